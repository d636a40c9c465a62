"""DINO-style attention maps: the last block's CLS-token attention, per head.

On a patched model the fused attention kernel writes the probabilities of the first
query row as a by-product of its forward pass; on an eager timm model they are
recomputed from the last attention module's input.
"""
from typing import Optional

import torch
from torch import nn

from fastvision.modules._hooks import internal_hook


def _is_attention(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in ("qkv", "proj")) and \
        isinstance(getattr(module, "num_heads", None), int)


def _last_attention(model: nn.Module) -> nn.Module:
    found = [m for m in model.modules() if _is_attention(m)]
    if not found:
        raise ValueError("model has no attention module (expected timm ViT blocks with qkv/proj)")
    return found[-1]


def _run_features(model: nn.Module, x: torch.Tensor) -> None:
    forward = getattr(model, "forward_features", None)
    (forward or model)(x)


def eager_cls_attention(attn: nn.Module, x: torch.Tensor, n_rows: int = 1) -> torch.Tensor:
    """softmax(q kᵀ·scale) for the first ``n_rows`` queries of a timm Attention on input ``x``: (B, H, n, N)."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q[:, :, :n_rows].float() * attn.scale) @ k.float().transpose(-2, -1)
    return logits.softmax(dim=-1)


def get_last_selfattention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block's attention probabilities of the CLS token (query 0): (B, heads, tokens), float32.

    Equals softmax(q kᵀ·scale)[:, :, 0, :] of the eager model (keys include the CLS and
    register tokens, as DINO's visualisation expects: take [..., num_prefix_tokens:]).
    """
    attn = _last_attention(model)
    captured: Optional[torch.Tensor] = None
    if hasattr(attn, "attention_rows"):  # fastvision.modules.Attention: the kernel writes the rows
        previous = attn.attention_rows
        attn.attention_rows = 1
        try:
            with torch.no_grad():
                _run_features(model, x)
            captured = attn.last_attention_rows
        finally:
            attn.attention_rows = previous
            attn.last_attention_rows = None
        return captured[:, :, 0, :].float()

    inputs = {}
    handle = attn.register_forward_pre_hook(internal_hook(lambda mod, args: inputs.setdefault("x", args[0])))
    try:
        with torch.no_grad():
            _run_features(model, x)
            return eager_cls_attention(attn, inputs["x"])[:, :, 0, :]
    finally:
        handle.remove()
