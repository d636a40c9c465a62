"""How a model family tells fastvision.patch what to swap.

A Rule recognises a module by structure and builds its replacement. The replacement
must hold the original's parameters and buffers as the very same objects under the
same relative state_dict keys (usually by keeping the original child modules), so
checkpoints, optimizers and EMA teachers keep working across patch/unpatch.
"""
from dataclasses import dataclass
from typing import Callable, Union

from torch import nn

# build() returns the replacement module, or a string saying why the module is left alone.
BuildResult = Union[nn.Module, str]


@dataclass(frozen=True)
class Rule:
    name: str                                     # e.g. "vit.attention", "resnet.bottleneck"
    option: str                                   # the patch() keyword that switches it on/off
    matches: Callable[[nn.Module], bool]          # structural test on one module
    build: Callable[[nn.Module, dict], BuildResult]  # (module, patch options) -> replacement or reason
    # slots=True: the matched module stays and build returns {child name: replacement} for some of its
    # children (e.g. a ResNet stem's conv1/bn1/act1), or a reason string. Root modules are matched too.
    slots: bool = False
