"""Calling a timm model's nn.Linear children through ``ops.linear``."""
import torch
from torch import nn

from fastvision import ops
from fastvision.modules._compiled import fused
from fastvision.modules._hooks import has_hooks


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), through ``ops.linear`` (the bias gradient summed by the column-sum kernel) when module is
    a plain nn.Linear with a bias and no hooks, and the policy of a compiled model keeps it."""
    if type(module) is nn.Linear and module.bias is not None and not has_hooks(module) and fused("linear"):
        return ops.linear(x, module.weight, module.bias)
    return module(x)
