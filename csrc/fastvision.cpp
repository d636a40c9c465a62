// fastvision._C: operator schemas (TORCH_LIBRARY) and a small Python module for build facts.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastvision, m) {
  m.def(
      "fold_batchnorm(Tensor conv_weight, Tensor? conv_bias, Tensor running_mean, Tensor running_var, "
      "Tensor? bn_weight, Tensor? bn_bias, float eps, ScalarType? out_dtype=None) -> (Tensor, Tensor)");
}

namespace {
bool built_with_cuda() {
#ifdef FASTVISION_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastvision C++/CUDA extension: ops are registered under torch.ops.fastvision";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled into this build");
}
