"""Shared test utilities: inputs, float64 references, gradient capture."""
from typing import Callable, Optional, Sequence

import torch

from fastvision.testing import assert_close, tolerance  # noqa: F401  (re-exported for tests)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def randn(*shape, dtype=torch.float32, device="cpu", std=1.0, mean=0.0, requires_grad=False):
    """Fresh normal values rounded to ``dtype`` (never zeros)."""
    t = (torch.randn(*shape, dtype=torch.float64) * std + mean).to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def float64_copies(*tensors: Optional[torch.Tensor]):
    """Float64 CPU leaf copies of the same (already rounded) values, with grad where the source had it."""
    return tuple(None if t is None else t.detach().to("cpu", torch.float64).requires_grad_(t.requires_grad)
                 for t in tensors)


def run_with_grads(fn: Callable, inputs: Sequence[Optional[torch.Tensor]], grad_out: torch.Tensor):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> for every input that requires grad."""
    out = fn(*inputs)
    out.backward(grad_out.to(device=out.device, dtype=out.dtype))
    return out, [None if t is None or not t.requires_grad else t.grad for t in inputs]


def check_against_float64(fn: Callable, ref_fn: Callable, inputs, grad_out, dtype, names, grad_scales=None):
    """Forward and every input gradient of fn vs ref_fn on float64 copies, within dtype's tolerance.

    ``grad_scales``: {name: the size of the terms that cancel in that gradient}, for gradients that
    are exactly zero (see fastvision.testing.relative_error)."""
    out, grads = run_with_grads(fn, inputs, grad_out)
    ref_out, ref_grads = run_with_grads(ref_fn, float64_copies(*inputs), grad_out.double().cpu())
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    assert_close(out, ref_out, dtype, name="output")
    for name, g, ref_g in zip(names, grads, ref_grads):
        if ref_g is not None:
            assert g is not None, f"no gradient for {name}"
            assert_close(g, ref_g, dtype, name=f"grad of {name}", scale=(grad_scales or {}).get(name))


def reference_dino_loss(student, teacher, center, ncrops, student_temp, teacher_temp, n_global=None):
    """DINO's loss as its authors wrote it: every (teacher global crop, other student crop) pair."""
    import torch.nn.functional as F

    s = [c / student_temp for c in student.chunk(ncrops)]
    n_global = n_global or teacher.shape[0] // s[0].shape[0]
    t = [F.softmax((c - center) / teacher_temp, dim=-1) for c in teacher.chunk(n_global)]
    total, pairs = 0.0, 0
    for iq, q in enumerate(t):
        for v, s_v in enumerate(s):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s_v, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


def assert_patched_checkpoint_loads_unpatched(eager, fresh) -> None:
    """Patching keeps state_dict keys; a patched model's checkpoint loads into a fresh unpatched ``fresh``."""
    import copy
    import io

    import fastvision

    patched = fastvision.patch(copy.deepcopy(eager))
    assert list(patched.state_dict()) == list(eager.state_dict())
    buffer = io.BytesIO()
    torch.save(patched.state_dict(), buffer)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    for k, v in eager.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def assert_loads_checkpoint(target, state_dict) -> None:
    """``target`` (e.g. a patched model) with zeroed parameters takes ``state_dict`` exactly."""
    with torch.no_grad():
        for p in target.parameters():
            p.mul_(0.0)
    target.load_state_dict(state_dict)
    for k, v in state_dict.items():
        assert torch.equal(target.state_dict()[k], v), k


class EagerCall:
    """CapturedCall's interface without the CUDA graph (fn() on every call): a graph step's own logic
    on the CPU. ``built`` counts the calls built, i.e. how often the step would capture again."""
    built = 0

    def __init__(self, fn, warmup_steps, grad_params):
        self.fn, self.captured = fn, False
        EagerCall.built += 1

    def __call__(self):
        return self.fn()


def randomize_bn(model):
    """Non-trivial BN statistics and affine (timm zero-inits the last BN of each block)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0, 0.2)
    return model
