import torch
from torch import nn

from fastvision import ops
from fastvision.modules._compiled import fused


class Softmax(nn.Softmax):
    """nn.Softmax running the fused kernel; ``dim`` defaults to -1 (nn.Softmax's implicit dim is not supported)."""

    def __init__(self, dim: int = -1) -> None:
        if dim is None:
            raise ValueError("dim must be given: nn.Softmax's implicit-dim behaviour is deprecated and not supported")
        super().__init__(dim=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused("softmax"):  # compiled: Inductor's own softmax (see modules/_compiled.py)
            return torch.softmax(x, self.dim)
        return ops.softmax(x, self.dim)

    def why_not(self, x: torch.Tensor):
        return ops.softmax_decline(x)
