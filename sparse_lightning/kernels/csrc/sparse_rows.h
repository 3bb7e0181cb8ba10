// Helpers shared by the input-sparse kernels (input_sparse_linear.cpp, sparse_logits.cpp):
// streaming kept rows of a transposed weight, finding a token's kept channels, and its
// threshold. Inline functions in a named namespace, so both translation units share them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace sparse_rows {

// acc[0:n] += sum over j < R of v[j] * rows[j][0:n]: R rows streamed at once, so R memory
// streams are in flight and acc is loaded and stored once per R rows. The rows may be stored
// in a narrower type W than the sums (bfloat16 rows of an approximation, summed in float).
// With Fresh, acc = the sum: acc is written without being read (a first group).
template <int R, bool Fresh = false, typename T, typename W>
inline void axpy(T* acc, const W* const* rows, const T* v, int64_t n,
                 const W* const* /*next*/ = nullptr) {
  int64_t c = 0;
  for (; c < n; ++c) {
    T s = Fresh ? T(0) : acc[c];
    for (int j = 0; j < R; ++j) {
      s += v[j] * static_cast<T>(rows[j][c]);
    }
    acc[c] = s;
  }
}

#if defined(__AVX512F__)
// Sixteen weights as floats: loaded, or widened from bfloat16 (its bits are a float's top
// half) or from half (AVX-512F converts it).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#elif defined(__AVX2__) && defined(__FMA__)
// Eight weights as floats: loaded, or widened from bfloat16 (its bits are a float's top half)
// or from half (F16C, which every AVX2 CPU has; a scalar loop where it was not compiled in).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline __m256 load8(const c10::Half* p) {
#if defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  alignas(32) float f[8];
  for (int j = 0; j < 8; ++j) {
    f[j] = static_cast<float>(p[j]);
  }
  return _mm256_load_ps(f);
#endif
}
#endif

// Tensors of bfloat16 or half (x, a bias, y) are summed in float: their values are widened
// into a buffer of the sums' type, and each output row is summed in a buffer and rounded to
// its type once, as ATen's own matmul of those types does. Tensors of the sums' type itself
// are read and written in place.
template <typename T, typename W>
inline const T* widened(const W* p, int64_t n, T* buffer) {
  if constexpr (std::is_same_v<T, W>) {
    return p;
  } else {
    for (int64_t i = 0; i < n; ++i) {
      buffer[i] = static_cast<T>(p[i]);
    }
    return buffer;
  }
}

// Where an output row y of W is summed: y itself, or buffer (then narrowed into y).
template <typename T, typename W>
inline T* sums_of(W* y, T* buffer) {
  if constexpr (std::is_same_v<T, W>) {
    return y;
  } else {
    return buffer;
  }
}

// y[begin:end] = sums[begin:end] rounded to W (nothing when the sums are y itself).
template <typename T, typename W>
inline void narrowed(const T* sums, W* y, int64_t begin, int64_t end) {
  if constexpr (!std::is_same_v<T, W>) {
    for (int64_t c = begin; c < end; ++c) {
      y[c] = static_cast<W>(sums[c]);
    }
  }
}

// Whether the kernels take x, a weight and the bias as they are: on the CPU, the weight's rows
// contiguous, all three of one type the kernels handle (float, double, bfloat16, half; y is
// of it too). Otherwise the ops run the same math with ATen operators.
inline bool kernel_takes(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  const auto dtype = x.scalar_type();
  const bool handled = dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                       dtype == at::kHalf;
  return handled && weight.scalar_type() == dtype && weight.stride(1) == 1 &&
         x.device().is_cpu() && (!bias.has_value() || bias->scalar_type() == dtype);
}

// The kernels' types for a dtype that kernel_takes: T, the sums' type, and W, the type the
// tensors are stored in (float sums for bfloat16 and half). f is called with a tag of them:
//   with_types(dtype, [&](auto types) { using Ts = decltype(types); run<typename Ts::T,
//                                        typename Ts::W>(...); });
template <typename Sums, typename Stored = Sums>
struct Types {
  using T = Sums;
  using W = Stored;
};

