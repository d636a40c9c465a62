"""The fused DINO loss (fastvision.ops.dino_loss) against DINO's own pairwise loss in float64, fwd and bwd."""
import importlib

import pytest
import torch

import fastvision
from fastvision import dino
from fastvision.ops import _common
from fastvision.testing import assert_close
from conftest import kernel_devices
from helpers import randn, reference_dino_loss

STUDENT_TEMP = 0.1
dino_loss_module = importlib.import_module("fastvision.ops.dino_loss")  # the name ops.dino_loss is the op


def inputs(ncrops, batch, out_dim, dtype, device, n_global=2, std=3.0):
    student = randn(ncrops * batch, out_dim, dtype=dtype, device=device, std=std, requires_grad=True)
    teacher = randn(n_global * batch, out_dim, dtype=dtype, device=device, std=std)
    center = randn(1, out_dim, device=device, std=0.5)
    return student, teacher, center


def check(student, teacher, center, ncrops, teacher_temp, dtype, grad_scale=1.7):
    loss = fastvision.ops.dino_loss(student, teacher, center, ncrops=ncrops, student_temp=STUDENT_TEMP,
                                    teacher_temp=teacher_temp)
    (grad,) = torch.autograd.grad(loss * grad_scale, student)
    s64 = student.detach().cpu().double().requires_grad_()
    ref = reference_dino_loss(s64, teacher.cpu().double(), center.cpu().double(), ncrops, STUDENT_TEMP, teacher_temp)
    (ref_grad,) = torch.autograd.grad(ref * grad_scale, s64)
    assert loss.shape == () and loss.dtype == torch.float32
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert_close(loss, ref, dtype, name="loss")
    assert_close(grad, ref_grad, dtype, name="grad of student_output")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("ncrops,batch,out_dim", [(2, 3, 37), (4, 3, 1000), (12, 2, 4099), (12, 1, 37), (4, 2, 65536)])
def test_fused_dino_loss_float32_matches_pairwise_float64(device, ncrops, batch, out_dim):
    assert fastvision.ops.dino_loss_decline(*inputs(ncrops, 1, 8, torch.float32, device), ncrops=ncrops) is None
    check(*inputs(ncrops, batch, out_dim, torch.float32, device), ncrops, 0.04, torch.float32)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("ncrops,batch,out_dim", [(2, 2, 37), (12, 2, 1000)])
def test_fused_dino_loss_half_precision(device, dtype, ncrops, batch, out_dim):
    check(*inputs(ncrops, batch, out_dim, dtype, device), ncrops, 0.07, dtype)


@pytest.mark.parametrize("device", kernel_devices())
def test_fused_dino_loss_one_global_crop_and_extreme_logits(device):
    student, teacher, center = inputs(5, 3, 300, torch.float32, device, n_global=1, std=20.0)
    check(student, teacher, center, 5, 0.04, torch.float32)


@pytest.mark.parametrize("device", kernel_devices())
def test_fused_dino_loss_non_contiguous_rows_and_flat_center(device):
    wide = randn(4 * 2, 2 * 301, device=device)
    student = wide[:, ::2].detach().requires_grad_()   # column stride 2: copied to rows
    teacher = randn(2 * 2, 400, device=device)[:, :301]  # row stride 400: read in place
    check(student, teacher, randn(301, device=device), 4, 0.05, torch.float32)


def test_kernel_and_eager_fallback_of_the_op_agree(monkeypatch):
    """The op's impl without a usable Triton (torch math) gives the kernels' loss, lse and gradient."""
    student, teacher, center = inputs(4, 3, 77, torch.float32, "cpu")
    center = center.reshape(-1)
    args = (student.detach(), teacher, center, 4, STUDENT_TEMP, 0.04)
    fused = dino_loss_module._dino_loss_impl(*args)
    fused_grad = dino_loss_module._dino_loss_backward_impl(torch.tensor(0.3), *args[:3], *fused[1:], *args[3:])
    monkeypatch.setattr(_common, "use_triton", lambda x: False)
    eager = dino_loss_module._dino_loss_impl(*args)
    eager_grad = dino_loss_module._dino_loss_backward_impl(torch.tensor(0.3), *args[:3], *eager[1:], *args[3:])
    for name, got, want in zip(("loss", "student lse", "teacher lse"), fused, eager):
        assert_close(got, want.double(), torch.float32, name=name)
    assert_close(fused_grad, eager_grad.double(), torch.float32, name="grad")


def test_declined_inputs_take_the_eager_path():
    student, teacher, center = inputs(3, 2, 40, torch.float64, "cpu")
    assert "float64" in fastvision.ops.dino_loss_decline(student, teacher, center, ncrops=3)
    loss = fastvision.ops.dino_loss(student, teacher, center, ncrops=3, teacher_temp=0.04)
    ref = reference_dino_loss(student, teacher, center, 3, STUDENT_TEMP, 0.04)
    assert loss.dtype == torch.float64
    assert_close(loss, ref, torch.float64)
    assert "ncrops" in fastvision.ops.dino_loss_decline(student, teacher, center, ncrops=65)


@pytest.mark.parametrize("device", kernel_devices())
def test_compiled_fullgraph_through_the_op(device):
    student, teacher, center = inputs(4, 2, 257, torch.float32, device)

    def step(s, t, c):
        return fastvision.ops.dino_loss(s, t, c, ncrops=4, student_temp=STUDENT_TEMP, teacher_temp=0.04) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(student, teacher, center)
    (grad,) = torch.autograd.grad(loss, student)
    s64 = student.detach().double().requires_grad_()
    ref = 2.0 * reference_dino_loss(s64, teacher.double(), center.double(), 4, STUDENT_TEMP, 0.04)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    assert_close(loss, ref, torch.float32, name="loss")
    assert_close(grad, ref_grad, torch.float32, name="grad")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("ncrops", (2, 12))
