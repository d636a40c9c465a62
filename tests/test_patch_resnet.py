"""fastvision.patch on timm / torchvision ResNets: outputs, training semantics, checkpoints, unpatch."""
import copy

import pytest
import torch

import fastvision
from fastvision import _extension
from fastvision.modules.conv import FoldedBatchNorm2d
from fastvision.modules.resnet import FusedResNetBlock
from fastvision.testing import assert_close
from helpers import assert_loads_checkpoint, assert_patched_checkpoint_loads_unpatched, randomize_bn

timm = pytest.importorskip("timm")
needs_extension = pytest.mark.skipif(_extension.load() is None, reason="fastvision._C is not built")
MODELS = ("resnet18", "resnet50", "resnet50d")


def make(name, num_classes=10):
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, pretrained=False, num_classes=num_classes))


def images(batch=2, size=64):
    return torch.randn(batch, 3, size, size)


@needs_extension
@pytest.mark.parametrize("fmt", ("nchw", "nhwc"))
@pytest.mark.parametrize("name", MODELS)
def test_patched_eval_matches_float64(name, fmt):
    model = make(name).eval()
    x = images()
    if fmt == "nhwc":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        patched = fastvision.patch(copy.deepcopy(model))
        assert patched.layer1[0].why_not(torch.randn(2, 64, 16, 16)) is None
        assert patched.conv1.why_not(x) is None if name != "resnet50d" else True
        out = patched(x)
    counts = fastvision.patch_report(patched).counts()
    assert counts["resnet.block"] == sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    assert counts["resnet.stem"] >= 2 and counts["resnet.sequential"] >= 3
    assert_close(out, ref, torch.float32)


@needs_extension
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_patched_resnet50_low_precision_no_worse_than_eager(dtype):
    from fastvision.testing import relative_error
    model = make("resnet50").eval()
    x = images()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        eager = copy.deepcopy(model).to(dtype)(x.to(dtype))
        out = fastvision.patch(copy.deepcopy(model).to(dtype))(x.to(dtype))
    assert out.dtype == dtype
    assert relative_error(out, ref) <= max(2 * relative_error(eager, ref), 5e-2)


@needs_extension
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("name", ("resnet18", "resnet50"))
def test_every_chain_is_fused_under_autocast(name, device, monkeypatch):
    """float32 weights under bf16 autocast (how models are trained and benchmarked): every conv -> BN
    chain runs the fused op, none declines for the weights' dtype, and the output is as close to float64
    as eager autocast's."""
    from fastvision.modules.conv import ConvBnFusion
    from fastvision.testing import relative_error
    model = make(name).eval().to(device, memory_format=torch.channels_last)
    x = images().to(device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    patched = fastvision.patch(copy.deepcopy(model))
    reasons = []
    decline = ConvBnFusion.decline

    def recorded(self, *args):
        reasons.append(decline(self, *args))
        return reasons[-1]

    monkeypatch.setattr(ConvBnFusion, "decline", recorded)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        out, eager = patched(x), model(x)
    assert len(reasons) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert set(reasons) == {None}, set(reasons)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert relative_error(out, ref) <= max(2 * relative_error(eager, ref), 5e-2)


def test_extension_queries_do_not_break_compiled_graphs():
    """The fused path asks the extension whether it was built with CUDA: a call into the pybind module
    there broke torch.compile's graph at every conv + BN chain (ResNet-50 patch + compile ran 0.34x eager)."""
    def fn(x):
        return x + 1 if _extension.built_with_cuda() or _extension.extension_decline() is None else x - 1

    x = torch.randn(3)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(x), fn(x))


@needs_extension
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_patched_eval_compiles_fullgraph_under_autocast(device):
    """patch + torch.compile: the whole patched ResNet is one graph (the folded weights computed in it)
    and its output is the uncompiled patched model's."""
    model = fastvision.patch(make("resnet18").eval().to(device, memory_format=torch.channels_last))
    x = images().to(device).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        out, ref = compiled(x), model(x)
    assert_close(out, ref)