template <typename F>
inline void with_types(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat) {
    f(Types<float>{});
  } else if (dtype == at::kBFloat16) {
    f(Types<float, c10::BFloat16>{});
  } else if (dtype == at::kHalf) {
    f(Types<float, c10::Half>{});
  } else {
    f(Types<double>{});
  }
}

// The threshold as ATen compares x of type W with it: rounded to W.
template <typename T, typename W>
inline T threshold_of(double threshold) {
  return static_cast<T>(static_cast<W>(static_cast<T>(threshold)));
}

// How far ahead of its loads a row is prefetched, in bytes (see axpy below).
constexpr int64_t kAheadBytes = 256;

// Two-byte rows with AVX-512: each row's line kAheadBytes ahead is prefetched as the row
// streams, and past the row's end the same offset into the row streamed after it (next: the
// R rows of the caller's next group), so no kept row starts cold and nothing is fetched past a
// row into a dropped neighbour. Measured 2026-12-07 on a Xeon (Emerald Rapids; both models'
// shapes, benchmarks/kernel_loop.py: a C++ loop over 768 MB of weights, two threads, each
// half of the kept rows): plain reads of the rows ran at 24-30 GB/s, this loop without the
// prefetch at 19-24; with it, bfloat16 rows 1.09-1.17x as fast with every row kept and
// 1.11-1.21x with half kept (prefetching within the row only gained about half of that at
// 50%). In SmolLM2's tuned bfloat16 decode at top-1 0.90, steps 1.13-1.16x as fast
// (docs/half_precision.md). Float rows (one load and one FMA per line) already streamed at
// 94-99% of the bound and lost 0-4%.
template <int R, bool Fresh = false, typename W>
inline void axpy(float* acc, const W* const* rows, const float* v, int64_t n,
                 const W* const* next = nullptr) {
  int64_t c = 0;
#if defined(__AVX512F__)
  // One cache line of each row per load; 32 registers hold sixteen rows' values.
  __m512 a[R];
  for (int j = 0; j < R; ++j) {
    a[j] = _mm512_set1_ps(v[j]);
  }
  if constexpr (sizeof(W) == 2) {
    // Two-byte rows: a cache line of each row is 32 columns, summed in two chains (against
    // one chain per 16 columns: 1.01-1.05x as fast on SmolLM2's shapes in bfloat16, eager
    // calls, 0% and 50% skipped, 2026-12-07).
    constexpr int64_t ahead = kAheadBytes / 2;
    for (; c + 32 <= n; c += 32) {
      __m512 s = Fresh ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + c);
      __m512 t = Fresh ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + c + 16);
      const bool within = c + ahead < n;
      for (int j = 0; j < R; ++j) {
        if (within) {
          _mm_prefetch(reinterpret_cast<const char*>(rows[j] + c + ahead), _MM_HINT_T0);
        } else if (next != nullptr) {
          _mm_prefetch(reinterpret_cast<const char*>(next[j] + (c + ahead - n)), _MM_HINT_T0);
        }
        s = _mm512_fmadd_ps(a[j], load16(rows[j] + c), s);
        t = _mm512_fmadd_ps(a[j], load16(rows[j] + c + 16), t);
      }
      _mm512_storeu_ps(acc + c, s);
      _mm512_storeu_ps(acc + c + 16, t);
    }
  }
  for (; c + 16 <= n; c += 16) {
    __m512 s = Fresh ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + c);
    for (int j = 0; j < R; ++j) {
      s = _mm512_fmadd_ps(a[j], load16(rows[j] + c), s);
    }
    _mm512_storeu_ps(acc + c, s);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 a[R];
  for (int j = 0; j < R; ++j) {
    a[j] = _mm256_set1_ps(v[j]);
  }
  for (; c + 16 <= n; c += 16) {
    __m256 s = Fresh ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + c);
    __m256 t = Fresh ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + c + 8);
    for (int j = 0; j < R; ++j) {
      s = _mm256_fmadd_ps(a[j], load8(rows[j] + c), s);
      t = _mm256_fmadd_ps(a[j], load8(rows[j] + c + 8), t);
    }
    _mm256_storeu_ps(acc + c, s);
    _mm256_storeu_ps(acc + c + 8, t);
  }
