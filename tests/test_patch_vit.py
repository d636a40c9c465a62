"""fastvision.patch on timm ViT families: same outputs, gradients, parameters and checkpoints."""
import collections
import copy
import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastvision
from fastvision.modules import GELU, LayerNorm
from fastvision.modules import transformer
from fastvision.testing import assert_close, relative_error, tolerance
from conftest import kernel_devices
from helpers import assert_loads_checkpoint, assert_patched_checkpoint_loads_unpatched

timm = pytest.importorskip("timm")

# (timm name, extra create_model kwargs): small depth and image so the interpreter stays fast.
FAMILIES = {
    "vit_tiny_patch16_224": dict(img_size=32),
    "vit_small_patch16_224": dict(img_size=32),
    "vit_base_patch16_224": dict(img_size=32),
    "vit_large_patch16_224": dict(img_size=32),
    "vit_small_patch8_224": dict(img_size=24),
    "vit_base_patch8_224": dict(img_size=24),
    "deit_tiny_patch16_224": dict(img_size=32),
    "deit_small_distilled_patch16_224": dict(img_size=32),
    "vit_small_patch14_dinov2": dict(img_size=28),
    "vit_small_patch14_reg4_dinov2": dict(img_size=28),
    "vit_small_patch16_224-qk_norm": dict(img_size=32, qk_norm=True),
}


def make_vit(name: str, depth: int = 2, **overrides):
    kwargs = dict(FAMILIES[name])
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = timm.create_model(name.split("-")[0], pretrained=False, depth=depth, num_classes=10, **kwargs)
    # LayerScale starts at 1e-5 and would hide the attention and MLP branches from the check.
    for module in model.modules():
        if hasattr(module, "gamma") and isinstance(module.gamma, torch.nn.Parameter):
            torch.nn.init.normal_(module.gamma, 0.5, 0.1)
    return model


