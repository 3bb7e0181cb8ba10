"""The input-sparse kernel against the tuned dense GEMV, on every projection shape of both models.

For each projection group of SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct at batch-1
decode (q|k|v and gate|up fused, as the tuned decode fuses them; o; down), with weights
streamed from memory as in a decode step (enough copies of random float32 weights, each with
its own input, to exceed the last-level cache several times over):

* ``dense``: ``F.linear`` compiled with the tuned decode's Inductor options
  (``benchmarks.common.CPU_DECODE_OPTIONS``: frozen weights, max-autotune CPP GEMM): the best
  dense GEMV we have;
* ``kernel 0%``: ``sparse_lightning::input_sparse_linear`` over the transposed weights with
  threshold 0 (every channel kept), compiled the same way (an extern call per projection);
* ``kernel 50%`` (and 25%, 75%): thresholds that keep exactly that share of each input's
  channels.

Both sides alternate within each repetition; each figure is the median of per-repetition ratios.
The graphs are called without Dynamo, as the tuned decode calls its steps (``tuned``).
Targets: kernel 0% at least as fast as dense; kernel 50% at >= 90% of the byte bound against
the kernel's own 0% (bound = channels / kept channels).

Where a call's time goes, the same op on the same copies is also called from a C++ loop
through the dispatcher (no graph, no Python; ``cpp_us`` and ``share_of_bound_cpp`` per level),
and keeping no channel at all (``empty_call_us``: what a call costs besides its rows). The
graph's extra time per call over the loop is the graph's own: among other things, its inputs
(every copy's weight and input) and outputs pass through Python on each call of the graph, so
once per copy here, as a decode step passes each weight once per step; and the loop's clock
starts after pybind has converted the lists, which brings every copy's tensor metadata into
cache, where the graph reads it cold after the other passes' streams (1-4 us a call of
SmolLM2's o and q|k|v in float32, 2026-12-07, docs/kernel_tries.md). The C++ loop reads
the same copies level after level: on a host whose last-level cache holds a good part of
``--stream-mb``, take a larger one (``--cpp-only`` skips the graphs, which take minutes each to
compile at several hundred MB).

    python benchmarks/kernel_speed.py [--repeats 15] [--stream-mb 256] [--dtype bfloat16]
        [--cpp-only]

Prints a table and writes benchmarks/results/kernel_speed.json (``kernel_speed_bfloat16.json``
with ``--dtype bfloat16``: weights, inputs and both sides in that type).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    DTYPES,
    decode_options,
    decode_options_record,
    own_code,
    paired_ratio,
    results_path,
    save_report,
    without_dynamo,
)
from sparse_lightning.kernels import compiled, load, transposed_rows  # noqa: E402

#: (model, hidden, MLP width, query heads, KV heads, head_dim), from the models' configs.
MODELS = (
    ("SmolLM2-135M-Instruct", 576, 1536, 9, 3, 64),
    ("Qwen2.5-Coder-0.5B-Instruct", 896, 4864, 14, 2, 64),
)
SKIPPED = (0.25, 0.5, 0.75)


def projection_shapes(hidden: int, mlp: int, heads: int, kv: int, hd: int) -> dict:
    """(in_features, out_features) of each projection group at decode, fused as in the
    tuned decode (Inductor's concat-linear fuses q|k|v and gate|up)."""
    return {
        "q|k|v": (hidden, (heads + 2 * kv) * hd),
        "gate|up": (hidden, 2 * mlp),
        "o": (heads * hd, hidden),
        "down": (mlp, hidden),
    }


class DenseProjections(nn.Module):
    """``copies`` projections of one shape, each applied to its own input."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in weights)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [F.linear(x, w) for x, w in zip(xs, self.weights, strict=True)]


def executor_layout(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each (out, in) weight stored as the sparse executor stores it: transposed, rows padded
    (:func:`~sparse_lightning.kernels.transposed_rows`), a copy of its own."""
    return [transposed_rows([w.t()]) for w in weights]


class SparseProjections(nn.Module):
    """The same projections through the input-sparse op, weights stored transposed."""

    def __init__(self, weights: list[torch.Tensor], threshold: float) -> None:
        super().__init__()
        self.weights_t = executor_layout(weights)
        self.threshold = threshold
        self.op = load()

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            self.op(x, w, self.threshold, None) for x, w in zip(xs, self.weights_t, strict=True)
        ]


