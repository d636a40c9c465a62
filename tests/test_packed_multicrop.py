"""Packed multi-crop forward (fastvision.packing, MultiCropWrapper): equal to the per-resolution passes."""
import copy
import json
import os
import sys

import pytest
import torch

import fastvision
from fastvision import dino, ops, packing
from fastvision.modules import transformer
from fastvision.testing import assert_close, tolerance

timm = pytest.importorskip("timm")


def tiny_vit(patched=True, **kwargs):
    options = dict(img_size=32, depth=2, dynamic_img_size=True, num_classes=0)
    options.update(kwargs)
    model = timm.create_model("vit_tiny_patch16_224", **options)
    return fastvision.patch(model) if patched else model


def crop_groups(sizes_and_counts):
    return [torch.randn(n, 3, s, s) for s, n in sizes_and_counts]


def per_resolution(model, groups):
    return torch.cat([model(g) for g in groups])


def output_and_grads(fn, model, groups):
    """fn(model, groups) and the gradients of <out, fixed weights> for every parameter and input."""
    groups = [g.clone().requires_grad_(True) for g in groups]
    out = fn(model, groups)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out).to(out.dtype)
    (out * weights).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    grads.update({f"crops[{i}]": g.grad for i, g in enumerate(groups)})
    return out, grads


def packed(model, groups):
    return packing.packed_features(model, groups, pre_logits=False)


# --- forward and backward equal to the per-resolution passes --------------------------------------

MODELS = {
    "plain": dict(depth=2),
    "registers": dict(reg_tokens=4, depth=1),
    "layer_scale": dict(init_values=0.3, depth=1),
    "avg_pool_no_cls": dict(class_token=False, global_pool="avg", reg_tokens=1, depth=1),
    "qk_norm": dict(qk_norm=True, depth=1),
    "checkpointing": dict(depth=1),
}
# Adding a constant to every key leaves the softmax unchanged: this gradient is 0 up to rounding.
ZERO_GRADIENTS = ("attn.k_norm.bias",)


@pytest.mark.parametrize("kind", MODELS)
def test_packed_forward_and_gradients_match_per_resolution_passes(kind):
    model = tiny_vit(**MODELS[kind])
    if kind == "checkpointing":
        model.set_grad_checkpointing(True)
    model.train()
    assert packing.can_pack(model) is None
    reference = copy.deepcopy(model)
    groups = crop_groups([(32, 2), (16, 3), (48, 1)])  # 5, 2 and 10 tokens (+ registers) per crop
    out, grads = output_and_grads(packed, model, groups)
    ref, ref_grads = output_and_grads(per_resolution, reference, groups)
    assert out.shape == (6, model.num_features)
    assert_close(out, ref, torch.float32, name="features")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        if name.endswith(ZERO_GRADIENTS):
            assert grad.abs().max() < 1e-6 and ref_grads[name].abs().max() < 1e-6, name
        else:
            assert_close(grad, ref_grads[name], torch.float32, name=f"grad of {name}")


def test_unpatched_timm_vit_matches_packed_patched_vit():
    eager = tiny_vit(patched=False, reg_tokens=2)
    model = fastvision.patch(copy.deepcopy(eager))
    groups = crop_groups([(32, 2), (16, 3)])
    with torch.no_grad():
        assert_close(packed(model, groups), per_resolution(eager, groups), torch.float32)


