import torch
from torch import nn

from fastvision import ops


class GELU(nn.GELU):
    """nn.GELU(approximate=...) running the fused kernel."""

    def __init__(self, approximate: str = "none") -> None:
        if approximate not in ops.GELU_APPROXIMATIONS:
            raise ValueError(f"approximate must be one of {ops.GELU_APPROXIMATIONS}, got {approximate!r}")
        super().__init__(approximate=approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu(x, self.approximate)

    def forward_bias(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """self(x + bias) in one pass."""
        return ops.bias_gelu(x, bias, self.approximate)

    def why_not(self, x: torch.Tensor):
        return ops.gelu_decline(x)
