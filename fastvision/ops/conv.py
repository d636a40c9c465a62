"""Convolution + per-channel scale/shift + optional residual + optional ReLU (C++/CUDA op fastvision::conv_bn_act).

    y = relu?(conv2d(x, weight) * scale[c] + shift[c] + residual)

A folded BatchNorm is ``scale=None, shift=folded bias``; a frozen BatchNorm (eval-mode
statistics, trainable affine) is ``scale = gamma/sqrt(var+eps), shift = beta - mean*scale``.
The epilogue runs in float32 (float64 for float64 inputs) over the conv's output in one pass.
Without fastvision._C, or for inputs the op does not support, the same math runs in eager torch.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvision import _extension
from . import _common as C

IntPair = Union[int, Sequence[int]]
_DEVICES = ("cpu", "cuda")


def _pair(name: str, v: IntPair) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, str) or len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return (int(v[0]), int(v[1]))


def output_size(x_shape, w_shape, stride, padding, dilation) -> Tuple[int, int, int, int]:
    spatial = [(x_shape[d + 2] + 2 * padding[d] - dilation[d] * (w_shape[d + 2] - 1) - 1) // stride[d] + 1
               for d in range(2)]
    return (x_shape[0], w_shape[0], *spatial)


def output_memory_format(x: Tensor) -> torch.memory_format:
    """The op's output layout (the same rule as csrc/conv_bn_act_common.cpp)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@_extension.register_fake("fastvision::conv_bn_act")
