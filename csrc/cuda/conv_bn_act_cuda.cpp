// conv_bn_act on CUDA: ATen's convolution (cuDNN) followed by fastvision's one-pass epilogue
// kernel; optionally cuDNN's own fused conv+bias+ReLU / conv+bias+add+ReLU
// (set_cuda_conv_engine("cudnn_fused")) or the direct 3x3 depthwise kernel ("direct_depthwise").
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "conv_bn_act.h"
#include "conv_engine.h"
#include "cuda/conv_bn_act_launch.h"

namespace fastvision {

namespace {

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kDouble;
    default: TORCH_CHECK(false, "conv_bn_act: unsupported dtype ", t);
  }
}

const void* optional_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

bool is_depthwise3x3(const at::Tensor& input, const at::Tensor& weight, const ConvParams& p) {
  return p.groups == input.size(1) && weight.size(0) == p.groups && weight.size(1) == 1 && weight.size(2) == 3 &&
         weight.size(3) == 3 && p.stride[0] == p.stride[1] && (p.stride[0] == 1 || p.stride[0] == 2) &&
         p.dilation[0] == 1 && p.dilation[1] == 1;
}

at::Tensor depthwise3x3(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& residual,
                        const EpilogueArgs& e, const ConvParams& p, at::MemoryFormat fmt) {
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor w = weight.contiguous();
  const auto size = conv_output_size(input, weight, p);
  at::Tensor out = at::empty(size, input.options().memory_format(fmt));
  DepthwiseLaunch l{x.data_ptr(), w.data_ptr(), optional_ptr(residual), out.data_ptr(), e,
                    kernel_dtype(input.scalar_type()),
                    DepthwiseShape{size[0], size[1], input.size(2), input.size(3), size[2], size[3], p.stride[0],
                                   p.padding[0], p.padding[1]},
                    fmt == at::MemoryFormat::ChannelsLast};
  const cudaError_t err = launch_depthwise3x3(l, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "conv_bn_act depthwise CUDA kernel failed: ", cudaGetErrorString(err));
  return out;
}

// cuDNN's fused conv + bias (+ add) + ReLU, when the op is exactly that; undefined when it does not apply.
at::Tensor try_cudnn_fused(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& shift, const at::Tensor& residual, const ConvParams& p,
                           bool relu, at::MemoryFormat fmt) {
  if (current_conv_engine() != ConvEngine::kCudnnFused || !relu || (scale.has_value() && scale->defined()))
    return at::Tensor();
  if (input.scalar_type() == at::kDouble) return at::Tensor();
  const std::optional<at::Tensor> bias =
      shift.has_value() && shift->defined() ? std::optional<at::Tensor>(shift->to(input.scalar_type())) : std::nullopt;
  const at::Tensor x = input.contiguous(fmt), w = weight.contiguous(fmt);
  try {
    if (residual.defined())
      return at::cudnn_convolution_add_relu(x, w, residual, 1.0, bias, p.stride, p.padding, p.dilation, p.groups)
          .contiguous(fmt);
    return at::cudnn_convolution_relu(x, w, bias, p.stride, p.padding, p.dilation, p.groups).contiguous(fmt);
  } catch (const c10::Error&) {
    return at::Tensor();  // cuDNN has no fused plan for this case: take the epilogue path
  }
}

at::Tensor conv_bn_act_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            bool relu) {
  const c10::cuda::CUDAGuard guard(input.device());
  const ConvParams p{stride.vec(), padding.vec(), dilation.vec(), groups};
  const at::MemoryFormat fmt = check_conv_bn_act_args(input, weight, scale, shift, residual, p);
  const at::ScalarType acc = accumulation_type(input.scalar_type());
  const at::Tensor s = epilogue_vector(scale, acc), b = epilogue_vector(shift, acc);
  const at::Tensor r = residual.has_value() && residual->defined() ? residual->contiguous(fmt) : at::Tensor();
  const EpilogueArgs e{optional_ptr(s), optional_ptr(b), relu};
  if (current_conv_engine() == ConvEngine::kDirectDepthwise && is_depthwise3x3(input, weight, p))
    return depthwise3x3(input, weight, r, e, p, fmt);
  at::Tensor fused = try_cudnn_fused(input, weight, scale, shift, r, p, relu, fmt);
  if (fused.defined()) return fused;
  at::Tensor out = at::convolution(input, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, groups)
                       .contiguous(fmt);
  if (!s.defined() && !b.defined() && !r.defined() && !relu) return out;
  const EpilogueLaunch l{out.data_ptr(), optional_ptr(r), e, kernel_dtype(out.scalar_type()),
                         out.size(0), out.size(1), out.size(2) * out.size(3), fmt == at::MemoryFormat::ChannelsLast};
  const cudaError_t err = launch_conv_epilogue(l, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "conv_bn_act epilogue CUDA kernel failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CUDA, m) { m.impl("conv_bn_act", &conv_bn_act_cuda); }

}  // namespace fastvision
