"""The kernel's row loop against another revision's, timed in C++ (no dispatcher, no Python).

``sparse_rows::accumulate`` (``sparse_lightning/kernels/csrc/sparse_rows.h``) streams the kept
rows of a transposed weight into a row of sums; the op splits the kept rows between its threads,
each summing its run into a partial row of its own. This benchmark compiles the loop of this
checkout and that of ``--against`` side by side into one extension and times both the same way:
two OpenMP threads, each a half of the kept rows into a fresh partial row, the partial rows then
added; every projection shape of SmolLM2-135M and Qwen2.5-Coder-0.5B in the kernel's layout
(padded rows), enough copies to stream ``--stream-mb`` MB per pass (beyond the last-level
cache), with 0%, 25% and 50% of each copy's rows dropped at random. Passes alternate between
the two loops and the levels; figures are medians. It times what the op spends streaming rows
and nothing around it (finding the kept channels, the dispatcher, the graph), which
``kernel_speed.py`` and ``kernel_rows.py`` include.

    python benchmarks/kernel_loop.py [--against REV] [--dtype bfloat16] [--repeats 11]
        [--stream-mb 768]

Prints a table and writes benchmarks/results/kernel_loop[_bfloat16].json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import DTYPES, results_path, save_report  # noqa: E402
from benchmarks.kernel_rows import file_at  # noqa: E402
from benchmarks.kernel_speed import MODELS, projection_shapes  # noqa: E402
from sparse_lightning.kernels.layout import row_stride  # noqa: E402
from sparse_lightning.kernels.ops import SOURCE, build_flags  # noqa: E402

#: The revision before two-byte rows were prefetched (2026-12-07).
BEFORE_PREFETCH = "072abf3"
LEVELS = (0.0, 0.25, 0.5)

LOOP = r"""
#include <torch/extension.h>
#include <omp.h>
#include <chrono>
#include "sparse_rows_against.h"
#include "sparse_rows.h"

template <bool Against, typename W>
double timed(const std::vector<torch::Tensor>& ws, const std::vector<torch::Tensor>& kept,
             int64_t out) {
  std::vector<float> first(out), second(out), value(1 << 16, 0.5f);
  const auto start = std::chrono::steady_clock::now();
  for (size_t i = 0; i < ws.size(); ++i) {
    const W* w = reinterpret_cast<const W*>(ws[i].data_ptr());
    const int64_t ld = ws[i].stride(0), n = kept[i].numel();
    const int64_t* index = kept[i].data_ptr<int64_t>();
#pragma omp parallel num_threads(2)
    {
      const int t = omp_get_thread_num();
      float* acc = t == 0 ? first.data() : second.data();
      const int64_t lo = n * t / 2, hi = n * (t + 1) / 2;
      if constexpr (Against) {
        sparse_rows_against::accumulate<float, W>(acc, w, ld, index, value.data(), lo, hi, out,
                                                  true);
      } else {
        sparse_rows::accumulate<float, W>(acc, w, ld, index, value.data(), lo, hi, out, true);
      }
    }
    for (int64_t c = 0; c < out; ++c) first[c] += second[c];
  }
  const std::chrono::duration<double> spent = std::chrono::steady_clock::now() - start;
  return spent.count() / ws.size();
}

double loop_seconds(std::vector<torch::Tensor> ws, std::vector<torch::Tensor> kept, int64_t out,
                    bool against) {
  if (ws[0].scalar_type() == at::kBFloat16) {
    return against ? timed<true, c10::BFloat16>(ws, kept, out)
                   : timed<false, c10::BFloat16>(ws, kept, out);
  }
  return against ? timed<true, float>(ws, kept, out) : timed<false, float>(ws, kept, out);
}
"""


def build(revision: str):
    """One extension with this checkout's loop and ``revision``'s (its header's namespace
    renamed, so both compile side by side)."""
    from torch.utils.cpp_extension import load_inline

    header = SOURCE.parent / "sparse_rows.h"
    against = file_at(revision, header)
    assert against is not None, f"{header.name} is not in revision {revision}"
    against = against.replace("namespace sparse_rows {", "namespace sparse_rows_against {")
    folder = Path(tempfile.mkdtemp())
    (folder / "sparse_rows_against.h").write_text(against)
    flags = build_flags()
    return load_inline(
        f"kernel_loop_{revision}",
        cpp_sources=LOOP,
        functions=["loop_seconds"],
        extra_include_paths=[str(header.parent), str(folder)],
        **flags,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default=BEFORE_PREFETCH)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--stream-mb", type=float, default=768.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    out = args.out or results_path("kernel_loop", dtype=args.dtype)
    extension = build(args.against)
    started = time.time()
    rows = []
    for model, *dims in MODELS:
        for name, (fan_in, fan_out) in projection_shapes(*dims).items():
            ld = row_stride(fan_out, dtype.itemsize)
            copies = max(4, int(args.stream_mb * 2**20 // (fan_in * ld * dtype.itemsize)))
            g = torch.Generator().manual_seed(fan_in * fan_out)
            ws = [torch.randn(fan_in, ld, generator=g).to(dtype) for _ in range(copies)]
            kept = {
                level: [
                    torch.randperm(fan_in, generator=g)[: fan_in - round(level * fan_in)]
                    .sort()
                    .values
                    for _ in range(copies)
                ]
                for level in LEVELS
            }
            keys = [(against, level) for against in (True, False) for level in LEVELS]
            times: dict[tuple[bool, float], list[float]] = {key: [] for key in keys}
            for repeat in range(args.repeats):
                for against, level in keys if repeat % 2 == 0 else keys[::-1]:
                    seconds = extension.loop_seconds(ws, kept[level], fan_out, against)
                    times[(against, level)].append(seconds)
            median = {key: statistics.median(value) for key, value in times.items()}
            row = {"model": model, "projection": name, "in": fan_in, "out": fan_out}
            cells = []
            for against, label in ((True, args.against), (False, "this")):
                t0 = median[(against, 0.0)]
                row[label] = {
                    "us": {str(level): median[(against, level)] * 1e6 for level in LEVELS},
                    "gb_per_s_at_0": fan_in * fan_out * dtype.itemsize / t0 / 1e9,
                    "share_of_bound": {
                        str(level): t0 * (1 - level) / median[(against, level)]
                        for level in LEVELS[1:]
                    },
                }
                shares = " ".join(f"{k}: {v:.0%}" for k, v in row[label]["share_of_bound"].items())
                cells.append(f"{label} {row[label]['gb_per_s_at_0']:4.1f} GB/s ({shares})")
            row["speedup"] = {
                str(level): median[(True, level)] / median[(False, level)] for level in LEVELS
            }
            speedups = " ".join(f"{k}: {v:.3f}" for k, v in row["speedup"].items())
            head = f"{model[:7]:8} {name:8} this / {args.against}: {speedups}"
            print(" | ".join([head, *cells]), flush=True)
            rows.append(row)
            del ws
    save_report(
        {
            "benchmark": "kernel_loop",
            "against": args.against,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "stream_mb": args.stream_mb,
            "seconds": round(time.time() - started),
            "results": rows,
        },
        out,
    )


if __name__ == "__main__":
    main()
