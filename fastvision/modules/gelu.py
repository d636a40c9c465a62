import torch
import torch.nn.functional as F
from torch import nn

from fastvision import ops
from fastvision.modules._compiled import fused


class GELU(nn.GELU):
    """nn.GELU(approximate=...) running the fused kernel."""

    def __init__(self, approximate: str = "none") -> None:
        if approximate not in ops.GELU_APPROXIMATIONS:
            raise ValueError(f"approximate must be one of {ops.GELU_APPROXIMATIONS}, got {approximate!r}")
        super().__init__(approximate=approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused("gelu"):  # compiled: Inductor's own GELU (see modules/_compiled.py)
            return F.gelu(x, approximate=self.approximate)
        return ops.gelu(x, self.approximate)

    def forward_bias(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """self(x + bias) in one pass."""
        if not fused("gelu"):
            return F.gelu(x + bias, approximate=self.approximate)
        return ops.bias_gelu(x, bias, self.approximate)

    def why_not(self, x: torch.Tensor):
        return ops.gelu_decline(x)