#endif
  for (; c < n; ++c) {
    float s = Fresh ? 0.0f : acc[c];
    for (int j = 0; j < R; ++j) {
      s += v[j] * static_cast<float>(rows[j][c]);
    }
    acc[c] = s;
  }
}

// y[begin:end] = bias[begin:end], or zeros without a bias: where the kept rows' sums start.
template <typename T>
inline void start_with_bias(T* y, const T* bias, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) {
    y[c] = bias != nullptr ? bias[c] : T(0);
  }
}

// Kept rows streamed at once: with AVX-512, sixteen (measured on Zen 4, 2026-12-06: 1.08-1.25x
// faster than eight on the narrow shapes of both models, at 0% and 50% skipped; 24 or 32 were
// 1.5-2x slower); with AVX2's sixteen registers, eight (more spill).
#if defined(__AVX512F__)
constexpr int kRows = 16;
#else
constexpr int kRows = 8;
#endif

// Two-byte rows (bfloat16, half) up to this long are read as sixteen stretches (accumulate).
constexpr int64_t kStretchRowBytes = 4096;

// acc[0:n] += sum over kept rows k in [first, last) of value[k] * w[index[k] * ld + 0:n], or
// (fresh) acc[0:n] = that sum. A fresh run writes its first group's sums without reading acc:
// a partial row that another core read last (the threads' partial rows, see
// input_sparse_linear.cpp) is then claimed by the stores of the first group, while its rows
// stream, instead of by a pass of zeros before it (in SmolLM2's tuned decode, 2026-12-06, the
// second thread's zeros took 0.6-4.5 us per call in the machine's fast spell, when hand-overs
// between the cores were slow).
template <typename T, typename W>
inline void accumulate(T* acc, const W* w, int64_t ld, const int64_t* index, const T* value,
                       int64_t first, int64_t last, int64_t n, bool fresh = false) {
  // Groups of kRows rows, in the order they stream: a fresh run's first group (kept rows
  // first, first + 1, ...), then stretches (below), then consecutive groups. Each group's axpy
  // gets the next group's rows to prefetch the starts of.
  const int64_t lead = fresh && first + kRows <= last ? 1 : 0;
  const int64_t after = first + lead * kRows;
  // Short two-byte rows (1.1-2.3 KB in SmolLM2's and Qwen's projections other than
  // gate|up) as sixteen stretches: step t reads the t-th row of each of sixteen equal runs
  // of the kept rows, so each stream goes on to the kept row after its own instead of
  // sixteen rows on. Measured 2026-12-07 (Zen 4, eager calls of SmolLM2's shapes in
  // bfloat16, against groups of sixteen consecutive kept rows): q|k|v, o and down 1.24-1.42x
  // as fast with every row kept, 1.06-1.14x with half; gate|up's 6 KB rows even (1.00x,
  // 0.98x), float32 rows of 2.3-3.8 KB about even too (1.03-1.06x, 1.00x). SmolLM2's tuned
  // bfloat16 decode at top-1 0.90: steps 1.07-1.10x as fast (docs/half_precision.md).
  const bool stretched =
      sizeof(W) == 2 && n * static_cast<int64_t>(sizeof(W)) <= kStretchRowBytes;
  const int64_t m = stretched ? (last - after) / kRows : 0;
  const int64_t consecutive = after + m * kRows;
  const int64_t groups = lead + m + (last - consecutive) / kRows;
  // The kept-row number of row j of group g.
  const auto kept_row = [&](int64_t g, int j) {
    if (g < lead) {
      return first + j;
    }
    if (g < lead + m) {
      return after + j * m + (g - lead);
    }
    return consecutive + (g - lead - m) * kRows + j;
  };
  if (fresh && lead == 0) {
    std::fill(acc, acc + n, T(0));
  }
  const W* rows[kRows];
  const W* next[kRows];
  T v[kRows];
  for (int j = 0; j < kRows && groups > 0; ++j) {
    next[j] = w + index[kept_row(0, j)] * ld;
  }
  for (int64_t g = 0; g < groups; ++g) {
    for (int j = 0; j < kRows; ++j) {
      rows[j] = next[j];
      v[j] = value[kept_row(g, j)];
    }
    const bool more = g + 1 < groups;
    for (int j = 0; j < kRows && more; ++j) {
      next[j] = w + index[kept_row(g + 1, j)] * ld;
    }
    if (g < lead) {
      axpy<kRows, true>(acc, rows, v, n, more ? next : nullptr);
    } else {
      axpy<kRows>(acc, rows, v, n, more ? next : nullptr);
    }
  }
  int64_t k = consecutive + (groups - lead - m) * kRows;
  // rows[0:count] = the weight rows of kept rows k, k + 1, ...
  const auto point = [&](int count) {
    for (int j = 0; j < count; ++j) {
      rows[j] = w + index[k + j] * ld;
    }
  };
  if (kRows > 8 && k + 8 <= last) {
    point(8);
    axpy<8>(acc, rows, value + k, n);
    k += 8;
  }
  for (; k < last; ++k) {
    point(1);
    axpy<1>(acc, rows, value + k, n);
  }
}

