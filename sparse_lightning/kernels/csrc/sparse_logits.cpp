// The sparse-input output projection (lm_head) of one decode step in one call: approximate
// logits from each token's keep largest input channels, then the candidates largest of them
// recomputed exactly and written over the approximations.
//
// Done with ATen operators, the last two steps cost a decode step of SmolLM2 about 0.7 ms:
// torch.topk over 49,152 logits (~0.17 ms), and index_select of the candidates' columns of
// the transposed weight (~0.55 ms with the weights out of cache: 64 x 576 reads, each in a
// cache line and a 4 KB page of its own, one thread, one miss at a time). Here each thread
// finds the top candidates of the columns it has just summed (still in its cache), and the
// exact values add only the dropped channels' weights to the approximations (the kept ones
// are in them already): half of the reads, split between the threads, prefetched a few rows
// ahead so that many misses are in flight.
//
// rotated_logits is the same step for an lm_head approximated in another basis (the
// calibrated eigenbasis of its input, inference/output.py): the approximation reads the kept
// rows of that basis's weight (float or bfloat16), and the candidates' exact logits are dot
// products with the weight's own rows, contiguous 2-4 KB reads instead of scattered columns.
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <optional>
#include <utility>

#include "sparse_rows.h"

namespace {

using namespace sparse_rows;

// Rows ahead whose candidate weights are prefetched while the current row's are summed.
constexpr int64_t kPrefetchRows = 4;

template <typename T>
struct LogitsScratch {
  std::vector<int64_t> dropped_index, candidate_index;
  std::vector<T> dropped_value, candidate_value, partial;
};

template <typename T>
LogitsScratch<T>& logits_scratch(int64_t in, int64_t tasks, int64_t candidates) {
  thread_local LogitsScratch<T> s;
  if (static_cast<int64_t>(s.dropped_index.size()) < in) {
    s.dropped_index.resize(in);
    s.dropped_value.resize(in);
  }
  if (static_cast<int64_t>(s.candidate_index.size()) < tasks * candidates) {
    s.candidate_index.resize(tasks * candidates);
    s.candidate_value.resize(tasks * candidates);
    s.partial.resize(tasks * candidates);
  }
  return s;
}

// The channels below the threshold t (those kept_channels leaves out), in channel order.
template <typename T>
inline int64_t dropped_channels(const T* x, int64_t in, T t, int64_t* index, T* value) {
  int64_t count = 0;
  for (int64_t i = 0; i < in; ++i) {
    if (!(std::abs(x[i]) >= t)) {
      index[count] = i;
      value[count++] = x[i];
    }
  }
  return count;
}

// The k largest of y[first, last) (k <= last - first) into value/index, through a min-heap of
// k: after the first few hundred columns almost every column fails one comparison.
template <typename T>
inline void top_of_slice(const T* y, int64_t first, int64_t last, int64_t k, T* value,
                         int64_t* index) {
  std::vector<std::pair<T, int64_t>> heap;
  heap.reserve(k);
  const auto greater = [](const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  for (int64_t c = first; c < first + k; ++c) {
    heap.emplace_back(y[c], c);
  }
  std::make_heap(heap.begin(), heap.end(), greater);  // heap.front(): the smallest kept
  for (int64_t c = first + k; c < last; ++c) {
    if (y[c] > heap.front().first) {
      std::pop_heap(heap.begin(), heap.end(), greater);
      heap.back() = {y[c], c};
      std::push_heap(heap.begin(), heap.end(), greater);
    }
  }
  for (int64_t j = 0; j < k; ++j) {
    value[j] = heap[j].first;
    index[j] = heap[j].second;
  }
}

// The k largest of the tasks' own top candidates (by value, then the lower column), in
// column order.
template <typename T>
std::vector<int64_t> merge_candidates(const LogitsScratch<T>& ls, const std::vector<int64_t>& found,
                                      int64_t k) {
  std::vector<std::pair<T, int64_t>> all;
  for (int64_t p = 0; p < static_cast<int64_t>(found.size()); ++p) {
    for (int64_t j = 0; j < found[p]; ++j) {
      all.emplace_back(ls.candidate_value[p * k + j], ls.candidate_index[p * k + j]);
    }
  }
  std::partial_sort(all.begin(), all.begin() + k, all.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  std::vector<int64_t> column(k);
  for (int64_t j = 0; j < k; ++j) {
    column[j] = all[j].second;
  }
  std::sort(column.begin(), column.end());
  return column;
}

// Tasks of the approximate pass: one per thread, each a run of columns (a multiple of 16) at
// least k long, so that each task's own top k exists; the k largest overall are among them.
inline int64_t logit_tasks(int64_t out, int64_t k) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), out / std::max(k, kGrain)));
}

