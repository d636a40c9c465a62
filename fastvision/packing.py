"""Packed multi-resolution ViT forward: the crops of every resolution through the transformer blocks once.

DINO's student sees crops of two resolutions (2 × 224 px and 10 × 96 px per image); run as two
backbone passes, the local crops make small, badly shaped matrix products. Here each resolution is
embedded on its own (patch embedding and its interpolated position embedding), then every image's
token sequence is laid end to end in one (1, T, C) stream; the blocks run once over it with
block-diagonal attention (``fastvision.ops.attention_varlen``: a token attends only within its own
image), and the final norm and pooling give back one feature per image, in crop order.

    features = packed_features(vit, [global_crops, local_crops])   # == cat of vit(g) for g in groups

``can_pack(vit)`` says why a model cannot run this way (None when it can).
"""
import functools
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from fastvision import ops
from fastvision.modules import transformer
from fastvision.modules._hooks import hooked_module
from fastvision.modules.attention import Attention


def _timm_vit_class():
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    return VisionTransformer


def _timm_block_forward():
    try:
        from timm.models.vision_transformer import Block
    except ImportError:
        return None
    return Block.forward


def _runs_timm_vit_forward(vit: nn.Module) -> bool:
    cls = _timm_vit_class()
    if cls is None or not isinstance(vit, cls):
        return False
    return all(getattr(type(vit), name) is getattr(cls, name)
               for name in ("forward", "forward_features", "forward_head", "_pos_embed"))


def _type_name(module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _active_drop_path(module: nn.Module) -> bool:
    return module.training and not isinstance(module, nn.Identity) and getattr(module, "drop_prob", 1.0) > 0


def _block_decline(i: int, block: nn.Module) -> Optional[str]:
    where = f"blocks[{i}]"
    if isinstance(block, transformer.Block):
        for name in ("drop_path1", "drop_path2"):
            module = getattr(block, name)
            if _active_drop_path(module) and not transformer.is_drop_path(module):
                return f"{where}.{name} is {type(module).__name__}, not timm's DropPath: no per-crop version"
    elif type(block).forward is _timm_block_forward():
        if _active_drop_path(block.drop_path1) or _active_drop_path(block.drop_path2):
            return (f"{where} is timm's Block with drop path in training: it would drop every packed crop "
                    "together (fastvision.patch with fuse_residual_norm=True gives the per-crop version)")
    else:
        return f"{where} is {_type_name(block)}, not a timm or fastvision ViT Block"
    attn = getattr(block, "attn", None)
    if not isinstance(attn, Attention):
        return f"{where}.attn is {_type_name(attn)}, not fastvision's Attention (run fastvision.patch)"
    if attn.training and attn.attn_drop.p > 0:
        return f"{where}.attn has attention dropout in training (not supported on packed sequences)"
    if attn.attention_rows:
        return f"{where}.attn records attention rows (not supported on packed sequences)"
    return None


def can_pack(vit: nn.Module) -> Optional[str]:
    """Why ``vit`` cannot run the packed forward (None when it can).

    Packing needs a timm VisionTransformer (its own forward), blocks that hand ``attn_mask`` to
    fastvision's Attention (a patched model), no attention dropout or recorded attention rows, and
    drop path only where it can act per crop (fastvision's Block). The answer depends on
    train()/eval(): ask again after switching.
    """
    if not _runs_timm_vit_forward(vit):
        return f"{_type_name(vit)} is not a timm VisionTransformer (with timm's forward)"
    if getattr(vit, "_compiled_call_impl", None) is not None:
        return "the backbone is compiled (nn.Module.compile): packing would run it uncompiled"
    if not isinstance(vit.blocks, nn.Sequential) or len(vit.blocks) == 0:
        return "vit.blocks is not a non-empty nn.Sequential"
    hooked = hooked_module(vit)
    if hooked is not None:
        return f"{hooked or 'the backbone'} has hooks: the packed pass would call it on all crops at once, or not at all"
    for i, block in enumerate(vit.blocks):
        reason = _block_decline(i, block)
        if reason is not None:
            return reason
    return None


@functools.lru_cache(maxsize=16)
def segments_for(lengths: Tuple[int, ...], device: torch.device) -> "ops.Segments":
    """The Segments of a crop layout, built once: a training loop sees the same few layouts every step,
    and a CUDA-graph capture must not copy offsets from host memory it does not own."""
    return ops.Segments.from_lengths(lengths, device)


def _embed(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Token sequences (n, L, C) of one resolution, as forward_features builds them before the blocks."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def _run_blocks(vit: nn.Module, x: torch.Tensor, segments: "ops.Segments",
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The blocks over the packed stream; with ``rows`` (token indices), the output at those tokens only."""
    checkpointing = getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled()
    if not checkpointing:
        return transformer.run_blocks(vit.blocks, x, attn_mask=segments, rows=rows)
    for block in vit.blocks:
        x = torch.utils.checkpoint.checkpoint(block, x, attn_mask=segments, use_reentrant=False)
    return x if rows is None else x.index_select(1, rows)


def _pools_first_token(vit: nn.Module) -> bool:
    """timm's 'token' pooling (the CLS token, no attention pool) after a per-token final norm."""
    return (getattr(vit, "global_pool", None) == "token" and getattr(vit, "attn_pool", None) is None
            and isinstance(vit.norm, (nn.LayerNorm, nn.Identity)))


def packed_features(vit: nn.Module, groups: Sequence[torch.Tensor], *, pre_logits: bool = True) -> torch.Tensor:
    """Pooled features of every image in ``groups`` (tensors (n_i, 3, H_i, W_i)), rows in input order.

    Equals ``torch.cat([vit.forward_head(vit.forward_features(g), pre_logits) for g in groups])`` up to
    rounding, with one pass of the blocks over all images (block-diagonal attention).
    """
    reason = can_pack(vit)
    if reason is not None:
        raise ValueError(f"cannot pack this model: {reason}")
    return packed_features_checked(vit, groups, pre_logits=pre_logits)


def packed_features_checked(vit: nn.Module, groups: Sequence[torch.Tensor], *, pre_logits: bool = True) -> torch.Tensor:
    """packed_features for a caller that has just had can_pack(vit) say yes (it walks every module)."""
    embedded = [_embed(vit, images) for images in groups]
    dtype = embedded[0].dtype
    for x in embedded[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    lengths: List[int] = [x.shape[1] for x in embedded for _ in range(x.shape[0])]
    stream = torch.cat([x.to(dtype).reshape(-1, x.shape[-1]) for x in embedded]).unsqueeze(0)
    segments = segments_for(tuple(lengths), stream.device)
    if _pools_first_token(vit):
        # Only each sequence's first token is read after the blocks, and what follows the last block's
        # attention (norm2, MLP, final norm) acts per token: run those on the first tokens alone.
        first_tokens = vit.norm(_run_blocks(vit, stream, segments, rows=segments.first_tokens))  # (1, images, C)
        return vit.forward_head(first_tokens.transpose(0, 1), pre_logits=pre_logits)
    stream = vit.norm(_run_blocks(vit, stream, segments))
    # Back to (n_i, L_i, C) per resolution: timm's own pooling (token, avg, map, ...) then applies as is.
    sizes = [x.shape[0] * x.shape[1] for x in embedded]
    per_group = stream.squeeze(0).split(sizes)  # squeeze: no zero-filled stream-sized gradient, as [0] gives
    return torch.cat([vit.forward_head(tokens.view(x.shape[0], x.shape[1], -1), pre_logits=pre_logits)
                      for tokens, x in zip(per_group, embedded)])
