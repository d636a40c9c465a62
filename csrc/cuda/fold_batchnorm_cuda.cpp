#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fold_batchnorm.h"

namespace fastvision {

cudaError_t launch_fold_batchnorm(const double* w, const double* b, const double* mean, const double* var,
                                  const double* gamma, const double* beta, double eps, int64_t channels,
                                  int64_t per_channel, double* w_out, double* b_out, cudaStream_t stream);

namespace {

std::tuple<at::Tensor, at::Tensor> fold_batchnorm_cuda(
    const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, std::optional<at::ScalarType> out_dtype) {
  const c10::cuda::CUDAGuard guard(conv_weight.device());
  FoldInputs in = prepare_fold_inputs(conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias);
  at::Tensor weight = at::empty_like(in.weight), bias = at::empty_like(in.bias);
  const cudaError_t err = launch_fold_batchnorm(
      in.weight.data_ptr<double>(), in.bias.data_ptr<double>(), in.mean.data_ptr<double>(),
      in.var.data_ptr<double>(), in.gamma.data_ptr<double>(), in.beta.data_ptr<double>(), eps, in.weight.size(0),
      in.weight.size(1), weight.data_ptr<double>(), bias.data_ptr<double>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "fold_batchnorm CUDA kernel failed: ", cudaGetErrorString(err));
  const at::ScalarType dtype = out_dtype.value_or(conv_weight.scalar_type());
  return {weight.view(conv_weight.sizes()).to(dtype), bias.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CUDA, m) { m.impl("fold_batchnorm", &fold_batchnorm_cuda); }

}  // namespace fastvision
