// Batch-1 GEMVs over many weights in one C++ loop, for benchmarks/kernel_panels.py: the
// shipped input-sparse kernel (through its C entry point, as a compiled decode step calls it)
// against the layout of Inductor's dense GEMV, the weight packed in panels of P output columns
// (out/P, in, P), each thread streaming its panels front to back, with and without skipping
// the dropped channels' P-float pieces. GCC vector types, so it builds on AVX2 and AVX-512.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/extension.h>

#include <vector>

#include "sparse_rows.h"

extern "C" AOTITorchError aoti_torch_cpu_input_sparse_linear(AtenTensorHandle x,
                                                             AtenTensorHandle weight_t,
                                                             double threshold,
                                                             AtenTensorHandle* bias,
                                                             AtenTensorHandle* ret0);

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));

// y[0:16V] = sum over the listed rows k of value[k] * panel[row[k] * 16V + 0:16V].
template <int V, bool Indexed>
void panel(const float* w, const int64_t* row, const float* value, int64_t count, float* y) {
  v16 acc[V] = {};
  for (int64_t k = 0; k < count; ++k) {
    const float* r = w + (Indexed ? row[k] : k) * 16 * V;
    const float v = value[k];
    for (int j = 0; j < V; ++j) {
      acc[j] += v * *reinterpret_cast<const v16*>(r + 16 * j);
    }
  }
  for (int j = 0; j < V; ++j) {
    *reinterpret_cast<v16*>(y + 16 * j) = acc[j];
  }
}

template <int V, bool Indexed>
void panels(const at::Tensor& x, const at::Tensor& w, double threshold, at::Tensor& y) {
  const int64_t blocks = w.size(0), in = w.size(1);
  // The kept channels as the shipped kernel finds them (every channel when not indexed).
  std::vector<int64_t> row(in);
  std::vector<float> value(in);
  const int64_t count = sparse_rows::kept_channels<float>(
      x.data_ptr<float>(), in, Indexed ? static_cast<float>(threshold) : 0.0f, row.data(),
      value.data());
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t b = blocks * p / threads; b < blocks * (p + 1) / threads; ++b) {
        panel<V, Indexed>(wp + b * in * 16 * V, row.data(), value.data(), count,
                          yp + b * 16 * V);
      }
    }
  });
}

template <int V>
void run_panels(const at::Tensor& x, const at::Tensor& w, double threshold, bool indexed,
                at::Tensor& y) {
  indexed ? panels<V, true>(x, w, threshold, y) : panels<V, false>(x, w, threshold, y);
}

// One pass over every weight: "rows" (the shipped kernel over weights_t), "panels" (packed,
// every row read in order) or "panels_indexed" (packed, only rows with |x_i| >= threshold).
void pass(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& ws,
          double threshold, const std::string& how, std::vector<at::Tensor>& ys) {
  for (size_t i = 0; i < xs.size(); ++i) {
    if (how == "rows") {
      AtenTensorHandle out;
      at::Tensor x = xs[i], w = ws[i];
      TORCH_CHECK(aoti_torch_cpu_input_sparse_linear(
                      torch::aot_inductor::tensor_pointer_to_tensor_handle(&x),
                      torch::aot_inductor::tensor_pointer_to_tensor_handle(&w), threshold,
                      nullptr, &out) == AOTI_TORCH_SUCCESS,
                  "the kernel failed");
      ys[i] = *torch::aot_inductor::tensor_handle_to_tensor_pointer(out);
      delete torch::aot_inductor::tensor_handle_to_tensor_pointer(out);
      continue;
    }
    const bool indexed = how == "panels_indexed";
    switch (ws[i].size(2)) {
      case 48: run_panels<3>(xs[i], ws[i], threshold, indexed, ys[i]); break;
      case 64: run_panels<4>(xs[i], ws[i], threshold, indexed, ys[i]); break;
      default: TORCH_CHECK(false, "panel width must be 48 or 64");
    }
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("timed_pass",
        [](const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& ws,
           double threshold, const std::string& how, std::vector<at::Tensor> ys) {
          {
            py::gil_scoped_release release;
            pass(xs, ws, threshold, how, ys);
          }
          return ys;
        });
}
