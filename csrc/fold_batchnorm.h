#pragma once
// Folding an eval-mode BatchNorm into the convolution before it:
//   scale_c = gamma_c / sqrt(var_c + eps)
//   w'_c    = w_c * scale_c
//   b'_c    = beta_c + (b_c - mean_c) * scale_c
// Computed in float64 whatever the inputs' dtype, then cast to out_dtype, so a bf16
// model folds without compounding the rounding of its BN statistics.
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastvision {

// Checks the arguments and returns the float64 inputs laid out for the kernels.
struct FoldInputs {
  at::Tensor weight;        // (C_out, K) contiguous float64, K = in_channels/groups * kh * kw
  at::Tensor bias;          // (C_out,) float64 (zeros when the conv has none)
  at::Tensor mean, var;     // (C_out,) float64
  at::Tensor gamma, beta;   // (C_out,) float64 (ones / zeros when BN is not affine)
};

FoldInputs prepare_fold_inputs(const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias);

std::tuple<at::Tensor, at::Tensor> fold_batchnorm_cpu(
    const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, std::optional<at::ScalarType> out_dtype);

}  // namespace fastvision
