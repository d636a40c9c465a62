"""fastvision.verify: prove a patched model computes what the eager model computes.

Three runs on the same inputs: a float64 eager reference (the truth), the eager model
and the patched model in the dtype under test. For the output, each tracked module's
output and each parameter gradient, the patched model passes when its error against
the float64 reference is within the dtype's tolerance, or no worse than the eager
model's own error in that dtype (eager itself rounds; deep models accumulate it).
"""
import contextlib
import copy
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from .modules._hooks import internal_hook
from .patching import core
from .patching import patch as _patch
from .testing import relative_error, tolerance

# Patched error may exceed eager's by this factor before it counts as worse than eager.
EAGER_SLACK = 2.0
# Where eager itself misses the tolerance, the quantity is rounding noise at this dtype (e.g. the
# gradient of a key-norm bias, zero in exact arithmetic: softmax ignores a shift shared by all keys),
# and two summation orders give errors of the same order but not within 2x of each other.
NOISE_SLACK = 10.0


@dataclass
class Check:
    name: str
    kind: str                 # "output", "module", "grad"
    patched_error: float
    eager_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        slack = NOISE_SLACK if self.eager_error > self.tolerance else EAGER_SLACK
        return self.patched_error <= max(self.tolerance, slack * self.eager_error)


@dataclass
class VerifyReport:
    dtype: torch.dtype
    device: str
    checks: List[Check] = field(default_factory=list)
    declined: Dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> List[Check]:
        return [c for c in self.checks if not c.passed]

    def table(self) -> str:
        head = f"{'check':<48} {'kind':<7} {'patched':>10} {'eager':>10} {'tol':>8}  result"
        rows = [f"{c.name[:48]:<48} {c.kind:<7} {c.patched_error:>10.2e} {c.eager_error:>10.2e} "
                f"{c.tolerance:>8.0e}  {'ok' if c.passed else 'FAIL'}" for c in self.checks]
        rows += [f"fallback {name}: {reason}" for name, reason in self.declined.items()]
        verdict = "PASSED" if self.passed else f"FAILED ({len(self.failures())} checks)"
        return "\n".join([f"fastvision.verify on {self.device}, {self.dtype}: {verdict}", head, *rows])

    __str__ = table


def _as_tuple(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _cast(inputs, dtype, device):
    return tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                 if isinstance(t, torch.Tensor) else t for t in inputs)


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if isinstance(out, dict):
        return _first_tensor(next(iter(out.values())))
    raise TypeError(f"cannot find a tensor in the model output of type {type(out).__name__}")


class _Recorder:
    """Forward hooks keeping the first tensor output of the named modules."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.outputs: Dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names if n in modules]

    def _hook(self, name):
        @internal_hook  # records what the fused model runs: turns no fused path off
        def hook(module, args, out):
            if name not in self.outputs:
                self.outputs[name] = _first_tensor(out).detach()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _run(model, inputs, names, grads: bool, seed: int):
    recorder = _Recorder(model, names)
    try:
        out = _first_tensor(model(*inputs))
        param_grads = {}
        if grads:
            model.zero_grad(set_to_none=True)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            weights = torch.randn(out.shape, generator=generator, dtype=torch.float64)
            (out * weights.to(out.device, out.dtype)).sum().backward()
            param_grads = {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), recorder.outputs, param_grads
    finally:
        recorder.close()


def _eager_and_patched(model: nn.Module):
    """(eager, patched) copies of ``model``, whichever of the two it is now."""
    if any(core.is_replacement(m) for m in model.modules()):
        return core.unpatch_model(copy.deepcopy(model)), copy.deepcopy(model)
    return copy.deepcopy(model), _patch(copy.deepcopy(model))


@contextlib.contextmanager
def recording_declines(patched: nn.Module) -> Iterator[Dict[str, str]]:
    """Within the block: the fused modules of ``patched`` that fall back to eager, with their reasons,
    each asked (``why_not``) when it is called, in the caller's own autocast and grad mode. Not for
    torch.compile'd models: the hooks would break their graphs."""
    reasons: Dict[str, str] = {}
    handles = []
    for name, module in patched.named_modules():
        if core.is_replacement(module) and hasattr(module, "why_not"):
            @internal_hook
            def hook(mod, args, name=name):
                if args and isinstance(args[0], torch.Tensor) and name not in reasons:
                    reason = mod.why_not(args[0])
                    if reason:
                        reasons[name] = reason
            handles.append(module.register_forward_pre_hook(hook))
    try:
        yield reasons
    finally:
        for h in handles:
            h.remove()


def _declines(patched: nn.Module, inputs) -> Dict[str, str]:
    """Fused modules that fell back to eager on these inputs, with their reasons."""
    with recording_declines(patched) as reasons, torch.no_grad():
        patched(*inputs)
    return reasons


def verify(model: nn.Module, inputs: Union[torch.Tensor, Sequence], *, grads: bool = True,
           dtype: Optional[torch.dtype] = None, device: Optional[Union[str, torch.device]] = None,
           seed: int = 0) -> VerifyReport:
    """Compare a patched model with eager PyTorch on ``inputs``; return a per-check report.

    ``model`` may be patched or not (the other version is derived from a deep copy; the
    model itself is not modified). ``dtype`` casts the model copies and floating inputs
    (default: the model's dtype); ``device`` moves them (default: the model's device).
    Set ``grads=False`` to compare outputs only. Models with dropout or drop-path should
    be given in eval() mode, or the runs differ by their random masks.
    """
    inputs = _as_tuple(inputs)
    first_param = next(model.parameters(), None)
    dtype = dtype or (first_param.dtype if first_param is not None else torch.float32)
    device = torch.device(device) if device is not None else (
        first_param.device if first_param is not None else torch.device("cpu"))
    eager, patched = _eager_and_patched(model)
    eager, patched = eager.to(device=device, dtype=dtype), patched.to(device=device, dtype=dtype)
    reference = copy.deepcopy(eager).to(device="cpu", dtype=torch.float64)
    names = [n for n, m in patched.named_modules() if core.is_replacement(m)]

    ref = _run(reference, _cast(inputs, torch.float64, "cpu"), names, grads, seed)
    eag = _run(eager, _cast(inputs, dtype, device), names, grads, seed)
    pat = _run(patched, _cast(inputs, dtype, device), names, grads, seed)

    report = VerifyReport(dtype=dtype, device=str(device))
    tol = tolerance(dtype)
    report.checks.append(Check("model output", "output", relative_error(pat[0], ref[0]),
                               relative_error(eag[0], ref[0]), tol))
    for name in names:
        if name in ref[1] and name in pat[1]:
            report.checks.append(Check(name, "module", relative_error(pat[1][name], ref[1][name]),
                                       relative_error(eag[1].get(name, ref[1][name]), ref[1][name]), tol))
    for name, ref_grad in ref[2].items():
        patched_grad = pat[2].get(name)
        patched_error = float("inf") if patched_grad is None else relative_error(patched_grad, ref_grad)
        report.checks.append(Check(f"grad {name}", "grad", patched_error,
                                   relative_error(eag[2][name], ref_grad) if name in eag[2] else float("inf"), tol))
    report.declined = _declines(patched, _cast(inputs, dtype, device))
    return report
