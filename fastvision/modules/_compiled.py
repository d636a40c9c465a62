"""Which fused modules keep their custom op inside a torch.compile'd model.

Inductor generates and fuses its own kernels for LayerNorm, GELU, softmax and a Linear's bias
gradient with the ops around them; a custom op there is an opaque node that blocks those fusions
and costs a dispatcher round trip per call (on the H200, 2026-11-26, a patched DINO step compiled
with every fused op ran at 332 img/s against 951 for compile alone). Attention is different:
Inductor calls SDPA, which our kernel beats on timm's packed layout, so a compiled model always
keeps the fused attention, and by default lets Inductor have the rest. ``set_compile_ops`` (or
FASTVISION_COMPILE_OPS, a comma-separated list or "all") keeps some or all of these fused too.
Eager execution always uses every fused op.
"""
import os
from typing import Iterable, Union

from fastvision.ops._dispatch import is_compiling

COMPILE_OP_NAMES = ("layer_norm", "gelu", "softmax", "linear")
_DEFAULT = ""


def _parse(spec: Union[str, Iterable[str]]) -> frozenset:
    names = COMPILE_OP_NAMES if spec in ("all", ("all",), ["all"]) else (
        [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec))
    unknown = set(names) - set(COMPILE_OP_NAMES)
    if unknown:
        raise ValueError(f"unknown fused ops {sorted(unknown)}: choose from {COMPILE_OP_NAMES} or 'all'")
    return frozenset(names)


_compile_ops = _parse(os.environ.get("FASTVISION_COMPILE_OPS", _DEFAULT))


def set_compile_ops(spec: Union[str, Iterable[str]]) -> None:
    """Fused ops a compiled model keeps: names from COMPILE_OP_NAMES, a comma-separated string, or "all".

    Takes effect for graphs traced afterwards (call torch._dynamo.reset() to retrace).
    """
    global _compile_ops
    _compile_ops = _parse(spec)


def compile_ops() -> frozenset:
    return _compile_ops


def fused(name: str) -> bool:
    """Whether module code should call fused op ``name`` here: always in eager mode; when compiling,
    only if the policy keeps it."""
    return name in _compile_ops or not is_compiling()
