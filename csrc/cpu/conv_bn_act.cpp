// conv_bn_act on CPU: ATen's convolution, then one fused pass over its output
// (scale/shift, residual, ReLU) computed in float (double for double inputs).
#include "conv_bn_act.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace fastvision {

namespace {

template <typename scalar_t>
struct Epilogue {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* scale;
  const acc_t* shift;
  bool relu;

  inline scalar_t operator()(scalar_t conv, const scalar_t* residual, int64_t i, int64_t c) const {
    acc_t v = static_cast<acc_t>(conv);
    if (scale) v *= scale[c];
    if (shift) v += shift[c];
    if (residual) v += static_cast<acc_t>(residual[i]);
    if (relu) v = v < acc_t(0) ? acc_t(0) : v;  // NaN passes through, as torch.relu
    return static_cast<scalar_t>(v);
  }
};

template <typename scalar_t>
void epilogue_cpu(at::Tensor& out, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& residual,
                  bool relu, bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const Epilogue<scalar_t> op{scale.defined() ? scale.data_ptr<acc_t>() : nullptr,
                              shift.defined() ? shift.data_ptr<acc_t>() : nullptr, relu};
  scalar_t* y = out.data_ptr<scalar_t>();
  const scalar_t* r = residual.defined() ? residual.data_ptr<scalar_t>() : nullptr;
  const int64_t N = out.size(0), C = out.size(1), HW = out.size(2) * out.size(3);
  if (channels_last) {
    at::parallel_for(0, N * HW, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        for (int64_t c = 0; c < C; ++c) y[row * C + c] = op(y[row * C + c], r, row * C + c, c);
    });
  } else {
    at::parallel_for(0, N * C, 4, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % C;
        for (int64_t i = plane * HW; i < (plane + 1) * HW; ++i) y[i] = op(y[i], r, i, c);
      }
    });
  }
}

at::Tensor conv_bn_act_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           bool relu) {
  const ConvParams p{stride.vec(), padding.vec(), dilation.vec(), groups};
  const at::MemoryFormat fmt = check_conv_bn_act_args(input, weight, scale, shift, residual, p);
  at::Tensor out = at::convolution(input, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, groups)
                       .contiguous(fmt);
  const at::ScalarType acc = accumulation_type(input.scalar_type());
  const at::Tensor s = epilogue_vector(scale, acc), b = epilogue_vector(shift, acc);
  const at::Tensor r = residual.has_value() && residual->defined() ? residual->contiguous(fmt) : at::Tensor();
  if (!s.defined() && !b.defined() && !r.defined() && !relu) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv_bn_act_cpu", [&] {
    epilogue_cpu<scalar_t>(out, s, b, r, relu, fmt == at::MemoryFormat::ChannelsLast);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CPU, m) { m.impl("conv_bn_act", &conv_bn_act_cpu); }

}  // namespace fastvision
