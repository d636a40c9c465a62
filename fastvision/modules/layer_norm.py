from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastvision import ops
from fastvision.modules._compiled import fused


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm running the fused kernel: same arguments, attributes and state_dict keys."""

    @classmethod
    def from_module(cls, norm: nn.LayerNorm) -> "LayerNorm":
        """A fused LayerNorm holding ``norm``'s very Parameter objects (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape = tuple(norm.normalized_shape)
        new.eps = norm.eps
        new.elementwise_affine = norm.elementwise_affine
        new.register_parameter("weight", norm.weight)
        new.register_parameter("bias", norm.bias)
        return new

    def forward(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        if not fused("layer_norm"):  # compiled: Inductor's own LayerNorm (see modules/_compiled.py)
            y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return y if out_dtype is None else y.to(out_dtype)
        return ops.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, out_dtype=out_dtype)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor, out_dtype: Optional[torch.dtype] = None,
                    residual_scale: Optional[torch.Tensor] = None):
        """(self(h), h) with h = x + residual (times ``residual_scale``, one factor per row), in one pass."""
        if not fused("layer_norm"):
            h = ops.residual_sum(x, residual, residual_scale)
            return self(h, out_dtype=out_dtype), h
        return ops.add_layer_norm(x, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                                  out_dtype=out_dtype, residual_scale=residual_scale)

    def why_not(self, x: torch.Tensor):
        """Why this module falls back to eager on ``x`` (None when the kernel runs)."""
        return ops.layer_norm_decline(x, self.weight, self.bias)