// sum over i < n of a[i] * b[i] (a contiguous row of a weight and a token's input).
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = T(0);
  for (int64_t i = 0; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

template <>
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 u = _mm256_setzero_ps(), w = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    u = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), u);
    w = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), w);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(u, w));
  for (float lane : lanes) {
    s += lane;
  }
#endif
  for (; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

// The same for a row of a two-byte type (bfloat16, half), summed in float.
template <typename W, typename = std::enable_if_t<sizeof(W) == 2>>
inline float dot(const W* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#if defined(__AVX512F__)
  __m512 u = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    u = _mm512_fmadd_ps(load16(a + i), _mm512_loadu_ps(b + i), u);
  }
  s = _mm512_reduce_add_ps(u);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 u = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    u = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(b + i), u);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, u);
  for (float lane : lanes) {
    s += lane;
  }
#endif
  for (; i < n; ++i) {
    s += static_cast<float>(a[i]) * b[i];
  }
  return s;
}

// The kept channels of one token: index[0:count] and their values, in channel order.
template <typename T>
inline int64_t kept_channels(const T* x, int64_t in, T t, int64_t* index, T* value) {
  int64_t count = 0;
  for (int64_t i = 0; i < in; ++i) {
    if (std::abs(x[i]) >= t) {
      index[count] = i;
      value[count++] = x[i];
    }
  }
  return count;
}

// With AVX-512, sixteen channels at a time are compressed into place; each block writes up to
// kVectorSlack entries past the last kept one, so index and value hold in + kVectorSlack.
// The AVX2 loop below takes a branch per kept channel: in SmolLM2's tuned decode at top-1 0.90
// (2026-12-06, timestamps per call) the 120 calls of a step spent 0.21 ms finding their kept
// channels with it (2.9 us for the down input's 1536), 0.07 ms with the compress (0.9 us).
constexpr int64_t kVectorSlack = 16;

template <>
inline int64_t kept_channels(const float* x, int64_t in, float t, int64_t* index, float* value) {
  int64_t count = 0, i = 0;
#if defined(__AVX512F__)
  const __m512 threshold = _mm512_set1_ps(t);
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  for (; i + 16 <= in; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_abs_ps(v), threshold, _CMP_GE_OQ);
    // Compressing in registers, then a plain store: Zen 4 compresses into memory slowly.
    _mm512_storeu_ps(value + count, _mm512_maskz_compress_ps(keep, v));
    const __mmask8 low = static_cast<__mmask8>(keep), high = static_cast<__mmask8>(keep >> 8);
    const __m512i first = _mm512_add_epi64(_mm512_set1_epi64(i), iota);
    _mm512_storeu_si512(index + count, _mm512_maskz_compress_epi64(low, first));
    count += __builtin_popcount(low);
    const __m512i second = _mm512_add_epi64(_mm512_set1_epi64(i + 8), iota);
    _mm512_storeu_si512(index + count, _mm512_maskz_compress_epi64(high, second));
    count += __builtin_popcount(high);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 threshold = _mm256_set1_ps(t);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (; i + 8 <= in; i += 8) {
    const __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + i), magnitude);
    int bits = _mm256_movemask_ps(_mm256_cmp_ps(v, threshold, _CMP_GE_OQ));
    while (bits != 0) {
      const int b = __builtin_ctz(bits);
      index[count] = i + b;
      value[count++] = x[i + b];
      bits &= bits - 1;
    }
  }
