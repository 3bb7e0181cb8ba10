// Input-sparse linear layer for batch-1 decode: y = sum over kept input channels i of
// x_i * W_t[i, :] + bias, where a channel is kept when |x_i| >= threshold, or (the _topk op)
// when |x_i| is at least the keep-th largest magnitude of its token.
//
// W_t is the weight stored transposed, (in_features, out_features) with rows contiguous, so
// the weights of a dropped channel (one row) are never read. The threshold is applied here
// (no index tensor is built by the caller). Threads (at::parallel_for) split the kept rows,
// each summing its run into its own partial row, or, past kRowSplitColumns output columns,
// the columns, each streaming the kept rows' segment of its columns; sixteen rows at a time
// with AVX-512 where compiled for it, else eight with AVX2/FMA.
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <optional>

#include "sparse_rows.h"

namespace {

using namespace sparse_rows;

// The kernel proper. T is the sums' type: float (AVX2/FMA), or double (a plain loop the
// compiler vectorizes; it lets tests compare with a masked reference without float32's
// rounding flipping a channel that sits at the threshold). W is the type x, the weight, the
// bias and y are stored in: T itself, or bfloat16 or half summed in float and rounded to W
// once per output, as ATen's own matmul of those types does; the rows then stream half the
// bytes.
template <typename T, typename W = T>
void run(const at::Tensor& x, const at::Tensor& weight_t, double threshold, int64_t keep,
         const std::optional<at::Tensor>& bias, at::Tensor& y) {
  constexpr bool same = std::is_same_v<T, W>;
  const int64_t in = weight_t.size(0), out = weight_t.size(1);
  const auto xc = x.contiguous();
  const auto bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const W* xp = xc.data_ptr<W>();
  const W* wp = weight_t.data_ptr<W>();
  W* yp = y.data_ptr<W>();
  const int64_t ld = weight_t.stride(0);
  const int64_t tokens = in == 0 ? 0 : xc.numel() / in;
  const int64_t threads = at::get_num_threads();
  const bool split_rows = out <= kRowSplitColumns;
  // wide: x's token, the bias, the sums of y's row.
  Scratch<T>& s = scratch_of<T>(in, split_rows ? threads * out : 0, keep >= 0 ? in : 0,
                                same ? 0 : in + 2 * out);
  int64_t* index = s.index.data();
  T* value = s.value.data();
  const T* bp = bc.has_value() ? widened<T>(bc->data_ptr<W>(), out, s.wide.data() + in) : nullptr;
  const T threshold_w = threshold_of<T, W>(threshold);
  for (int64_t r = 0; r < tokens; ++r) {
    const T* xr = widened<T>(xp + r * in, in, s.wide.data());
    const T t = token_threshold<T>(xr, in, threshold_w, keep, s.magnitude);
    const int64_t kept = kept_channels<T>(xr, in, t, index, value);
    W* yw = yp + r * out;
    T* yr = sums_of<T>(yw, s.wide.data() + in + out);
    if (!split_rows) {
      at::parallel_for(0, out, kGrain, [&](int64_t begin, int64_t end) {
        start_with_bias(yr, bp, begin, end);
        accumulate(yr + begin, wp + begin, ld, index, value, 0, kept, end - begin);
        narrowed(yr, yw, begin, end);
      });
      continue;
    }
    // Thread p sums the p-th run of kept rows (whole groups of kRows) into its own partial
    // row, written whole by the thread itself (fresh), even when p's run is empty.
    const int64_t run_length = ((kept + threads - 1) / threads + kRows - 1) / kRows * kRows;
    T* partial = s.partial.data();
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t first = std::min(kept, p * run_length);
        accumulate(partial + p * out, wp, ld, index, value, first,
                   std::min(kept, first + run_length), out, true);
      }
    });
    const auto sum = [&](int64_t begin, int64_t end) {
      start_with_bias(yr, bp, begin, end);
      for (int64_t p = 0; p < threads; ++p) {
        const T* acc = partial + p * out;
        for (int64_t c = begin; c < end; ++c) {
          yr[c] += acc[c];
        }
      }
      narrowed(yr, yw, begin, end);
    };
    if (threads * out > kSerialSum) {
      at::parallel_for(0, out, kGrain, sum);
    } else {
      sum(0, out);
    }
  }
}

