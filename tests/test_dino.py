"""fastvision.dino: loss, centre, multi-crop wrapper, EMA, clipping and whole DINO steps against references."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastvision
from fastvision import dino
from fastvision.testing import assert_close
from helpers import float64_copies, randn, reference_dino_loss

timm = pytest.importorskip("timm")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- references (float64, loops, as in the DINO paper's pseudo-code) ---------------------------

def reference_clip(grads, clip):
    out = []
    for g in grads:
        scale = clip / (g.norm().item() + 1e-6)
        out.append(g * scale if scale < 1 else g.clone())
    return out


def tiny_dino(depth=2, out_dim=256, drop_path_rate=0.0, seed=0):
    torch.manual_seed(seed)
    return dino.build_dino("vit_tiny", 16, out_dim, img_size=32, depth=depth, drop_path_rate=drop_path_rate)


def crops_for(batch, n_global=2, n_local=3):
    return ([torch.randn(batch, 3, 32, 32) for _ in range(n_global)]
            + [torch.randn(batch, 3, 16, 16) for _ in range(n_local)])


# --- loss -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("ncrops,batch,out_dim", ((5, 3, 37), (2, 1, 65), (8, 2, 130)))
def test_dino_loss_matches_float64_reference(dtype, ncrops, batch, out_dim):
    loss_fn = dino.DINOLoss(out_dim, ncrops, warmup_teacher_temp=0.04, teacher_temp=0.07,
                            warmup_teacher_temp_epochs=3, nepochs=5)
    loss_fn.center.copy_(torch.randn(1, out_dim))
    center = loss_fn.center.clone().double()
    student = randn(ncrops * batch, out_dim, dtype=dtype, std=3.0, requires_grad=True)
    teacher = randn(2 * batch, out_dim, dtype=dtype, std=3.0)
    epoch = 1
    temp = 0.04 + (0.07 - 0.04) * 0.5
    assert math.isclose(loss_fn.teacher_temp(epoch), temp)

    loss = loss_fn(student, teacher, epoch)
    (grad,) = torch.autograd.grad(loss * 1.7, student)
    s64, t64 = float64_copies(student, teacher)
    ref = reference_dino_loss(s64, t64, center, ncrops, 0.1, temp)
    (ref_grad,) = torch.autograd.grad(ref * 1.7, s64)
    assert loss.dtype == dtype
    assert_close(loss, ref, dtype, name="loss")
    assert_close(grad, ref_grad, dtype, name="grad of student output")


def test_dino_loss_autocast_outputs_are_computed_in_float32():
    loss_fn = dino.DINOLoss(64, 4, 0.04, 0.04, 0, 1)
    student = randn(4 * 3, 64, std=2.0).to(torch.bfloat16).requires_grad_()
    teacher = randn(2 * 3, 64, std=2.0).to(torch.bfloat16)
    loss = loss_fn(student, teacher, 0)
    loss.backward()
    ref = reference_dino_loss(*float64_copies(student, teacher), torch.zeros(1, 64, dtype=torch.float64), 4, 0.1, 0.04)
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    assert_close(loss, ref, torch.float32, name="loss")


def test_center_is_an_ema_of_teacher_batch_means():
    loss_fn = dino.DINOLoss(29, 3, 0.04, 0.04, 0, 1, center_momentum=0.8)
    expected = torch.zeros(1, 29, dtype=torch.float64)
    for rows in (6, 4):
        teacher = randn(rows, 29)
        loss_fn(randn(3 * rows // 2, 29), teacher, 0)
        expected = 0.8 * expected + 0.2 * teacher.double().mean(0, keepdim=True)
        assert_close(loss_fn.center, expected, torch.float32, name="center")
    assert loss_fn.center.dtype == torch.float32 and "center" in loss_fn.state_dict()


def test_schedules():
    temps = dino.teacher_temperature_schedule(0.04, 0.07, 4, 6)
    assert temps[0] == 0.04 and math.isclose(temps[3], 0.07) and temps[-1] == 0.07 and len(temps) == 6
    sched = dino.cosine_scheduler(1.0, 0.1, epochs=3, niter_per_ep=4, warmup_epochs=1, start_warmup_value=0.0)
    assert len(sched) == 12 and sched[0] == 0.0 and math.isclose(sched[3], 1.0) and sched[4] == 1.0
    assert all(a >= b for a, b in zip(sched[4:], sched[5:])) and sched[-1] > 0.1
    assert math.isclose(sched[8], 0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 8)))


# --- head and multi-crop ----------------------------------------------------------------------

def test_head_shapes_weight_norm_and_legacy_keys():
    head = dino.DINOHead(24, 70, hidden_dim=40, bottleneck_dim=12)
    x = randn(5, 24)
    out = head(x)
    assert out.shape == (5, 70)
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    assert not g.requires_grad and torch.all(g == 1)
    weight = head.last_layer.weight
    assert_close(weight.norm(dim=1), torch.ones(70), torch.float32, name="row norms")
    z = F.normalize(head.mlp(x), dim=-1)
    assert_close(out, z @ weight.t(), torch.float32, name="head output")
    # DINO's own checkpoints (torch.nn.utils.weight_norm) name the two tensors weight_g / weight_v.
    legacy = {k.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v"): t * 2 for k, t in head.state_dict().items()}
    other = dino.DINOHead(24, 70, hidden_dim=40, bottleneck_dim=12, norm_last_layer=False)
    other.load_state_dict(legacy)
    assert torch.equal(other.last_layer.parametrizations.weight.original1, v * 2)
    assert other.last_layer.parametrizations.weight.original0.requires_grad


def test_multicrop_wrapper_matches_per_crop_calls():
    student, _ = tiny_dino(depth=1, out_dim=53)
    student.eval()
    crops = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16),
             torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16), torch.randn(3, 3, 48, 48)]
    calls = []
    handle = student.backbone.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    out = student(crops)
    handle.remove()
    assert calls == [6, 9, 3]
    ref = torch.cat([student.head(student.backbone(c)) for c in crops])
    assert out.shape == (18, 53)
    assert_close(out, ref, torch.float32, name="multi-crop output")


# --- parameter updates ------------------------------------------------------------------------

def test_ema_update_matches_loop():
    student, teacher = tiny_dino(depth=1, out_dim=33)
    for p in student.parameters():
        p.data.add_(torch.randn_like(p))
    expected = [0.9 * t.detach().double() + 0.1 * s.detach().double()
                for s, t in zip(student.parameters(), teacher.parameters())]
    dino.ema_update(student, teacher, 0.9)
    for (name, p), ref in zip(teacher.named_parameters(), expected):
        assert_close(p, ref, torch.float32, name=name)
    with pytest.raises(ValueError, match="parameters"):
        dino.ema_update(student, torch.nn.Linear(2, 2), 0.9)


def test_clip_gradients_matches_dino_reference():
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3), torch.nn.Linear(3, 1))
    scales = [10.0, 0.001, 3.0, 0.01, 1.0, 100.0]
    for p, s in zip(model.parameters(), scales):
        p.grad = torch.randn_like(p) * s
    model[1].bias.grad = None
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    norms = dino.clip_gradients(model, 2.0)
    expected = reference_clip(grads, 2.0)
    got = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(got) == len(expected) == 5
    for g, ref in zip(got, expected):
        assert_close(g, ref, torch.float32, name="clipped grad")
    assert_close(norms, torch.stack([g.norm() for g in grads]), torch.float32, name="norms")
    assert dino.clip_gradients(torch.nn.Linear(2, 2), 1.0) is None


def test_cancel_gradients_last_layer():
    student, _ = tiny_dino(depth=1, out_dim=17)
    for p in student.parameters():
        p.grad = torch.ones_like(p)
    dino.cancel_gradients_last_layer(epoch=1, model=student, freeze_last_layer=1)
    assert student.head.last_layer.parametrizations.weight.original1.grad is not None
    dino.cancel_gradients_last_layer(epoch=0, model=student, freeze_last_layer=1)
    cancelled = [n for n, p in student.named_parameters() if p.grad is None]
    assert cancelled and all("last_layer" in n for n in cancelled)
    assert student.backbone.cls_token.grad is not None


# --- whole steps ------------------------------------------------------------------------------

def _snapshot(model):
    return [p.detach().double().clone() for p in model.parameters()]


def _run_step(student, teacher, crops, epoch, optimizer_cls=torch.optim.SGD, seed=7, **kwargs):
    loss_fn = dino.DINOLoss(256, len(crops), 0.04, 0.07, 2, 4)
    loss_fn.center.copy_(torch.linspace(-1, 1, 256))
    optimizer = optimizer_cls(dino.param_groups(student), lr=0.5, weight_decay=1e-3)
    before_s, before_t = _snapshot(student), _snapshot(teacher)
    torch.manual_seed(seed)
    loss = dino.DINOStep(student, teacher, loss_fn, optimizer, clip_grad=3.0, freeze_last_layer=1, **kwargs)(
        crops, epoch, teacher_momentum=0.9)
    deltas = [torch.cat([(p.detach().double() - b).flatten() for p, b in zip(m.parameters(), before)])
              for m, before in ((student, before_s), (teacher, before_t))]
    return loss, deltas[0], deltas[1], loss_fn.center.clone()


def test_dino_step_updates_student_teacher_and_center():
    student, teacher = tiny_dino(drop_path_rate=0.1)
    crops = crops_for(3)
    frozen = student.head.last_layer.parametrizations.weight.original1.detach().clone()
    loss, d_student, d_teacher, center = _run_step(student, teacher, crops, epoch=0,
                                                   optimizer_cls=torch.optim.AdamW)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert d_student.abs().max() > 0 and d_teacher.abs().max() > 0
    assert_close(d_teacher, 0.1 * d_student, torch.float32, name="teacher moved 1-m of the way")
    assert torch.equal(student.head.last_layer.parametrizations.weight.original1, frozen)  # epoch 0: frozen
    assert all(not p.requires_grad for p in teacher.parameters())
    bf16_loss = _run_step(student, teacher, crops, epoch=1, autocast_dtype=torch.bfloat16)[0]
    assert torch.isfinite(bf16_loss) and bf16_loss.dtype == torch.float32


def test_step_inside_caller_autocast_equals_autocast_dtype():
    student, teacher = tiny_dino(depth=1)
    copies = copy.deepcopy(student), copy.deepcopy(teacher)
    crops = crops_for(2, n_local=1)
    ref = _run_step(student, teacher, crops, epoch=1, autocast_dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run_step(*copies, crops, epoch=1)
    fp32 = _run_step(*tiny_dino(depth=1), crops, epoch=1)
    for got, want in zip(out, ref):
        assert torch.equal(got, want)
    assert not torch.equal(fp32[0], ref[0])


def test_patched_dino_step_matches_eager_step():
    eager_student, eager_teacher = tiny_dino(drop_path_rate=0.1)
    student, teacher = copy.deepcopy(eager_student), copy.deepcopy(eager_teacher)
    fastvision.patch(student)
    fastvision.patch(teacher)
    student.packed = False  # packed crops draw drop path per crop in another order (test_packed_multicrop.py)
    assert fastvision.patch_report(student).counts() == fastvision.patch_report(teacher).counts()
    assert [n for n, _ in student.named_parameters()] == [n for n, _ in eager_student.named_parameters()]
    crops = crops_for(2, n_local=2)
    ref = _run_step(eager_student, eager_teacher, crops, epoch=1)
    out = _run_step(student, teacher, crops, epoch=1)
    for name, got, want in zip(("loss", "student update", "teacher update", "center"), out, ref):
        assert_close(got, want, torch.float32, name=name)
    assert ref[1].abs().max() > 0


def test_benchmark_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "dino.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.dino_step", "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["config"]["smoke"] and "torch" in result["versions"]
    variants = {v["name"]: v for v in result["variants"]}
    for name in ("eager", "fastvision"):
        assert variants[name].get("error") is None, variants[name]
        assert variants[name]["images_per_s"] > 0 and variants[name]["time_to_first_step_s"] > 0
    assert variants["fastvision"]["first_loss_rel_err_vs_eager"] <= 1e-5
    assert variants["fastvision"]["patched"].get("vit.block") == 1
    assert "CUDA" in variants["eager+graph"]["cuda_graph"] and variants["eager+graph"]["images_per_s"] > 0
