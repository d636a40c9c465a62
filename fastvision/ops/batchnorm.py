"""Folding an eval-mode BatchNorm into the convolution before it (C++/CUDA op fastvision::fold_batchnorm).

    scale = gamma / sqrt(running_var + eps)
    weight' = conv_weight * scale,   bias' = beta + (conv_bias - running_mean) * scale

The math runs in float64 whatever the inputs' dtype; the results are cast once to
``out_dtype`` (default: the conv weight's dtype), so a bf16 model folds without
compounding the rounding of its statistics.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastvision import _extension
from . import _common as C


@_extension.register_fake("fastvision::fold_batchnorm")
def _fold_batchnorm_fake(conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps,
                         out_dtype=None):
    dtype = out_dtype if out_dtype is not None else conv_weight.dtype
    return (conv_weight.new_empty(conv_weight.shape, dtype=dtype),
            conv_weight.new_empty((conv_weight.shape[0],), dtype=dtype))


def _check_channel_vector(name: str, t: Optional[Tensor], channels: int) -> None:
    C.check_floating(name, t)
    if t is not None and tuple(t.shape) != (channels,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({channels},) (the conv's out_channels)")


def _validate(conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias, eps) -> None:
    C.check_floating("conv_weight", conv_weight)
    if conv_weight.dim() < 2:
        raise ValueError(f"conv_weight must have at least 2 dimensions (out_channels, in_channels, ...), "
                         f"got shape {tuple(conv_weight.shape)}")
    channels = conv_weight.shape[0]
    for name, t in (("conv_bias", conv_bias), ("bn_mean", bn_mean), ("bn_var", bn_var), ("bn_weight", bn_weight),
                    ("bn_bias", bn_bias)):
        _check_channel_vector(name, t, channels)
    if bn_mean is None or bn_var is None:
        raise ValueError("bn_mean and bn_var (the BatchNorm running statistics) are required to fold")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    C.check_same_device(conv_weight=conv_weight, conv_bias=conv_bias, bn_mean=bn_mean, bn_var=bn_var,
                        bn_weight=bn_weight, bn_bias=bn_bias)


def fold_batchnorm(conv_weight: Tensor, conv_bias: Optional[Tensor], bn_mean: Tensor, bn_var: Tensor,
                   bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
                   out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """(folded weight, folded bias) of conv -> BatchNorm(eval), computed in float64, cast to ``out_dtype``.

    Not differentiable (a weight transform for inference); needs fastvision._C.
    """
    _validate(conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias, eps)
    _extension.require_extension("ops.fold_batchnorm")
    return torch.ops.fastvision.fold_batchnorm(conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias,
                                               float(eps), out_dtype)


def fold_batchnorm_reference(conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias, eps, out_dtype=None):
    """The same fold in eager float64 torch (no extension needed)."""
    d = lambda t: None if t is None else t.detach().to(torch.float64)  # noqa: E731
    w, b, mean, var, gamma, beta = map(d, (conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias))
    scale = torch.rsqrt(var + eps) if gamma is None else gamma / torch.sqrt(var + eps)
    b = torch.zeros_like(mean) if b is None else b
    beta = torch.zeros_like(mean) if beta is None else beta
    dtype = out_dtype or conv_weight.dtype
    w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    return w.to(dtype), (beta + (b - mean) * scale).to(dtype)
