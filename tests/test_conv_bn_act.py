"""fastvision.ops.conv_bn_act (C++ CPU / CUDA op) and ConvBnAct vs float64 eager."""
import pytest
import torch
import torch.nn.functional as F

import fastvision
from fastvision import _extension
from fastvision.modules import ConvBnAct
from fastvision.testing import TF32_TOLERANCE, assert_close
from helpers import DTYPES, randn

needs_extension = pytest.mark.skipif(_extension.load() is None, reason="fastvision._C is not built")

# (C_in, C_out, kernel, stride, groups, H=W): ResNet-18/50 layer shapes (small spatial), grouped and depthwise.
SHAPES = {
    "stem7x7s2": (3, 64, 7, 2, 1, 17),
    "l1_1x1": (64, 64, 1, 1, 1, 9),
    "l1_3x3": (64, 64, 3, 1, 1, 7),
    "l1_expand": (64, 256, 1, 1, 1, 7),
    "l2_3x3s2": (128, 128, 3, 2, 1, 9),
    "l3_down_1x1s2": (256, 512, 1, 2, 1, 7),
    "l4_3x3": (512, 512, 3, 1, 1, 7),
    "grouped": (64, 64, 3, 1, 4, 7),
    "dw3x3s1": (32, 32, 3, 1, 32, 9),
    "dw3x3s2": (48, 48, 3, 2, 48, 9),
}
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


