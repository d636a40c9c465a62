"""Conv -> BatchNorm -> ReLU (-> + residual) fused over the original modules.

``ConvBnFusion`` computes one chain from existing conv and BatchNorm modules:
  * BatchNorm using batch statistics (training mode): exactly the eager modules (running
    statistics updated as eager updates them);
  * gradients needed with eval-mode statistics (frozen BN): conv_bn_act with the BN affine
    as a differentiable per-channel scale/shift;
  * inference: conv_bn_act with the BN folded into the conv in float64, the folded weight
    cached and recomputed when a parameter or statistic changes (tensor versions) or on train().
The modules below hold the original Parameters and buffers under the original state_dict keys.
"""
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from fastvision import ops
from fastvision.ops import _common as ops_common
from fastvision.ops._dispatch import is_compiling
from fastvision.ops import conv as conv_ops
from ._hooks import has_hooks

_FROZEN_BN_CLASSES = ("FrozenBatchNorm2d",)


def is_plain_conv2d(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward


def is_batchnorm2d(m: nn.Module) -> bool:
    """nn.BatchNorm2d or nn.SyncBatchNorm (or a subclass keeping its forward), or a FrozenBatchNorm2d
    (torchvision / timm). Evaluated with running statistics, SyncBatchNorm is BatchNorm2d; with batch
    statistics its own forward runs (the chain declines), so its statistics stay synchronised."""
    if isinstance(m, FoldedBatchNorm2d):
        return True
    for cls in (nn.BatchNorm2d, nn.SyncBatchNorm):
        if isinstance(m, cls) and type(m).forward is cls.forward:
            return True
    return type(m).__name__ in _FROZEN_BN_CLASSES and all(hasattr(m, a) for a in ("running_mean", "running_var"))


def is_relu(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.ReLU) and type(m).forward is nn.ReLU.forward


def conv_decline(conv: nn.Module) -> Optional[str]:
    """Why a conv cannot be fused (None: it can)."""
    if not is_plain_conv2d(conv):
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is fused)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (only explicit padding is fused)"
    return None


def bn_decline(bn: nn.Module, conv: nn.Module) -> Optional[str]:
    if not is_batchnorm2d(bn):
        return f"{type(bn).__name__} is not a BatchNorm2d"
    if bn.running_mean is None or bn.num_features != conv.out_channels:
        return "BatchNorm without running statistics or with a different channel count"
    return None


def _uses_batch_stats(bn: nn.Module) -> bool:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return False  # FrozenBatchNorm2d
    return bn.training or bn.running_mean is None


def _bn_eager(bn: nn.Module, y: Tensor) -> Tensor:
    return bn.batch_norm(y) if isinstance(bn, FoldedBatchNorm2d) else bn(y)


