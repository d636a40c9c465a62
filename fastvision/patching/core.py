"""Walk a model, swap in fastvision modules by rule, record what happened, undo it."""
import copy
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

from torch import nn

from fastvision.modules._hooks import share_hooks
from .rules import Rule

# Attributes kept in __dict__ (object.__setattr__) so they are never registered as submodules
# and never appear in state_dict.
_ORIGINAL = "_fastvision_original"
_RULE = "_fastvision_rule"
_REPORT = "_fastvision_report"


@dataclass(frozen=True)
class Replaced:
    path: str
    rule: str
    original: str
    replacement: str


@dataclass(frozen=True)
class Skipped:
    path: str
    module: str
    reason: str


@dataclass
class PatchReport:
    options: Dict[str, bool]
    replaced: List[Replaced] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for r in self.replaced:
            out[r.rule] = out.get(r.rule, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"fastvision.patch: {len(self.replaced)} modules replaced, {len(self.skipped)} skipped"]
        lines += [f"  {rule:<24} x{n}" for rule, n in sorted(self.counts().items())]
        lines += [f"  replaced {r.path or '<root>'}: {r.original} -> {r.replacement}" for r in self.replaced]
        lines += [f"  skipped  {s.path or '<root>'} ({s.module}): {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _type_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _take_mode(replacement: nn.Module, original: nn.Module) -> None:
    """Give ``replacement`` the original's train/eval mode; submodules the two share keep their own
    (a model in train() with frozen, eval-mode BatchNorms stays that way)."""
    modes = {id(m): m.training for m in original.modules()}
    replacement.train(original.training)
    for m in replacement.modules():
        if id(m) in modes:
            m.training = modes[id(m)]


def is_replacement(module: nn.Module) -> bool:
    return _ORIGINAL in module.__dict__


def rule_of(module: nn.Module) -> Optional[str]:
    """The name of the rule that put ``module`` in place (None: not a replacement)."""
    return module.__dict__.get(_RULE)


def _first_rule(module: nn.Module, rules: Sequence[Rule], options: Dict[str, bool], slots: bool = False
                ) -> Optional[Rule]:
    for rule in rules:
        if getattr(rule, "slots", False) == slots and options.get(rule.option, True) and rule.matches(module):
            return rule
    return None


def _patch_children(parent: nn.Module, prefix: str, rules, options, report: PatchReport) -> None:
    for name, child in list(parent.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        if not is_replacement(child):
            rule = _first_rule(child, rules, options)
            if rule is not None:
                child = _apply_rule(parent, name, path, child, rule, options, report)
        _patch_slots(child, path, rules, options, report)
        _patch_children(child, path, rules, options, report)


def _patch_slots(module: nn.Module, prefix: str, rules, options, report: PatchReport) -> None:
    """Apply a slots rule: replace some children of ``module`` together (the module itself stays)."""
    rule = _first_rule(module, rules, options, slots=True)
    if rule is None:
        return
    built = rule.build(module, options)
    if isinstance(built, str):
        report.skipped.append(Skipped(prefix, _type_name(module), built))
        return
    for name, replacement in built.items():
        original = replace_slot(module, name, replacement, rule.name)
        path = f"{prefix}.{name}" if prefix else name
        report.replaced.append(Replaced(path, rule.name, _type_name(original), _type_name(replacement)))


def replace_slot(parent: nn.Module, name: str, replacement: nn.Module, rule_name: Optional[str]) -> nn.Module:
    """Put ``replacement`` in ``parent``'s child slot ``name`` (in its mode and with its hooks), remembering
    the module it replaces for unpatch and the rule that made it; returns the module replaced."""
    original = getattr(parent, name)
    object.__setattr__(replacement, _ORIGINAL, original)
    object.__setattr__(replacement, _RULE, rule_name)
    share_hooks(replacement, original)
    _take_mode(replacement, original)
    setattr(parent, name, replacement)
    return original


def _apply_rule(parent, name, path, module, rule: Rule, options, report: PatchReport) -> nn.Module:
    built = rule.build(module, options)
    if isinstance(built, str):
        report.skipped.append(Skipped(path, _type_name(module), built))
        return module
    replace_slot(parent, name, built, rule.name)
    report.replaced.append(Replaced(path, rule.name, _type_name(module), _type_name(built)))
    return built


def patch_model(model: nn.Module, rules: Sequence[Rule], options: Dict[str, bool], inplace: bool = True) -> nn.Module:
    """Replace every module a rule matches (children first visited after their parent's swap).

    Fastvision modules already in place are left alone, so patching twice changes nothing.
    The root module itself is never replaced: patch() returns the object it was given.
    """
    if not inplace:
        model = copy.deepcopy(model)
    previous = getattr(model, _REPORT, None)
    report = PatchReport(options=dict(options))
    if previous is not None:
        report.replaced.extend(previous.replaced)
    _patch_slots(model, "", rules, options, report)
    _patch_children(model, "", rules, options, report)
    object.__setattr__(model, _REPORT, report)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put back every original module (the same objects patch() took out)."""
    _unpatch_children(model)
    model.__dict__.pop(_REPORT, None)
    return model


def _unpatch_children(parent: nn.Module) -> None:
    for name, child in list(parent.named_children()):
        while is_replacement(child):
            original = child.__dict__[_ORIGINAL]
            _take_mode(original, child)
            _keep_current_state(original, child)
            share_hooks(original, child)
            setattr(parent, name, original)
            child = original
        _unpatch_children(child)


def _keep_current_state(original: nn.Module, replacement: nn.Module) -> None:
    """Children, parameters and buffers the replacement holds under the original's names (the same objects
    at patch time) go back to the original as they are now: a module swapped in after patching (a
    SyncBatchNorm from convert_sync_batchnorm, an adapter around a Linear) or a Parameter replaced
    (``load_state_dict(assign=True)``) stays after unpatch."""
    for kind in ("_modules", "_parameters", "_buffers"):
        mine, theirs = original.__dict__[kind], replacement.__dict__[kind]
        if mine is theirs:
            continue
        for name, value in theirs.items():
            if mine.get(name) is not None and value is not None and mine[name] is not value:
                mine[name] = value


def report_of(model: nn.Module) -> Optional[PatchReport]:
    return model.__dict__.get(_REPORT)


def replacements(model: nn.Module) -> Iterable[nn.Module]:
    return (m for m in model.modules() if is_replacement(m))
