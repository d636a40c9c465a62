"""The compiled extension fastvision._C, loaded on first use and never required to import fastvision.

Loading it registers the C++/CUDA ops (torch.ops.fastvision.fold_batchnorm, conv_bn_act).
Ops that cannot work without it call ``require_extension``; modules that have an eager
fallback call ``extension_decline`` and take the fallback instead.
"""
import importlib
from types import ModuleType
from typing import Optional

_REBUILD_HINT = (
    "Rebuild it against the installed torch: `pip install --no-build-isolation -e .` from the fastvision "
    "checkout (CUDA kernels are compiled when nvcc is found through CUDA_HOME, e.g. "
    "CUDA_HOME=/usr/local/cuda; FASTVISION_SKIP_CUDA=1 builds the C++ part only). "
    "Builds made with FASTVISION_SKIP_EXTENSION=1 have no extension at all.")

_state = {"module": None, "error": None, "tried": False, "cuda": False}


def load() -> Optional[ModuleType]:
    """fastvision._C, or None when it is missing or fails to load (the reason: ``load_error()``)."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["module"] = importlib.import_module("fastvision._C")
            _state["cuda"] = bool(_state["module"].built_with_cuda())
        except (ImportError, OSError) as exc:
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["module"]


def load_error() -> Optional[str]:
    load()
    return _state["error"]


def extension_decline() -> Optional[str]:
    """Why the compiled ops cannot run (None when fastvision._C is loaded)."""
    if load() is not None:
        return None
    return f"the fastvision._C extension is not available ({load_error()})"


def require_extension(op_name: str) -> ModuleType:
    """fastvision._C, or a RuntimeError that says which op needed it and how to build it."""
    module = load()
    if module is None:
        raise RuntimeError(f"fastvision.{op_name} needs the compiled extension fastvision._C, which is not "
                           f"available ({load_error()}). {_REBUILD_HINT}")
    return module


def built_with_cuda() -> bool:
    """Read once at load: a call into the pybind module would break torch.compile's graph."""
    load()
    return _state["cuda"]


def register_fake(qualname: str):
    """torch.library.register_fake (torch>=2.4) for an op defined in C++; a no-op decorator without _C."""
    import torch

    if load() is None:
        return lambda fn: fn
    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract
    return register(qualname)
