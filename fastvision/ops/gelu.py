"""GELU (exact and tanh) and fused bias + GELU as torch.library custom ops."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _common as C
from ._dispatch import call, define

APPROXIMATIONS = ("none", "tanh")


def _kernels():
    return C.triton_kernels.gelu


def _gelu_impl(x: Tensor, approximate: str) -> Tensor:
    if not C.use_triton(x):
        return F.gelu(x, approximate=approximate)
    return _kernels().gelu_fwd(x.contiguous(), approximate == "tanh")


def _gelu_fake(x, approximate):
    return x.new_empty(x.shape)


def _gelu_backward_impl(dy: Tensor, x: Tensor, approximate: str) -> Tensor:
    if not C.use_triton(x):
        return torch.ops.aten.gelu_backward(dy, x, approximate=approximate)
    return _kernels().gelu_bwd(dy.contiguous(), x.contiguous(), approximate == "tanh")


def _gelu_backward_fake(dy, x, approximate):
    return x.new_empty(x.shape)


def _setup_gelu(ctx, inputs, output):
    x, approximate = inputs
    ctx.approximate = approximate
    ctx.save_for_backward(x)


def _gelu_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return call("gelu_backward", dy, x, ctx.approximate), None


define("gelu_backward", _gelu_backward_impl, _gelu_backward_fake)
define("gelu", _gelu_impl, _gelu_fake, setup_context=_setup_gelu, backward=_gelu_backward)


def _bias_gelu_impl(x: Tensor, bias: Tensor, approximate: str) -> Tensor:
    if not C.use_triton(x):
        return F.gelu(x + bias, approximate=approximate)
    rows = C.row_major(x)
    y = _kernels().bias_gelu_fwd(rows, bias.contiguous(), approximate == "tanh")
    return y if rows is x else y.view(x.shape)


def _bias_gelu_fake(x, bias, approximate):
    return x.new_empty(x.shape)


def _bias_gelu_backward_impl(dy: Tensor, x: Tensor, bias: Tensor, approximate: str) -> Tuple[Tensor, Tensor]:
    N = x.shape[-1]
    if not C.use_triton(x):
        dx = torch.ops.aten.gelu_backward(dy, x + bias, approximate=approximate).to(x.dtype)
        return dx, dx.reshape(-1, N).sum(0, dtype=C.accumulator_dtype(x.dtype))
    rows = C.row_major(x)
    dx, db = _kernels().bias_gelu_bwd(C.row_major(dy), rows, bias.contiguous(), approximate == "tanh")
    return (dx if rows is x else dx.view(x.shape)), db


def _bias_gelu_backward_fake(dy, x, bias, approximate):
    acc = C.accumulator_dtype(x.dtype)
    return x.new_empty(x.shape), x.new_empty(x.shape[-1], dtype=acc)


def _setup_bias_gelu(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.approximate = approximate
    ctx.save_for_backward(x, bias)


def _bias_gelu_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = call("bias_gelu_backward", dy, x, bias, ctx.approximate)
    return dx, db.to(bias.dtype), None


define("bias_gelu_backward", _bias_gelu_backward_impl, _bias_gelu_backward_fake)
define("bias_gelu", _bias_gelu_impl, _bias_gelu_fake, setup_context=_setup_bias_gelu,
       backward=_bias_gelu_backward)


def _check_approximate(approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def gelu_decline(x: Tensor, bias: Optional[Tensor] = None) -> Optional[str]:
    """Why the fused GELU will not run on these inputs (None: it will)."""
    return C.first_decline(C.device_decline(x), C.dtype_decline(x),
                           None if bias is None else C.dtype_decline(bias))


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """Drop-in for F.gelu."""
    C.check_floating("input", x)
    _check_approximate(approximate)
    if gelu_decline(x) is not None:
        return F.gelu(x, approximate=approximate)
    return call("gelu", x, approximate)


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """F.gelu(x + bias) in one pass; bias has the size of x's last dimension."""
    C.check_floating("input", x)
    C.check_floating("bias", bias)
    _check_approximate(approximate)
    if bias.dim() != 1 or x.dim() == 0 or bias.shape[0] != x.shape[-1]:
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({x.shape[-1] if x.dim() else '?'},) "
                         f"to match the input's last dimension")
    C.check_same_device(input=x, bias=bias)
    dtype = torch.promote_types(x.dtype, bias.dtype)
    if gelu_decline(x, bias) is not None or x.dtype != dtype:
        return F.gelu(x + bias, approximate=approximate)
    return call("bias_gelu", x, bias, approximate)
