"""Why the kernel falls short of the byte bound on narrow rows: neighbouring rows share pages.

The input-sparse kernel reads one row of the transposed weight per kept input channel. A
skipped channel's row is never read by the code, yet on the narrow projections (rows of
2.3-4.6 KB) a skipped row was measured to cost about a quarter of a kept one. The hypothesis:
the hardware prefetcher, streaming a kept row, runs on past its end into the next row (skipped)
while it stays in the same 4 KB page. Test: the same kernel on the same weights laid out with
every row starting a page of its own (row stride rounded up to 4 KB, which costs memory), so
no prefetch can cross into a neighbour. If the hypothesis holds, the padded layout's share of
the byte bound at 50% and 75% skipped is higher.

Eager calls of ``sparse_lightning::input_sparse_linear`` (no compiled loop around them), enough
copies to stream 256 MB per repetition, the two layouts alternating, median of the repetitions;
share of bound = ``t0 / (t_skipped * bound)``, bound = channels / kept channels, each layout
against its own 0%.

    python benchmarks/kernel_layout.py [--repeats 9] [--threads 2]

Prints a table and writes benchmarks/results/kernel_layout.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import save_report  # noqa: E402
from sparse_lightning.kernels import load  # noqa: E402

#: (model, projection) -> (in_features, out_features): the narrow ones (row-split threads).
SHAPES = {
    ("SmolLM2-135M-Instruct", "o"): (576, 576),
    ("SmolLM2-135M-Instruct", "down"): (1536, 576),
    ("Qwen2.5-Coder-0.5B-Instruct", "q|k|v"): (896, 1152),
    ("Qwen2.5-Coder-0.5B-Instruct", "o"): (896, 896),
    ("Qwen2.5-Coder-0.5B-Instruct", "down"): (4864, 896),
}
SKIPPED = (0.0, 0.5, 0.75)
PAGE = 4096


def weights(rows: int, cols: int, paged: bool, copies: int) -> list[torch.Tensor]:
    """``copies`` random (rows, cols) float32 weights; ``paged``: each row starts a page."""
    out = []
    for _ in range(copies):
        if not paged:
            out.append(torch.randn(rows, cols))
            continue
        stride = -(-cols * 4 // PAGE) * PAGE // 4
        base = torch.empty(rows * stride + PAGE // 4)
        offset = (-base.data_ptr() // 4) % (PAGE // 4)
        out.append(base[offset : offset + rows * stride].view(rows, stride)[:, :cols].normal_())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--stream-mb", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kernel_layout.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load()
    op = torch.ops.sparse_lightning.input_sparse_linear
    torch.manual_seed(0)
    started = time.time()
    rows = []
    for (model, projection), (inputs, outputs) in SHAPES.items():
        copies = max(4, args.stream_mb * 2**20 // (inputs * outputs * 4))
        xs = [torch.randn(1, inputs) for _ in range(copies)]
        layouts = {paged: weights(inputs, outputs, paged, copies) for paged in (False, True)}
        times: dict[tuple[bool, float], list[float]] = {}
        for skipped in SKIPPED:
            thresholds = [float(x.abs().quantile(skipped)) if skipped else 0.0 for x in xs]
            for _ in range(args.repeats):
                for paged, ws in layouts.items():  # alternating
                    start = time.perf_counter()
                    for x, w, t in zip(xs, ws, thresholds, strict=True):
                        op(x, w, t, None)
                    elapsed = (time.perf_counter() - start) / copies
                    times.setdefault((paged, skipped), []).append(elapsed)
        for paged in (False, True):
            t0 = statistics.median(times[(paged, 0.0)])
            row = {
                "model": model,
                "projection": projection,
                "in_features": inputs,
                "out_features": outputs,
                "paged_rows": paged,
                "copies": copies,
                "kernel0_us": t0 * 1e6,
            }
            for skipped in SKIPPED[1:]:
                t = statistics.median(times[(paged, skipped)])
                row[f"kernel{int(skipped * 100)}_us"] = t * 1e6
                row[f"share_of_bound_{int(skipped * 100)}"] = t0 / (t / (1 - skipped))
            rows.append(row)
            print(
                f"{model[:7]:8} {projection:6} {'paged' if paged else 'packed':6} "
                f"0%: {row['kernel0_us']:7.1f} us   50%: {row['kernel50_us']:7.1f} us "
                f"({row['share_of_bound_50']:.0%} of bound)   75%: {row['kernel75_us']:7.1f} us "
                f"({row['share_of_bound_75']:.0%})",
                flush=True,
            )
        del layouts
    save_report(
        {
            "benchmark": "kernel_layout",
            "threads": args.threads,
            "repeats": args.repeats,
            "stream_mb": args.stream_mb,
            "seconds": time.time() - started,
            "results": rows,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
