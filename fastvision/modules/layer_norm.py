import torch
from torch import nn

from fastvision import ops


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm running the fused kernel: same arguments, attributes and state_dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor):
        """(self(x + residual), x + residual) in one pass."""
        return ops.add_layer_norm(x, residual, self.normalized_shape, self.weight, self.bias, self.eps)

    def why_not(self, x: torch.Tensor):
        """Why this module falls back to eager on ``x`` (None when the kernel runs)."""
        return ops.layer_norm_decline(x, self.weight, self.bias)