def test_dino_loss_module_fused_matches_eager_and_updates_center(device, ncrops):
    out_dim, batch = 131, 3
    modules = {fused: dino.DINOLoss(out_dim, ncrops, 0.04, 0.07, 2, 5, center_momentum=0.8, fused=fused).to(device)
               for fused in (True, False)}
    expected_center = torch.zeros(1, out_dim, dtype=torch.float64)
    for epoch in range(2):
        student, teacher, _ = inputs(ncrops, batch, out_dim, torch.float32, device)
        center64 = expected_center.clone()
        results = {}
        for fused, module in modules.items():
            loss = module(student, teacher, epoch)
            results[fused] = (loss, *torch.autograd.grad(loss, student))
        s64 = student.detach().double().requires_grad_()
        ref = reference_dino_loss(s64, teacher.double(), center64, ncrops, STUDENT_TEMP, modules[True].teacher_temp(epoch))
        (ref_grad,) = torch.autograd.grad(ref, s64)
        expected_center = 0.8 * expected_center + 0.2 * teacher.double().mean(0, keepdim=True)
        for fused in (True, False):
            loss, grad = results[fused]
            assert_close(loss, ref, torch.float32, name=f"loss (fused={fused})")
            assert_close(grad, ref_grad, torch.float32, name=f"grad (fused={fused})")
            assert_close(modules[fused].center, expected_center, torch.float32, name=f"center (fused={fused})")


def test_compiled_dino_loss_module_runs_the_op_and_updates_center():
    module = dino.DINOLoss(131, 4, 0.04, 0.04, 0, 5)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    student, teacher, _ = inputs(4, 3, 131, torch.float32, "cpu")
    torch._dynamo.reset()
    loss = compiled(student, teacher, 0)
    (grad,) = torch.autograd.grad(loss, student)
    s64 = student.detach().double().requires_grad_()
    ref = reference_dino_loss(s64, teacher.double(), torch.zeros(1, 131, dtype=torch.float64), 4, STUDENT_TEMP, 0.04)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    assert_close(loss, ref, torch.float32, name="loss")
    assert_close(grad, ref_grad, torch.float32, name="grad")
    assert_close(module.center, 0.1 * teacher.double().mean(0, keepdim=True), torch.float32, name="center")


def test_without_a_kernel_device_the_op_and_module_run_the_eager_math(monkeypatch):
    reason = "CPU tensor: Triton kernels need CUDA (or TRITON_INTERPRET=1 to run them on CPU)"
    monkeypatch.setattr(_common, "device_decline", lambda x: reason)
    monkeypatch.setattr(dino_loss_module, "call", None)  # the custom op must not run
    student, teacher, center = inputs(4, 2, 50, torch.float32, "cpu")
    assert fastvision.ops.dino_loss_decline(student, teacher, center, ncrops=4) == reason
    check(student, teacher, center, 4, 0.04, torch.float32)
    module = dino.DINOLoss(50, 4, 0.04, 0.04, 0, 1)
    loss = module(student, teacher, 0)
    ref = reference_dino_loss(student.detach().double(), teacher.double(), torch.zeros(1, 50, dtype=torch.float64), 4,
                         STUDENT_TEMP, 0.04)
    assert_close(loss, ref, torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        dino.DINOLoss(50, 4, 0.04, 0.04, 0, 1, fused=True)(student, teacher, 0)


def test_dino_loss_module_fused_true_refuses_what_it_cannot_run():
    module = dino.DINOLoss(16, 3, 0.04, 0.04, 0, 1, fused=True).double()
    student, teacher, _ = inputs(3, 2, 16, torch.float64, "cpu")
    with pytest.raises(ValueError, match="fused"):
        module(student, teacher, 0)


def _bad(**changes):
    student, teacher, center = inputs(4, 2, 10, torch.float32, "cpu")
    kwargs = dict(student_output=student, teacher_output=teacher, center=center, ncrops=4, student_temp=0.1,
                  teacher_temp=0.04)
    kwargs.update(changes)
    return lambda: fastvision.ops.dino_loss(kwargs.pop("student_output"), kwargs.pop("teacher_output"),
                                            kwargs.pop("center"), **kwargs)


@pytest.mark.parametrize("bad, match", [
    (_bad(student_output=torch.zeros(8, 10, dtype=torch.long)), "student_output"),
    (_bad(student_output=torch.randn(7, 10)), "student_output"),
    (_bad(student_output=torch.randn(8, 10, 1)), "student_output"),
    (_bad(teacher_output=torch.randn(4, 11)), "teacher_output"),
    (_bad(teacher_output=torch.randn(3, 10)), "teacher_output"),
    (_bad(teacher_output=torch.randn(10, 10)), "teacher_output"),
    (_bad(teacher_output=None), "teacher_output"),
    (_bad(center=torch.randn(2, 10)), "center"),
    (_bad(center=torch.randn(11)), "center"),
    (_bad(ncrops=1), "ncrops"),
    (_bad(ncrops=3), "student_output"),
    (_bad(ncrops=4.0), "ncrops"),
    (_bad(student_temp=0.0), "student_temp"),
    (_bad(teacher_temp=-1.0), "teacher_temp"),
])
def test_bad_inputs_name_the_argument(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()