def tuned(module: nn.Module, xs: list[torch.Tensor]) -> Callable[..., list[torch.Tensor]]:
    """``module`` compiled with the tuned decode's options; the first call (here) compiles.

    The returned ``run(inputs=xs)`` (the outputs) calls the compiled code without Dynamo, as the
    tuned decode calls its steps (:func:`~benchmarks.common.without_dynamo`; checked here to give
    the same outputs): Dynamo's frame hook and guards over every copy's input and weight cost
    2-5 us per copy (SmolLM2's o in bfloat16, 2026-12-07, on both sides), where a decode step
    pays them once per step, not per projection. Nor can it recompile: a recompile would run
    outside ``CPU_DECODE_OPTIONS`` and time a default-compiled graph instead. Each module
    compiles through a code object of its own (``own_code``), so no ``torch._dynamo.reset()``
    is needed between modules; a reset would drop the entries of the modules compiled before it,
    which then recompile with default options on their next call (measured 2026-11-24: the
    tuned dense GEMV of SmolLM2's o went from 66 to 102 us per call that way, and every run of
    this script before the fix compared against such recompiled graphs).
    """
    from torch._inductor import config as inductor_config

    step = torch.compile(own_code(type(module).forward), dynamic=False)
    with torch.no_grad(), inductor_config.patch(decode_options()):
        expected = step(module, xs)
    direct = without_dynamo(step)
    with torch.no_grad():
        if direct is step or not all(map(torch.equal, direct(module, xs), expected)):
            raise RuntimeError(
                "The compiled projections called without Dynamo gave other outputs, or could "
                "not be had: benchmarks.common.without_dynamo does not fit this torch."
            )

    def run(inputs: list[torch.Tensor] = xs) -> list[torch.Tensor]:
        with torch.no_grad():
            return direct(module, inputs)

    return run


def streamed_copies(
    fan_in: int, fan_out: int, stream_mb: float, dtype: torch.dtype = torch.float32
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Enough seeded random (fan_out, fan_in) weights of ``dtype`` to stream ``stream_mb`` MB
    (at least 4), each with its own (1, fan_in) input: every call then reads its weight from
    memory."""
    size = torch.finfo(dtype).bits // 8
    copies = max(4, int(stream_mb * 2**20 // (fan_in * fan_out * size)))
    g = torch.Generator().manual_seed(fan_in * fan_out)
    weights = [
        (torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5).to(dtype) for _ in range(copies)
    ]
    return weights, [torch.randn(1, fan_in, generator=g).to(dtype) for _ in range(copies)]


def inputs_keeping(xs: list[torch.Tensor], skipped: float) -> list[torch.Tensor]:
    """Inputs scaled so that threshold 1.0 keeps exactly ``1 - skipped`` of each one's
    channels."""
    channels = xs[0].shape[-1]
    drop = round(skipped * channels)
    out = []
    for x in xs:
        order = x.abs().flatten().sort().values
        # Rescale so that the (drop)-th smallest magnitude lands just above 1.0: exactly
        # ``drop`` channels fall below threshold 1.0 (and none ties with it).
        edge = (order[drop - 1] + order[drop]) / 2 if drop else order[0] / 2
        out.append(x / edge)
    return out


#: A C++ loop calling the op on each copy through the dispatcher (unboxed, as a C++ caller would).
CALLS = r"""
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <chrono>

double calls_seconds(const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& ws,
                     double threshold) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sparse_lightning::input_sparse_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double,
                            const std::optional<at::Tensor>&)>();
  const auto start = std::chrono::steady_clock::now();
  for (size_t i = 0; i < ws.size(); ++i) {
    op.call(xs[i], ws[i], threshold, std::nullopt);
  }
  const std::chrono::duration<double> spent = std::chrono::steady_clock::now() - start;
  return spent.count();
}
"""


def cpp_calls() -> Callable[..., float]:
    """``calls_seconds(xs, weights_t, threshold)``: seconds for the op's calls from C++."""
    from torch.utils.cpp_extension import load_inline

    return load_inline(
        "kernel_speed_calls", cpp_sources=CALLS, functions=["calls_seconds"], verbose=False
    ).calls_seconds


def cpp_medians(
    calls: Callable[..., float], weights_t: list[torch.Tensor], inputs: dict, repeats: int
) -> dict:
    """Median seconds per call of the op from C++ for each entry of ``inputs`` (name: the
    copies' inputs; all at threshold 1.0), the entries alternating within each repetition."""
    times: dict[str, list[float]] = {name: [] for name in inputs}
    for _ in range(repeats):
        for name, xs in inputs.items():
            times[name].append(calls(xs, weights_t, 1.0) / len(weights_t))
    return {name: statistics.median(values) for name, values in times.items()}