def images(model, batch=2):
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_patched_family_matches_eager_fp32(device, name):
    model = make_vit(name).to(device).eval()
    report = fastvision.verify(model, images(model).to(device))
    assert report.passed, report.table()
    patched = fastvision.patch(copy.deepcopy(model))
    replaced = fastvision.patch_report(patched).counts()
    assert replaced.get("vit.block") == 2 and replaced.get("layer_norm", 0) >= 5, replaced
    assert replaced.get("vit.attention") == 2, fastvision.patch_report(patched)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("name", ("vit_small_patch16_224", "vit_small_patch14_reg4_dinov2"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_patched_vit_low_precision(device, name, dtype):
    model = make_vit(name).to(device).eval()
    report = fastvision.verify(model, images(model).to(device), dtype=dtype)
    assert report.passed, report.table()


def test_state_dict_round_trip_both_ways():
    eager = make_vit("vit_small_patch14_reg4_dinov2")
    assert_patched_checkpoint_loads_unpatched(eager, make_vit("vit_small_patch14_reg4_dinov2"))
    # and an eager checkpoint into a patched model
    assert_loads_checkpoint(fastvision.patch(make_vit("vit_small_patch14_reg4_dinov2")), eager.state_dict())


def test_patch_keeps_parameter_objects_and_requires_grad():
    model = make_vit("vit_tiny_patch16_224")
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    before = {n: p for n, p in model.named_parameters()}
    fastvision.patch(model)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(before[n] is after[n] for n in before)
    assert not model.blocks[0].attn.qkv.weight.requires_grad


def test_unpatch_restores_original_modules_and_double_patch_is_idempotent():
    model = make_vit("vit_small_patch16_224-qk_norm")
    originals = {n: m for n, m in model.named_modules()}
    fastvision.patch(model)
    first = {n: type(m) for n, m in model.named_modules()}
    fastvision.patch(model)
    assert {n: type(m) for n, m in model.named_modules()} == first
    assert not any(type(m).__name__ == "Block" and isinstance(getattr(m, "norm1", None), transformer.Block)
                   for m in model.modules())
    assert isinstance(model.blocks[0], transformer.Block) and isinstance(model.norm, LayerNorm)
    fastvision.unpatch(model)
    restored = dict(model.named_modules())
    assert restored.keys() == originals.keys()
    assert all(restored[n] is originals[n] for n in originals)


def test_modules_swapped_in_after_patching_stay_after_unpatch():
    """An adapter put around a Linear of a patched block (LoRA-style) is used by the patched model and
    is still there after unpatch, not the Linear the original block held before patching."""
    class Adapted(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear
            self.delta = torch.nn.Linear(linear.in_features, linear.out_features, bias=False)

        def forward(self, x):
            return self.linear(x) + self.delta(x)

    model = make_vit("vit_tiny_patch16_224")
    reference = copy.deepcopy(model)
    fastvision.patch(model)
    for m in (model, reference):
        torch.manual_seed(1)
        m.blocks[1].attn.qkv = Adapted(m.blocks[1].attn.qkv)
        m.blocks[0].mlp.fc2 = Adapted(m.blocks[0].mlp.fc2)
    x = images(model)
    with torch.no_grad():
        assert_close(model(x), reference(x), torch.float32)
    fastvision.unpatch(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert list(model.state_dict()) == list(reference.state_dict())


def test_parameters_assigned_after_patching_stay_after_unpatch():
    """load_state_dict(assign=True) puts new Parameter objects into the patched modules: unpatch keeps them
    (the restored modules had the old ones: outputs off by 46 before)."""
    model = make_vit("vit_tiny_patch16_224")
    reference = copy.deepcopy(model)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    fastvision.patch(model)
    for m in (model, reference):
        m.load_state_dict(state, assign=True)
    params = [id(p) for p in model.parameters()]
    fastvision.unpatch(model)
    assert [id(p) for p in model.parameters()] == params  # what an optimizer made after the load holds
    x = images(model)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_patch_options_switch_each_replacement_off():
    model = fastvision.patch(make_vit("vit_tiny_patch16_224"), attention=False, gelu=False,
                             fuse_residual_norm=False)
    counts = fastvision.patch_report(model).counts()
    assert "vit.attention" not in counts and "gelu" not in counts and "vit.block" not in counts
    assert counts["layer_norm"] == 5
    skipped = {s.path: s.reason for s in fastvision.patch_report(model).skipped}
    assert "gelu" in skipped["blocks.0.mlp"]
    none = fastvision.patch(make_vit("vit_tiny_patch16_224"), attention=False, layer_norm=False, gelu=False,
                            fuse_residual_norm=False, fuse_bias_gelu=False, patch_embed=False)
    assert not fastvision.patch_report(none).replaced


def test_inplace_false_leaves_the_model_alone():
    model = make_vit("vit_tiny_patch16_224")
    patched = fastvision.patch(model, inplace=False)
    assert patched is not model
    assert not any(isinstance(m, (LayerNorm, GELU)) for m in model.modules())


@pytest.mark.parametrize("device", kernel_devices())
def test_train_mode_with_drop_path_and_dropout(device):
    model = make_vit("vit_small_patch16_224", drop_path_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1).to(device)
    patched = fastvision.patch(copy.deepcopy(model)).train()
    x = images(model).to(device)
    torch.manual_seed(3)
    ref = model.train()(x)
    torch.manual_seed(3)
    out = patched(x)
    assert_close(out, ref, torch.float32)
    assert patched.training and all(m.training for m in patched.modules())
    patched.eval()
    assert not any(m.training for m in patched.modules())


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("train", (False, True), ids=("eval", "train-drop-path"))
def test_run_blocks_fuses_each_mlp_add_into_the_next_norm(device, train, monkeypatch):
    """run_blocks defers each Block's MLP residual add (with its drop path) into the next block's
    norm1: same outputs and gradients as timm's blocks one after the other, same random draws."""
    model = make_vit("vit_small_patch16_224", depth=3, drop_path_rate=0.3).to(device).train(train)
    patched = fastvision.patch(copy.deepcopy(model)).train(train)
    fused_adds = []
    forward_add = LayerNorm.forward_add
    monkeypatch.setattr(LayerNorm, "forward_add",
                        lambda self, *a, **k: fused_adds.append(1) or forward_add(self, *a, **k))
    tokens = torch.randn(2, 5, 384, device=device, requires_grad=True)
    ref_tokens = tokens.detach().clone().requires_grad_()
    dy = torch.randn(2, 5, 384, device=device)
    torch.manual_seed(5)
    ref = model.blocks(ref_tokens)
    torch.manual_seed(5)
    out = transformer.run_blocks(patched.blocks, tokens)
    assert len(fused_adds) == 2 * 3 - 1  # norm2 of every block, norm1 of all but the first
    assert_close(out, ref, torch.float32)
    ref.backward(dy)
    out.backward(dy)
    assert_close(tokens.grad, ref_tokens.grad, torch.float32, name="grad of the tokens")
    for (name, p), q in zip(patched.blocks.named_parameters(), model.blocks.parameters()):
        assert_close(p.grad, q.grad, torch.float32, name=f"grad of {name}")


@pytest.mark.parametrize("device", kernel_devices())
def test_mlp_recompute_same_gradients_fewer_saved_bytes(device):
    """patch(mlp_recompute=True): the same outputs and gradients as the default patch, and the GELU
    outputs (one hidden-sized tensor per block) are no longer kept for the backward. The default patch
    keeps no more activation bytes than eager timm (issue 7: peak memory no higher than eager's)."""
    model = make_vit("vit_small_patch16_224").to(device).train()
    default = fastvision.patch(copy.deepcopy(model))
    recompute = fastvision.patch(copy.deepcopy(model), mlp_recompute=True)
    assert all(b.mlp.recompute_activation for b in recompute.blocks)
    x = images(model).to(device)
    params = {p.data_ptr() for p in model.parameters()} | {p.data_ptr() for p in default.parameters()}
    params |= {p.data_ptr() for p in recompute.parameters()}
    results = []
    for patched in (model, default, recompute):
        saved = []

        def pack(t, saved=saved):
            if t.data_ptr() not in params:  # activations only: weights are kept anyway
                saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = patched(x)
        out.square().sum().backward()
        results.append((out, {n: p.grad for n, p in patched.named_parameters()}, sum(saved)))
    (_, _, saved_eager), (out, grads, saved_default), (out_r, grads_r, saved_recompute) = results
    assert saved_default <= saved_eager
    assert_close(out_r, out, torch.float32)
    for name, g in grads.items():
        assert_close(grads_r[name], g, torch.float32, name=f"grad of {name}")
    hidden = x.shape[0] * (model.patch_embed.num_patches + 1) * model.blocks[0].mlp.fc1.out_features * 4
    assert saved_default - saved_recompute == len(model.blocks) * hidden


@pytest.mark.parametrize("device", kernel_devices())
def test_patched_model_compiles_fullgraph(device):
    torch._dynamo.reset()
    model = make_vit("vit_tiny_patch16_224").to(device).eval()
    x = images(model).to(device)
    ref = model(x)
    patched = fastvision.patch(copy.deepcopy(model))
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), ref, torch.float32)
    out = compiled(x)
    out.sum().backward()
    assert all(p.grad is not None for p in patched.parameters() if p.requires_grad)


def test_cpu_without_interpreter_falls_back_to_eager():
    script = textwrap.dedent("""
        import copy, torch, timm, fastvision
        assert not fastvision.ops.triton_interpreted()
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32).eval()
        x = torch.randn(2, 3, 32, 32)
        ref = model(x)
        patched = fastvision.patch(copy.deepcopy(model))
        out = patched(x)
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), (out - ref).abs().max()
        reason = patched.blocks[0].norm1.why_not(x)
        assert reason and "CPU" in reason, reason
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_patch_rejects_non_modules_and_reports_unknown_models():
    with pytest.raises(TypeError, match="model"):
        fastvision.patch("not a model")
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    fastvision.patch(mlp)
    report = fastvision.patch_report(mlp)
    assert not report.replaced and "no module" in report.skipped[0].reason
    with pytest.raises(ValueError, match="not been patched"):
        fastvision.patch_report(torch.nn.Linear(2, 2))


def test_look_alike_with_a_different_forward_is_left_alone():
    class ScaledLayerNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    model = torch.nn.Sequential(ScaledLayerNorm(8), torch.nn.LayerNorm(8))
    fastvision.patch(model)
    assert type(model[0]) is ScaledLayerNorm and isinstance(model[1], LayerNorm)


@pytest.mark.parametrize("device", kernel_devices())
def test_to_dtype_and_autocast_on_patched_model(device):
    model = make_vit("vit_small_patch16_224").to(device).eval()
    x = images(model).to(device)
    patched = fastvision.patch(copy.deepcopy(model))
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        ref, out = model(x), patched(x)
    assert out.dtype == ref.dtype
    exact = copy.deepcopy(model).double()(x.double())
    eager_error = relative_error(ref, exact)
    assert_close(out, exact, torch.bfloat16, tol=max(tolerance(torch.bfloat16), 2 * eager_error))
    patched.to(torch.float16)
    model.to(torch.float16)
    assert all(p.dtype == torch.float16 for p in patched.parameters())
    assert_close(patched(x.half()), model(x.half()), torch.float16)


@pytest.mark.parametrize("device", kernel_devices())
def test_autocast_runs_the_same_fused_ops(device, monkeypatch):
    """Under bf16 autocast a patched ViT's forward and backward call every fused op they call without it:
    no silent eager fallback for the float32 weights (as ResNet's conv chains once had)."""
    from fastvision.ops import _dispatch
    calls = collections.Counter()
    for name, entry in list(_dispatch.REGISTRY.items()):
        def counted(*args, _impl=entry.impl, _name=name):
            calls[_name] += 1
            return _impl(*args)
        monkeypatch.setitem(_dispatch.REGISTRY, name, dataclasses.replace(entry, impl=counted))
    model = fastvision.patch(make_vit("vit_small_patch16_224").to(device)).train()
    x = images(model).to(device)
    counts = []
    for enabled in (False, True):
        calls.clear()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=enabled):
            out = model(x)
        out.float().sum().backward()
        counts.append(dict(calls))
    assert {"attention_qkvpacked", "add_layer_norm_backward"} <= set(counts[0])
    assert counts[1] == counts[0]


def test_ddp_wraps_a_patched_model(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = make_vit("vit_tiny_patch16_224")
    reference = copy.deepcopy(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(fastvision.patch(model))
        x = images(model)
        ddp(x).sum().backward()
        reference(x).sum().backward()
        for (name, p), ref_p in zip(model.named_parameters(), reference.parameters()):
            assert_close(p.grad, ref_p.grad, torch.float32, name=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("name", ("vit_small_patch16_224", "vit_small_patch14_reg4_dinov2"))
def test_cls_attention_maps_match_eager(device, name):
    model = make_vit(name, depth=3).to(device).eval()
    x = images(model).to(device)
    ref = fastvision.get_last_selfattention(model, x)
    patched = fastvision.patch(copy.deepcopy(model))
    assert hasattr(patched.blocks[-1].attn, "attention_rows"), "last attention not fused"
    out = fastvision.get_last_selfattention(patched, x)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    assert out.shape == ref.shape == (2, model.blocks[0].attn.num_heads, tokens)
    assert_close(out, ref, torch.float32)
    assert torch.allclose(out.sum(-1), torch.ones_like(out.sum(-1)), atol=1e-5)
    assert patched.blocks[-1].attn.attention_rows == 0  # switched off again


def test_dino_student_and_teacher_patched_identically_keep_ema_working():
    student = fastvision.patch(make_vit("vit_small_patch16_224", dynamic_img_size=True))
    teacher = copy.deepcopy(student)
    assert list(student.state_dict()) == list(teacher.state_dict())
    student_params = dict(student.named_parameters())
    with torch.no_grad():
        for name, p_t in teacher.named_parameters():
            p_t.mul_(0.996).add_(student_params[name].detach(), alpha=0.004)
    for x in (torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)):  # global and local crops
        assert_close(teacher(x), student(x), torch.float32)


def test_verify_check_passes_within_eager_error_and_tolerates_noise_only_where_eager_misses():
    from fastvision.verify import Check

    def passed(patched, eager, tol=1e-5):
        return Check("x", "grad", patched, eager, tol).passed

    assert passed(9e-6, 1e-7) and not passed(2e-5, 1e-7)      # within tolerance, or not
    assert passed(1.5e-5, 8e-6) and not passed(1.7e-5, 8e-6)  # eager near the tolerance: 2x eager
    assert passed(2.5e8, 1e8) and not passed(1.1e9, 1e8)      # a zero-in-exact-arithmetic gradient: 10x eager