@needs_extension
def test_recording_declines_names_each_block_that_ran_eager():
    """In training mode every block keeps its eager modules (batch statistics); the benchmarks record it."""
    from fastvision.verify import recording_declines
    patched = fastvision.patch(make("resnet18")).train()
    with recording_declines(patched) as declined:
        patched(images())
    blocks = {n for n, m in patched.named_modules() if isinstance(m, FusedResNetBlock)}
    assert blocks and blocks <= set(declined)
    assert all("batch statistics" in declined[b] for b in blocks)
    with recording_declines(patched.eval()) as declined, torch.no_grad():
        patched(images())
    assert not blocks & set(declined)


@pytest.mark.parametrize("name", MODELS)
def test_train_step_identical_to_eager(name):
    model = make(name).train()
    patched = fastvision.patch(copy.deepcopy(model))
    x, target = images(3), torch.randint(0, 10, (3,))
    outs = []
    for m in (model, patched):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(1)
        out = m(x)
        torch.nn.functional.cross_entropy(out, target).backward()
        opt.step()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    ref_state, state = model.state_dict(), patched.state_dict()
    assert list(ref_state) == list(state)
    for k in ref_state:  # weights after the step and running statistics: identical
        assert torch.equal(ref_state[k], state[k]), k
    model.eval(), patched.eval()
    with torch.no_grad():
        assert_close(patched(x), model.double()(x.double()), torch.float32)


@needs_extension
def test_conv_geometry_changed_after_patching_is_followed():
    """The op's stride/padding arguments are cached per chain: a conv changed in place after patching
    (and after a first forward) is computed with its new geometry, as eager would."""
    model = make("resnet18").eval()
    patched = fastvision.patch(copy.deepcopy(model))
    x = images()
    with torch.no_grad():
        patched(x)
        for m in (model, patched):
            m.layer2[0].conv1.stride = (1, 1)
            m.layer2[0].downsample[0].stride = (1, 1)
        out, ref = patched(x), model.double()(x.double())
    assert_close(out, ref, torch.float32)


@needs_extension
def test_frozen_bn_training_gradients_match_float64():
    model = make("resnet18").train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()  # frozen statistics, trainable affine (detection-style fine-tuning)
    patched = fastvision.patch(copy.deepcopy(model))
    ref = copy.deepcopy(model).double()
    x = images(2)
    out = patched(x)
    ref_out = ref(x.double())
    assert_close(out, ref_out, torch.float32)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    for n, p in patched.named_parameters():
        assert_close(p.grad, ref_grads[n].grad, torch.float32, name=f"grad of {n}", tol=1e-4)


