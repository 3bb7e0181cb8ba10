"""The kernel's row loop against another revision's, timed in C++ (no dispatcher, no Python).

``sparse_rows::accumulate`` (``sparse_lightning/kernels/csrc/sparse_rows.h``) streams the kept
rows of a transposed weight into a row of sums; the op splits the kept rows between its threads,
each summing its run into a partial row of its own. This benchmark compiles the loop of this
checkout and that of ``--against`` side by side into one extension and times both the same way:
two OpenMP threads, each a half of the kept rows into a fresh partial row, the partial rows then
added; every projection shape of SmolLM2-135M and Qwen2.5-Coder-0.5B in the kernel's layout
(padded rows), enough copies to stream ``--stream-mb`` MB per pass (beyond the last-level
cache), with 0%, 25% and 50% of each copy's rows dropped at random. It times what the op
spends streaming rows and nothing around it (finding the kept channels, the dispatcher, the
graph), which ``kernel_speed.py`` and ``kernel_rows.py`` include.

Beside the two loops, three ceilings on the same rows in the same passes: this loop with one
parallel region around the whole pass instead of one per copy (no thread start or join per
call), and plain reads of the kept rows (an OR per load, no arithmetic, sixteen rows at a time
as the loop reads them) with a region per copy and with one. ``ceiling_share``: the fastest of
these five ways to read the kept rows against the fastest to read them all, as a share of the
byte bound; what this host's memory leaves any loop over scattered rows, whose 50% share in
``kernel_speed.py`` is reckoned against the kernel's own 0%. Passes alternate between the
variants and the levels; figures are medians.

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
#: What each pass times (the C++ ``timed``'s kind, and whether a parallel region starts per
#: copy): the two loops as the op runs them, then, as ceilings, this loop and plain reads of the
#: same rows without a region per copy, and plain reads with one.
VARIANTS = {
    "against": (0, True),
    "this": (1, True),
    "this_one_region": (1, False),
    "reads": (2, True),
    "reads_one_region": (2, False),
}

LOOP = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include "sparse_rows_against.h"
#include "sparse_rows.h"

// Plain reads of rows k[lo:hi] of a weight (only the bytes the loop reads, rounded up to whole
// cache lines), sixteen rows at a time line by line as the loop streams them, one OR per load:
// how fast this host delivers those rows with no arithmetic at all.
inline uint64_t read_rows(const char* w, int64_t stride, int64_t bytes, const int64_t* k,
                          int64_t lo, int64_t hi) {
  const int64_t lines = (bytes + 63) / 64;
#if defined(__AVX2__)
  __m256i acc = _mm256_setzero_si256();
  const auto line = [&](const char* p) {
    acc = _mm256_or_si256(acc, _mm256_load_si256(reinterpret_cast<const __m256i*>(p)));
    acc = _mm256_or_si256(acc, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 32)));
  };
#else
  uint64_t acc = 0;
  const auto line = [&](const char* p) {
    for (int j = 0; j < 8; ++j) acc |= reinterpret_cast<const uint64_t*>(p)[j];
  };
#endif
  int64_t r = lo;
  for (; r + 16 <= hi; r += 16) {
    const char* rows[16];
    for (int j = 0; j < 16; ++j) rows[j] = w + k[r + j] * stride;
    for (int64_t l = 0; l < lines; ++l)
      for (int j = 0; j < 16; ++j) line(rows[j] + 64 * l);
  }
  for (; r < hi; ++r)
    for (int64_t l = 0; l < lines; ++l) line(w + k[r] * stride + 64 * l);
#if defined(__AVX2__)
  return _mm256_extract_epi64(acc, 0) | _mm256_extract_epi64(acc, 3);
#else
  return acc;
#endif
}

volatile uint64_t observed;

// Seconds per copy: Kind 0 the --against loop, 1 this checkout's, 2 plain reads; each of two
// threads takes half of a copy's kept rows. PerCall: a parallel region per copy, as the op
// starts one per call (the loops' partial rows then added); else one region around the pass,
// each thread going on to its half of the next copy without waiting for the other.
template <int Kind, bool PerCall, typename W>
double timed(const std::vector<torch::Tensor>& ws, const std::vector<torch::Tensor>& kept,
             int64_t out) {
  std::vector<float> first(out), second(out), value(1 << 16, 0.5f);
  uint64_t sink = 0;
  const auto half = [&](size_t i, int t) {
    const W* w = reinterpret_cast<const W*>(ws[i].data_ptr());
    const int64_t ld = ws[i].stride(0), n = kept[i].numel();
    const int64_t* index = kept[i].data_ptr<int64_t>();
    float* acc = t == 0 ? first.data() : second.data();
    const int64_t lo = n * t / 2, hi = n * (t + 1) / 2;
    if constexpr (Kind == 0) {
      sparse_rows_against::accumulate<float, W>(acc, w, ld, index, value.data(), lo, hi, out,
                                                true);
    } else if constexpr (Kind == 1) {
      sparse_rows::accumulate<float, W>(acc, w, ld, index, value.data(), lo, hi, out, true);
    } else {
      return read_rows(reinterpret_cast<const char*>(w), ld * sizeof(W), out * sizeof(W),
                       index, lo, hi);
    }
    return uint64_t(0);
  };
  const auto start = std::chrono::steady_clock::now();
  if constexpr (PerCall) {
    for (size_t i = 0; i < ws.size(); ++i) {
#pragma omp parallel num_threads(2) reduction(| : sink)
      sink |= half(i, omp_get_thread_num());
      if constexpr (Kind != 2) {
        for (int64_t c = 0; c < out; ++c) first[c] += second[c];
      }
    }
  } else {
#pragma omp parallel num_threads(2) reduction(| : sink)
    for (size_t i = 0; i < ws.size(); ++i) sink |= half(i, omp_get_thread_num());
  }
  const std::chrono::duration<double> spent = std::chrono::steady_clock::now() - start;
  observed = sink;  // so the plain reads cannot be optimized away
  return spent.count() / ws.size();
}

template <int Kind, typename W>
double timed_as(bool per_call, const std::vector<torch::Tensor>& ws,
                const std::vector<torch::Tensor>& kept, int64_t out) {
  return per_call ? timed<Kind, true, W>(ws, kept, out) : timed<Kind, false, W>(ws, kept, out);
}

template <typename W>
double timed_as(int64_t kind, bool per_call, const std::vector<torch::Tensor>& ws,
                const std::vector<torch::Tensor>& kept, int64_t out) {
  if (kind == 0) return timed_as<0, W>(per_call, ws, kept, out);
  if (kind == 1) return timed_as<1, W>(per_call, ws, kept, out);
  return timed_as<2, W>(per_call, ws, kept, out);
}

double loop_seconds(std::vector<torch::Tensor> ws, std::vector<torch::Tensor> kept, int64_t out,
                    int64_t kind, bool per_call) {
  if (ws[0].scalar_type() == at::kBFloat16) {
    return timed_as<c10::BFloat16>(kind, per_call, ws, kept, out);
  }
  return timed_as<float>(kind, per_call, ws, kept, out);
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
            keys = [(variant, level) for variant in VARIANTS for level in LEVELS]
            times: dict[tuple[str, float], list[float]] = {key: [] for key in keys}
            for repeat in range(args.repeats):
                for variant, level in keys if repeat % 2 == 0 else keys[::-1]:
                    kind, per_call = VARIANTS[variant]
                    seconds = extension.loop_seconds(ws, kept[level], fan_out, kind, per_call)
                    times[(variant, level)].append(seconds)
            median = {key: statistics.median(value) for key, value in times.items()}
            row = {"model": model, "projection": name, "in": fan_in, "out": fan_out}
            cells = []
            for variant in VARIANTS:
                label = args.against if variant == "against" else variant
                t0 = median[(variant, 0.0)]
                row[label] = {
                    "us": {str(level): median[(variant, level)] * 1e6 for level in LEVELS},
                    "gb_per_s_at_0": fan_in * fan_out * dtype.itemsize / t0 / 1e9,
                    "share_of_bound": {
                        str(level): t0 * (1 - level) / median[(variant, level)]
                        for level in LEVELS[1:]
                    },
                }
                shares = "/".join(f"{v:.0%}" for v in row[label]["share_of_bound"].values())
                cells.append(f"{label} {row[label]['gb_per_s_at_0']:4.1f} GB/s {shares}")
            # The fastest of all the ways here to read the kept rows against the fastest to read
            # every row: what share of the bound this host leaves any loop over these rows.
            fastest = {level: min(median[(v, level)] for v in VARIANTS) for level in LEVELS}
            row["ceiling_share"] = {
                str(level): fastest[0.0] * (1 - level) / fastest[level] for level in LEVELS[1:]
            }
            cells.append("ceiling " + "/".join(f"{v:.0%}" for v in row["ceiling_share"].values()))
            row["speedup"] = {
                str(level): median[("against", level)] / median[("this", level)] for level in LEVELS
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