def test_bf16_autocast_packed_forward_and_backward():
    model = tiny_vit(reg_tokens=4)
    reference = copy.deepcopy(model)
    groups = crop_groups([(32, 2), (16, 4)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = output_and_grads(packed, model, groups)
        ref, ref_grads = output_and_grads(per_resolution, reference, groups)
    fp32 = per_resolution(copy.deepcopy(reference), groups)
    assert out.dtype == ref.dtype
    limit = tolerance(torch.bfloat16)
    assert_close(out, fp32, tol=limit, name="packed bf16 vs fp32")
    assert_close(out, ref, tol=limit, name="packed vs per-resolution, bf16")
    for name in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "cls_token", "crops[1]"):
        assert torch.isfinite(grads[name]).all()
        assert_close(grads[name], ref_grads[name], tol=2 * limit, name=f"grad of {name}")


# --- can_pack --------------------------------------------------------------------------------------

def test_can_pack_says_why_not():
    assert "fastvision's Attention" in packing.can_pack(tiny_vit(patched=False))
    assert "not a timm VisionTransformer" in packing.can_pack(torch.nn.Linear(2, 2))
    timm_blocks = fastvision.patch(tiny_vit(patched=False, drop_path_rate=0.2), fuse_residual_norm=False)
    assert "drop path" in packing.can_pack(timm_blocks.train())
    assert packing.can_pack(timm_blocks.eval()) is None  # no drop path in eval: timm's Block is fine
    attn_drop = tiny_vit(attn_drop_rate=0.1)
    assert "attention dropout" in packing.can_pack(attn_drop.train())
    assert packing.can_pack(attn_drop.eval()) is None
    rows = tiny_vit()
    rows.blocks[1].attn.attention_rows = 1
    assert "attention rows" in packing.can_pack(rows)
    compiled = tiny_vit()
    compiled.compile()
    assert "compiled" in packing.can_pack(compiled)
    with pytest.raises(ValueError, match="fastvision's Attention"):
        packing.packed_features(tiny_vit(patched=False), crop_groups([(32, 1), (16, 1)]))


# --- MultiCropWrapper ------------------------------------------------------------------------------

class _Spy:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = packing.packed_features_checked  # what MultiCropWrapper calls after its can_pack

        def spy(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(packing, "packed_features_checked", spy)


def _wrapper(backbone, packed=None):
    return dino.MultiCropWrapper(backbone, dino.DINOHead(backbone.num_features, 64, hidden_dim=32,
                                                         bottleneck_dim=16), packed=packed)


def test_multicrop_wrapper_packs_a_patched_backbone_by_default(monkeypatch):
    spy = _Spy(monkeypatch)
    wrapper = _wrapper(tiny_vit())
    unpacked = copy.deepcopy(wrapper)
    unpacked.packed = False
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(3)]
    assert wrapper.why_not_packed() is None
    out = wrapper(crops)
    assert spy.calls == 1
    ref = unpacked(crops)
    assert spy.calls == 1 and "packed=False" in unpacked.why_not_packed()
    assert out.shape == (10, 64)
    assert_close(out, ref, torch.float32)
    wrapper(crops[:2])  # one resolution: one ordinary pass
    assert spy.calls == 1
    forced = _wrapper(tiny_vit(), packed=True)
    forced(crops[:1] + crops[2:3] + crops[1:2])  # 32, 16, 32 px: three runs, packed in order
    assert spy.calls == 2


def test_multicrop_wrapper_falls_back_or_refuses_on_an_unpatched_backbone(monkeypatch):
    spy = _Spy(monkeypatch)
    auto = _wrapper(tiny_vit(patched=False))
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    assert "fastvision.patch" in auto.why_not_packed()
    out = auto(crops)
    assert spy.calls == 0 and out.shape == (4, 64)
    forced = _wrapper(tiny_vit(patched=False), packed=True)
    with pytest.raises(ValueError, match="packed=True.*fastvision's Attention"):
        forced(crops)


def test_build_dino_then_patch_packs_the_student(monkeypatch):
    spy = _Spy(monkeypatch)
    torch.manual_seed(0)
    student, teacher = dino.build_dino("vit_tiny", 16, 64, img_size=32, depth=1, drop_path_rate=0.1)
    eager_student = copy.deepcopy(student)
    fastvision.patch(student)
    fastvision.patch(teacher)
    crops = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [torch.randn(3, 3, 16, 16) for _ in range(2)]
    assert student.why_not_packed() is None
    student(crops)
    teacher(crops[:2])
    assert spy.calls == 1
    student.eval()
    eager_student.eval()
    with torch.no_grad():
        assert_close(student(crops), eager_student(crops), torch.float32)


# --- drop path per crop ----------------------------------------------------------------------------

def _random_segments(n, max_length, device="cpu"):
    return ops.Segments.from_lengths(torch.randint(1, max_length + 1, (n,)).tolist(), device)


@pytest.mark.parametrize("scale_by_keep", (True, False))
def test_drop_path_per_segment_keeps_or_drops_whole_segments(scale_by_keep):
    segments = _random_segments(400, 7)
    x = torch.randn(1, segments.total, 5)
    out = transformer.drop_path_per_segment(x, segments, 0.5, scale_by_keep)
    scale = 2.0 if scale_by_keep else 1.0
    kept = []
    for start, length in zip(segments.cu_seqlens[:-1].tolist(), segments.lengths):
        ratio = out[0, start:start + length] / x[0, start:start + length]
        assert torch.all(ratio == 0) or torch.allclose(ratio, torch.full_like(ratio, scale)), ratio
        kept.append(bool(ratio[0, 0] != 0))
    fraction = sum(kept) / len(kept)
    assert 0.4 < fraction < 0.6, fraction  # 400 draws: 5 standard deviations either side
    assert transformer.drop_path_per_segment(x, segments, 0.0) is x


def test_block_drops_each_packed_crop_as_a_whole():
    """Block in train mode with drop path 0.5: each segment's output is one of the four
    (attention kept/dropped × MLP kept/dropped) outcomes, computed exactly by scaling LayerScale."""
    model = tiny_vit(depth=2, init_values=0.5, drop_path_rate=0.5, embed_dim=32, num_heads=1)
    block = model.blocks[1]  # drop path rates rise from 0 at the first block to 0.5 at the last
    assert isinstance(block, transformer.Block) and block.drop_path1.drop_prob == 0.5
    segments = _random_segments(64, 4)
    x = torch.randn(1, segments.total, 32)
    block.eval()
    outcomes = {}
    with torch.no_grad():
        gammas = block.ls1.gamma.clone(), block.ls2.gamma.clone()
        for k1 in (0.0, 2.0):
            for k2 in (0.0, 2.0):
                block.ls1.gamma.copy_(gammas[0] * k1)
                block.ls2.gamma.copy_(gammas[1] * k2)
                outcomes[(k1, k2)] = block(x, attn_mask=segments)
        block.ls1.gamma.copy_(gammas[0])
        block.ls2.gamma.copy_(gammas[1])
        block.train()
        out = block(x, attn_mask=segments)
    counts = dict.fromkeys(outcomes, 0)
    for start, length in zip(segments.cu_seqlens[:-1].tolist(), segments.lengths):
        rows = slice(start, start + length)
        matches = [k for k, o in outcomes.items() if torch.allclose(out[0, rows], o[0, rows], rtol=1e-5, atol=1e-5)]
        assert len(matches) == 1, f"segment at {start} matches {matches}"
        counts[matches[0]] += 1
    assert all(5 <= c <= 27 for c in counts.values()), counts  # 64 draws, p = 1/4 each: ±3 sd


@pytest.mark.parametrize("layout", ("packed", "batch"))
def test_blocks_output_at_chosen_rows_equals_the_full_output_there(layout, monkeypatch):
    """run_blocks(rows=...) (the last block's MLP on those tokens alone) gives the full run's output at
    those rows, with the same drop-path draws in training, and the same gradients."""
    model = tiny_vit(depth=2, init_values=0.5, drop_path_rate=0.5, embed_dim=32, num_heads=2).train()
    if layout == "packed":
        segments = _random_segments(9, 6)
        x0, rows, mask = torch.randn(1, segments.total, 32), segments.first_tokens, segments
    else:
        x0, rows, mask = torch.randn(4, 6, 32), torch.tensor([0, 3]), None
    mlp_rows = []
    last_mlp = model.blocks[-1].mlp
    last_mlp.register_forward_pre_hook(lambda module, args: mlp_rows.append(args[0].shape[-2]))

    def run(selected):
        torch.manual_seed(3)  # the same drop-path draws for both runs
        x = x0.clone().requires_grad_(True)
        out = transformer.run_blocks(model.blocks, x, attn_mask=mask, rows=selected)
        out = out if selected is not None else out.index_select(-2, rows)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        grads = torch.autograd.grad((out * weights).sum(), [x, *model.blocks.parameters()])
        return out, grads

    out, grads = run(rows)
    ref, ref_grads = run(None)
    assert mlp_rows == [len(rows), x0.shape[-2]]
    assert_close(out, ref, torch.float32, name="output at the rows")
    for (name, _), grad, ref_grad in zip((("x", None), *model.blocks.named_parameters()), grads, ref_grads):
        assert_close(grad, ref_grad, torch.float32, name=f"grad of {name}")


def test_packed_eval_with_drop_path_equals_unpacked_and_train_runs():
    model = tiny_vit(drop_path_rate=0.5, reg_tokens=4)
    groups = crop_groups([(32, 3), (16, 4)])
    model.eval()
    with torch.no_grad():
        first = packed(model, groups)
        assert torch.equal(first, packed(model, groups))
        assert_close(first, per_resolution(model, groups), torch.float32)
    model.train()
    assert packing.can_pack(model) is None
    out, grads = output_and_grads(packed, model, groups)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert not torch.allclose(out, first)


# --- whole DINO step and the benchmark -------------------------------------------------------------

def _step(student, teacher, crops):
    loss_fn = dino.DINOLoss(64, len(crops), 0.04, 0.07, 0, 10)
    optimizer = torch.optim.SGD(dino.param_groups(student), lr=0.5)
    before = torch.cat([p.detach().flatten().clone() for p in student.parameters()])
    loss = dino.dino_train_step(student, teacher, loss_fn, optimizer, crops, epoch=1, teacher_momentum=0.9)
    after = torch.cat([p.detach().flatten() for p in student.parameters()])
    return loss, after - before, loss_fn.center


def test_packed_dino_step_matches_eager_step():
    torch.manual_seed(0)
    eager_student, eager_teacher = dino.build_dino("vit_tiny", 16, 64, img_size=32, depth=2, drop_path_rate=0.0,
                                                   reg_tokens=2)
    student, teacher = copy.deepcopy(eager_student), copy.deepcopy(eager_teacher)
    fastvision.patch(student)
    fastvision.patch(teacher)
    student.packed = True
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(3)]
    ref = _step(eager_student, eager_teacher, crops)
    out = _step(student, teacher, crops)
    for name, got, want in zip(("loss", "student update", "center"), out, ref):
        assert_close(got, want, torch.float32, name=name)
    assert ref[1].abs().max() > 0


def test_benchmark_smoke_runs_the_packed_variant(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import dino_step

    assert "fastvision+packing" in dino_step.parse_args(["--smoke", "--out", "x"]).variants
    dino_step.main(["--smoke", "--variants", "eager,fastvision+packing", "--out", str(tmp_path / "d.json")])

    variants = {v["name"]: v for v in json.loads((tmp_path / "d.json").read_text())["variants"]}
    packed_run = variants["fastvision+packing"]
    assert packed_run.get("error") is None, packed_run
    assert packed_run["packing"] == "packed" and packed_run["first_loss_rel_err_vs_eager"] <= 1e-5
