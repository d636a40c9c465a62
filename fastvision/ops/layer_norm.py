"""LayerNorm and residual-add + LayerNorm as torch.library custom ops.

``layer_norm(x, normalized_shape, weight, bias, eps)`` matches F.layer_norm.
``add_layer_norm(x, residual, ...)`` returns (LN(x + residual), x + residual): the
sum is the next residual stream, so a transformer block reads it once. Its optional
``residual_scale`` (one factor per row) scales the residual first: drop path's per-sample
keep / keep_prob, applied inside the same pass.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _common as C
from ._dispatch import call, define

def _kernels():
    return C.triton_kernels.layer_norm


def _eager_forward(h: Tensor, weight, bias, eps, out_dtype=None):
    hf = h.to(C.accumulator_dtype(h.dtype))
    mean = hf.mean(-1)
    rstd = torch.rsqrt((hf - mean[..., None]).pow(2).mean(-1) + eps)
    y = (hf - mean[..., None]) * rstd[..., None]
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(out_dtype or h.dtype), mean, rstd


def _layer_norm_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                     out_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor]:
    if not C.use_triton(x):
        return _eager_forward(x, weight, bias, eps, out_dtype)
    rows = C.row_major(x)
    y, _, mean, rstd = _kernels().layer_norm_fwd(rows, weight, bias, eps, out_dtype=out_dtype)
    if rows is not x:
        return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])
    return y, mean, rstd


def _layer_norm_fake(x, weight, bias, eps, out_dtype):
    stats = x.new_empty(x.shape[:-1], dtype=C.accumulator_dtype(x.dtype))
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), stats, stats.new_empty(stats.shape)


def residual_sum(x: Tensor, residual: Tensor, residual_scale: Optional[Tensor] = None) -> Tensor:
    """h = x + residual * residual_scale[..., None] (one factor per row; None: x + residual) in eager
    ops: the sum add_layer_norm fuses, in the dtype x + residual promotes to, the product in the
    scale's precision."""
    if residual_scale is None:
        return x + residual
    return torch.addcmul(x, residual, residual_scale[..., None]).to(torch.promote_types(x.dtype, residual.dtype))


def _add_layer_norm_impl(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                         out_dtype: Optional[torch.dtype], residual_scale: Optional[Tensor]
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if not C.use_triton(x):
        h = residual_sum(x, residual, residual_scale)
        y, mean, rstd = _eager_forward(h, weight, bias, eps, out_dtype)
        return y, h, mean, rstd
    rows = C.row_major(x)
    scale = None if residual_scale is None else residual_scale.reshape(-1)
    y, h, mean, rstd = _kernels().layer_norm_fwd(rows, weight, bias, eps, residual=C.row_major(residual),
                                                 out_dtype=out_dtype, residual_scale=scale)
    if rows is not x:
        return y.view(x.shape), h.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])
    return y, h, mean, rstd


def _add_layer_norm_fake(x, residual, weight, bias, eps, out_dtype, residual_scale):
    h = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    stats = x.new_empty(x.shape[:-1], dtype=C.accumulator_dtype(h.dtype))
    return h.new_empty(h.shape, dtype=out_dtype or h.dtype), h, stats, stats.new_empty(stats.shape)