def _conv_bn_act_fake(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    size = output_size(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(size, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def _channel(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


def _setup_context(ctx, inputs, output):
    x, weight, scale, shift, residual, stride, padding, dilation, groups, relu = inputs
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
    ctx.relu = relu
    ctx.present = (scale is not None, shift is not None, residual is not None)
    ctx.shift_dtype = None if shift is None else shift.dtype
    ctx.save_for_backward(x, weight, scale, output if relu else None)


def _backward(ctx, grad: Tensor):
    x, weight, scale, out = ctx.saved_tensors
    has_scale, has_shift, has_residual = ctx.present
    stride, padding, dilation, groups = ctx.conv_args
    needs = ctx.needs_input_grad
    if ctx.relu:
        grad = torch.ops.aten.threshold_backward(grad, out, 0)  # what eager ReLU's backward computes
    acc = C.accumulator_dtype(grad.dtype)
    grad_shift = grad.sum((0, 2, 3), dtype=acc).to(ctx.shift_dtype) if has_shift and needs[3] else None
    grad_scale = None
    if has_scale and needs[2]:
        z = torch.ops.aten.convolution(x, weight, None, stride, padding, dilation, False, [0, 0], groups)
        grad_scale = (grad.to(acc) * z.to(acc)).sum((0, 2, 3)).to(scale.dtype)
    grad_z = (grad.to(acc) * _channel(scale.to(acc))).to(grad.dtype) if has_scale else grad
    grad_x = grad_w = None
    if needs[0] or needs[1]:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_z, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [needs[0], needs[1], False])
    grad_residual = grad if has_residual and needs[4] else None
    return grad_x, grad_w, grad_scale, grad_shift, grad_residual, None, None, None, None, None


if _extension.load() is not None:
    torch.library.register_autograd("fastvision::conv_bn_act", _backward, setup_context=_setup_context)


def conv_bn_act_reference(x: Tensor, weight: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                          residual: Optional[Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                          dilation: IntPair = 1, groups: int = 1, relu: bool = False) -> Tensor:
    """The op in eager torch: conv in the input dtype, epilogue in float32 (float64 for float64)."""
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    acc = C.accumulator_dtype(y.dtype)
    out = y.to(acc)
    if scale is not None:
        out = out * _channel(scale.to(acc))
    if shift is not None:
        out = out + _channel(shift.to(acc))
    if residual is not None:
        out = out + residual.to(acc)
    if relu:
        out = torch.relu(out)
    return out.to(y.dtype)


def _check_channel_vector(name: str, t: Optional[Tensor], channels: int) -> None:
    C.check_floating(name, t)
    if t is not None and tuple(t.shape) != (channels,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({channels},) (the conv's out_channels)")


def _validate(x, weight, scale, shift, residual, stride, padding, dilation, groups):
    C.check_floating("input", x)
    C.check_floating("weight", weight)
    if x.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels/groups, kH, kW), got {tuple(weight.shape)}")
    if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups={groups!r} must be a positive int dividing out_channels {weight.shape[0]}")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"input has {x.shape[1]} channels, but weight {tuple(weight.shape)} with groups={groups} "
                         f"expects {weight.shape[1] * groups}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"invalid stride {stride}, padding {padding} or dilation {dilation}")
    size = output_size(x.shape, weight.shape, stride, padding, dilation)
    if min(size[2:]) < 1:
        raise ValueError(f"input of shape {tuple(x.shape)} is too small for kernel {tuple(weight.shape[2:])} "
                         f"with padding {padding} and dilation {dilation}")
    _check_channel_vector("scale", scale, weight.shape[0])
    _check_channel_vector("shift", shift, weight.shape[0])
    C.check_floating("residual", residual)
    if residual is not None and tuple(residual.shape) != size:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected the output's {size}")
    C.check_same_device(input=x, weight=weight, scale=scale, shift=shift, residual=residual)


def conv_bn_act_decline(x: Tensor, weight: Optional[Tensor] = None, residual: Optional[Tensor] = None
                        ) -> Optional[str]:
    """Why conv_bn_act runs in eager torch rather than the C++/CUDA op on these inputs (None: it runs the op)."""
    reason = _extension.extension_decline()
    if reason is not None:
        return reason
    if x.device.type not in _DEVICES:
        return f"{x.device.type} tensors are not supported (cpu and cuda are)"
    if x.device.type == "cuda" and not _extension.built_with_cuda():
        return "fastvision._C was built without CUDA (CUDA_HOME unset or FASTVISION_SKIP_CUDA=1 at build time)"
    for name, t in (("input", x), ("weight", weight), ("residual", residual)):
        if t is not None and t.dtype != x.dtype:
            return f"{name} dtype {t.dtype} differs from input dtype {x.dtype}"
    return C.dtype_decline(x)


def conv_bn_act(x: Tensor, weight: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                residual: Optional[Tensor] = None, stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
                groups: int = 1, relu: bool = False) -> Tensor:
    """relu?(conv2d(x, weight, stride, padding, dilation, groups) * scale + shift + residual), fused.

    ``scale``/``shift`` are per-output-channel (any float dtype; applied in float32). Under
    autocast the conv runs in the autocast dtype, as eager conv2d does, and so does the residual add.
    """
    stride, padding, dilation = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    _validate(x, weight, scale, shift, residual, stride, padding, dilation, groups)
    x, weight, residual = C.autocast_cast(C.autocast_dtype_for(x.device.type, "lower"), x, weight, residual)
    if conv_bn_act_decline(x, weight, residual) is not None:
        return conv_bn_act_reference(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu)
    return torch.ops.fastvision.conv_bn_act(x, weight, scale, shift, residual, list(stride), list(padding),
                                            list(dilation), groups, relu)


def conv_bn_act_unchecked(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                          residual: Optional[Tensor], conv_args: Tuple[List[int], List[int], List[int], int],
                          relu: bool) -> Tensor:
    """conv_bn_act for a caller that got None from conv_bn_act_decline and cast every tensor to x's dtype:
    straight to the registered op, whose C++ checks shapes and devices. conv_args: (stride, padding,
    dilation, groups). A patched ResNet makes 53 such calls per step, where the host time counts."""
    return torch.ops.fastvision.conv_bn_act(x, weight, scale, shift, residual, *conv_args, relu)
