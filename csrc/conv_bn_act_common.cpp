// Argument checks and shape logic shared by the CPU and CUDA conv_bn_act.
#include "conv_bn_act.h"

namespace fastvision {

namespace {

void check_pair(const std::vector<int64_t>& v, const char* name, int64_t minimum) {
  TORCH_CHECK(v.size() == 2, "conv_bn_act: ", name, " must have 2 values, got ", v.size());
  TORCH_CHECK(v[0] >= minimum && v[1] >= minimum, "conv_bn_act: ", name, " must be >= ", minimum, ", got ", v);
}

void check_channel_vector(const std::optional<at::Tensor>& t, const char* name, int64_t channels,
                          const at::Tensor& input) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, "conv_bn_act: ", name, " must have shape (", channels,
              ",), got ", t->sizes());
  TORCH_CHECK(t->is_floating_point(), "conv_bn_act: ", name, " must be floating-point, got ", t->scalar_type());
  TORCH_CHECK(t->device() == input.device(), "conv_bn_act: ", name, " is on ", t->device(), ", input on ",
              input.device());
}

}  // namespace

at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::vector<int64_t> conv_output_size(const at::Tensor& input, const at::Tensor& weight, const ConvParams& p) {
  std::vector<int64_t> size{input.size(0), weight.size(0)};
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = p.dilation[d] * (weight.size(d + 2) - 1) + 1;
    size.push_back((input.size(d + 2) + 2 * p.padding[d] - extent) / p.stride[d] + 1);
  }
  return size;
}

at::MemoryFormat check_conv_bn_act_args(const at::Tensor& input, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& scale,
                                        const std::optional<at::Tensor>& shift,
                                        const std::optional<at::Tensor>& residual, const ConvParams& p) {
  TORCH_CHECK(input.dim() == 4, "conv_bn_act: input must be 4-D (N, C, H, W), got shape ", input.sizes());
  TORCH_CHECK(input.is_floating_point(), "conv_bn_act: input must be floating-point, got ", input.scalar_type());
  TORCH_CHECK(weight.dim() == 4, "conv_bn_act: weight must be 4-D (C_out, C_in/groups, kH, kW), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "conv_bn_act: weight dtype ", weight.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), "conv_bn_act: weight is on ", weight.device(), ", input on ",
              input.device());
  TORCH_CHECK(p.groups >= 1, "conv_bn_act: groups must be >= 1, got ", p.groups);
  check_pair(p.stride, "stride", 1);
  check_pair(p.padding, "padding", 0);
  check_pair(p.dilation, "dilation", 1);
  TORCH_CHECK(weight.size(1) * p.groups == input.size(1), "conv_bn_act: input has ", input.size(1),
              " channels, but weight ", weight.sizes(), " with groups=", p.groups, " expects ",
              weight.size(1) * p.groups);
  TORCH_CHECK(weight.size(0) % p.groups == 0, "conv_bn_act: weight's out_channels ", weight.size(0),
              " is not divisible by groups=", p.groups);
  const auto out_size = conv_output_size(input, weight, p);
  TORCH_CHECK(out_size[2] > 0 && out_size[3] > 0, "conv_bn_act: input spatial size ", input.sizes(),
              " is too small for kernel ", weight.sizes(), " (output would be ", out_size, ")");
  check_channel_vector(scale, "scale", weight.size(0), input);
  check_channel_vector(shift, "shift", weight.size(0), input);
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes().vec() == out_size, "conv_bn_act: residual has shape ", residual->sizes(),
                ", expected the output's ", out_size);
    TORCH_CHECK(residual->scalar_type() == input.scalar_type(), "conv_bn_act: residual dtype ",
                residual->scalar_type(), " differs from input dtype ", input.scalar_type());
    TORCH_CHECK(residual->device() == input.device(), "conv_bn_act: residual is on ", residual->device(),
                ", input on ", input.device());
  }
  // Same rule as fastvision/ops/conv.py's fake kernel.
  const bool channels_last = input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

at::Tensor epilogue_vector(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(acc).contiguous();
}

}  // namespace fastvision
