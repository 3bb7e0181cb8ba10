// Input-sparse linear layer for batch-1 decode: y = sum over kept input channels i of
// x_i * W_t[i, :] + bias, where a channel is kept when |x_i| >= threshold.
//
// W_t is the weight stored transposed, (in_features, out_features) with rows contiguous, so
// the weights of a dropped channel (one row) are never read. The threshold is applied here
// (no index tensor is built by the caller). Threads split the output columns
// (at::parallel_for); each thread streams the kept rows' segment of its columns and
// accumulates into its slice of y, four rows at a time, with AVX2/FMA where compiled for it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

// acc[0:n] += v0 * r0[0:n] + v1 * r1[0:n] + v2 * r2[0:n] + v3 * r3[0:n]
inline void axpy4(float* acc, const float* r0, const float* r1, const float* r2,
                  const float* r3, float v0, float v1, float v2, float v3, int64_t n) {
  int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 a0 = _mm256_set1_ps(v0), a1 = _mm256_set1_ps(v1);
  const __m256 a2 = _mm256_set1_ps(v2), a3 = _mm256_set1_ps(v3);
  for (; c + 16 <= n; c += 16) {
    __m256 s = _mm256_loadu_ps(acc + c);
    __m256 t = _mm256_loadu_ps(acc + c + 8);
    s = _mm256_fmadd_ps(a0, _mm256_loadu_ps(r0 + c), s);
    t = _mm256_fmadd_ps(a0, _mm256_loadu_ps(r0 + c + 8), t);
    s = _mm256_fmadd_ps(a1, _mm256_loadu_ps(r1 + c), s);
    t = _mm256_fmadd_ps(a1, _mm256_loadu_ps(r1 + c + 8), t);
    s = _mm256_fmadd_ps(a2, _mm256_loadu_ps(r2 + c), s);
    t = _mm256_fmadd_ps(a2, _mm256_loadu_ps(r2 + c + 8), t);
    s = _mm256_fmadd_ps(a3, _mm256_loadu_ps(r3 + c), s);
    t = _mm256_fmadd_ps(a3, _mm256_loadu_ps(r3 + c + 8), t);
    _mm256_storeu_ps(acc + c, s);
    _mm256_storeu_ps(acc + c + 8, t);
  }
#endif
  for (; c < n; ++c) {
    acc[c] += v0 * r0[c] + v1 * r1[c] + v2 * r2[c] + v3 * r3[c];
  }
}

inline void axpy1(float* acc, const float* r0, float v0, int64_t n) {
  int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 a0 = _mm256_set1_ps(v0);
  for (; c + 8 <= n; c += 8) {
    _mm256_storeu_ps(acc + c, _mm256_fmadd_ps(a0, _mm256_loadu_ps(r0 + c),
                                              _mm256_loadu_ps(acc + c)));
  }
#endif
  for (; c < n; ++c) {
    acc[c] += v0 * r0[c];
  }
}

// Columns per parallel task: a multiple of the vector width, small enough that two threads
// share the narrowest projection.
constexpr int64_t kGrain = 64;

// acc[0:n] = bias (or 0) + sum over the kept rows k of value[k] * w[index[k] * ld + 0:n].
inline void accumulate_rows(float* acc, const float* bias, const float* w, int64_t ld,
                            const int64_t* index, const float* value, int64_t kept, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    acc[c] = bias != nullptr ? bias[c] : 0.0f;
  }
  int64_t k = 0;
  for (; k + 4 <= kept; k += 4) {
    axpy4(acc, w + index[k] * ld, w + index[k + 1] * ld, w + index[k + 2] * ld,
          w + index[k + 3] * ld, value[k], value[k + 1], value[k + 2], value[k + 3], n);
  }
  for (; k < kept; ++k) {
    axpy1(acc, w + index[k] * ld, value[k], n);
  }
}

at::Tensor input_sparse_linear(const at::Tensor& x, const at::Tensor& weight_t,
                               double threshold, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight_t.dim() == 2, "weight_t must be 2-d (in_features, out_features)");
  const int64_t in = weight_t.size(0), out = weight_t.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "x's last dimension (", x.size(-1),
              ") must equal weight_t's in_features (", in, ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias must be (out_features,)");
  }
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  const bool fast = x.scalar_type() == at::kFloat && weight_t.scalar_type() == at::kFloat &&
                    weight_t.stride(1) == 1 && x.device().is_cpu() &&
                    (!bias.has_value() || bias->scalar_type() == at::kFloat);
  if (!fast) {
    // Other dtypes and layouts: the same math with ATen operators (reads every weight).
    auto kept = x * (x.abs() >= threshold).to(x.scalar_type());
    auto y = at::matmul(kept, weight_t);
    return bias.has_value() ? y + *bias : y;
  }
  const auto xc = x.contiguous();
  const auto bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  auto y = at::empty(sizes, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = weight_t.data_ptr<float>();
  const float* bp = bc.has_value() ? bc->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ld = weight_t.stride(0);
  const int64_t tokens = in == 0 ? 0 : xc.numel() / in;
  const float t = static_cast<float>(threshold);
  std::vector<int64_t> index;
  std::vector<float> value;
  index.reserve(in);
  value.reserve(in);
  for (int64_t r = 0; r < tokens; ++r) {
    const float* xr = xp + r * in;
    index.clear();
    value.clear();
    for (int64_t i = 0; i < in; ++i) {
      if (std::abs(xr[i]) >= t) {
        index.push_back(i);
        value.push_back(xr[i]);
      }
    }
    const int64_t kept = static_cast<int64_t>(index.size());
    float* yr = yp + r * out;
    at::parallel_for(0, out, kGrain, [&](int64_t begin, int64_t end) {
      accumulate_rows(yr + begin, bp != nullptr ? bp + begin : nullptr, wp + begin, ld,
                      index.data(), value.data(), kept, end - begin);
    });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(sparse_lightning, m) {
  m.def("input_sparse_linear(Tensor x, Tensor weight_t, float threshold, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse_lightning, CPU, m) {
  m.impl("input_sparse_linear", &input_sparse_linear);
}