@needs_extension
def test_folded_weights_follow_parametrized_and_reassigned_weights():
    """The fold is cached per chain. A parametrized weight (weight norm, spectral norm, pruning through
    torch.nn.utils.parametrize) is a new tensor at every access, usually at the last one's address, and a
    ``.data =`` assignment keeps the version: neither may reuse a stale fold (it did, off by 0.81)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    class Scale(torch.nn.Module):
        """w * s as a fresh tensor (version 0) at one fixed address: what an allocator that hands the freed
        block back does, made deterministic."""
        def __init__(self, like):
            super().__init__()
            self.s = torch.nn.Parameter(torch.ones(()))
            self.register_buffer("block", torch.empty_like(like), persistent=False)

        def forward(self, w):
            with torch.no_grad():  # evaluation only
                self.block.copy_(w * self.s)
            return torch.empty(0, dtype=w.dtype).set_(self.block.untyped_storage(), 0, w.shape, w.stride())

    model = make("resnet18").eval()
    parametrize.register_parametrization(model.layer1[0].conv1, "weight", Scale(model.layer1[0].conv1.weight))
    weight_norm(model.layer2[1].conv2)
    patched = fastvision.patch(copy.deepcopy(model))
    assert patched.layer1[0].why_not(torch.randn(2, 64, 16, 16)) is None
    x = images()
    with torch.no_grad():
        for step in range(4):
            for m in (model, patched):
                m.layer1[0].conv1.parametrizations.weight[0].s.fill_(1.0 + 0.1 * step)
                m.layer2[1].conv2.parametrizations.weight.original0.mul_(1.05)
            assert_close(patched(x), model(x), torch.float32)  # eager fp32: the staleness is O(1), not rounding
        for m in (model, patched):
            m.layer3[0].conv2.weight.data = m.layer3[0].conv2.weight.data * 0.5
        assert_close(patched(x), model(x), torch.float32)
        assert_close(patched(x), copy.deepcopy(model).double()(x.double()), torch.float32)


@needs_extension
def test_whole_model_save_and_load_after_a_forward(tmp_path):
    """torch.save(model) of a patched ResNet failed once a forward had filled the fold caches (their key
    held a torch.memory_format, which pickle refuses). The loaded model computes the same and unpatches."""
    model = fastvision.patch(make("resnet50d")).eval()
    x = images()
    with torch.no_grad():
        out = model(x)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    fastvision.unpatch(loaded)
    assert type(loaded.bn1) is torch.nn.BatchNorm2d
    with torch.no_grad():
        assert_close(loaded(x), out, torch.float32)


def test_state_dict_keys_identical_and_round_trip_both_ways():
    eager = make("resnet50d").eval()
    assert_patched_checkpoint_loads_unpatched(eager, make("resnet50d"))
    target = fastvision.patch(make("resnet50d")).eval()
    with torch.no_grad():
        target(images(1))  # fill the folded-weight caches before loading
    assert_loads_checkpoint(target, eager.state_dict())
    x = images(1)
    with torch.no_grad():
        assert_close(target(x), eager(x), torch.float32)  # caches were refolded
    # the stem slots share the original modules' tensors, also after .to()
    target.to(torch.float64)
    original_bn = target.bn1.__dict__["_fastvision_original"]
    assert original_bn.running_mean.dtype == torch.float64 and original_bn.running_mean is target.bn1.running_mean


def test_unpatch_restores_originals_and_patch_is_idempotent():
    model = make("resnet50d")
    originals = dict(model.named_modules())
    fastvision.patch(model)
    assert isinstance(model.layer1[0], FusedResNetBlock) and isinstance(model.bn1, FoldedBatchNorm2d)
    first = {n: type(m) for n, m in model.named_modules()}
    fastvision.patch(model)
    assert {n: type(m) for n, m in model.named_modules()} == first
    fastvision.unpatch(model)
    restored = dict(model.named_modules())
    assert restored.keys() == originals.keys()
    assert all(restored[n] is originals[n] for n in originals)


def sync_bn(model):
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def count_sync_bn_calls(monkeypatch):
    calls = []
    forward = torch.nn.SyncBatchNorm.forward

    def counting(self, x):
        calls.append(self)
        return forward(self, x)
    monkeypatch.setattr(torch.nn.SyncBatchNorm, "forward", counting)
    return calls


def assert_train_and_eval_match(patched, ref, monkeypatch):
    """Training: every SyncBatchNorm runs its own forward (statistics synchronised), outputs identical to the
    eager model's; evaluation: the same as the float64 eager model."""
    x = images(3)
    calls = count_sync_bn_calls(monkeypatch)
    out = patched.train()(x)
    n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in ref.modules())
    assert len(calls) == n_sync, (len(calls), n_sync)
    assert torch.equal(out, ref.train()(x))
    with torch.no_grad():
        out = patched.eval()(x)
        assert_close(out, copy.deepcopy(ref).eval().double()(x.double()), torch.float32)


@needs_extension
@pytest.mark.parametrize("name", ("resnet18", "resnet50d"))
def test_sync_batchnorm_resnets_fold_in_eval_and_sync_in_training(name, monkeypatch):
    """DINO's ResNets train with SyncBatchNorm: k-NN, linear probe and inference fold it like BatchNorm2d."""
    model = sync_bn(make(name))
    patched = fastvision.patch(copy.deepcopy(model))
    report = fastvision.patch_report(patched)
    assert not report.skipped, report
    assert report.counts()["resnet.block"] == sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    assert isinstance(patched.bn1, FoldedBatchNorm2d) and isinstance(patched.bn1, torch.nn.SyncBatchNorm)
    assert list(patched.state_dict()) == list(model.state_dict())
    assert_train_and_eval_match(patched, model, monkeypatch)
    assert patched.layer1[0].why_not(torch.randn(2, 64, 16, 16)) is None


