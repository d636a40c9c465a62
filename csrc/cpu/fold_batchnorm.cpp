#include "fold_batchnorm.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

namespace fastvision {

namespace {

at::Tensor as_channel_vector(const at::Tensor& t, int64_t channels, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, name, " must have shape (", channels, ",), got ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
  return t.to(at::kDouble).contiguous();
}

at::Tensor optional_channel_vector(const std::optional<at::Tensor>& t, const at::Tensor& like, double fill,
                                   const char* name) {
  if (t.has_value() && t->defined()) return as_channel_vector(*t, like.size(0), name);
  return at::full({like.size(0)}, fill, like.options().dtype(at::kDouble));
}

}  // namespace

FoldInputs prepare_fold_inputs(const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias) {
  TORCH_CHECK(conv_weight.dim() >= 2, "conv_weight must have at least 2 dimensions (out_channels, in_channels, ...), got ",
              conv_weight.sizes());
  TORCH_CHECK(conv_weight.is_floating_point(), "conv_weight must be a floating-point tensor, got ",
              conv_weight.scalar_type());
  const int64_t channels = conv_weight.size(0);
  FoldInputs in;
  in.weight = conv_weight.to(at::kDouble).reshape({channels, -1}).contiguous();
  in.mean = as_channel_vector(running_mean, channels, "running_mean");
  in.var = as_channel_vector(running_var, channels, "running_var");
  in.bias = optional_channel_vector(conv_bias, conv_weight, 0.0, "conv_bias");
  in.gamma = optional_channel_vector(bn_weight, conv_weight, 1.0, "bn_weight");
  in.beta = optional_channel_vector(bn_bias, conv_weight, 0.0, "bn_bias");
  for (const auto& [t, name] : {std::pair{running_mean, "running_mean"}, std::pair{running_var, "running_var"}}) {
    TORCH_CHECK(t.device() == conv_weight.device(), name, " is on ", t.device(), ", conv_weight on ",
                conv_weight.device());
  }
  return in;
}

std::tuple<at::Tensor, at::Tensor> fold_batchnorm_cpu(
    const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, std::optional<at::ScalarType> out_dtype) {
  FoldInputs in = prepare_fold_inputs(conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias);
  const int64_t channels = in.weight.size(0), per_channel = in.weight.size(1);
  at::Tensor weight = at::empty_like(in.weight), bias = at::empty_like(in.bias);
  const double *w = in.weight.data_ptr<double>(), *b = in.bias.data_ptr<double>();
  const double *mean = in.mean.data_ptr<double>(), *var = in.var.data_ptr<double>();
  const double *gamma = in.gamma.data_ptr<double>(), *beta = in.beta.data_ptr<double>();
  double *w_out = weight.data_ptr<double>(), *b_out = bias.data_ptr<double>();
  at::parallel_for(0, channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const double scale = gamma[c] / std::sqrt(var[c] + eps);
      for (int64_t k = 0; k < per_channel; ++k) w_out[c * per_channel + k] = w[c * per_channel + k] * scale;
      b_out[c] = beta[c] + (b[c] - mean[c]) * scale;
    }
  });
  const at::ScalarType dtype = out_dtype.value_or(conv_weight.scalar_type());
  return {weight.view(conv_weight.sizes()).to(dtype), bias.to(dtype)};
}

TORCH_LIBRARY_IMPL(fastvision, CPU, m) { m.impl("fold_batchnorm", &fold_batchnorm_cpu); }

}  // namespace fastvision
