"""Module hooks on patched models: they run, on the values the eager model gives them.

Fused paths compute several modules without calling them; a module with hooks (registered before or
after fastvision.patch) is called instead, so feature extractors, Grad-CAM and activation statistics
see what they see on the eager model.
"""
import copy

import pytest
import torch

import fastvision
from fastvision.modules import transformer
from fastvision.packing import can_pack
from fastvision.testing import assert_close
from fastvision.verify import recording_declines
from conftest import kernel_devices
from helpers import randomize_bn

timm = pytest.importorskip("timm")

VIT_HOOKED = ("blocks.0.norm1", "blocks.0.attn", "blocks.0.mlp.act", "blocks.0.mlp.fc1", "blocks.0.mlp",
              "blocks.0.norm2", "blocks.0.drop_path1", "blocks.0", "blocks.1", "blocks", "norm")
RESNET_HOOKED = ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.act1", "layer1.1", "layer2.0.downsample.1",
                 "layer3.1.act2")


def make_vit(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gamma"):
                m.gamma.normal_(0.5, 0.1)
    return model


def make_resnet():
    torch.manual_seed(0)
    return randomize_bn(timm.create_model("resnet18", num_classes=10)).eval()


def record(model, names, pre=False):
    """{name: [inputs and outputs]} filled by hooks on the named modules, in call order (and the handles)."""
    seen = {}

    def hook(name):
        def forward_hook(module, args, out=None):
            seen.setdefault(name, []).append(args[0].detach().clone() if pre else out.detach().clone())
        return forward_hook

    handles = [(model.get_submodule(n).register_forward_pre_hook if pre else
                model.get_submodule(n).register_forward_hook)(hook(n)) for n in names]
    return seen, handles


def assert_same_records(seen, expected):
    assert list(seen) == list(expected)  # the same modules, in the same order
    for name in expected:
        assert len(seen[name]) == len(expected[name]), name
        for got, want in zip(seen[name], expected[name]):
            assert_close(got, want, torch.float32, name=name)


@pytest.fixture
def exact_fp32(monkeypatch):
    """Eager fp32 on CUDA without TF32 (cuDNN convolutions use it by default), so 1e-5 applies."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("when", ("before", "after"))
def test_vit_hooks_run_on_eager_values(when, device, exact_fp32):
    eager = make_vit(drop_path_rate=0.0).to(device)
    patched = copy.deepcopy(eager)
    x = torch.randn(2, 3, 32, 32, device=device)
    expected, _ = record(eager, VIT_HOOKED)
    expected_pre, _ = record(eager, VIT_HOOKED, pre=True)
    if when == "after":
        fastvision.patch(patched)
    seen, _ = record(patched, VIT_HOOKED)
    seen_pre, _ = record(patched, VIT_HOOKED, pre=True)
    if when == "before":
        fastvision.patch(patched)
    assert isinstance(patched.blocks[0], transformer.Block) and isinstance(patched.blocks, transformer.Blocks)
    with torch.no_grad():
        assert_close(patched(x), eager(x), torch.float32)
    assert_same_records(seen, expected)
    assert_same_records(seen_pre, expected_pre)


@pytest.mark.parametrize("device", kernel_devices())
def test_grad_cam_style_hooks_on_a_patched_vit(device, exact_fp32):
    """pytorch-grad-cam's ViT recipe: forward and full backward hooks on blocks[-1].norm1."""
    eager = make_vit().to(device)
    patched = fastvision.patch(copy.deepcopy(eager))
    x = torch.randn(2, 3, 32, 32, device=device)
    captured = []
    for model in (eager, patched):
        acts, grads = [], []
        layer = model.blocks[-1].norm1
        layer.register_forward_hook(lambda m, args, out: acts.append(out.detach()))
        layer.register_full_backward_hook(lambda m, grad_in, grad_out: grads.append(grad_out[0].detach()))
        model(x)[:, 3].sum().backward()
        captured.append((acts, grads))
    (eager_acts, eager_grads), (acts, grads) = captured
    assert len(acts) == len(grads) == 1 and len(eager_acts) == len(eager_grads) == 1
    assert_close(acts[0], eager_acts[0], torch.float32)
    assert_close(grads[0], eager_grads[0], torch.float32)


def test_hook_handles_work_across_patch_and_unpatch():
    model = make_vit()
    calls = []
    before = model.blocks[0].norm2.register_forward_hook(lambda *a: calls.append("before"))
    fastvision.patch(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
    assert calls == ["before"]
    before.remove()  # the handle reaches the patched module's hooks
    after = model.blocks[1].attn.register_forward_hook(lambda *a: calls.append("after"))
    with torch.no_grad():
        model(x)
    assert calls == ["before", "after"]
    fastvision.unpatch(model)
    assert not isinstance(model.blocks[1].attn, fastvision.modules.Attention)
    with torch.no_grad():
        model(x)
    assert calls == ["before", "after", "after"]  # a hook registered on the replacement stays
    after.remove()
    with torch.no_grad():
        model(x)
    assert calls == ["before", "after", "after"]


def test_fastvision_own_hooks_leave_the_fused_paths_on(monkeypatch):
    """verify's recorders and recording_declines use hooks too: those must not turn fusion off."""
    model = fastvision.patch(make_vit())
    fused_adds = []
    forward_add = fastvision.modules.LayerNorm.forward_add
    monkeypatch.setattr(fastvision.modules.LayerNorm, "forward_add",
                        lambda self, *a, **k: fused_adds.append(1) or forward_add(self, *a, **k))
    with recording_declines(model) as declined, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert declined == {} and len(fused_adds) == 2 * len(model.blocks) - 1


def test_hooks_decline_the_packed_multicrop_pass():
    model = fastvision.patch(make_vit(dynamic_img_size=True))
    assert can_pack(model) is None
    handle = model.blocks[1].mlp.register_forward_hook(lambda *a: None)
    assert "blocks.1.mlp has hooks" in can_pack(model)
    handle.remove()
    assert can_pack(model) is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("when", ("before", "after"))
def test_resnet_hooks_run_on_eager_values(when, device, exact_fp32):
    pytest.importorskip("fastvision._C")
    eager = make_resnet().to(device)
    patched = copy.deepcopy(eager)
    x = torch.randn(2, 3, 64, 64, device=device)
    expected, _ = record(eager, RESNET_HOOKED)
    if when == "after":
        fastvision.patch(patched)
    seen, _ = record(patched, RESNET_HOOKED)
    if when == "before":
        fastvision.patch(patched)
    with torch.no_grad():
        assert_close(patched(x), eager(x), torch.float32)
    assert_same_records(seen, expected)
    why = patched.layer1[0].why_not(torch.randn(2, 64, 16, 16, device=device))
    assert why.startswith("hooks on conv1, bn1, act1"), why
    assert patched.layer2[1].why_not(torch.randn(2, 128, 8, 8, device=device)) is None  # no hooks: fused


def test_resnet_stem_hooks():
    """Hooks on the stem before patching leave it unfused (reported); after patching they are refused:
    its slots now compute conv -> BN -> ReLU in one, so no module there computes what a hook expects."""
    pytest.importorskip("fastvision._C")
    eager = make_resnet()
    x = torch.randn(2, 3, 64, 64)
    hooked = copy.deepcopy(eager)
    seen, _ = record(hooked, ("bn1",))
    expected, _ = record(eager, ("bn1",))
    fastvision.patch(hooked)
    skipped = {s.path: s.reason for s in fastvision.patch_report(hooked).skipped}
    assert skipped == {"": "stem: hooks on bn1, which the fused stem would not call"}, skipped
    with torch.no_grad():
        assert_close(hooked(x), eager(x), torch.float32)
    assert_same_records(seen, expected)

    patched = fastvision.patch(make_resnet())
    assert isinstance(patched.conv1, fastvision.modules.FusedConv2d)
    patched.act1.register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="hooks were registered on the fused stem"):
        patched(x)


def test_global_module_hooks_see_eager_calls():
    """A global forward hook (module trackers, activation statistics) runs on every module call: the
    patched models then call the modules their fused paths would skip, and give the eager outputs."""
    pytest.importorskip("fastvision._C")
    for eager in (make_vit(), make_resnet()):
        patched = fastvision.patch(copy.deepcopy(eager))
        x = torch.randn(2, 3, 32 if hasattr(eager, "blocks") else 64, 32 if hasattr(eager, "blocks") else 64)
        outputs = {}
        for name, model in (("eager", eager), ("patched", patched)):
            names = {m: n for n, m in model.named_modules()}
            seen = outputs[name] = {}
            handle = torch.nn.modules.module.register_module_forward_hook(
                lambda m, args, out: seen.setdefault(names.get(m), out.detach().clone()))
            try:
                with torch.no_grad():
                    model(x)
            finally:
                handle.remove()
        # every module eager called ran in the patched model too, except the ResNet stem's bn1 and act1,
        # folded into conv1, whose output is therefore the fused stem's (global hooks do not unfuse the stem)
        missing = set(outputs["eager"]) - set(outputs["patched"])
        assert missing <= {"bn1", "act1"}, missing
        for name in set(outputs["eager"]) - missing - {"conv1"}:
            assert_close(outputs["patched"][name], outputs["eager"][name], torch.float32, name=name)


@pytest.mark.parametrize("mask", (None, "bool", "float"))
def test_attention_maps_read_from_attn_drop_hooks(mask):
    """The attention-rollout recipe: timm's unfused attention (fused_attn=False) and a hook on attn_drop,
    whose input is the softmax. The patched attention computes the same probabilities there."""
    eager = make_vit()
    for block in eager.blocks:
        block.attn.fused_attn = False
    patched = fastvision.patch(copy.deepcopy(eager))
    x = torch.randn(2, 3, 32, 32)
    tokens = eager.patch_embed.num_patches + 1
    attn_mask = {None: None, "bool": torch.rand(tokens, tokens) > 0.3,
                 "float": torch.randn(2, 1, tokens, tokens)}[mask]
    if mask == "bool":
        attn_mask.fill_diagonal_(True)
    maps = []
    for model in (eager, patched):
        seen, _ = record(model, [f"blocks.{i}.attn.attn_drop" for i in range(len(model.blocks))])
        tokens_in = model.patch_embed(x)
        tokens_in = model._pos_embed(tokens_in)
        with torch.no_grad():
            out = model.blocks[0].attn(model.blocks[0].norm1(tokens_in), attn_mask=attn_mask)
            if mask is None:
                out = model(x)  # every block's maps, as attention rollout reads them
        maps.append((seen, out))
    (eager_seen, eager_out), (seen, out) = maps
    assert_same_records(seen, eager_seen)
    assert_close(out, eager_out, torch.float32)