// Both ops: keep < 0 applies ``threshold``, keep >= 0 keeps each token's keep largest.
at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& weight_t, double threshold,
                         int64_t keep, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight_t.dim() == 2, "weight_t must be 2-d (in_features, out_features)");
  const int64_t in = weight_t.size(0), out = weight_t.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "x's last dimension (", x.size(-1),
              ") must equal weight_t's in_features (", in, ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias must be (out_features,)");
  }
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  const auto dtype = x.scalar_type();
  if (!kernel_takes(x, weight_t, bias)) {
    // Other dtypes and layouts: the same math with ATen operators (reads every weight).
    auto magnitude = x.abs();
    at::Tensor t;
    if (keep < 0) {
      t = at::full({}, threshold, x.options());
    } else if (keep == 0) {
      t = at::full({}, std::numeric_limits<double>::infinity(), x.options());
    } else if (keep >= in) {
      t = at::zeros({}, x.options());
    } else {
      t = std::get<0>(magnitude.topk(keep, -1)).narrow(-1, keep - 1, 1);
    }
    auto kept = x * (magnitude >= t).to(x.scalar_type());
    auto y = at::matmul(kept, weight_t);
    return bias.has_value() ? y + *bias : y;
  }
  auto y = at::empty(sizes, x.options());
  with_types(dtype, [&](auto types) {
    using Ts = decltype(types);
    run<typename Ts::T, typename Ts::W>(x, weight_t, threshold, keep, bias, y);
  });
  return y;
}

at::Tensor input_sparse_linear(const at::Tensor& x, const at::Tensor& weight_t,
                               double threshold, const std::optional<at::Tensor>& bias) {
  return sparse_linear(x, weight_t, threshold, -1, bias);
}

at::Tensor input_sparse_linear_topk(const at::Tensor& x, const at::Tensor& weight_t,
                                    int64_t keep, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(keep >= 0, "keep must be >= 0, got ", keep);
  return sparse_linear(x, weight_t, 0.0, keep, bias);
}

}  // namespace

TORCH_LIBRARY(sparse_lightning, m) {
  m.def("input_sparse_linear(Tensor x, Tensor weight_t, float threshold, Tensor? bias) -> Tensor");
  m.def("input_sparse_linear_topk(Tensor x, Tensor weight_t, int keep, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse_lightning, CPU, m) {
  m.impl("input_sparse_linear", &input_sparse_linear);
  m.impl("input_sparse_linear_topk", &input_sparse_linear_topk);
}

// C entry points for Inductor's C++ wrapper (the ``aot_inductor.custom_ops_to_c_shims`` option,
// see ``inductor_options()`` in ops.py): a compiled decode step calls these directly instead of
// finding the op by name in the dispatcher and boxing its arguments on every call.
extern "C" {
__attribute__((visibility("default"))) AOTITorchError aoti_torch_cpu_input_sparse_linear(
    AtenTensorHandle x, AtenTensorHandle weight_t, double threshold, AtenTensorHandle* bias,
    AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using namespace torch::aot_inductor;
    *ret0 = new_tensor_handle(input_sparse_linear(
        *tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(weight_t),
        threshold, pointer_to_optional<at::Tensor>(bias)));
  });
}

__attribute__((visibility("default"))) AOTITorchError aoti_torch_cpu_input_sparse_linear_topk(
    AtenTensorHandle x, AtenTensorHandle weight_t, int64_t keep, AtenTensorHandle* bias,
    AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using namespace torch::aot_inductor;
    *ret0 = new_tensor_handle(input_sparse_linear_topk(
        *tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(weight_t), keep,
        pointer_to_optional<at::Tensor>(bias)));
  });
}
}
