"""Rules for ResNets (timm and torchvision): blocks, conv -> BN (-> ReLU) Sequentials, and the stem.

  resnet.block       BasicBlock / Bottleneck -> FusedResNetBlock (each conv->BN->act chain fused,
                     the residual add and final ReLU fused into the last conv's epilogue)
  resnet.sequential  nn.Sequential holding conv -> BN (-> ReLU) runs (downsample paths) -> FusedSequential
  resnet.stem        the model's conv1 / bn1 / act1 (torchvision: relu) slots -> FusedConv2d (or, for the
                     deep stem of resnet*d, a FusedSequential whose last conv takes bn1), FoldedBatchNorm2d
                     and Identity; the replaced slots keep the original tensors under the original keys.
All are switched by patch(conv_bn=...).
"""
import importlib
from typing import Callable, Dict, Tuple, Union

from torch import nn

from fastvision.modules import conv as conv_modules
from fastvision.modules._hooks import hooked_module
from fastvision.modules import resnet as blocks
from .rules import Rule

OPTION = "conv_bn"


def _attr(path: str):
    module_name, name = path.split(":")
    try:
        obj = importlib.import_module(module_name)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError):
        return None


def _block_kinds() -> Dict[Callable, Tuple[blocks.Chain, ...]]:
    kinds = {}
    for path, chains in (("timm.models.resnet:Bottleneck.forward", blocks.TIMM_BOTTLENECK),
                         ("timm.models.resnet:BasicBlock.forward", blocks.TIMM_BASIC),
                         ("torchvision.models.resnet:Bottleneck.forward", blocks.TV_BOTTLENECK),
                         ("torchvision.models.resnet:BasicBlock.forward", blocks.TV_BASIC)):
        forward = _attr(path)
        if forward is not None:
            kinds[forward] = chains
    return kinds


def _is_fastvision(m: nn.Module) -> bool:
    return type(m).__module__.startswith("fastvision.")


# --- blocks ------------------------------------------------------------------------------------

def _is_block(m: nn.Module) -> bool:
    return not _is_fastvision(m) and type(m).forward in _block_kinds()


def _build_block(m: nn.Module, options) -> Union[nn.Module, str]:
    chains = _block_kinds()[type(m).forward]
    reason = blocks.block_decline(m, chains)
    if reason is not None:
        return reason
    return blocks.FusedResNetBlock(m, chains)


# --- conv -> BN (-> ReLU) Sequentials ------------------------------------------------------------

def _is_conv_bn_sequential(m: nn.Module) -> bool:
    return type(m) is nn.Sequential and conv_modules.sequence_fusable(m)


def _build_sequential(m: nn.Sequential, options) -> nn.Module:
    return conv_modules.FusedSequential(m)


# --- stem (slots of the model itself) ------------------------------------------------------------

_STEM_FORWARDS = ("timm.models.resnet:ResNet.forward_features", "torchvision.models.resnet:ResNet._forward_impl")


def _stem_act_name(m: nn.Module) -> str:
    return "act1" if isinstance(getattr(m, "act1", None), nn.Module) else "relu"


def _is_resnet(m: nn.Module) -> bool:
    forwards = [f for f in (_attr(p) for p in _STEM_FORWARDS) if f is not None]
    own = getattr(type(m), "forward_features", None) or getattr(type(m), "_forward_impl", None)
    return own in forwards and all(isinstance(getattr(m, n, None), nn.Module) for n in ("conv1", "bn1"))


def _build_stem(m: nn.Module, options) -> Union[Dict[str, nn.Module], str]:
    conv, bn, act_name = m.conv1, m.bn1, _stem_act_name(m)
    act = getattr(m, act_name, None)
    if isinstance(bn, conv_modules.FoldedBatchNorm2d):
        return {}  # already patched
    if isinstance(conv, conv_modules.FoldsSlotBatchNorm) and conv.folds_slot_of(m):
        conv.slot_bn()  # patched, then bn1 replaced (convert_sync_batchnorm): folds the new module in its place
        return {}
    last_conv = conv[-1] if isinstance(conv, nn.Sequential) and len(conv) else conv
    reason = conv_modules.conv_decline(last_conv) or conv_modules.bn_decline(bn, last_conv)
    if reason is None and not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        reason = f"{type(bn).__name__} in the stem is not an nn.BatchNorm2d or nn.SyncBatchNorm"
    if reason is not None:
        return f"stem conv1/bn1: {reason}"
    hooked = [name for name, module in (("conv1", conv), ("bn1", bn), (act_name, act))
              if isinstance(module, nn.Module) and hooked_module(module) is not None]
    if hooked:
        return f"stem: hooks on {', '.join(hooked)}, which the fused stem would not call"
    relu = conv_modules.is_relu(act)
    act_slot = act_name if relu else None
    folded_bn = conv_modules.FoldedBatchNorm2d.from_module(bn)
    if isinstance(conv, nn.Sequential):
        fused = conv_modules.FusedSequential(conv, tail_bn=folded_bn, tail_relu=relu, owner=m, bn_slot="bn1",
                                             act_slot=act_slot)
    else:
        fused = conv_modules.FusedConv2d.from_module(conv, folded_bn, relu, owner=m, bn_slot="bn1", act_slot=act_slot)
    slots = {"conv1": fused, "bn1": folded_bn}
    if relu:
        slots[act_name] = nn.Identity()
    return slots


RULES = [
    Rule("resnet.stem", OPTION, _is_resnet, _build_stem, slots=True),
    Rule("resnet.block", OPTION, _is_block, _build_block),
    Rule("resnet.sequential", OPTION, _is_conv_bn_sequential, _build_sequential),
]
