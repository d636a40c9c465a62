"""Transformer block pieces that fuse across timm's module boundaries.

Both keep the original child modules (the same objects, under the same names), so
parameters, buffers and state_dict keys are those of the timm modules they replace.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastvision import ops
from fastvision.modules._compiled import fused
from fastvision.modules._hooks import has_hooks
from fastvision.modules.gelu import GELU
from fastvision.modules.layer_norm import LayerNorm
from fastvision.modules.linear import linear

BLOCK_CHILDREN = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
MLP_CHILDREN = ("fc1", "act", "drop1", "norm", "fc2", "drop2")


def _adopt(target: nn.Module, source: nn.Module, names) -> None:
    for name in names:
        setattr(target, name, getattr(source, name))


class Block(nn.Module):
    """timm ViT Block with the residual adds fused into the LayerNorms that follow them.

    The attention branch's add (and its drop path) is fused into norm2: one pass gives
    h = x + keep * a and LN(h). ``forward_carry`` also defers the MLP branch's add to the next
    block's norm1 (``run_blocks``), so the residual stream is read and written once per add.
    """

    def __init__(self, block: nn.Module, fuse_residual_norm: bool = True):
        super().__init__()
        _adopt(self, block, BLOCK_CHILDREN)
        self.fuse_residual_norm = fuse_residual_norm

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        """``attn_mask`` may be a ``fastvision.ops.Segments`` (x: packed sequences, (1, T, C)): drop path
        then keeps or drops each sequence as a whole, as it does each sample of a batch."""
        return finish_residual(*self.forward_carry(x, None, attn_mask=attn_mask, is_causal=is_causal))

    def forward_carry(self, x: torch.Tensor, pending: "Pending", attn_mask=None, is_causal: bool = False,
                      rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, "Pending"]:
        """(x, pending) in, (x, pending) out, where the residual stream is x + branch * row_scale for
        pending = (branch, row_scale or None), or x for pending = None. The pending add is fused into
        norm1 where norm1 is a fastvision LayerNorm.

        ``rows`` (token indices along dim -2): the output at those tokens alone. Attention still reads
        every token; norm2 and the MLP run on those rows only (the last block of a ViT pooled by its CLS
        token: DINO's packed pass)."""
        qkv_dtype = _linear_input_dtype(x, self.attn, "qkv")
        fused_norm1 = isinstance(self.norm1, LayerNorm) and not has_hooks(self.norm1)
        if pending is not None and self.fuse_residual_norm and fused_norm1:
            y, x = self.norm1.forward_add(x, pending[0], out_dtype=qkv_dtype, residual_scale=pending[1])
        elif fused_norm1:
            x = finish_residual(x, pending)
            y = self.norm1(x, out_dtype=qkv_dtype)
        else:
            x = finish_residual(x, pending)
            y = self.norm1(x)
        a, scale = self._branch(self.drop_path1, self.ls1(self.attn(y, attn_mask=attn_mask, is_causal=is_causal)),
                                x, attn_mask)
        if rows is not None:
            x, a = x.index_select(-2, rows), a.index_select(-2, rows)
            if scale is not None and isinstance(attn_mask, ops.Segments):  # one factor per token (batched: per sample)
                scale = scale.index_select(-1, rows)
        if self.fuse_residual_norm and isinstance(self.norm2, LayerNorm) and not has_hooks(self.norm2):
            y, x = self.norm2.forward_add(x, a, out_dtype=_linear_input_dtype(x, self.mlp, "fc1"),
                                          residual_scale=scale)
        else:
            x = finish_residual(x, (a, scale))
            y = self.norm2(x)
        return x, self._branch(self.drop_path2, self.ls2(self.mlp(y)), x, attn_mask, rows)

    def _branch(self, drop_path: nn.Module, branch: torch.Tensor, x: torch.Tensor, attn_mask,
                rows: Optional[torch.Tensor] = None) -> "Pending":
        """(branch, per-row keep scale or None): drop path as a factor the fused add applies. ``rows``:
        x and branch hold only those tokens of the packed stream attn_mask describes."""
        if not drop_path.training or isinstance(drop_path, nn.Identity) or has_hooks(drop_path):
            return drop_path(branch), None
        if not is_drop_path(drop_path):
            if isinstance(attn_mask, ops.Segments):
                raise NotImplementedError(f"{type(drop_path).__name__} cannot act per packed sequence")
            return drop_path(branch), None
        if drop_path.drop_prob == 0.0:
            return branch, None
        if isinstance(attn_mask, ops.Segments):
            scale = segment_keep_scale(attn_mask, drop_path.drop_prob, drop_path.scale_by_keep, attn_mask.total)
            return branch, (scale if rows is None else scale.index_select(0, rows)).view(1, -1)
        return branch, sample_keep_scale(x.shape[0], x.dim(), drop_path.drop_prob, drop_path.scale_by_keep, x.device)


Pending = Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]