// Approximate logits of one token into yr (bias, then the kept rows of w_t), and each task's
// top k of the columns it has just summed; returns how many each task found.
template <typename T, typename W>
std::vector<int64_t> approximate(T* yr, const W* wp, int64_t ld, const T* bp, const int64_t* index,
                                 const T* value, int64_t kept, int64_t out, int64_t k,
                                 int64_t tasks, LogitsScratch<T>& ls) {
  const int64_t chunk = (((out + tasks - 1) / tasks) + 15) & ~int64_t(15);
  std::vector<int64_t> found(tasks, 0);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t first = std::min(out, p * chunk), last = std::min(out, first + chunk);
      start_with_bias(yr, bp, first, last);
      accumulate(yr + first, wp + first, ld, index, value, 0, kept, last - first);
      found[p] = std::min(k, last - first);
      top_of_slice(yr, first, last, found[p], ls.candidate_value.data() + p * k,
                   ls.candidate_index.data() + p * k);
    }
  });
  return found;
}

// T: the sums' type; W: the type x, the weight, the bias and y are stored in (T, or bfloat16
// or half summed in float: sparse_rows.h, widened).
template <typename T, typename W = T>
void run_logits(const at::Tensor& x, const at::Tensor& weight_t, int64_t keep,
                int64_t candidates, const std::optional<at::Tensor>& bias, at::Tensor& y) {
  constexpr bool same = std::is_same_v<T, W>;
  const int64_t in = weight_t.size(0), out = weight_t.size(1);
  const auto xc = x.contiguous();
  const auto bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const W* xp = xc.data_ptr<W>();
  const W* wp = weight_t.data_ptr<W>();
  W* yp = y.data_ptr<W>();
  const int64_t ld = weight_t.stride(0);
  const int64_t tokens = in == 0 ? 0 : xc.numel() / in;
  const int64_t k = std::min(candidates, out);
  const int64_t tasks = logit_tasks(out, k);
  // wide: x's token, the bias, the sums of y's row.
  Scratch<T>& s = scratch_of<T>(in, 0, in, same ? 0 : in + 2 * out);
  LogitsScratch<T>& ls = logits_scratch<T>(in, tasks, k);
  int64_t* index = s.index.data();
  T* value = s.value.data();
  const T* bp = bc.has_value() ? widened<T>(bc->data_ptr<W>(), out, s.wide.data() + in) : nullptr;
  for (int64_t r = 0; r < tokens; ++r) {
    const T* xr = widened<T>(xp + r * in, in, s.wide.data());
    W* yw = yp + r * out;
    T* yr = sums_of<T>(yw, s.wide.data() + in + out);
    const T t = token_threshold<T>(xr, in, T(0), keep, s.magnitude);
    const int64_t kept = kept_channels<T>(xr, in, t, index, value);
    const int64_t dropped =
        dropped_channels<T>(xr, in, t, ls.dropped_index.data(), ls.dropped_value.data());
    const std::vector<int64_t> found =
        approximate(yr, wp, ld, bp, index, value, kept, out, k, tasks, ls);
    const std::vector<int64_t> column = merge_candidates(ls, found, k);
    if (dropped == 0) {
      narrowed(yr, yw, 0, out);
      continue;  // nothing was left out: the approximations are exact
    }
    // Exact values: each thread adds a run of the dropped rows' candidate weights.
    const int64_t run_length = (dropped + tasks - 1) / tasks;
    T* partial = ls.partial.data();
    const int64_t* drop_index = ls.dropped_index.data();
    const T* drop_value = ls.dropped_value.data();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        T* acc = partial + p * k;
        std::fill(acc, acc + k, T(0));
        const int64_t first = std::min(dropped, p * run_length);
        const int64_t last = std::min(dropped, first + run_length);
        for (int64_t d = first; d < last; ++d) {
          if (d + kPrefetchRows < last) {
            const W* ahead = wp + drop_index[d + kPrefetchRows] * ld;
            for (int64_t j = 0; j < k; ++j) {
              __builtin_prefetch(ahead + column[j], 0, 0);
            }
          }
          const W* row = wp + drop_index[d] * ld;
          const T v = drop_value[d];
          for (int64_t j = 0; j < k; ++j) {
            acc[j] += v * static_cast<T>(row[column[j]]);
          }
        }
      }
    });
    for (int64_t j = 0; j < k; ++j) {
      T sum = T(0);
      for (int64_t p = 0; p < tasks; ++p) {
        sum += partial[p * k + j];
      }
      yr[column[j]] += sum;
    }
    narrowed(yr, yw, 0, out);
  }
}