@pytest.fixture(autouse=True)
def _exact_fp32_convolutions():
    """cuDNN runs float32 convolutions in TF32 by default (eager too): check the exact path here,
    TF32 in test_cuda_fp32_follows_the_tf32_flag."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allowed


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return devices


def _case(shape, batch, dtype, device, fmt, residual=True):
    c_in, c_out, k, stride, groups, hw = SHAPES[shape]
    x = randn(batch, c_in, hw, hw, dtype=dtype, device=device).contiguous(memory_format=FORMATS[fmt])
    w = randn(c_out, c_in // groups, k, k, dtype=dtype, device=device, std=(c_in // groups * k * k) ** -0.5)
    scale = randn(c_out, device=device, mean=1.0, std=0.3)
    shift = randn(c_out, device=device)
    conv = dict(stride=stride, padding=k // 2, dilation=1, groups=groups)
    out_hw = (hw + 2 * (k // 2) - k) // stride + 1
    res = randn(batch, c_out, out_hw, out_hw, dtype=dtype, device=device) if residual else None
    return x, w, scale, shift, res, conv


def _reference64(x, w, scale, shift, res, conv, relu):
    d = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    y = F.conv2d(d(x), d(w), None, **conv)
    if scale is not None:
        y = y * d(scale)[:, None, None]
    if shift is not None:
        y = y + d(shift)[:, None, None]
    if res is not None:
        y = y + d(res)
    return torch.relu(y) if relu else y


@needs_extension
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch", (1, 3))
@pytest.mark.parametrize("shape", SHAPES)
def test_op_matches_float64(device, dtype, fmt, batch, shape):
    x, w, scale, shift, res, conv = _case(shape, batch, dtype, device, fmt)
    relu = batch == 3  # both epilogue variants across the grid
    out = fastvision.ops.conv_bn_act(x, w, scale, shift, res, relu=relu, **conv)
    assert out.dtype == dtype and out.device.type == device
    assert out.is_contiguous(memory_format=FORMATS[fmt]) or out.shape[2] * out.shape[3] == 1
    assert_close(out, _reference64(x, w, scale, shift, res, conv, relu), dtype)


@needs_extension
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("variant", ("shift_only", "scale_only", "none", "relu_only", "residual_only"))
def test_op_epilogue_variants(device, variant):
    x, w, scale, shift, res, conv = _case("l1_3x3", 2, torch.float32, device, "nchw")
    args = dict(shift_only=(None, shift, None, False), scale_only=(scale, None, None, False),
                none=(None, None, None, False), relu_only=(None, None, None, True),
                residual_only=(None, None, res, False))[variant]
    out = fastvision.ops.conv_bn_act(x, w, *args[:3], relu=args[3], **conv)
    assert_close(out, _reference64(x, w, *args[:3], conv, args[3]), torch.float32)


@needs_extension
def test_op_dilation_and_asymmetric_padding():
    x = randn(2, 8, 11, 13)
    w = randn(6, 8, 3, 3)
    shift = randn(6)
    out = fastvision.ops.conv_bn_act(x, w, None, shift, stride=(2, 1), padding=(2, 1), dilation=(2, 1), relu=True)
    assert_close(out, _reference64(x, w, None, shift, None, dict(stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
                                   True), torch.float32)


@needs_extension
def test_relu_keeps_nan_like_torch():
    x = randn(1, 4, 5, 5)
    x[0, 0, 2, 2] = float("nan")
    w = randn(4, 4, 1, 1)
    out = fastvision.ops.conv_bn_act(x, w, None, randn(4), relu=True)
    assert torch.equal(torch.isnan(out), torch.isnan(torch.relu(F.conv2d(x, w))))


@needs_extension
def test_gradcheck_float64():
    x = randn(2, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    w = randn(8, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    scale = randn(8, dtype=torch.float64, requires_grad=True)
    shift = randn(8, dtype=torch.float64, requires_grad=True)
    res = randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda *a: fastvision.ops.conv_bn_act(*a, stride=2, padding=1, groups=2, relu=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, scale, shift, res))


@needs_extension
@pytest.mark.parametrize("fmt", FORMATS)
def test_grads_fp32_match_float64(fmt):
    x, w, scale, shift, res, conv = _case("l2_3x3s2", 3, torch.float32, "cpu", fmt)
    inputs = [t.requires_grad_() for t in (x, w, scale, shift, res)]
    out = fastvision.ops.conv_bn_act(*inputs, relu=True, **conv)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dy)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = _reference64(*ref_inputs, conv, True)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dy.double())
    for name, g, rg in zip(("x", "weight", "scale", "shift", "residual"), grads, ref_grads):
        assert_close(g, rg, torch.float32, name=f"grad of {name}")


@needs_extension
def test_op_compiles_fullgraph_with_backward():
    torch._dynamo.reset()
    x, w, scale, shift, res, conv = _case("l1_3x3", 2, torch.float32, "cpu", "nhwc")
    w.requires_grad_()

    def fn(x, w, scale, shift, res):
        return fastvision.ops.conv_bn_act(x, w, scale, shift, res, relu=True, **conv)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, scale, shift, res)
    assert_close(out, _reference64(x, w, scale, shift, res, conv, True), torch.float32)
    out.sum().backward()
    assert w.grad is not None


@needs_extension
def test_autocast_runs_conv_in_lower_precision():
    x, w, scale, shift, _, conv = _case("l1_3x3", 2, torch.float32, "cpu", "nchw", residual=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastvision.ops.conv_bn_act(x, w, scale, shift, relu=True, **conv)
        eager = torch.relu(F.conv2d(x, w, None, **conv) * scale[:, None, None] + shift[:, None, None])
    assert out.dtype == torch.bfloat16 == F.conv2d(x.bfloat16(), w.bfloat16()).dtype
    assert_close(out, eager.double(), torch.bfloat16)


def test_bad_inputs_raise_clear_errors():
    x, w, scale, shift, res, conv = _case("l1_3x3", 2, torch.float32, "cpu", "nchw")
    with pytest.raises(ValueError, match="input has 32 channels"):
        fastvision.ops.conv_bn_act(x[:, :32], w, scale, shift, **conv)
    with pytest.raises(TypeError, match="input must be a floating-point"):
        fastvision.ops.conv_bn_act(x.int(), w, scale, shift, **conv)
    with pytest.raises(ValueError, match="input must be 4-D"):
        fastvision.ops.conv_bn_act(x[0], w, scale, shift, **conv)
    with pytest.raises(ValueError, match="scale has shape"):
        fastvision.ops.conv_bn_act(x, w, scale[:3], shift, **conv)
    with pytest.raises(ValueError, match="residual has shape"):
        fastvision.ops.conv_bn_act(x, w, scale, shift, res[:, :, :3], **conv)
    with pytest.raises(ValueError, match="too small"):
        fastvision.ops.conv_bn_act(x[:, :, :1, :1], w, scale, shift)


@needs_extension
def test_cpp_checks_name_the_argument():
    x, w, scale, shift, res, _ = _case("l1_3x3", 2, torch.float32, "cpu", "nchw")
    op = torch.ops.fastvision.conv_bn_act
    with pytest.raises(RuntimeError, match="input has 32 channels"):
        op(x[:, :32], w, scale, shift, None, [1, 1], [1, 1], [1, 1], 1, True)
    with pytest.raises(RuntimeError, match="shift must have shape"):
        op(x, w, scale, shift[:2], None, [1, 1], [1, 1], [1, 1], 1, True)
    with pytest.raises(RuntimeError, match="input must be 4-D"):
        op(x[0], w, scale, shift, None, [1, 1], [1, 1], [1, 1], 1, True)


# --- ConvBnAct module ---------------------------------------------------------------------------

def _conv_bn(c_in=8, c_out=12, k=3, stride=1, groups=1, bias=False):
    conv = torch.nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=bias)
    bn = torch.nn.BatchNorm2d(c_out)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_(1, 0.3)
        bn.bias.normal_(0, 0.3)
    return conv, bn


@needs_extension
@pytest.mark.parametrize("bias", (False, True))
def test_conv_bn_act_module_eval_folds_and_caches(bias):
    conv, bn = _conv_bn(bias=bias)
    eager = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).eval()
    fused = ConvBnAct(conv, bn, torch.nn.ReLU(), names=("0", "1", "2")).eval()
    assert list(fused.state_dict()) == list(eager.state_dict())
    x = randn(3, 8, 9, 9)
    with torch.no_grad():
        ref = eager.double()(x.double())
        eager.float()
        assert fused.why_not(x) is None
        assert_close(fused(x), ref, torch.float32)
        fusion = next(iter(fused._fastvision_fusions.values()))
        cached = fusion._cache[1]
        fused(x)
        assert fusion._cache[1] is cached  # reused
        bn.running_var.mul_(2.0)           # stats change -> refolded
        fused(x)
        assert fusion._cache[1] is not cached
        assert_close(fused(x), eager.double()(x.double()), torch.float32)
    fused.train()
    assert fusion._cache is None


@needs_extension
def test_conv_bn_act_module_train_matches_eager_exactly():
    conv, bn = _conv_bn()
    ref_conv, ref_bn = _conv_bn()
    ref_conv.load_state_dict(conv.state_dict()), ref_bn.load_state_dict(bn.state_dict())
    fused = ConvBnAct(conv, bn, torch.nn.ReLU()).train()
    x = randn(3, 8, 9, 9)
    out = fused(x)
    ref = torch.relu(ref_bn(ref_conv(x)))
    assert torch.equal(out, ref)
    assert torch.equal(bn.running_mean, ref_bn.running_mean) and torch.equal(bn.running_var, ref_bn.running_var)
    assert fused.why_not(x) is not None and "batch statistics" in fused.why_not(x)


@needs_extension
def test_frozen_bn_gradients_match_float64():
    conv, bn = _conv_bn(stride=2)
    fused = ConvBnAct(conv, bn, torch.nn.ReLU()).eval()
    x = randn(2, 8, 9, 9, requires_grad=True)
    res = randn(2, 12, 5, 5, requires_grad=True)
    out = fused(x, res)
    dy = torch.randn_like(out)
    params = [x, res, conv.weight, bn.weight, bn.bias]
    grads = torch.autograd.grad(out, params, dy)
    conv64, bn64 = _conv_bn(stride=2)
    conv64.load_state_dict(conv.state_dict()), bn64.load_state_dict(bn.state_dict())
    conv64.double(), bn64.double().eval()
    x64, res64 = x.detach().double().requires_grad_(), res.detach().double().requires_grad_()
    ref = torch.relu(bn64(conv64(x64)) + res64)
    assert_close(out, ref, torch.float32)
    ref_grads = torch.autograd.grad(ref, [x64, res64, conv64.weight, bn64.weight, bn64.bias], dy.double())
    for name, g, rg in zip(("x", "residual", "conv.weight", "bn.weight", "bn.bias"), grads, ref_grads):
        assert_close(g, rg, torch.float32, name=f"grad of {name}")


@pytest.mark.gpu
@needs_extension
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("engine", ("epilogue", "cudnn_fused", "direct_depthwise"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_engines_match_float64(engine, dtype, fmt):
    ext = _extension.load()
    ext.set_cuda_conv_engine(engine)
    try:
        for shape in SHAPES:
            for residual in (False, True):
                x, w, scale, shift, res, conv = _case(shape, 3, dtype, "cuda", fmt, residual=residual)
                out = fastvision.ops.conv_bn_act(x, w, None, shift, res, relu=True, **conv)
                assert_close(out, _reference64(x, w, None, shift, res, conv, True), dtype, name=shape)
    finally:
        ext.set_cuda_conv_engine("epilogue")


@pytest.mark.gpu
@needs_extension
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp32_follows_the_tf32_flag():
    x, w, scale, shift, res, conv = _case("l4_3x3", 3, torch.float32, "cuda", "nhwc")
    ref = _reference64(x, w, scale, shift, res, conv, True)
    torch.backends.cudnn.allow_tf32 = True
    assert_close(fastvision.ops.conv_bn_act(x, w, scale, shift, res, relu=True, **conv), ref, tol=TF32_TOLERANCE)
