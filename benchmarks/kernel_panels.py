"""The kernel's row layout against the panel layout of Inductor's dense GEMV.

Inductor's tuned dense GEMV (``CPU_DECODE_OPTIONS``) packs each weight in panels of 48
output columns, ``(out/48, in, 48)``, and each thread streams its half of the panels front
to back: one sequential stream per thread. The input-sparse kernel reads the transposed
weight ``(in, out)`` one row per kept input channel, sixteen rows at a time. On this project's
Zen 4 machine the kernel at 0% skipped trails the dense GEMV by 1-9% and more when the
machine's memory runs fast (docs/performance.md). This benchmark asks whether the kernel
should adopt the panel layout: on every projection shape of both models, weights streamed
from memory (256 MB of copies, each with its own input), one C++ loop per pass (no dispatcher
between calls; ``benchmarks/csrc/panel_gemv.cpp``), it times

* ``inductor``: ``F.linear`` compiled with ``CPU_DECODE_OPTIONS`` (one graph over all copies,
  so its figure carries one graph call's overhead per pass, a few us per copy);
* ``rows``: the shipped kernel through its C entry point, at 0% and 50% skipped;
* ``panels``: the panel layout (48 columns, 64 where 48 does not split the output evenly
  between two threads) read front to back, every row (Inductor's access pattern);
* ``panels, indexed``: the same layout reading only the kept channels' pieces (P floats each)
  through the list of kept channels, at 0% and 50%.

The variants alternate within each repetition; figures are medians of per-repetition ratios.
Share of bound = ``t(0%) / (t(50%) * bound)``, bound = channels / kept channels.

    python benchmarks/kernel_panels.py [--repeats 15] [--stream-mb 256]

Prints a table and writes benchmarks/results/kernel_panels.json.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kernel_speed import (  # noqa: E402
    MODELS,
    DenseProjections,
    executor_layout,
    inputs_keeping,
    projection_shapes,
    save_stream_report,
    stream_arguments,
    streamed_copies,
    tuned,
)

SOURCE = ROOT / "benchmarks" / "csrc" / "panel_gemv.cpp"


def panel_width(out_features: int, threads: int = 2) -> int:
    """48 (Inductor's) where it splits the output into whole panels evenly between the
    threads, else 64."""
    return 48 if out_features % (48 * threads) == 0 else 64


def pack(weight: torch.Tensor, width: int) -> torch.Tensor:
    """(out, in) -> (out/width, in, width): Inductor's panel layout for a batch-1 GEMV."""
    out, fan_in = weight.shape
    return weight.t().reshape(fan_in, out // width, width).permute(1, 0, 2).contiguous()


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


def main() -> None:
    args = stream_arguments(__doc__, "kernel_panels")
    from torch.utils.cpp_extension import load as load_extension

    ext = load_extension(
        name="sparse_lightning_bench_panels",
        sources=[str(SOURCE)],
        extra_include_paths=[str(ROOT / "sparse_lightning" / "kernels" / "csrc")],  # sparse_rows.h
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )
    rows, started = [], time.time()
    for model, *dims in MODELS:
        for name, (fan_in, fan_out) in projection_shapes(*dims).items():
            weights, xs = streamed_copies(fan_in, fan_out, args.stream_mb)
            copies = len(weights)
            half = inputs_keeping(xs, 0.5)  # threshold 1.0 keeps exactly half of each
            width = panel_width(fan_out)
            weights_t = executor_layout(weights)
            packed = [pack(w, width) for w in weights]
            ys = [torch.empty(1, fan_out) for _ in range(copies)]
            torch._dynamo.reset()
            inductor = tuned(DenseProjections(weights), xs)
            # Each variant's output against F.linear on the kept channels: a wrong layout or
            # index would otherwise time fast garbage.
            for x, t, how, ws in (
                (xs, 0.0, "rows", weights_t),
                (half, 1.0, "rows", weights_t),
                (xs, 0.0, "panels", packed),
                (half, 1.0, "panels_indexed", packed),
            ):
                got = ext.timed_pass(x[:2], ws[:2], t, how, ys[:2])
                for xi, wi, yi in zip(x[:2], weights[:2], got, strict=True):
                    want = F.linear(xi * (xi.abs() >= t), wi)
                    torch.testing.assert_close(yi, want, rtol=1e-4, atol=1e-4)
            del weights
            run = ext.timed_pass
            calls = {
                "inductor": inductor,
                "rows 0%": partial(run, xs, weights_t, 0.0, "rows", ys),
                "rows 50%": partial(run, half, weights_t, 1.0, "rows", ys),
                "panels": partial(run, xs, packed, 0.0, "panels", ys),
                "indexed 0%": partial(run, xs, packed, 0.0, "panels_indexed", ys),
                "indexed 50%": partial(run, half, packed, 1.0, "panels_indexed", ys),
            }
            order = list(calls)
            t: dict[str, list[float]] = {k: [] for k in order}
            for call in calls.values():
                call()
            for r in range(args.repeats):
                for key in order if r % 2 == 0 else order[::-1]:
                    start = time.perf_counter()
                    calls[key]()
                    t[key].append(time.perf_counter() - start)
            gb = fan_in * fan_out * 4 * copies / 2**30
            bound = fan_in / int((half[0].abs() >= 1.0).sum())
            row = {
                "model": model,
                "projection": name,
                "in_features": fan_in,
                "out_features": fan_out,
                "panel_width": width,
                "copies_streamed": copies,
                "gb_s": {k: gb / statistics.median(v) for k, v in t.items()},
                "vs_inductor": {
                    k: median_ratio(t["inductor"], t[k])
                    for k in ("rows 0%", "panels", "indexed 0%")
                },
                "byte_bound_50": bound,
                "share_of_bound_50": {
                    "rows": median_ratio(t["rows 0%"], t["rows 50%"]) / bound,
                    "panels, indexed": median_ratio(t["indexed 0%"], t["indexed 50%"]) / bound,
                },
            }
            rows.append(row)
            v, s = row["vs_inductor"], row["share_of_bound_50"]
            print(
                f"{model[:10]:10s} {name:8s} {fan_in:5d}x{fan_out:<5d} P={width} inductor "
                f"{row['gb_s']['inductor']:4.1f} GB/s | vs inductor at 0%: rows "
                f"{v['rows 0%']:.2f}, panels {v['panels']:.2f}, indexed {v['indexed 0%']:.2f} | "
                f"50% share of bound: rows {s['rows']:.0%}, indexed {s['panels, indexed']:.0%}",
                flush=True,
            )
    save_stream_report("kernel_panels", args, started, rows)


if __name__ == "__main__":
    main()
