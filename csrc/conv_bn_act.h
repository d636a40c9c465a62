#pragma once
// conv_bn_act: y = act(conv(x, w) * scale[c] + shift[c] + residual)
//   scale, shift: per output channel (folded BatchNorm: scale absent, shift = folded bias;
//                 frozen BatchNorm: scale = gamma/sqrt(var+eps), shift = beta - mean*scale)
//   residual:     optional, the output's shape and dtype
//   act:          ReLU or nothing
// The output has the input's memory format (channels_last when the input is channels_last),
// so the fake (meta) kernel in fastvision/ops/conv.py can give the same strides.
#include <ATen/ATen.h>

#include <optional>

namespace fastvision {

struct ConvParams {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};

// Checks every argument (messages name it) and returns the output's memory format.
at::MemoryFormat check_conv_bn_act_args(const at::Tensor& input, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& scale,
                                        const std::optional<at::Tensor>& shift,
                                        const std::optional<at::Tensor>& residual, const ConvParams& p);

std::vector<int64_t> conv_output_size(const at::Tensor& input, const at::Tensor& weight, const ConvParams& p);

// Per-channel vector in the accumulation type (float, or double for double inputs); undefined when absent.
at::Tensor epilogue_vector(const std::optional<at::Tensor>& t, at::ScalarType acc);

at::ScalarType accumulation_type(at::ScalarType t);

}  // namespace fastvision