class ConvBnFusion:
    """conv -> bn (-> + residual) (-> ReLU) over existing modules; not an nn.Module (owns no state_dict)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module):
        self.conv, self.bn = conv, bn
        self._cache: Optional[Tuple[tuple, tuple, Tensor, Tensor]] = None
        self._conv_args_of: Optional[tuple] = None

    def invalidate(self) -> None:
        self._cache = None

    def __getstate__(self):
        """Pickled and deep-copied without the cache (derived data; its key holds a torch.memory_format,
        which pickle refuses: torch.save(model) failed after a first forward)."""
        return {**self.__dict__, "_cache": None}

    # --- the three paths ------------------------------------------------------------------
    def eager(self, x: Tensor, residual: Optional[Tensor] = None, relu: bool = False) -> Tensor:
        conv = self.conv
        y = _bn_eager(self.bn, nn.Conv2d.forward(conv, x) if isinstance(conv, FusedConv2d) else conv(x))
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y

    def _conv_args(self) -> Tuple[List[int], List[int], List[int], int]:
        """(stride, padding, dilation, groups) as the op takes them, rebuilt only if the conv's change."""
        c = self.conv
        source = (c.stride, c.padding, c.dilation, c.groups)
        if self._conv_args_of is None or self._conv_args_of[0] != source:
            self._conv_args_of = (source, (list(c.stride), list(c.padding), list(c.dilation), c.groups))
        return self._conv_args_of[1]

    def frozen_affine(self, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
        """(scale, shift) of eval-mode BN (and the conv bias), differentiable in the BN affine."""
        bn, conv = self.bn, self.conv
        scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(acc)
        shift = -bn.running_mean.to(acc) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(acc)
        if conv.bias is not None:
            shift = shift + conv.bias.to(acc) * scale
        return scale, shift

    def folded(self, dtype: torch.dtype, memory_format: torch.memory_format) -> Tuple[Tensor, Tensor]:
        """(weight, bias) with the BN folded in (float64 math), weight in ``dtype``, bias in float32/64.

        Cached on the source tensors themselves (held, compared by identity), their versions and their data
        (``.data =`` keeps the version): a weight computed at each access (torch.nn.utils.parametrize: weight
        norm, spectral norm, pruning) is a new tensor each time, often at the address of the last one, and is
        folded again. Under torch.compile the fold is part of the graph instead."""
        conv, bn = self.conv, self.bn
        sources = (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)
        if is_compiling():
            return self._fold(sources, dtype, memory_format)
        key = (dtype, memory_format, bn.eps, sources[0].device,
               *[None if t is None else (t._version, t.data_ptr()) for t in sources])
        cache = self._cache
        if cache is None or cache[0] != key or any(a is not b for a, b in zip(cache[1], sources)):
            cache = self._cache = (key, sources) + self._fold(sources, dtype, memory_format)
        return cache[2], cache[3]

    def _fold(self, sources: tuple, dtype: torch.dtype, memory_format: torch.memory_format) -> Tuple[Tensor, Tensor]:
        with torch.no_grad():
            weight, bias = ops.fold_batchnorm(*sources, float(self.bn.eps), out_dtype=torch.float64)
        return (weight.to(dtype).contiguous(memory_format=memory_format),
                bias.to(ops_common.accumulator_dtype(dtype)))

    # --- dispatch -------------------------------------------------------------------------
    @staticmethod
    def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
        """The dtype autocast runs a conv on ``x`` in, None outside autocast."""
        return ops_common.autocast_dtype_for(x.device.type, "lower") if x.is_floating_point() else None

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        return self.autocast_dtype(x) or x.dtype

    def decline(self, x: Tensor, residual: Optional[Tensor] = None) -> Optional[str]:
        """Why this chain runs the eager modules on ``x`` (None: it runs conv_bn_act)."""
        if _uses_batch_stats(self.bn):
            return "BatchNorm uses batch statistics (training mode): eager modules keep exact semantics"
        if x.dim() != 4:
            return f"input is {x.dim()}-D, not 4-D"
        autocast = self.autocast_dtype(x)
        dtype = autocast or x.dtype
        # Outside autocast eager conv2d refuses mixed dtypes; under it both are cast to the autocast dtype.
        if autocast is None and self.conv.weight.dtype != x.dtype:
            return f"input dtype {x.dtype} differs from the conv weight's {self.conv.weight.dtype}"
        if residual is not None and residual.dtype != dtype:
            return f"residual dtype {residual.dtype} differs from the compute dtype {dtype}"
        if x.shape[1] != self.conv.in_channels:
            return f"input has {x.shape[1]} channels, the conv expects {self.conv.in_channels}"
        return ops.conv_bn_act_decline(x)

    def _needs_grad(self, x: Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        params = (self.conv.weight, self.conv.bias, self.bn.weight, self.bn.bias)
        return x.requires_grad or any(isinstance(p, Tensor) and p.requires_grad for p in params)

    def __call__(self, x: Tensor, residual: Optional[Tensor] = None, relu: bool = False) -> Tensor:
        if self.decline(x, residual) is not None:
            return self.eager(x, residual, relu)
        dtype = self.compute_dtype(x)
        x = x.to(dtype)
        if self._needs_grad(x):
            scale, shift = self.frozen_affine(ops_common.accumulator_dtype(dtype))
            return conv_ops.conv_bn_act_unchecked(x, self.conv.weight.to(dtype), scale, shift, residual,
                                                  self._conv_args(), relu)
        weight, bias = self.folded(dtype, conv_ops.output_memory_format(x))
        return conv_ops.conv_bn_act_unchecked(x, weight, None, bias, residual, self._conv_args(), relu)


def _fusions_of(module: nn.Module) -> Dict[Tuple[str, str], ConvBnFusion]:
    fusions = module.__dict__.get("_fastvision_fusions")
    if fusions is None:
        fusions = {}
        object.__setattr__(module, "_fastvision_fusions", fusions)
    return fusions


def fusion_for(owner: nn.Module, conv: nn.Module, bn: nn.Module, key: Tuple[str, str]) -> ConvBnFusion:
    """The ConvBnFusion of (conv, bn) kept on ``owner``, rebuilt if either module was swapped out."""
    fusions = _fusions_of(owner)
    f = fusions.get(key)
    if f is None or f.conv is not conv or f.bn is not bn:
        f = fusions[key] = ConvBnFusion(conv, bn)
    return f


def invalidate_fusions(owner: nn.Module) -> None:
    for f in _fusions_of(owner).values():
        f.invalidate()


class _FusionOwner:
    """Mixin: drop the folded-weight caches on train()."""

    def train(self, mode: bool = True):
        if mode:
            invalidate_fusions(self)
        return super().train(mode)


def _apply_act(act: Optional[nn.Module], x: Tensor) -> Tensor:
    return x if act is None else act(x)


class ConvBnAct(_FusionOwner, nn.Module):
    """conv -> bn -> act (-> + residual before act) as one module, holding the original modules.

    ``names`` are the names the three modules get (default conv, bn, act); with ("0", "1", "2")
    the state_dict keys are those of nn.Sequential(conv, bn, act).
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, act: Optional[nn.Module] = None,
                 names: Tuple[str, str, str] = ("conv", "bn", "act")):
        super().__init__()
        for reason in (conv_decline(conv), bn_decline(bn, conv)):
            if reason is not None:
                raise ValueError(f"ConvBnAct: {reason}")
        self._names = tuple(names)
        self.add_module(names[0], conv)
        self.add_module(names[1], bn)
        if act is not None:
            self.add_module(names[2], act)

    @property
    def parts(self):
        conv, bn = getattr(self, self._names[0]), getattr(self, self._names[1])
        return conv, bn, getattr(self, self._names[2], None)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        conv, bn, act = self.parts
        if has_hooks(conv, bn, act):  # the modules are called, so their hooks run
            y = bn(conv(x))
            return _apply_act(act, y if residual is None else y + residual)
        fusion = fusion_for(self, conv, bn, self._names[:2])
        relu = is_relu(act)
        y = fusion(x, residual, relu=relu)
        return y if relu else _apply_act(act, y)

    def why_not(self, x: Tensor, residual: Optional[Tensor] = None) -> Optional[str]:
        conv, bn, act = self.parts
        if has_hooks(conv, bn, act):
            return "hooks on the conv, BatchNorm or activation: the modules run unfused"
        return fusion_for(self, conv, bn, self._names[:2]).decline(x, residual)


# --- modules that stand in for single slots of a parent (the ResNet stem) --------------------

def _share_state(new: nn.Module, old: nn.Module) -> None:
    """``new`` sees ``old``'s parameters and buffers through the very same dicts (so .to(), load_state_dict
    and in-place updates reach both) and copies its plain attributes."""
    for k, v in old.__dict__.items():
        if not k.startswith("_") and k != "training":
            object.__setattr__(new, k, v)
    object.__setattr__(new, "_parameters", old._parameters)
    object.__setattr__(new, "_buffers", old._buffers)
    object.__setattr__(new, "_non_persistent_buffers_set", old._non_persistent_buffers_set)


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """Stands in the slot of a BatchNorm whose work the fused conv before it does: forward is the identity.

    Holds the original BN's parameters and buffers under the same names (the same tensors);
    ``batch_norm(x)`` is the original BatchNorm2d computation. A SyncBatchNorm gets a
    FoldedSyncBatchNorm, whose ``batch_norm`` is SyncBatchNorm's.
    """

    @classmethod
    def from_module(cls, bn: nn.BatchNorm2d) -> "FoldedBatchNorm2d":
        if cls is FoldedBatchNorm2d and isinstance(bn, nn.SyncBatchNorm):
            cls = FoldedSyncBatchNorm
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        _share_state(new, bn)
        new.train(bn.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return x

    def batch_norm(self, x: Tensor) -> Tensor:
        return nn.BatchNorm2d.forward(self, x)


class FoldedSyncBatchNorm(FoldedBatchNorm2d, nn.SyncBatchNorm):
    """FoldedBatchNorm2d of a SyncBatchNorm: still a SyncBatchNorm, and with batch statistics (training)
    its computation is SyncBatchNorm's, statistics reduced over the process group as before."""

    def batch_norm(self, x: Tensor) -> Tensor:
        return nn.SyncBatchNorm.forward(self, x)


class FoldsSlotBatchNorm:
    """Mixin of a module computing the BatchNorm of a slot of its parent (the ResNet stem's ``bn1``), which
    holds a FoldedBatchNorm2d. A tool that swaps BatchNorm modules after patching replaces that slot
    (``nn.SyncBatchNorm.convert_sync_batchnorm``, which DINO applies to its ResNets): the next forward then
    folds the new BatchNorm in its place, instead of it being applied a second time after the fused conv."""

    def _bind_slot(self, folded: FoldedBatchNorm2d, owner: Optional[nn.Module], name: str,
                   act_name: Optional[str] = None) -> None:
        object.__setattr__(self, "_slot", (folded, owner, name, act_name))

    def slot_bn(self) -> FoldedBatchNorm2d:
        """The slot's FoldedBatchNorm2d, folding a module swapped into the slot since (see the class)."""
        folded, owner, name, act_name = self._slot
        if owner is not None:
            current = getattr(owner, name)
            if current is not folded:
                if is_compiling():  # a module cannot be swapped in from inside a compiled graph
                    raise RuntimeError(
                        f"{type(owner).__name__}.{name} was replaced after fastvision.patch fused it into the conv "
                        f"before it: call fastvision.patch(model) again (or run the model once uncompiled) before "
                        f"compiling, to fold the new module into the stem")
                folded = _refold_slot(owner, name, current, folded)
                self._bind_slot(folded, owner, name, act_name)
        return folded

    def folds_slot_of(self, owner: nn.Module) -> bool:
        """Whether this module computes the BatchNorm in a slot of ``owner``."""
        return self._slot[1] is owner

    def checked_slot_bn(self, conv: nn.Module) -> FoldedBatchNorm2d:
        """slot_bn(), for fusing ``conv`` with it now. The slots' modules no longer compute what their hooks
        expect (the BatchNorm and act slots are identities): refuse rather than run hooks on the wrong values.
        Global hooks (module trackers such as FlopCounterMode's) are let through: they are not registered on
        these modules."""
        _, owner, name, act_name = self._slot
        bn = self.slot_bn()
        act = getattr(owner, act_name, None) if owner is not None and act_name else None
        if has_hooks(self, conv, bn, act, global_hooks=False):
            raise RuntimeError(
                f"hooks were registered on the fused stem of {type(owner).__name__} ({name} and the conv and "
                f"activation around it) after fastvision.patch: those modules now compute conv -> BN -> ReLU in "
                f"one. Register them before patching (the stem then stays unfused), or fastvision.unpatch first.")
        return bn


def _refold_slot(owner: nn.Module, name: str, current: nn.Module, folded: FoldedBatchNorm2d) -> FoldedBatchNorm2d:
    if isinstance(current, FoldedBatchNorm2d):
        return current
    if not (isinstance(current, (nn.BatchNorm2d, nn.SyncBatchNorm)) and is_batchnorm2d(current)
            and current.num_features == folded.num_features):
        raise RuntimeError(
            f"{type(owner).__name__}.{name} was replaced by a {type(current).__name__} after fastvision.patch fused "
            f"the BatchNorm there into the conv before it; only a BatchNorm2d or SyncBatchNorm of "
            f"{folded.num_features} channels can be folded in its place. Call fastvision.unpatch(model), replace "
            f"the module, then patch again.")
    from fastvision.patching.core import replace_slot, rule_of  # patching builds on modules, not the reverse
    refolded = FoldedBatchNorm2d.from_module(current)
    replace_slot(owner, name, refolded, rule_of(folded))
    return refolded


class FusedConv2d(_FusionOwner, FoldsSlotBatchNorm, nn.Conv2d):
    """Stands in a conv slot and computes conv -> the next slot's BatchNorm -> ReLU (those slots become identities).

    Holds the original conv's parameters under the same names (the same tensors). ``owner``: the module
    whose ``bn_slot`` holds ``bn`` (see FoldsSlotBatchNorm); None for a conv used on its own.
    """

    @classmethod
    def from_module(cls, conv: nn.Conv2d, bn: FoldedBatchNorm2d, relu: bool, owner: Optional[nn.Module] = None,
                    bn_slot: str = "bn1", act_slot: Optional[str] = None) -> "FusedConv2d":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        _share_state(new, conv)
        new.train(conv.training)
        new._bind_slot(bn, owner, bn_slot, act_slot)
        new.fused_relu = relu
        return new

    def forward(self, x: Tensor) -> Tensor:
        return fusion_for(self, self, self.checked_slot_bn(self), ("self", "bn"))(x, relu=self.fused_relu)

    def why_not(self, x: Tensor) -> Optional[str]:
        return fusion_for(self, self, self.slot_bn(), ("self", "bn")).decline(x)


class FusedSequential(_FusionOwner, FoldsSlotBatchNorm, nn.Sequential):
    """nn.Sequential with its conv -> BatchNorm (-> ReLU) runs fused; the same children under the same names.

    ``tail_bn``/``tail_relu``: a BatchNorm (a FoldedBatchNorm2d in the ``bn_slot`` of ``owner``) that follows
    the last conv outside the Sequential, as in the deep stem of resnet*d (see FoldsSlotBatchNorm).
    """

    def __init__(self, seq: nn.Sequential, tail_bn: Optional[FoldedBatchNorm2d] = None, tail_relu: bool = False,
                 owner: Optional[nn.Module] = None, bn_slot: str = "bn1", act_slot: Optional[str] = None):
        super().__init__()
        for name, m in seq.named_children():
            self.add_module(name, m)
        self.training = seq.training
        self._bind_slot(tail_bn, owner, bn_slot, act_slot)
        self.tail_relu = tail_relu
        self._plan = _plan_sequence(list(seq._modules.items()), tail_bn is not None)

    def fused_chains(self) -> int:
        return sum(1 for step in self._plan if step[0] == "fuse")

    def forward(self, x: Tensor) -> Tensor:
        for step in self._plan:
            if step[0] == "module":
                x = self._modules[step[1]](x)
                continue
            _, conv_name, bn_name, act_name = step
            conv = self._modules[conv_name]
            if bn_name is None:
                bn, relu = self.checked_slot_bn(conv), self.tail_relu
            else:
                bn, relu = self._modules[bn_name], act_name is not None
                if has_hooks(conv, bn, self._modules.get(act_name)):
                    for name in (conv_name, bn_name, act_name):  # called, so their hooks run
                        x = x if name is None else self._modules[name](x)
                    continue
            x = fusion_for(self, conv, bn, (conv_name, str(bn_name)))(x, relu=relu)
        return x


def _plan_sequence(items: List[Tuple[str, nn.Module]], has_tail: bool) -> List[tuple]:
    """Steps: ("module", name) or ("fuse", conv_name, bn_name or None for the tail, relu_name or None)."""
    plan, i = [], 0
    while i < len(items):
        name, m = items[i]
        nxt = items[i + 1][1] if i + 1 < len(items) else None
        if conv_decline(m) is None and nxt is not None and bn_decline(nxt, m) is None:
            act = items[i + 2] if i + 2 < len(items) and is_relu(items[i + 2][1]) else None
            plan.append(("fuse", name, items[i + 1][0], act[0] if act else None))
            i += 3 if act else 2
        elif has_tail and i == len(items) - 1 and conv_decline(m) is None:
            plan.append(("fuse", name, None, None))
            i += 1
        else:
            plan.append(("module", name))
            i += 1
    return plan


def sequence_fusable(seq: nn.Sequential) -> bool:
    return any(step[0] == "fuse" for step in _plan_sequence(list(seq._modules.items()), False))


FusionTarget = Union[ConvBnAct, FusedConv2d, FusedSequential]