// Both logits ops for other dtypes and layouts, with ATen operators (reading every weight):
// approximate logits from x's keep largest channels and w_t, the candidates largest of them
// replaced by exact's values.
at::Tensor aten_logits(const at::Tensor& x, const at::Tensor& w_t, int64_t keep,
                       int64_t candidates, const at::Tensor& exact,
                       const std::optional<at::Tensor>& bias) {
  const int64_t in = w_t.size(0), out = w_t.size(1);
  auto magnitude = x.abs();
  at::Tensor t = keep == 0 ? at::full({}, std::numeric_limits<double>::infinity(), x.options())
                 : keep >= in
                     ? at::zeros({}, x.options())
                     : std::get<0>(magnitude.topk(keep, -1)).narrow(-1, keep - 1, 1);
  auto approx = at::matmul(x * (magnitude >= t).to(x.scalar_type()), w_t.to(x.scalar_type()));
  if (bias.has_value()) {
    approx = approx + *bias;
  }
  auto index = std::get<1>(approx.topk(std::min(candidates, out), -1));
  return approx.scatter(-1, index, exact.gather(-1, index));
}

at::Tensor input_sparse_logits(const at::Tensor& x, const at::Tensor& weight_t, int64_t keep,
                               int64_t candidates, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight_t.dim() == 2, "weight_t must be 2-d (in_features, out_features)");
  TORCH_CHECK(keep >= 0, "keep must be >= 0, got ", keep);
  TORCH_CHECK(candidates >= 1, "candidates must be >= 1, got ", candidates);
  const int64_t in = weight_t.size(0), out = weight_t.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "x's last dimension (", x.size(-1),
              ") must equal weight_t's in_features (", in, ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias must be (out_features,)");
  }
  const auto dtype = x.scalar_type();
  if (!kernel_takes(x, weight_t, bias) || out == 0) {
    return aten_logits(x, weight_t, keep, candidates, at::linear(x, weight_t.t(), bias), bias);
  }
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  auto y = at::empty(sizes, x.options());
  with_types(dtype, [&](auto types) {
    using Ts = decltype(types);
    run_logits<typename Ts::T, typename Ts::W>(x, weight_t, keep, candidates, bias, y);
  });
  return y;
}

// rotated_logits: approximate logits from x_rot's keep largest channels and the kept rows of
// approx_t (A, its element type, may be narrower than T), then the candidates largest
// recomputed exactly as weight[c] . x + bias[c]. W: the type x_rot, x, the weight, the bias
// and y are stored in (as in run_logits).
template <typename T, typename A, typename W = T>
void run_rotated(const at::Tensor& x_rot, const at::Tensor& approx_t, int64_t keep,
                 int64_t candidates, const at::Tensor& x, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, at::Tensor& y) {
  constexpr bool same = std::is_same_v<T, W>;
  const int64_t in = approx_t.size(0), out = approx_t.size(1), width = weight.size(1);
  const auto xrc = x_rot.contiguous();
  const auto xc = x.contiguous();
  const auto bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const W* xrp = xrc.data_ptr<W>();
  const W* xp = xc.data_ptr<W>();
  const A* ap = approx_t.data_ptr<A>();
  const W* wp = weight.data_ptr<W>();
  W* yp = y.data_ptr<W>();
  const int64_t ld = approx_t.stride(0), wld = weight.stride(0);
  const int64_t tokens = in == 0 ? 0 : xrc.numel() / in;
  const int64_t k = std::min(candidates, out);
  const int64_t tasks = logit_tasks(out, k);
  // wide: x_rot's token, x's token, the bias, the sums of y's row.
  Scratch<T>& s = scratch_of<T>(in, 0, in, same ? 0 : in + width + 2 * out);
  LogitsScratch<T>& ls = logits_scratch<T>(in, tasks, k);
  int64_t* index = s.index.data();
  T* value = s.value.data();
  const T* bp =
      bc.has_value() ? widened<T>(bc->data_ptr<W>(), out, s.wide.data() + in + width) : nullptr;
  const int64_t grain = std::max<int64_t>(1, (k + at::get_num_threads() - 1) / at::get_num_threads());
  for (int64_t r = 0; r < tokens; ++r) {
    const T* xr = widened<T>(xrp + r * in, in, s.wide.data());
    const T* xe = widened<T>(xp + r * width, width, s.wide.data() + in);
    W* yw = yp + r * out;
    T* yr = sums_of<T>(yw, s.wide.data() + in + width + out);
    const T t = token_threshold<T>(xr, in, T(0), keep, s.magnitude);
    const int64_t kept = kept_channels<T>(xr, in, t, index, value);
    const std::vector<int64_t> found =
        approximate(yr, ap, ld, bp, index, value, kept, out, k, tasks, ls);
    const std::vector<int64_t> column = merge_candidates(ls, found, k);
    at::parallel_for(0, k, grain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t c = column[j];
        yr[c] = dot(wp + c * wld, xe, width) + (bp != nullptr ? bp[c] : T(0));
      }
    });
    narrowed(yr, yw, 0, out);
  }
}

