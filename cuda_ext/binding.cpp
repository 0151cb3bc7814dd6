// Python binding of the Safe Delta CUDA kernels (safedelta.cu); built by deltafix/kernels/build.py.

#include <torch/extension.h>

#include <vector>

namespace deltafix {
at::Tensor column_cost(const at::Tensor& w_finetuned, const at::Tensor& w, const at::Tensor& kappa);
std::vector<at::Tensor> compensate(const at::Tensor& w, const at::Tensor& w_finetuned, const at::Tensor& keep,
                                   const at::Tensor& hinv, int64_t sub_block);
}  // namespace deltafix

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deltafix CUDA kernels for Safe Delta's selection costs and compensation sweep";
  m.def("column_cost", &deltafix::column_cost,
        "Per-column sums of (W_F - W)^2 * kappa over one (out, b) block, float64 (b,).", py::arg("w_finetuned"),
        py::arg("w"), py::arg("kappa"));
  m.def("compensate", &deltafix::compensate,
        "Compensation sweep of one (out, b) block: (Q, Err), float32 (out, b).", py::arg("w"),
        py::arg("w_finetuned"), py::arg("keep"), py::arg("hinv"), py::arg("sub_block"));
}
