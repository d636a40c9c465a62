"""Custom-op registration with a direct eager path.

Every fused op is a torch.library custom op (schema, fake kernel, autograd), which is what
torch.compile, export and autocast need. Going through the custom-op dispatcher costs
tens of microseconds per call in eager mode, as much as a ViT's small kernels take on
the GPU, so in plain eager execution ``call`` runs the same Python implementation
directly, under a torch.autograd.Function built from the same setup_context/backward
functions. Under tracing (dynamo, FakeTensor/functional tensors, dispatch modes,
functorch transforms) it calls the registered op, so graphs see one opaque node.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn

try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover - very old torch
    def _get_current_dispatch_mode():
        return None

_LIB = "fastvision"
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


@dataclass(frozen=True)
class FusedOp:
    name: str
    impl: Callable
    setup_context: Optional[Callable] = None
    backward: Optional[Callable] = None

    @property
    def op(self):
        return getattr(getattr(torch.ops, _LIB), self.name)


REGISTRY: Dict[str, FusedOp] = {}


def refuse_create_graph(name: str) -> None:
    """Raise inside a backward that runs with create_graph=True (grad mode on), where a backward made of
    kernels would hand back gradients without a graph: a gradient penalty or second-order method would
    then silently lose their terms through this op."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fastvision::{name}: higher-order gradients (backward or autograd.grad with create_graph=True) are "
            f"not supported, as the fused kernels' backward is not itself differentiable. Run that computation "
            f"on the unpatched model (fastvision.unpatch(model): the parameters are the same objects), or patch "
            f"without this op.")


def define(name: str, impl: Callable, fake: Callable, *, setup_context: Optional[Callable] = None,
           backward: Optional[Callable] = None):
    """Register ``impl`` (type-annotated) as the custom op fastvision::name, and for ``call``."""
    op = torch.library.custom_op(f"{_LIB}::{name}", mutates_args=())(impl)
    op.register_fake(fake)
    if backward is not None:
        def first_order_backward(ctx, *grads):
            refuse_create_graph(name)
            return backward(ctx, *grads)
        op.register_autograd(first_order_backward, setup_context=setup_context)
    REGISTRY[name] = FusedOp(name, impl, setup_context, backward)
    return op


def _resolve_is_compiling():
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling
    return torch._dynamo.is_compiling


is_compiling = _resolve_is_compiling()
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None) or (lambda: False)


def _scan(args):
    """(tracing, needs_autograd) in one pass over the arguments.

    tracing: the op must go through the dispatcher (compilation, fake tensors, dispatch modes,
    functorch transforms, tensor subclasses); needs_autograd: a tensor argument requires grad
    while grad mode is on.
    """
    if is_compiling() or _get_current_dispatch_mode() is not None or _functorch_active():
        return True, False
    requires_grad = False
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN_TENSOR_TYPES:
                return True, False
            requires_grad = requires_grad or a.requires_grad
    return False, requires_grad and torch.is_grad_enabled()


class _Direct(torch.autograd.Function):
    """Runs a FusedOp's impl with its own setup_context/backward; the op entry is the last input.

    forward takes ctx (the pre-2.0 style) because the setup_context style binds the
    arguments through inspect.signature on every call, which costs more than the rest.
    """

    @staticmethod
    def forward(ctx, *args):
        entry, inputs = args[-1], args[:-1]
        # Gradients of unused outputs (statistics marked non-differentiable) stay None instead of
        # zero tensors made for every call; every backward accepts None for them.
        ctx.set_materialize_grads(False)
        output = entry.impl(*inputs)
        ctx.fastvision_op = entry
        entry.setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):  # no output reached the loss (see set_materialize_grads)
            return (None,) * len(ctx.needs_input_grad)
        refuse_create_graph(ctx.fastvision_op.name)
        result = ctx.fastvision_op.backward(ctx, *grads)
        return (*(result if isinstance(result, tuple) else (result,)), None)


def call(name: str, *args):
    """fastvision::name(*args): direct in eager mode, through the dispatcher when traced."""
    entry = REGISTRY[name]
    traced, needs_autograd = _scan(args)
    if traced:
        return entry.op(*args)
    if entry.backward is None or not needs_autograd:
        return entry.impl(*args)
    return _Direct.apply(*args, entry)