at::Tensor rotated_logits(const at::Tensor& x_rot, const at::Tensor& approx_t, int64_t keep,
                          int64_t candidates, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(approx_t.dim() == 2, "approx_t must be 2-d (in_features, out_features)");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-d (out_features, in_features)");
  TORCH_CHECK(keep >= 0, "keep must be >= 0, got ", keep);
  TORCH_CHECK(candidates >= 1, "candidates must be >= 1, got ", candidates);
  const int64_t in = approx_t.size(0), out = approx_t.size(1);
  TORCH_CHECK(x_rot.dim() >= 1 && x_rot.size(-1) == in, "x_rot's last dimension (",
              x_rot.size(-1), ") must equal approx_t's in_features (", in, ")");
  TORCH_CHECK(weight.size(0) == out, "weight has ", weight.size(0),
              " rows, approx_t ", out, " columns: both are the output features");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "x's last dimension (", x.size(-1),
              ") must equal weight's in_features (", weight.size(1), ")");
  TORCH_CHECK(x.numel() / std::max<int64_t>(1, x.size(-1)) ==
                  x_rot.numel() / std::max<int64_t>(1, in),
              "x and x_rot must hold the same tokens");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias must be (out_features,)");
  }
  const auto dtype = x_rot.scalar_type();
  const auto narrow = approx_t.scalar_type();
  // approx_t may also be bfloat16 beside float tensors.
  const bool fast = kernel_takes(x_rot, weight, bias) && x.scalar_type() == dtype &&
                    (narrow == dtype || (dtype == at::kFloat && narrow == at::kBFloat16)) &&
                    approx_t.stride(1) == 1 && out > 0;
  if (!fast) {
    return aten_logits(x_rot, approx_t, keep, candidates, at::linear(x, weight, bias), bias);
  }
  auto sizes = x_rot.sizes().vec();
  sizes.back() = out;
  auto y = at::empty(sizes, x_rot.options());
  if (narrow != dtype) {  // float tensors, a bfloat16 approx_t
    run_rotated<float, c10::BFloat16>(x_rot, approx_t, keep, candidates, x, weight, bias, y);
  } else {
    with_types(dtype, [&](auto types) {
      using Ts = decltype(types);
      using W = typename Ts::W;
      run_rotated<typename Ts::T, W, W>(x_rot, approx_t, keep, candidates, x, weight, bias, y);
    });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_lightning, m) {
  m.def(
      "input_sparse_logits(Tensor x, Tensor weight_t, int keep, int candidates, Tensor? bias) "
      "-> Tensor");
  m.def(
      "rotated_logits(Tensor x_rot, Tensor approx_t, int keep, int candidates, Tensor x, "
      "Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse_lightning, CPU, m) {
  m.impl("input_sparse_logits", &input_sparse_logits);
  m.impl("rotated_logits", &rotated_logits);
}

// The C entry point for Inductor's C++ wrapper (see input_sparse_linear.cpp).
extern "C" {
__attribute__((visibility("default"))) AOTITorchError aoti_torch_cpu_input_sparse_logits(
    AtenTensorHandle x, AtenTensorHandle weight_t, int64_t keep, int64_t candidates,
    AtenTensorHandle* bias, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using namespace torch::aot_inductor;
    *ret0 = new_tensor_handle(input_sparse_logits(*tensor_handle_to_tensor_pointer(x),
                                                   *tensor_handle_to_tensor_pointer(weight_t),
                                                   keep, candidates,
                                                   pointer_to_optional<at::Tensor>(bias)));
  });
}

__attribute__((visibility("default"))) AOTITorchError aoti_torch_cpu_rotated_logits(
    AtenTensorHandle x_rot, AtenTensorHandle approx_t, int64_t keep, int64_t candidates,
    AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* bias, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using namespace torch::aot_inductor;
    *ret0 = new_tensor_handle(rotated_logits(
        *tensor_handle_to_tensor_pointer(x_rot), *tensor_handle_to_tensor_pointer(approx_t), keep,
        candidates, *tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(weight),
        pointer_to_optional<at::Tensor>(bias)));
  });
}
}
