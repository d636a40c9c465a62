"""Softmax over one dimension as a torch.library custom op (kernel works on the last dim)."""
from typing import Optional

import torch
from torch import Tensor

from . import _common as C
from ._dispatch import call, define


def _softmax_impl(x: Tensor) -> Tensor:
    if not C.use_triton(x):
        return torch.softmax(x, dim=-1)
    rows = C.row_major(x)
    y = C.triton_kernels.softmax.softmax_fwd(rows)
    return y if rows is x else y.view(x.shape)


def _softmax_fake(x):
    return x.new_empty(x.shape)


def _softmax_backward_impl(dy: Tensor, y: Tensor) -> Tensor:
    if not C.use_triton(y):
        return y * (dy - (dy * y).sum(-1, keepdim=True))
    rows = C.row_major(y)
    dx = C.triton_kernels.softmax.softmax_bwd(C.row_major(dy), rows)
    return dx if rows is y else dx.view(y.shape)


def _softmax_backward_fake(dy, y):
    return y.new_empty(y.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return call("softmax_backward", dy, y)


define("softmax_backward", _softmax_backward_impl, _softmax_backward_fake)
define("softmax", _softmax_impl, _softmax_fake, setup_context=_setup, backward=_backward)


def softmax_decline(x: Tensor) -> Optional[str]:
    """Why the fused softmax will not run on ``x`` (None: it will)."""
    return C.first_decline(C.device_decline(x), C.dtype_decline(x))


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Drop-in for torch.softmax(x, dim): the fused kernel where supported."""
    C.check_floating("input", x)
    if not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if x.dim() == 0:
        raise ValueError("input must have at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for an input with {x.dim()} dimensions")
    (x,) = C.autocast_cast(C.autocast_dtype_for(x.device.type, "fp32"), x)
    if softmax_decline(x) is not None:
        return torch.softmax(x, dim)
    dim = dim % x.dim()
    if dim == x.dim() - 1:
        return call("softmax", x)
    # The kernel reduces over the last dimension: move dim there and back.
    return call("softmax", x.movedim(dim, -1)).movedim(-1, dim)