#endif
  for (; i < in; ++i) {
    if (std::abs(x[i]) >= t) {
      index[count] = i;
      value[count++] = x[i];
    }
  }
  return count;
}

// The keep-th largest |x_i| of one token (keep in [1, in)), the threshold of the _topk op.
template <typename T>
inline T kth_magnitude(const T* x, int64_t in, int64_t keep, std::vector<T>& scratch) {
  for (int64_t i = 0; i < in; ++i) {
    scratch[i] = std::abs(x[i]);
  }
  std::nth_element(scratch.begin(), scratch.begin() + (keep - 1), scratch.begin() + in,
                   [](T a, T b) { return a > b; });
  return scratch[keep - 1];
}

// A token's threshold: the given one, or (keep >= 0) the one keeping its keep largest.
template <typename T>
inline T token_threshold(const T* x, int64_t in, T threshold, int64_t keep,
                         std::vector<T>& scratch) {
  if (keep < 0) {
    return threshold;
  }
  if (keep == 0) {
    return std::numeric_limits<T>::infinity();
  }
  return keep >= in ? T(0) : kth_magnitude(x, in, keep, scratch);
}

// Columns per parallel task: a multiple of the vector width.
constexpr int64_t kGrain = 64;
// Up to this many output columns, threads split the kept rows (each summing its own run of
// whole rows into a partial row) instead of the columns (each reading its slice of every kept
// row): threads then stream disjoint stretches of the weight, and rows are read whole.
// Measured on 2 threads: on Zen 3 (2026-11-25) SmolLM2's gate|up (3072 columns) 1.08-1.17x
// faster at 0% and 1.02-1.05x at 50% skipped, Qwen's (9728) even; on Zen 4 (2026-12-06, padded
// rows) Qwen's gate|up 1.00-1.13x faster on the model's decode inputs and its tuned decode at
// top-1 0.90 1.03-1.05x faster (docs/performance.md, "Whole rows"). The lm_head ops
// (sparse_logits.cpp) keep the column split: each thread ranks the logits of its columns.
constexpr int64_t kRowSplitColumns = 16384;
// Above this many partial sums (threads x columns) the threads add the partial rows together,
// each a run of columns; below it (every projection of both models on 2 threads) the calling
// thread adds them alone, without a second parallel region.
constexpr int64_t kSerialSum = 65536;

// Per-call buffers, kept per calling thread and grown on demand: a decode step calls the op
// some hundred times, and allocating and zero-filling them on each call showed in profiles.
template <typename T>
struct Scratch {
  std::vector<int64_t> index;
  std::vector<T> value, partial, magnitude, wide;
};

// wide: room for a bfloat16 or half input and bias widened to T and an output row's sums
// (0 for tensors of T itself).
template <typename T>
Scratch<T>& scratch_of(int64_t in, int64_t partial, int64_t magnitude, int64_t wide = 0) {
  thread_local Scratch<T> s;
  if (static_cast<int64_t>(s.wide.size()) < wide) {
    s.wide.resize(wide);
  }
  if (static_cast<int64_t>(s.index.size()) < in + kVectorSlack) {
    s.index.resize(in + kVectorSlack);
    s.value.resize(in + kVectorSlack);
  }
  if (static_cast<int64_t>(s.partial.size()) < partial) {
    s.partial.resize(partial);
  }
  if (static_cast<int64_t>(s.magnitude.size()) < magnitude) {
    s.magnitude.resize(magnitude);
  }
  return s;
}

}  // namespace sparse_rows
