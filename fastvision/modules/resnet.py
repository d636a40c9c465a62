"""ResNet BasicBlock / Bottleneck (timm and torchvision) with conv -> BN -> ReLU chains fused.

The fused block holds the original children under the original names (same state_dict keys).
The last chain fuses the residual add and the final ReLU into the conv's epilogue. While any
BatchNorm of the block uses batch statistics (training), the original forward runs unchanged.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from torch import Tensor, nn

from ._hooks import has_hooks
from .conv import _FusionOwner, _uses_batch_stats, bn_decline, conv_decline, fusion_for, is_relu


@dataclass(frozen=True)
class Chain:
    conv: str
    bn: str
    before_act: Tuple[str, ...]  # applied between BN and the act (fused away only when they are identities)
    act: str
    after_act: Tuple[str, ...] = ()


# The chains of each block class, in forward order; the last one takes the residual before its act.
TIMM_BOTTLENECK = (Chain("conv1", "bn1", (), "act1"), Chain("conv2", "bn2", ("drop_block",), "act2", ("aa",)),
                   Chain("conv3", "bn3", ("se", "drop_path"), "act3"))
TIMM_BASIC = (Chain("conv1", "bn1", ("drop_block",), "act1", ("aa",)), Chain("conv2", "bn2", ("se", "drop_path"), "act2"))
TV_BOTTLENECK = (Chain("conv1", "bn1", (), "relu"), Chain("conv2", "bn2", (), "relu"), Chain("conv3", "bn3", (), "relu"))
TV_BASIC = (Chain("conv1", "bn1", (), "relu"), Chain("conv2", "bn2", (), "relu"))

_STOCHASTIC = ("DropPath", "DropBlock2d")


def _passthrough(m: Optional[nn.Module]) -> bool:
    """True when ``m`` returns its input unchanged in its current mode."""
    if m is None or isinstance(m, nn.Identity):
        return True
    return type(m).__name__ in _STOCHASTIC and (not m.training or getattr(m, "drop_prob", 1.0) == 0.0)


def block_decline(block: nn.Module, chains: Sequence[Chain]) -> Optional[str]:
    """Why a block cannot be fused (None: it can)."""
    for c in chains:
        conv, bn = getattr(block, c.conv, None), getattr(block, c.bn, None)
        reason = conv_decline(conv) if conv is not None else f"no {c.conv}"
        reason = reason or (bn_decline(bn, conv) if bn is not None else f"no {c.bn}")
        if reason is not None:
            return f"{c.conv}/{c.bn}: {reason}"
    return None


class FusedResNetBlock(_FusionOwner, nn.Module):
    """A ResNet block computing each conv -> BN -> act chain with conv_bn_act (original children kept)."""

    def __init__(self, block: nn.Module, chains: Sequence[Chain]):
        super().__init__()
        for name, child in block._modules.items():
            self._modules[name] = child
        for key, value in block.__dict__.items():
            if not key.startswith("_") and key != "training" and key not in self.__dict__:
                object.__setattr__(self, key, value)
        object.__setattr__(self, "_eager_forward", type(block).forward)
        self._chains = tuple(chains)
        # The modules the fused chains may not call (the others are always called): with hooks on any of
        # them, the block runs its original forward.
        self._fused_names = tuple(n for c in self._chains for n in (c.conv, c.bn, *c.before_act, c.act))
        self.training = block.training

    def _uses_batch_stats(self) -> bool:
        return any(_uses_batch_stats(getattr(self, c.bn)) for c in self._chains)

    def forward(self, x: Tensor) -> Tensor:
        if self._uses_batch_stats() or has_hooks(*(getattr(self, n, None) for n in self._fused_names)):
            return self._eager_forward(self, x)
        shortcut = x
        last = len(self._chains) - 1
        for i, chain in enumerate(self._chains):
            residual = None
            if i == last:
                downsample = getattr(self, "downsample", None)
                residual = shortcut if downsample is None else downsample(shortcut)
            x = self._run_chain(chain, x, residual)
        return x

    def _run_chain(self, chain: Chain, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        fusion = fusion_for(self, getattr(self, chain.conv), getattr(self, chain.bn), (chain.conv, chain.bn))
        act = getattr(self, chain.act)
        before = [getattr(self, n, None) for n in chain.before_act]
        if all(_passthrough(m) for m in before):
            relu = is_relu(act)
            x = fusion(x, residual, relu=relu)
            x = x if relu else act(x)
        else:
            x = fusion(x)
            for m in before:
                x = x if m is None else m(x)
            x = act(x if residual is None else x + residual)
        for name in chain.after_act:
            m = getattr(self, name, None)
            x = x if m is None else m(x)
        return x

    def why_not(self, x: Tensor) -> Optional[str]:
        """Why the first chain runs eager modules on ``x`` (None: it runs conv_bn_act)."""
        hooked = [n for n in self._fused_names if has_hooks(getattr(self, n, None))]
        if hooked:
            return f"hooks on {', '.join(hooked)}: the block runs its original forward, which calls them"
        c = self._chains[0]
        return fusion_for(self, getattr(self, c.conv), getattr(self, c.bn), (c.conv, c.bn)).decline(x)
