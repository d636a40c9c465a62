"""timm-compatible multi-head self-attention running the fused attention kernel."""
from typing import Optional

import torch
from torch import nn

from fastvision import ops
from fastvision.modules._hooks import has_hooks
from fastvision.modules.linear import linear

# Children of timm's vision_transformer.Attention, adopted as they are (same objects, same names).
ATTENTION_CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop")


class Attention(nn.Module):
    """timm ``Attention`` with the attention itself fused and read straight off the packed qkv projection.

    Set ``attention_rows = n`` to keep the softmax probabilities of the first n query rows
    of the next forward in ``last_attention_rows`` (B, H, n, N): DINO's CLS attention maps,
    written by the same kernel pass.
    """

    @classmethod
    def from_timm(cls, attn: nn.Module) -> "Attention":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ATTENTION_CHILDREN:
            child = getattr(attn, name, None)
            if isinstance(child, nn.Module):
                setattr(new, name, child)
            else:
                setattr(new, name, None if name == "gate" else nn.Identity())
        new.num_heads = attn.num_heads
        new.head_dim = attn.head_dim
        new.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        new.scale = attn.scale
        new.fused_attn = True
        new.attention_rows = 0
        new.last_attention_rows = None
        return new

    def _heads(self, qkv: torch.Tensor):
        """q, k, v as (B, H, N, d) views, with timm's q_norm/k_norm applied."""
        q, k, v = (qkv.select(2, i).transpose(1, 2) for i in range(3))
        return self.q_norm(q), self.k_norm(k), v

    def _has_qk_norm(self) -> bool:
        """Whether q_norm and k_norm must be called (not identities, or hooked)."""
        identities = isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
        return not identities or has_hooks(self.q_norm, self.k_norm)

    def _attend(self, qkv: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool):
        if has_hooks(self.attn_drop):
            return self._attend_unfused(qkv, attn_mask, is_causal)
        dropout = self.attn_drop.p if self.training else 0.0
        kwargs = dict(scale=self.scale, attn_bias=attn_mask, return_attn_rows=self.attention_rows, dropout_p=dropout)
        if self._has_qk_norm() or is_causal:
            result = ops.attention(*self._heads(qkv), is_causal=is_causal, **kwargs)
            out, rows = result if self.attention_rows else (result, None)
            return out.transpose(1, 2), rows
        result = ops.attention_qkvpacked(qkv, **kwargs)
        return result if self.attention_rows else (result, None)

    def _attend_unfused(self, qkv: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool):
        """timm's unfused attention, whose probabilities go through ``attn_drop``: with hooks there
        (attention-rollout recipes read the maps from it), they run on the same values as in eager timm."""
        q, k, v = self._heads(qkv)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if is_causal:
            n = scores.shape[-1]
            attn_mask = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:
            scores = scores + attn_mask
        attn = self.attn_drop(scores.softmax(dim=-1))
        rows = attn[:, :, :self.attention_rows] if self.attention_rows else None
        return (attn @ v).transpose(1, 2), rows

    def _attend_packed(self, qkv: torch.Tensor, segments: "ops.Segments"):
        """Sequences packed along the token axis (x of shape (1, T, C)): block-diagonal attention."""
        if self._has_qk_norm():
            q, k, v = (self.q_norm(qkv[:, :, 0]), self.k_norm(qkv[:, :, 1]), qkv[:, :, 2])
            qkv = torch.stack([q, k, v], dim=2)
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError("attention dropout is not supported on packed sequences")
        if self.attention_rows:
            raise NotImplementedError("attention rows are not recorded for packed sequences")
        # squeeze, not qkv[0]: select's backward would zero-fill and copy a qkv-sized gradient per block
        return ops.attention_varlen(qkv.squeeze(0), segments, scale=self.scale).unsqueeze(0), None

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
        """``attn_mask`` may also be a ``fastvision.ops.Segments``: x then holds packed sequences, (1, T, C)."""
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = linear(self.qkv, x).view(B, N, 3, self.num_heads, self.head_dim)
        if isinstance(attn_mask, ops.Segments):
            out, rows = self._attend_packed(qkv, attn_mask)
        else:
            out, rows = self._attend(qkv, attn_mask, is_causal)
        if self.attention_rows:
            self.last_attention_rows = rows
        x = self.norm(out.reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(linear(self.proj, x))

    def why_not(self, x: torch.Tensor) -> Optional[str]:
        """Why this module falls back to eager attention on input ``x`` (None when the kernel runs)."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.qkv.weight.dtype
        q = torch.empty((1, self.num_heads, 0, self.head_dim), dtype=dtype, device=x.device)
        dropout = self.attn_drop.p if self.training else 0.0
        return ops.attention_decline(q, dropout_p=dropout)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, fused=True"
