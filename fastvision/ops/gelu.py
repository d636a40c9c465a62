"""GELU (exact and tanh) and fused bias + GELU as torch.library custom ops."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _common as C
from ._dispatch import call, define, refuse_create_graph
from .linear import linear_backward

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


def _check_bias_gelu(x: Tensor, bias: Tensor, approximate: str) -> None:
    C.check_floating("input", x)
    C.check_floating("bias", bias)
    _check_approximate(approximate)
    if bias.dim() != 1 or x.dim() == 0 or bias.shape[0] != x.shape[-1]:
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({x.shape[-1] if x.dim() else '?'},) "
                         f"to match the input's last dimension")
    C.check_same_device(input=x, bias=bias)


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """F.gelu(x + bias) in one pass; bias has the size of x's last dimension."""
    _check_bias_gelu(x, bias, approximate)
    dtype = torch.promote_types(x.dtype, bias.dtype)
    if gelu_decline(x, bias) is not None or x.dtype != dtype:
        return F.gelu(x + bias, approximate=approximate)
    return call("bias_gelu", x, bias, approximate)


class _BiasGeluLinear(torch.autograd.Function):
    """F.linear(gelu(a + b1), w2, b2), saving a but not gelu(a + b1): the backward recomputes it."""

    @staticmethod
    def forward(ctx, a, b1, w2, b2, approximate):
        ctx.approximate = approximate
        ctx.b2_dtype = None if b2 is None else b2.dtype
        ctx.save_for_backward(a, b1, w2)
        return F.linear(bias_gelu(a, b1, approximate), w2, b2)

    @staticmethod
    def backward(ctx, dy):
        refuse_create_graph("bias_gelu_linear")
        a, b1, w2 = ctx.saved_tensors
        g = call("bias_gelu", a, b1, ctx.approximate)
        needs = ctx.needs_input_grad
        dg, dw2, db2 = linear_backward(dy, g, w2, ctx.b2_dtype if needs[3] else None, True, needs[2])
        da, db1 = call("bias_gelu_backward", dg, a, b1, ctx.approximate)
        return da, db1.to(b1.dtype), dw2, db2, None


def bias_gelu_linear(x: Tensor, bias: Tensor, weight: Tensor, linear_bias: Optional[Tensor] = None,
                     approximate: str = "none") -> Tensor:
    """F.linear(F.gelu(x + bias), weight, linear_bias), keeping only x for the backward.

    A transformer MLP's fc2 saves its input, the GELU output, as large as x: here the backward
    recomputes it from x (one more bias+GELU pass) instead, which halves the MLP's saved
    activations. The tensors share one dtype (cast them first under autocast); where the fused
    bias+GELU declines, or the dtypes differ, the plain composition runs.
    """
    _check_bias_gelu(x, bias, approximate)
    C.check_floating("weight", weight)
    C.check_floating("linear_bias", linear_bias)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected (out_features, {x.shape[-1]})")
    dtypes = {t.dtype for t in (x, bias, weight, linear_bias) if t is not None}
    if len(dtypes) != 1 or gelu_decline(x, bias) is not None:
        return F.linear(bias_gelu(x, bias, approximate), weight, linear_bias)
    return _BiasGeluLinear.apply(x, bias, weight, linear_bias, approximate)