@needs_extension
@pytest.mark.parametrize("name", ("resnet18", "resnet50d"))
def test_convert_sync_batchnorm_after_patch_refolds_the_stem(name, monkeypatch):
    """DINO converts its models to SyncBatchNorm after building them. That replaces the stem's folded bn1
    slot: applied after the fused conv, it normalised twice (eval output off by 0.13 before the fix)."""
    model = make(name)
    ref = sync_bn(copy.deepcopy(model))
    patched = fastvision.patch(copy.deepcopy(model))
    teacher = sync_bn(copy.deepcopy(patched))  # DINO's teacher: a copy, converted on its own
    assert sync_bn(patched) is patched and type(patched.bn1) is torch.nn.SyncBatchNorm
    assert_train_and_eval_match(patched, copy.deepcopy(ref), monkeypatch)
    assert isinstance(patched.bn1, FoldedBatchNorm2d) and isinstance(patched.bn1, torch.nn.SyncBatchNorm)
    assert_train_and_eval_match(teacher, copy.deepcopy(ref), monkeypatch)
    assert list(patched.state_dict()) == list(ref.state_dict())
    fastvision.unpatch(patched)
    assert [type(m) for m in patched.modules()] == [type(m) for m in ref.modules()]


@needs_extension
def test_patching_again_after_convert_sync_batchnorm_compiles_fullgraph():
    """A compiled graph cannot swap the stem's slot module itself: it says so, and patch() again does it."""
    model = make("resnet18").eval()
    ref = sync_bn(copy.deepcopy(model))
    patched = sync_bn(fastvision.patch(copy.deepcopy(model)))
    x = images()
    with torch.no_grad(), pytest.raises(Exception, match="call fastvision.patch.model. again"):
        torch.compile(patched, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    fastvision.patch(patched)
    assert isinstance(patched.bn1, torch.nn.SyncBatchNorm) and isinstance(patched.bn1, FoldedBatchNorm2d)
    assert not fastvision.patch_report(patched).skipped
    with torch.no_grad():
        out = torch.compile(patched, fullgraph=True, backend="aot_eager")(x)
        assert_close(out, ref.double()(x.double()), torch.float32)


def test_bn_slot_replaced_by_something_else_after_patch_raises():
    patched = fastvision.patch(make("resnet18"))
    patched.bn1 = torch.nn.Identity()
    with pytest.raises(RuntimeError, match="bn1 was replaced by a Identity after fastvision.patch"):
        patched(images())


def test_patch_option_off_and_torchvision_resnet():
    model = make("resnet18")
    fastvision.patch(model, conv_bn=False)
    assert "resnet.block" not in fastvision.patch_report(model).counts()
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = randomize_bn(tv.models.resnet18(num_classes=10)).eval()
    keys = list(net.state_dict())
    x = images()
    with torch.no_grad():
        ref = copy.deepcopy(net).double()(x.double())
        patched = fastvision.patch(copy.deepcopy(net))
        out = patched(x)
    counts = fastvision.patch_report(patched).counts()
    assert counts["resnet.block"] == 8 and counts["resnet.stem"] == 3, counts
    assert list(patched.state_dict()) == keys
    assert_close(out, ref, torch.float32)


def test_skipped_blocks_are_reported():
    model = make("resnet18")
    model.layer1[0].conv1.padding_mode = "reflect"
    fastvision.patch(model)
    skipped = {s.path: s.reason for s in fastvision.patch_report(model).skipped}
    assert "padding_mode" in skipped["layer1.0"], skipped


@pytest.mark.parametrize("bad", ("channels", "int", "3d"))
def test_bad_input_raises_like_eager(bad):
    model = make("resnet18").eval()
    patched = fastvision.patch(copy.deepcopy(model))
    x = {"channels": torch.randn(2, 4, 32, 32), "int": torch.randint(0, 255, (2, 3, 32, 32)),
         "3d": torch.randn(3, 32, 32)}[bad]
    with pytest.raises((RuntimeError, ValueError)) as eager_error:
        model(x)
    with pytest.raises(type(eager_error.value)):
        patched(x)


@pytest.mark.gpu
@needs_extension
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_patched_resnet50_cuda_channels_last(dtype):
    from fastvision.testing import relative_error
    model = make("resnet50").eval().cuda().to(dtype, memory_format=torch.channels_last)
    x = images(8, 96).cuda().to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        eager = model(x)
        out = fastvision.patch(copy.deepcopy(model))(x)
    limit = 1e-3 if dtype == torch.float32 else 5e-2  # cuDNN may use TF32 in fp32
    assert relative_error(out, ref) <= max(2 * relative_error(eager, ref), limit)