def _backward(dy: Tensor, h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
              skip_grad: Optional[Tensor], needs_weight_grad: bool, residual_dtype: Optional[torch.dtype] = None,
              residual_scale: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """(dx, the residual's gradient (None without residual_dtype), [dweight; dbias] as one (2, N)
    accumulator-dtype tensor, empty when not needed)."""
    if not C.use_triton(h):
        return _eager_backward(dy, h, weight, mean, rstd, skip_grad, needs_weight_grad, residual_dtype,
                               residual_scale)
    rows = C.row_major(h)
    dx, dr, dwb = _kernels().layer_norm_bwd(
        C.row_major(dy), rows, weight, rstd, skip_grad=None if skip_grad is None else C.row_major(skip_grad),
        needs_weight_grad=needs_weight_grad, residual_dtype=residual_dtype,
        residual_scale=None if residual_scale is None else residual_scale.reshape(-1))
    if rows is not h:
        dx = dx.view(h.shape)
        dr = None if dr is None else dr.view(h.shape)
    return dx, dr, dwb if dwb is not None else h.new_empty(0, dtype=C.accumulator_dtype(h.dtype))


def _layer_norm_backward_impl(dy: Tensor, h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                              needs_weight_grad: bool) -> Tuple[Tensor, Tensor]:
    """(dx, [dweight; dbias] as one (2, N) accumulator-dtype tensor, empty when not needed)."""
    dx, _, dwb = _backward(dy, h, weight, mean, rstd, None, needs_weight_grad)
    return dx, dwb


def _layer_norm_backward_fake(dy, h, weight, mean, rstd, needs_weight_grad):
    return h.new_empty(h.shape), _weight_grads_fake(h, needs_weight_grad)


def _weight_grads_fake(h, needs_weight_grad):
    return h.new_empty((2, h.shape[-1]) if needs_weight_grad else 0, dtype=C.accumulator_dtype(h.dtype))


def _add_layer_norm_backward_impl(dy: Tensor, h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                                  skip_grad: Optional[Tensor], residual_scale: Optional[Tensor],
                                  residual_dtype: Optional[torch.dtype], needs_weight_grad: bool
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """(dh, the residual's gradient dh * residual_scale in residual_dtype, [dweight; dbias]). Without
    residual_dtype the residual's gradient is not written (an empty tensor in its place)."""
    dx, dr, dwb = _backward(dy, h, weight, mean, rstd, skip_grad, needs_weight_grad, residual_dtype, residual_scale)
    return dx, (dr if dr is not None else h.new_empty(0)), dwb


def _add_layer_norm_backward_fake(dy, h, weight, mean, rstd, skip_grad, residual_scale, residual_dtype,
                                  needs_weight_grad):
    dr = h.new_empty(h.shape, dtype=residual_dtype) if residual_dtype is not None else h.new_empty(0)
    return h.new_empty(h.shape), dr, _weight_grads_fake(h, needs_weight_grad)


def _eager_backward(dy, h, weight, mean, rstd, skip_grad, needs_weight_grad, residual_dtype=None,
                    residual_scale=None):
    acc = C.accumulator_dtype(h.dtype)
    xhat = (h.to(acc) - mean[..., None]) * rstd[..., None]
    dyf = dy.to(acc)
    g = dyf * weight.to(acc) if weight is not None else dyf
    dx = (g - xhat * (g * xhat).mean(-1, keepdim=True) - g.mean(-1, keepdim=True)) * rstd[..., None]
    if skip_grad is not None:
        dx = dx + skip_grad.to(acc)
    dr = None
    if residual_dtype is not None:
        dr = (dx if residual_scale is None else dx * residual_scale[..., None].to(acc)).to(residual_dtype)
    if not needs_weight_grad:
        return dx.to(h.dtype), dr, h.new_empty(0, dtype=acc)
    rows = h.shape[-1]
    return dx.to(h.dtype), dr, torch.stack(((dyf * xhat).reshape(-1, rows).sum(0), dyf.reshape(-1, rows).sum(0)))


def _weight_grads(ctx, dwb, weight, bias):
    needs_w = weight is not None and ctx.needs_input_grad[ctx.weight_index]
    needs_b = bias is not None and ctx.needs_input_grad[ctx.weight_index + 1]
    if not (needs_w or needs_b):
        return None, None
    if needs_w and needs_b and weight.dtype == bias.dtype:
        dw, db = dwb.to(weight.dtype).unbind(0)  # one cast for both
        return dw, db
    return (dwb[0].to(weight.dtype) if needs_w else None), (dwb[1].to(bias.dtype) if needs_b else None)


def _needs_weight_grad(ctx) -> bool:
    i = ctx.weight_index
    return bool(ctx.needs_input_grad[i] or ctx.needs_input_grad[i + 1])


def _setup_layer_norm(ctx, inputs, output):
    x, weight, bias, _, _ = inputs
    _, mean, rstd = output
    ctx.weight_index = 1
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    weight = weight if ctx.has_weight else None
    bias = bias if ctx.has_bias else None
    dx, dwb = call("layer_norm_backward", dy, x, weight, mean, rstd, _needs_weight_grad(ctx))
    dw, db = _weight_grads(ctx, dwb, weight, bias)
    return dx, dw, db, None, None


define("layer_norm_backward", _layer_norm_backward_impl, _layer_norm_backward_fake)
define("layer_norm", _layer_norm_impl, _layer_norm_fake, setup_context=_setup_layer_norm,
       backward=_layer_norm_backward)


def _setup_add_layer_norm(ctx, inputs, output):
    x, residual, weight, bias, _, _, residual_scale = inputs
    _, h, mean, rstd = output
    ctx.input_dtypes = (x.dtype, residual.dtype)
    ctx.weight_index = 2
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.has_scale = residual_scale is not None
    ctx.save_for_backward(h, weight, bias, mean, rstd, residual_scale)
    ctx.mark_non_differentiable(mean, rstd)


def _add_layer_norm_backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, bias, mean, rstd, residual_scale = ctx.saved_tensors
    weight = weight if ctx.has_weight else None
    bias = bias if ctx.has_bias else None
    residual_scale = residual_scale if ctx.has_scale else None
    if dy is None:
        dy = torch.zeros_like(h)
    x_dtype, residual_dtype = ctx.input_dtypes
    # h = x + residual: unscaled and in h's dtype, the residual's gradient is dh itself, written once
    # and handed to both inputs (as autograd's own add does)
    same_grad = residual_scale is None and residual_dtype == h.dtype
    dx, dr, dwb = call("add_layer_norm_backward", dy, h, weight, mean, rstd, dh, residual_scale,
                       None if same_grad else residual_dtype, _needs_weight_grad(ctx))
    dw, db = _weight_grads(ctx, dwb, weight, bias)
    return dx.to(x_dtype), (dx if same_grad else dr), dw, db, None, None, None


define("add_layer_norm_backward", _add_layer_norm_backward_impl, _add_layer_norm_backward_fake)
define("add_layer_norm", _add_layer_norm_impl, _add_layer_norm_fake, setup_context=_setup_add_layer_norm,
       backward=_add_layer_norm_backward)


def _normalized_size(normalized_shape) -> Tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def _validate(x, normalized_shape, weight, bias, residual=None) -> Tuple[int, ...]:
    C.check_floating("input", x)
    C.check_floating("weight", weight)
    C.check_floating("bias", bias)
    C.check_floating("residual", residual)
    shape = _normalized_size(normalized_shape)
    if len(shape) == 0 or x.dim() < len(shape) or tuple(x.shape[-len(shape):]) != shape:
        raise ValueError(f"input of shape {tuple(x.shape)} does not end with normalized_shape {shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected normalized_shape {shape}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected the input's {tuple(x.shape)}")
    C.check_same_device(input=x, weight=weight, bias=bias, residual=residual)
    return shape


def layer_norm_decline(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Optional[str]:
    """Why the fused LayerNorm will not run on these inputs (None: it will)."""
    return C.first_decline(
        C.device_decline(x), C.dtype_decline(x),
        *(C.dtype_decline(t) for t in (weight, bias) if t is not None))


def _last_dim_view(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shape: Tuple[int, ...]):
    """Multi-dimensional normalized_shape folded into one last dimension."""
    if len(shape) == 1:
        return x, weight, bias
    fold = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    return x.reshape(*x.shape[: x.dim() - len(shape)], -1), fold(weight), fold(bias)


_NOT_COMMON = object()


def _common_case(x, normalized_shape, weight, bias, out_dtype):
    """The usual call, recognised cheaply: a module's own parameters, a 1-D normalized_shape, a
    supported input where the kernel runs. Returns the output dtype to ask for (autocast's
    float32 unless ``out_dtype`` is given), or _NOT_COMMON: every other call takes the full
    checks, which name what is wrong or why the kernel declines."""
    if type(normalized_shape) is tuple and len(normalized_shape) == 1:
        n = normalized_shape[0]
    elif type(normalized_shape) is int:
        n = normalized_shape
    else:
        return _NOT_COMMON
    if not (isinstance(x, Tensor) and x.dtype in C.FLOATING_DTYPES and x.dim() and x.shape[-1] == n):
        return _NOT_COMMON
    if not x.is_cuda and C.device_decline(x) is not None:
        return _NOT_COMMON
    params = C.FLOATING_DTYPES
    if torch.is_autocast_enabled(x.device.type):
        if not x.is_cuda:
            return _NOT_COMMON
        params, out_dtype = (torch.float32,), out_dtype or torch.float32  # autocast runs LayerNorm in fp32
    device = x.device
    for t in (weight, bias):
        if t is not None and not (isinstance(t, Tensor) and t.dtype in params and t.dim() == 1 and t.shape[0] == n
                                  and t.device == device):
            return _NOT_COMMON
    return out_dtype


def layer_norm(x: Tensor, normalized_shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Drop-in for F.layer_norm: the fused kernel where supported, else F.layer_norm itself.

    Statistics are float32 (float64 for float64 input) whatever the input dtype. Under CUDA
    autocast the result is float32, as eager autocast gives, but a low-precision input is
    read as it is instead of being copied to float32 first. ``out_dtype`` overrides the
    output dtype (e.g. the autocast dtype when the consumer is a Linear that casts anyway).
    """
    common = _common_case(x, normalized_shape, weight, bias, out_dtype)
    if common is not _NOT_COMMON:
        return call("layer_norm", x, weight, bias, float(eps), common)[0]
    shape = _validate(x, normalized_shape, weight, bias)
    autocast_dtype = C.autocast_dtype_for(x.device.type, "fp32")
    weight, bias = C.autocast_cast(autocast_dtype, weight, bias)
    out_dtype = out_dtype or autocast_dtype
    if layer_norm_decline(x, weight, bias) is not None:
        y = F.layer_norm(x, shape, weight, bias, eps)
        return y if out_dtype is None else y.to(out_dtype)
    flat, w, b = _last_dim_view(x, weight, bias, shape)
    y = call("layer_norm", flat, w, b, float(eps), out_dtype)[0]
    return y if flat is x else y.view(x.shape)


def add_layer_norm(x: Tensor, residual: Tensor, normalized_shape, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, *, out_dtype: Optional[torch.dtype] = None,
                   residual_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(F.layer_norm(h), h) with h = x + residual, fused into one pass where supported.

    The sum has the dtype ``x + residual`` promotes to (the kernel reads both as they are);
    under CUDA autocast the normalised output is float32, as eager autocast gives, unless
    ``out_dtype`` says otherwise. ``residual_scale`` (broadcastable to the rows, x.shape
    without the normalised dimensions; no gradient) makes h = x + residual * residual_scale,
    with the product in float32 (float64 for float64 inputs).
    """
    if residual_scale is not None:
        residual_scale = _row_scale(residual_scale, x, residual, len(_normalized_size(normalized_shape)))
    common = _common_case(x, normalized_shape, weight, bias, out_dtype)
    if (common is not _NOT_COMMON and isinstance(residual, Tensor) and residual.shape == x.shape
            and residual.dtype in C.FLOATING_DTYPES and residual.device == x.device):
        y, h, _, _ = call("add_layer_norm", x, residual, weight, bias, float(eps), common, residual_scale)
        return y, h
    shape = _validate(x, normalized_shape, weight, bias, residual)
    autocast_dtype = C.autocast_dtype_for(x.device.type, "fp32")
    weight, bias = C.autocast_cast(autocast_dtype, weight, bias)
    out_dtype = out_dtype or autocast_dtype
    if layer_norm_decline(x, weight, bias) is not None or C.dtype_decline(residual) is not None:
        h = residual_sum(x, residual, residual_scale)
        return layer_norm(h, shape, weight, bias, eps, out_dtype=out_dtype), h
    flat, w, b = _last_dim_view(x, weight, bias, shape)
    y, h, _, _ = call("add_layer_norm", flat, residual.reshape(flat.shape), w, b, float(eps), out_dtype,
                      residual_scale)
    return y.view(x.shape), h.view(x.shape)


def _row_scale(residual_scale, x: Tensor, residual: Tensor, normalized_dims: int) -> Tensor:
    """residual_scale as one contiguous accumulator-dtype factor per row of x."""
    C.check_floating("residual_scale", residual_scale)
    C.check_floating("input", x)
    C.check_same_device(input=x, residual_scale=residual_scale)
    rows = x.shape[:max(x.dim() - normalized_dims, 0)]
    try:
        expanded = residual_scale.expand(rows)
    except RuntimeError:
        raise ValueError(f"residual_scale has shape {tuple(residual_scale.shape)}, which does not broadcast to "
                         f"the rows of the input, {tuple(rows)}") from None
    residual_dtype = residual.dtype if isinstance(residual, Tensor) else x.dtype  # a bad residual: _validate says so
    dtype = C.accumulator_dtype(torch.promote_types(x.dtype, residual_dtype))
    return expanded.to(dtype).contiguous()