def stream_arguments(
    doc: str, benchmark: str, dtypes: bool = False, cpp_only: bool = False
) -> argparse.Namespace:
    """The command line of a streamed-weights kernel benchmark: --repeats, --stream-mb, --out
    (default ``benchmarks/results/<benchmark>.json``) and, with ``dtypes``, --dtype (the
    default out then ``<benchmark>_<dtype>.json`` for another type) and, with ``cpp_only``,
    --cpp-only; fails early without the kernel."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--stream-mb", type=float, default=256.0)
    parser.add_argument("--out", type=Path, default=None)
    if dtypes:
        parser.add_argument("--dtype", choices=DTYPES, default="float32")
    if cpp_only:
        parser.add_argument(
            "--cpp-only",
            action="store_true",
            help="time only the op's calls from C++ (no compiled graphs: those take minutes "
            "each to compile at a --stream-mb of several hundred)",
        )
    args = parser.parse_args()
    dtype = getattr(args, "dtype", "float32")
    args.out = args.out or results_path(benchmark, dtype=dtype)
    args.dtype = getattr(torch, dtype)
    assert compiled(), "the kernel did not build (see the warning): nothing to measure"
    return args


def save_stream_report(
    benchmark: str, args: argparse.Namespace, started: float, rows: list[dict]
) -> None:
    """Saves the rows of a streamed-weights kernel benchmark with its settings."""
    report = {
        "benchmark": benchmark,
        "dtype": str(args.dtype).removeprefix("torch."),
        "repeats": args.repeats,
        "stream_mb": args.stream_mb,
        "compile_options": decode_options_record(),
        "seconds": round(time.time() - started),
        "results": rows,
    }
    save_report(report, args.out)


def graph_timings(
    row: dict, weights: list[torch.Tensor], xs: list[torch.Tensor], levels: dict, repeats: int
) -> None:
    """Adds to ``row`` the compiled graphs' timings: dense against the kernel at 0%, then the
    kernel at each skipped level against its 0%."""
    copies, size = len(weights), weights[0].numel() * weights[0].element_size() / 2**30
    torch._dynamo.reset()  # the previous shape's graphs (and weight copies) go
    dense = tuned(DenseProjections(weights), xs)
    kernel0 = tuned(SparseProjections(weights, 0.0), xs)
    sparse = tuned(SparseProjections(weights, 1.0), xs)  # see inputs_keeping
    vs_dense, dense_s, k0_s = paired_ratio(dense, kernel0, repeats)
    row.update(
        dense_us=dense_s / copies * 1e6,
        kernel0_us=k0_s / copies * 1e6,
        dense_gb_s=size * copies / dense_s,
        kernel0_gb_s=size * copies / k0_s,
        kernel0_speedup_vs_dense=vs_dense,
    )
    for key, entry in row["skipped"].items():
        speedup, _, sparse_s = paired_ratio(
            partial(kernel0, levels[key]), partial(sparse, levels[key]), repeats
        )
        entry.update(
            kernel_us=sparse_s / copies * 1e6,
            speedup_vs_kernel0=speedup,
            share_of_bound=speedup / entry["byte_bound"],
        )


def main() -> None:
    args = stream_arguments(__doc__, "kernel_speed", dtypes=True, cpp_only=True)
    calls = cpp_calls()
    rows = []
    started = time.time()
    for model, *dims in MODELS:
        for name, (fan_in, fan_out) in projection_shapes(*dims).items():
            weights, xs = streamed_copies(fan_in, fan_out, args.stream_mb, args.dtype)
            levels = {f"{s:.2f}": inputs_keeping(xs, s) for s in (0.0, *SKIPPED)}
            levels["empty"] = [torch.zeros_like(x) for x in xs]  # keeps no channel
            weights_t = executor_layout(weights)
            cpp = cpp_medians(calls, weights_t, levels, args.repeats)
            del weights_t
            row = {
                "model": model,
                "projection": name,
                "in_features": fan_in,
                "out_features": fan_out,
                "copies_streamed": len(weights),
                "cpp_kernel0_us": cpp["0.00"] * 1e6,
                "empty_call_us": cpp["empty"] * 1e6,
                "skipped": {},
            }
            for skipped in SKIPPED:
                key = f"{skipped:.2f}"
                kept = int((levels[key][0].abs() >= 1.0).sum())
                row["skipped"][key] = {
                    "kept_channels": kept,
                    "byte_bound": fan_in / kept,
                    "cpp_us": cpp[key] * 1e6,
                    "share_of_bound_cpp": cpp["0.00"] / cpp[key] / (fan_in / kept),
                }
            half = row["skipped"]["0.50"]
            line = (
                f"{model:28s} {name:8s} {fan_in:5d}x{fan_out:<5d} from C++: 0% "
                f"{row['cpp_kernel0_us']:6.1f} us, 50% {half['share_of_bound_cpp']:.0%} of bound "
                f"{half['byte_bound']:.2f}x, empty call {row['empty_call_us']:.1f} us"
            )
            if not args.cpp_only:
                graph_timings(row, weights, xs, levels, args.repeats)
                line += (
                    f" | graphs: dense {row['dense_us']:7.1f} us ({row['dense_gb_s']:4.1f} GB/s), "
                    f"kernel 0% {row['kernel0_us']:7.1f} us ({row['kernel0_gb_s']:4.1f} GB/s, "
                    f"{row['kernel0_speedup_vs_dense']:.2f}x dense), 50% "
                    f"{half['speedup_vs_kernel0']:.2f}x ({half['share_of_bound']:.0%} of bound)"
                )
            rows.append(row)
            print(line, flush=True)
    save_stream_report("kernel_speed", args, started, rows)


if __name__ == "__main__":
    main()