def finish_residual(x: torch.Tensor, pending: Pending) -> torch.Tensor:
    """x + branch * row_scale, the residual add a Block left pending."""
    return x if pending is None else ops.residual_sum(x, *pending)


def run_blocks(blocks, x: torch.Tensor, attn_mask=None, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The blocks in order, each fastvision Block's last residual add fused into the next one's norm1.

    ``rows`` (token indices along dim -2): return the output at those tokens only, which spares a last
    fastvision Block its MLP on every other token (see Block.forward_carry).
    """
    pending: Pending = None
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        if isinstance(block, Block) and not has_hooks(block):
            x, pending = block.forward_carry(x, pending, attn_mask=attn_mask, rows=rows if i == last else None)
        else:
            x, pending = finish_residual(x, pending), None
            x = block(x) if attn_mask is None else block(x, attn_mask=attn_mask)
            if i == last and rows is not None:
                x = x.index_select(-2, rows)
    return finish_residual(x, pending)


class Blocks(nn.Sequential):
    """A ViT's ``blocks`` Sequential (the same children, names and keys) run by ``run_blocks``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self, x)


def is_drop_path(module: nn.Module) -> bool:
    """timm's DropPath (per-sample stochastic depth), which Block applies as a per-row factor."""
    try:
        from timm.layers import DropPath
    except ImportError:
        return False
    return type(module).forward is DropPath.forward


def sample_keep_scale(batch: int, dims: int, drop_prob: float, scale_by_keep: bool, device) -> torch.Tensor:
    """timm's per-sample drop path factors, (batch, 1, ...): one row factor per token of x (batch, ..., C)."""
    keep_prob = 1.0 - drop_prob
    keep = torch.empty((batch,) + (1,) * (dims - 2), device=device).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        keep.div_(keep_prob)
    return keep


def segment_keep_scale(segments: "ops.Segments", drop_prob: float, scale_by_keep: bool, tokens: int) -> torch.Tensor:
    """Drop path factors per token of a packed stream (tokens,): one keep/drop draw per sequence."""
    keep = sample_keep_scale(len(segments.lengths), 2, drop_prob, scale_by_keep, segments.device_lengths.device)
    return keep.view(-1).repeat_interleave(segments.device_lengths, output_size=tokens)  # output_size: no host sync


def drop_path_per_segment(x: torch.Tensor, segments: "ops.Segments", drop_prob: float,
                          scale_by_keep: bool = True) -> torch.Tensor:
    """timm's drop_path with one keep/drop draw per packed sequence instead of per batch row: x (1, T, C)."""
    if drop_prob == 0.0:
        return x
    per_token = segment_keep_scale(segments, drop_prob, scale_by_keep, x.shape[-2]).to(x.dtype)
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
    """timm Mlp with fc1's bias add fused into the GELU (and, in backward, dbias into GELU's backward).

    ``recompute_activation`` (off by default; ``fastvision.patch(..., mlp_recompute=True)``): fc2 does
    not keep the GELU output for its backward, which recomputes it from fc1's output instead
    (``ops.bias_gelu_linear``): the MLP saves half the activations for one more bias+GELU pass.
    """

    def __init__(self, mlp: nn.Module, recompute_activation: bool = False):
        super().__init__()
        _adopt(self, mlp, MLP_CHILDREN)
        self.recompute_activation = recompute_activation

    def _fused_bias(self, dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
        if not isinstance(self.act, GELU) or self.fc1.bias is None or has_hooks(self.fc1, self.act):
            return None
        return self.fc1.bias if dtype is None else self.fc1.bias.to(dtype)  # eager linear adds it in that dtype

    def _recomputes(self, bias: Optional[torch.Tensor]) -> bool:
        return (self.recompute_activation and bias is not None and fused("gelu") and isinstance(self.norm, nn.Identity)
                and (not self.training or getattr(self.drop1, "p", 0.0) == 0.0) and isinstance(self.fc2, nn.Linear)
                and not has_hooks(self.drop1, self.norm, self.fc2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _linear_input_dtype(x, self, "fc1")  # autocast's, or None
        bias = self._fused_bias(dtype)
        if bias is None:
            x = self.act(self.fc1(x))
        elif self._recomputes(bias):
            weight, fc2_bias = (t if t is None or dtype is None else t.to(dtype)
                                for t in (self.fc2.weight, self.fc2.bias))
            return self.drop2(ops.bias_gelu_linear(F.linear(x, self.fc1.weight), bias, weight, fc2_bias,
                                                   self.act.approximate))
        else:
            x = self.act.forward_bias(F.linear(x, self.fc1.weight), bias)
        return self.drop2(linear(self.fc2, self.norm(self.drop1(x))))
