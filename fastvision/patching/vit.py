"""Rules for timm vision transformers: blocks, Block, Attention, Mlp, LayerNorm, GELU, Softmax, PatchEmbed.

Modules are recognised by structure (the children and attributes the fused module
reads) and by running timm's own forward, so subclasses that keep the forward are
covered and look-alikes with a different forward are not silently changed.
"""
from collections import OrderedDict
from typing import Callable, Optional, Tuple

from torch import nn

from fastvision.modules import GELU, LayerNorm, PatchConv2d, Softmax
from fastvision.modules import transformer
from fastvision.ops.attention import MAX_HEAD_DIM
from .rules import Rule


def _timm_forwards(*paths: str) -> Tuple[Callable, ...]:
    """The forward functions of timm classes given as 'module:Class' (missing ones skipped)."""
    import importlib

    found = []
    for path in paths:
        module_name, cls_name = path.split(":")
        try:
            found.append(getattr(importlib.import_module(module_name), cls_name).forward)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _runs_forward_of(module: nn.Module, forwards: Tuple[Callable, ...]) -> bool:
    return type(module).forward in forwards


def _has_children(module: nn.Module, names) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def _is_fastvision(module: nn.Module) -> bool:
    return type(module).__module__.startswith("fastvision.")


# --- LayerNorm -----------------------------------------------------------------------------

def _is_layer_norm(m: nn.Module) -> bool:
    forwards = (nn.LayerNorm.forward,) + _timm_forwards("timm.layers.norm:LayerNorm")
    return isinstance(m, nn.LayerNorm) and not _is_fastvision(m) and _runs_forward_of(m, forwards)


def _build_layer_norm(m: nn.LayerNorm, options) -> nn.Module:
    return LayerNorm.from_module(m)


# --- GELU ------------------------------------------------------------------------------------

_TIMM_GELU = {"timm.layers.activations:GELU": "none", "timm.layers.activations:GELUTanh": "tanh"}


def _gelu_approximation(m: nn.Module):
    if isinstance(m, nn.GELU) and type(m).forward is nn.GELU.forward:
        return m.approximate
    for path, approximate in _TIMM_GELU.items():
        if _runs_forward_of(m, _timm_forwards(path)):
            return approximate
    return None


def _is_gelu(m: nn.Module) -> bool:
    return not _is_fastvision(m) and _gelu_approximation(m) is not None


def _build_gelu(m: nn.Module, options) -> nn.Module:
    return GELU(approximate=_gelu_approximation(m))


# --- Softmax ---------------------------------------------------------------------------------

def _is_softmax(m: nn.Module) -> bool:
    return isinstance(m, nn.Softmax) and not _is_fastvision(m) and type(m).forward is nn.Softmax.forward


def _build_softmax(m: nn.Softmax, options):
    if m.dim is None:
        return "nn.Softmax with the implicit (deprecated) dim is not supported"
    return Softmax(dim=m.dim)


# --- Mlp -------------------------------------------------------------------------------------

def _is_mlp(m: nn.Module) -> bool:
    return (_runs_forward_of(m, _timm_forwards("timm.layers.mlp:Mlp"))
            and _has_children(m, transformer.MLP_CHILDREN) and isinstance(m.fc1, nn.Linear))


def _build_mlp(m: nn.Module, options):
    if not options.get("gelu", True):
        return "bias+GELU fusion needs gelu=True"
    if _gelu_approximation(m.act) is None and not isinstance(m.act, GELU):
        return f"activation {type(m.act).__name__} is not GELU"
    if m.fc1.bias is None:
        return "fc1 has no bias to fuse"
    return transformer.Mlp(m, recompute_activation=options.get("mlp_recompute", False))


# --- Block -----------------------------------------------------------------------------------

def _is_block(m: nn.Module) -> bool:
    return (_runs_forward_of(m, _timm_forwards("timm.models.vision_transformer:Block"))
            and _has_children(m, transformer.BLOCK_CHILDREN))


def _residual_norm_decline(options) -> Optional[str]:
    return None if options.get("layer_norm", True) else "residual+LayerNorm fusion needs layer_norm=True"


def _build_block(m: nn.Module, options):
    reason = _residual_norm_decline(options)
    if reason is None and not _is_layer_norm(m.norm2) and not isinstance(m.norm2, LayerNorm):
        reason = f"norm2 is {type(m.norm2).__name__}, not a LayerNorm"
    return reason or transformer.Block(m)


# --- blocks Sequential ----------------------------------------------------------------------

def _is_block_sequence(m: nn.Module) -> bool:
    return (type(m) is nn.Sequential and len(m) > 1
            and all(_is_block(b) or isinstance(b, transformer.Block) for b in m.children()))


def _build_block_sequence(m: nn.Sequential, options):
    return _residual_norm_decline(options) or transformer.Blocks(OrderedDict(m.named_children()))


# --- patch embedding -------------------------------------------------------------------------

def _is_patch_embed(m: nn.Module) -> bool:
    return (_runs_forward_of(m, _timm_forwards("timm.layers.patch_embed:PatchEmbed"))
            and type(getattr(m, "proj", None)) is nn.Conv2d)


def _build_patch_embed(m: nn.Module, options):
    proj = PatchConv2d.from_module(m.proj)
    reason = proj.why_not_module()
    return {"proj": proj} if reason is None else f"proj is not a patchify convolution: {reason}"


# --- Attention -------------------------------------------------------------------------------

def _is_attention(m: nn.Module) -> bool:
    return (_runs_forward_of(m, _timm_forwards("timm.layers.attention:Attention",
                                               "timm.models.vision_transformer:Attention"))
            and isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "proj", None), nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "head_dim", None), int))


def _build_attention(m: nn.Module, options):
    if m.head_dim > MAX_HEAD_DIM:
        return f"head_dim {m.head_dim} > {MAX_HEAD_DIM}: the fused kernel does not support it"
    try:
        from fastvision.modules.attention import Attention
    except ImportError as exc:
        return f"fused attention unavailable ({exc})"
    return Attention.from_timm(m)


RULES = [
    Rule("vit.patch_embed", "patch_embed", _is_patch_embed, _build_patch_embed, slots=True),
    Rule("vit.blocks", "fuse_residual_norm", _is_block_sequence, _build_block_sequence),
    Rule("vit.block", "fuse_residual_norm", _is_block, _build_block),
    Rule("vit.attention", "attention", _is_attention, _build_attention),
    Rule("vit.mlp", "fuse_bias_gelu", _is_mlp, _build_mlp),
    Rule("layer_norm", "layer_norm", _is_layer_norm, _build_layer_norm),
    Rule("gelu", "gelu", _is_gelu, _build_gelu),
    Rule("softmax", "softmax", _is_softmax, _build_softmax),
]
