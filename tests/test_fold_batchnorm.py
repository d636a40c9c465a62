"""fastvision.ops.fold_batchnorm (C++/CUDA op) and the package without its extension."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastvision
from fastvision import _extension
from fastvision.ops.batchnorm import fold_batchnorm_reference
from fastvision.testing import assert_close

needs_extension = pytest.mark.skipif(_extension.load() is None, reason="fastvision._C is not built")


def _bn_inputs(c_out, c_in, k, dtype=torch.float32, device="cpu", conv_bias=True, affine=True):
    rnd = lambda *s, **kw: torch.randn(*s, dtype=torch.float64, **kw)  # noqa: E731
    w = rnd(c_out, c_in, k, k)
    b = rnd(c_out) if conv_bias else None
    mean = rnd(c_out) * 3
    var = torch.rand(c_out, dtype=torch.float64) * 4 + 1e-3
    gamma = rnd(c_out) if affine else None
    beta = rnd(c_out) if affine else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return tuple(cast(t) for t in (w, b, mean, var, gamma, beta))


def _fold64(w, b, mean, var, gamma, beta, eps):
    """The float64 formula, spelled out."""
    d = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    w, b, mean, var, gamma, beta = map(d, (w, b, mean, var, gamma, beta))
    scale = (gamma if gamma is not None else torch.ones_like(mean)) / torch.sqrt(var + eps)
    shift = (beta if beta is not None else torch.zeros_like(mean))
    bias = shift + ((b if b is not None else torch.zeros_like(mean)) - mean) * scale
    return w * scale[:, None, None, None], bias


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return devices


@needs_extension
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("shape", ((64, 3, 7), (37, 5, 3), (1, 1, 1), (256, 64, 1)))
@pytest.mark.parametrize("conv_bias,affine", ((True, True), (False, True), (False, False)))
def test_fold_matches_float64_formula(device, dtype, shape, conv_bias, affine):
    inputs = _bn_inputs(*shape, dtype=dtype, device=device, conv_bias=conv_bias, affine=affine)
    w, b = fastvision.ops.fold_batchnorm(*inputs, 1e-5)
    ref_w, ref_b = _fold64(*inputs, 1e-5)
    assert w.dtype == dtype and b.dtype == dtype and w.device.type == device
    assert_close(w, ref_w, dtype, name="weight")
    assert_close(b, ref_b, dtype, name="bias")
    w32, b32 = fastvision.ops.fold_batchnorm(*inputs, 1e-5, out_dtype=torch.float32)
    assert w32.dtype == torch.float32 and b32.dtype == torch.float32
    assert_close(w32, ref_w, torch.float32, name="weight (out_dtype=float32)")


@needs_extension
def test_fold_matches_eager_reference_and_conv_bn():
    inputs = _bn_inputs(16, 8, 3)
    for got, ref in zip(fastvision.ops.fold_batchnorm(*inputs, 1e-3), fold_batchnorm_reference(*inputs, 1e-3)):
        assert_close(got, ref, torch.float32)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1).double()
    bn = torch.nn.BatchNorm2d(16).double().eval()
    w, b, mean, var, gamma, beta = (t.double() for t in inputs)
    with torch.no_grad():
        conv.weight.copy_(w), conv.bias.copy_(b), bn.running_mean.copy_(mean), bn.running_var.copy_(var)
        bn.weight.copy_(gamma), bn.bias.copy_(beta)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    fw, fb = fastvision.ops.fold_batchnorm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight,
                                           bn.bias, bn.eps)
    assert_close(torch.nn.functional.conv2d(x, fw, fb, padding=1), bn(conv(x)), torch.float64)


@needs_extension
def test_bf16_folded_then_cast_beats_cast_then_fold():
    # BN statistics with a wide range, as in trained networks: rounding them to bf16 before folding compounds.
    inputs = list(_bn_inputs(512, 64, 3, dtype=torch.float32))
    inputs[3] = torch.exp(torch.randn(512) * 3)  # running_var over many orders of magnitude
    inputs[2] = torch.randn(512) * 50
    ref_w, ref_b = _fold64(*inputs, 1e-5)
    folded_w, folded_b = fastvision.ops.fold_batchnorm(*inputs, 1e-5, out_dtype=torch.bfloat16)
    bf16 = [t.to(torch.bfloat16) for t in inputs]
    cast_w, cast_b = (t.to(torch.bfloat16) for t in fold_batchnorm_reference(*bf16, 1e-5, out_dtype=torch.float64))
    from fastvision.testing import relative_error
    # folded-then-cast: one bf16 rounding of the exact result
    assert relative_error(folded_w, ref_w) < relative_error(cast_w, ref_w)
    assert relative_error(folded_b, ref_b) < relative_error(cast_b, ref_b)
    assert relative_error(folded_b, ref_b) <= 2 ** -8


@needs_extension
def test_fold_bad_inputs_name_the_argument():
    w, b, mean, var, gamma, beta = _bn_inputs(8, 4, 3)
    with pytest.raises(ValueError, match="bn_var"):
        fastvision.ops.fold_batchnorm(w, b, mean, var[:5], gamma, beta, 1e-5)
    with pytest.raises(TypeError, match="conv_weight"):
        fastvision.ops.fold_batchnorm(w.int(), b, mean, var, gamma, beta, 1e-5)
    with pytest.raises(ValueError, match="bn_weight"):
        fastvision.ops.fold_batchnorm(w, b, mean, var, gamma[None], beta, 1e-5)
    with pytest.raises(ValueError, match="conv_weight"):
        fastvision.ops.fold_batchnorm(w[0, 0, 0], None, mean, var, gamma, beta, 1e-5)
    with pytest.raises(ValueError, match="eps"):
        fastvision.ops.fold_batchnorm(w, b, mean, var, gamma, beta, -1.0)
    with pytest.raises(RuntimeError, match="running_var"):  # the C++ check, reached directly
        torch.ops.fastvision.fold_batchnorm(w, b, mean, var[:5], gamma, beta, 1e-5)


@needs_extension
def test_fold_fake_kernel_under_compile():
    inputs = _bn_inputs(8, 4, 3)
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: fastvision.ops.fold_batchnorm(*a, 1e-5, out_dtype=torch.bfloat16),
                       fullgraph=True, backend="aot_eager")
    w, b = fn(*inputs)
    ref_w, ref_b = _fold64(*inputs, 1e-5)
    assert w.dtype == torch.bfloat16
    assert_close(w, ref_w, torch.bfloat16)
    assert_close(b, ref_b, torch.bfloat16)


def test_package_works_without_extension():
    script = textwrap.dedent("""
        import sys
        sys.modules["fastvision._C"] = None          # as if the extension had not been built
        import copy, torch, timm, fastvision
        from fastvision import _extension
        assert _extension.load() is None and _extension.extension_decline()
        # Triton ops still work (interpreter)
        x = torch.randn(7, 37)
        w, b = torch.randn(37), torch.randn(37)
        y = fastvision.ops.layer_norm(x, (37,), w, b)
        assert torch.allclose(y, torch.nn.functional.layer_norm(x, (37,), w, b), atol=1e-5)
        # the fold op says what is missing and how to build it
        try:
            fastvision.ops.fold_batchnorm(torch.randn(4, 2, 3, 3), None, torch.zeros(4), torch.ones(4), None,
                                          None, 1e-5)
        except RuntimeError as exc:
            msg = str(exc)
            assert "fastvision._C" in msg and "CUDA_HOME" in msg and "FASTVISION_SKIP_EXTENSION" in msg, msg
        else:
            raise AssertionError("fold_batchnorm ran without the extension")
        # conv_bn_act and patched ResNets fall back to eager
        reason = fastvision.ops.conv_bn_act_decline(x)
        assert "fastvision._C" in reason, reason
        torch.manual_seed(0)
        model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
        images = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            ref = model(images)
            out = fastvision.patch(copy.deepcopy(model))(images)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
