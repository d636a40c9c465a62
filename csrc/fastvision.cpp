// fastvision._C: operator schemas (TORCH_LIBRARY) and a small Python module for build facts.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "conv_engine.h"

TORCH_LIBRARY_FRAGMENT(fastvision, m) {
  m.def(
      "fold_batchnorm(Tensor conv_weight, Tensor? conv_bias, Tensor running_mean, Tensor running_var, "
      "Tensor? bn_weight, Tensor? bn_bias, float eps, ScalarType? out_dtype=None) -> (Tensor, Tensor)");
  m.def(
      "conv_bn_act(Tensor input, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor");
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
  m.def("set_cuda_conv_engine", &fastvision::set_cuda_conv_engine, pybind11::arg("engine"),
        "conv_bn_act on CUDA: 'epilogue' (cuDNN conv + fastvision epilogue kernel; default), 'cudnn_fused' "
        "(cuDNN conv+bias+ReLU / conv+add+ReLU where they apply) or 'direct_depthwise' (as epilogue, with "
        "fastvision's direct 3x3 depthwise kernel)");
  m.def("cuda_conv_engine", &fastvision::cuda_conv_engine, "The engine set by set_cuda_conv_engine");
}
