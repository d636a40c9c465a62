"""fastvision.patch: swap fused modules into timm ViTs and ResNets, instance by instance."""
from typing import List

from torch import nn

from . import vit
from .core import PatchReport, Replaced, Skipped, report_of, unpatch_model, patch_model
from .rules import Rule

OPTIONS = ("attention", "layer_norm", "gelu", "softmax", "fuse_residual_norm", "fuse_bias_gelu", "conv_bn",
           "patch_embed")


def all_rules() -> List[Rule]:
    rules = list(vit.RULES)
    try:
        from . import resnet
    except ImportError:
        return rules
    return list(resnet.RULES) + rules


def patch(model: nn.Module, *, attention: bool = True, layer_norm: bool = True, gelu: bool = True,
          softmax: bool = True, fuse_residual_norm: bool = True, fuse_bias_gelu: bool = True,
          conv_bn: bool = True, patch_embed: bool = True, mlp_recompute: bool = False,
          inplace: bool = True) -> nn.Module:
    """Swap fastvision's fused modules into ``model`` and return it.

    The replacements hold the original Parameters and buffers (the same objects, under
    the same state_dict keys), follow train()/eval(), and fall back to the eager
    computation for inputs their kernels do not support. Each keyword switches one
    kind of replacement (``patch_embed``: a ViT's patchify convolution as one GEMM);
    ``mlp_recompute=True`` makes the fused MLPs recompute their GELU output in the backward
    instead of keeping it (half the MLP's saved activations for one more bias+GELU pass);
    ``inplace=False`` patches a deep copy instead.
    ``fastvision.patch_report(model)`` lists what was replaced and what was skipped, and
    ``fastvision.unpatch(model)`` restores the original modules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    options = dict(attention=attention, layer_norm=layer_norm, gelu=gelu, softmax=softmax,
                   fuse_residual_norm=fuse_residual_norm, fuse_bias_gelu=fuse_bias_gelu, conv_bn=conv_bn,
                   patch_embed=patch_embed, mlp_recompute=mlp_recompute)
    patched = patch_model(model, all_rules(), options, inplace=inplace)
    report = report_of(patched)
    if not report.replaced and not report.skipped:
        report.skipped.append(Skipped("", type(model).__qualname__, "no module fastvision knows how to fuse"))
    return patched


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the modules patch() replaced (the original objects) and return the model."""
    return unpatch_model(model)


def patch_report(model: nn.Module) -> PatchReport:
    """What patch() replaced in ``model`` and what it skipped, with reasons."""
    report = report_of(model)
    if report is None:
        raise ValueError("model has not been patched by fastvision.patch")
    return report


__all__ = ["OPTIONS", "PatchReport", "Replaced", "Rule", "Skipped", "patch", "patch_report", "unpatch"]
