"""Transformer block pieces that fuse across timm's module boundaries.

Both keep the original child modules (the same objects, under the same names), so
parameters, buffers and state_dict keys are those of the timm modules they replace.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastvision import ops
from fastvision.modules.gelu import GELU
from fastvision.modules.layer_norm import LayerNorm

BLOCK_CHILDREN = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
MLP_CHILDREN = ("fc1", "act", "drop1", "norm", "fc2", "drop2")


def _adopt(target: nn.Module, source: nn.Module, names) -> None:
    for name in names:
        setattr(target, name, getattr(source, name))


class Block(nn.Module):
    """timm ViT Block with the first residual add fused into norm2 (one pass: h = x + a, LN(h))."""

    def __init__(self, block: nn.Module, fuse_residual_norm: bool = True):
        super().__init__()
        _adopt(self, block, BLOCK_CHILDREN)
        self.fuse_residual_norm = fuse_residual_norm

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        """``attn_mask`` may be a ``fastvision.ops.Segments`` (x: packed sequences, (1, T, C)): drop path
        then keeps or drops each sequence as a whole, as it does each sample of a batch."""
        if isinstance(self.norm1, LayerNorm):
            y = self.norm1(x, out_dtype=_linear_input_dtype(x, self.attn, "qkv"))
        else:
            y = self.norm1(x)
        a = self._drop_path(self.drop_path1, self.ls1(self.attn(y, attn_mask=attn_mask, is_causal=is_causal)),
                            attn_mask)
        if self.fuse_residual_norm and isinstance(self.norm2, LayerNorm):
            y, x = self.norm2.forward_add(x, a, out_dtype=_linear_input_dtype(x, self.mlp, "fc1"))
        else:
            x = x + a
            y = self.norm2(x)
        return x + self._drop_path(self.drop_path2, self.ls2(self.mlp(y)), attn_mask)

    def _drop_path(self, drop_path: nn.Module, x: torch.Tensor, attn_mask) -> torch.Tensor:
        if not isinstance(attn_mask, ops.Segments) or not drop_path.training or isinstance(drop_path, nn.Identity):
            return drop_path(x)
        if not is_drop_path(drop_path):
            raise NotImplementedError(f"{type(drop_path).__name__} cannot act per packed sequence")
        return drop_path_per_segment(x, attn_mask, drop_path.drop_prob, drop_path.scale_by_keep)


def is_drop_path(module: nn.Module) -> bool:
    """timm's DropPath (per-sample stochastic depth), which Block can apply per packed sequence."""
    try:
        from timm.layers import DropPath
    except ImportError:
        return False
    return type(module).forward is DropPath.forward


def drop_path_per_segment(x: torch.Tensor, segments: "ops.Segments", drop_prob: float,
                          scale_by_keep: bool = True) -> torch.Tensor:
    """timm's drop_path with one keep/drop draw per packed sequence instead of per batch row: x (1, T, C)."""
    if drop_prob == 0.0:
        return x
    keep_prob = 1.0 - drop_prob
    keep = x.new_empty(len(segments.lengths)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        keep.div_(keep_prob)
    per_token = keep.repeat_interleave(segments.device_lengths.to(x.device), output_size=x.shape[-2])  # output_size: no host sync
    return x * per_token.view(1, -1, 1)


def _linear_input_dtype(x: torch.Tensor, consumer: nn.Module, linear_name: str) -> Optional[torch.dtype]:
    """The dtype an autocast Linear that reads x first would cast it to (None outside autocast).

    A LayerNorm feeding such a consumer can write that dtype directly: the same values,
    half the bytes, and no cast kernel before the matmul.
    """
    device = x.device.type
    if not isinstance(getattr(consumer, linear_name, None), nn.Linear) or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


class Mlp(nn.Module):
    """timm Mlp with fc1's bias add fused into the GELU (and, in backward, dbias into GELU's backward)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        _adopt(self, mlp, MLP_CHILDREN)

    def _fused_bias(self) -> Optional[torch.Tensor]:
        if not isinstance(self.act, GELU) or self.fc1.bias is None:
            return None
        bias = self.fc1.bias
        device = bias.device.type
        if torch.is_autocast_enabled(device):
            bias = bias.to(torch.get_autocast_dtype(device))  # eager linear adds it in that dtype
        return bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._fused_bias()
        if bias is None:
            x = self.act(self.fc1(x))
        else:
            x = self.act.forward_bias(F.linear(x, self.fc1.weight), bias)
        return self.drop2(self.fc2(self.norm(self.drop1(x))))
