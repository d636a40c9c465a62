"""Module hooks and the fused paths that skip module calls.

A fused path computes several modules in one kernel and so does not call them: hooks registered
on those modules (feature extraction, Grad-CAM on a ViT's ``norm1``, activation statistics) would
not run. Wherever a fastvision module would skip the call of a module that has hooks, it calls
that module instead (the unfused path), so the hooks see what they see on the eager model.
"""
from typing import Optional

from torch import nn
from torch.nn.modules import module as _module

_INSTANCE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
# Hook dictionaries a replacement shares with the module it replaces (those this torch has).
SHARED_HOOK_DICTS = tuple(name for name, value in vars(nn.Module()).items()
                          if "hook" in name and isinstance(value, dict))
_INTERNAL = "_fastvision_internal_hook"


def internal_hook(fn):
    """Marks a hook fastvision itself registers (verify's recorders, attention maps): it does not turn
    the fused paths off, and sees only the modules they still call."""
    setattr(fn, _INTERNAL, True)
    return fn


def _user_hooks(hooks) -> bool:
    return bool(hooks) and any(not getattr(h, _INTERNAL, False) for h in hooks.values())


# torch registers global hooks into these dictionaries in place: bound once.
_GLOBAL_DICTS = tuple(getattr(_module, name) for name in _GLOBAL_HOOKS if hasattr(_module, name))


def _global_user_hooks() -> bool:
    for hooks in _GLOBAL_DICTS:
        if hooks and _user_hooks(hooks):
            return True
    return False


def _own_user_hooks(m: nn.Module) -> bool:
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return any(_user_hooks(getattr(m, name)) for name in _INSTANCE_HOOKS)
    return False


def has_hooks(*modules: Optional[nn.Module], global_hooks: bool = True) -> bool:
    """Whether calling any of ``modules`` (None: skipped) would run a user's forward or backward hook,
    its own or (``global_hooks``) a global one. About 0.3-0.6 µs for 1-3 modules without hooks; it runs
    about a hundred times per ViT-S forward."""
    if global_hooks and _global_user_hooks():
        return any(m is not None for m in modules)
    for m in modules:
        if m is not None and _own_user_hooks(m):
            return True
    return False


def hooked_module(root: nn.Module) -> Optional[str]:
    """The qualified name of the first module under ``root`` (itself: "") that has hooks, or None."""
    if _global_user_hooks():
        return ""
    stack = [root]  # a plain walk first: named_modules() costs over a microsecond per module
    while stack:
        m = stack.pop()
        if _own_user_hooks(m):
            return next(name for name, m in root.named_modules() if _own_user_hooks(m))
        stack.extend(child for child in m._modules.values() if child is not None)
    return None


def share_hooks(replacement: nn.Module, original: nn.Module) -> None:
    """``replacement`` keeps ``original``'s hooks, in the very same dictionaries: hooks registered on
    either module before or after the swap run on both, and their handles remove them from both.
    (Called again the other way round on unpatch, for the flag saying which backward hooks are full.)"""
    for name in SHARED_HOOK_DICTS:
        if name in original.__dict__:
            object.__setattr__(replacement, name, original.__dict__[name])
    if original.__dict__.get("_is_full_backward_hook") is not None:
        object.__setattr__(replacement, "_is_full_backward_hook", original._is_full_backward_hook)
