import pytest
import torch

import fastvision
from fastvision.modules import GELU
from fastvision.testing import assert_close
from conftest import kernel_devices
from helpers import DTYPES, check_against_float64, randn

SHAPES = ((1, 1), (7, 37), (197 * 3, 384), (3, 1000), (2, 4096))
APPROX = ("none", "tanh")


def reference_gelu(x, approximate="none"):
    """Float64 GELU without the 1 + erf cancellation F.gelu has for x << 0 (it returns 0 below -8.3)."""
    if approximate == "tanh":
        u = (2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)
        return x * torch.sigmoid(2.0 * u)
    return x * 0.5 * torch.special.erfc(-x * 0.5 ** 0.5)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gelu_matches_float64(device, approximate, dtype, shape):
    x = randn(*shape, dtype=dtype, device=device, std=3.0, requires_grad=True)
    check_against_float64(lambda x: fastvision.ops.gelu(x, approximate), lambda x: reference_gelu(x, approximate),
                          (x,), randn(*shape, dtype=dtype, device=device), dtype, ("x",))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_gelu_matches_float64(device, approximate, dtype, shape):
    x = randn(*shape, dtype=dtype, device=device, std=2.0, requires_grad=True)
    b = randn(shape[-1], dtype=dtype, device=device, requires_grad=True)
    check_against_float64(lambda x, b: fastvision.ops.bias_gelu(x, b, approximate),
                          lambda x, b: reference_gelu(x + b, approximate),
                          (x, b), randn(*shape, dtype=dtype, device=device), dtype, ("x", "bias"))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gelu_large_magnitudes(device, approximate, dtype):
    values = torch.tensor([-1e4, -300.0, -30.0, -8.0, -1e-3, 0.0, 1e-3, 8.0, 30.0, 300.0, 1e4, 6e4])
    x = values.to(dtype=dtype, device=device).requires_grad_()
    check_against_float64(lambda x: fastvision.ops.gelu(x, approximate), lambda x: reference_gelu(x, approximate),
                          (x,), torch.ones_like(values), dtype, ("x",))


@pytest.mark.parametrize("device", kernel_devices())
def test_gelu_non_contiguous_input(device):
    x = randn(37, 24, device=device).t().detach().requires_grad_()
    check_against_float64(lambda x: fastvision.ops.gelu(x), reference_gelu, (x,), randn(24, 37, device=device),
                          torch.float32, ("x",))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_gradcheck_float64(device, approximate):
    x = randn(3, 19, dtype=torch.float64, device=device, std=2.0, requires_grad=True)
    b = randn(19, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fastvision.ops.gelu(x, approximate), (x,))
    assert torch.autograd.gradcheck(lambda x, b: fastvision.ops.bias_gelu(x, b, approximate), (x, b))


@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_module_is_drop_in(approximate):
    mod, ref = GELU(approximate=approximate), torch.nn.GELU(approximate=approximate)
    assert isinstance(mod, torch.nn.GELU) and mod.approximate == ref.approximate
    x = randn(4, 33)
    assert_close(mod(x), ref(x), torch.float32)
    b = randn(33)
    assert_close(mod.forward_bias(x, b), ref(x + b), torch.float32)


@pytest.mark.parametrize("bad, match", [
    (lambda: fastvision.ops.gelu(torch.arange(4)), "input"),
    (lambda: fastvision.ops.gelu(torch.randn(4), "fast"), "approximate"),
    (lambda: fastvision.ops.bias_gelu(torch.randn(4, 8), torch.randn(7)), "bias"),
    (lambda: fastvision.ops.bias_gelu(torch.randn(4, 8), torch.ones(8, dtype=torch.int32)), "bias"),
    (lambda: GELU(approximate="sigmoid"), "approximate"),
])
def test_gelu_bad_input_names_the_argument(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


@pytest.mark.parametrize("device", kernel_devices())
def test_bias_gelu_reads_row_strided_slices_in_place(device):
    """A (M, N) slice of a wider tensor (row stride > N) goes to the kernel without a copy."""
    wide = randn(37, 80, device=device)
    x = wide[:, 8:72].detach().requires_grad_()
    b = randn(64, device=device, requires_grad=True)
    assert not x.is_contiguous() and x.stride(1) == 1
    check_against_float64(lambda x, b: fastvision.ops.bias_gelu(x, b), lambda x, b: reference_gelu(x + b),
                          (x, b), randn(37, 64, device=device), torch.float32, ("x", "bias"))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("with_linear_bias", (True, False), ids=("fc2-bias", "no-fc2-bias"))
def test_bias_gelu_linear_matches_float64(device, approximate, dtype, with_linear_bias):
    """fc2(gelu(h + b1)) with the GELU output recomputed in the backward: output and every gradient."""
    h = randn(2, 37, 96, dtype=dtype, device=device, std=2.0, requires_grad=True)
    b1 = randn(96, dtype=dtype, device=device, requires_grad=True)
    w2 = randn(24, 96, dtype=dtype, device=device, std=0.1, requires_grad=True)
    b2 = randn(24, dtype=dtype, device=device, requires_grad=True) if with_linear_bias else None

    def fused(h, b1, w2, b2):
        return fastvision.ops.bias_gelu_linear(h, b1, w2, b2, approximate)

    def ref(h, b1, w2, b2):
        return torch.nn.functional.linear(reference_gelu(h + b1, approximate), w2, b2)

    check_against_float64(fused, ref, (h, b1, w2, b2), randn(2, 37, 24, dtype=dtype, device=device), dtype,
                          ("h", "bias", "weight", "linear_bias"))


@pytest.mark.parametrize("device", kernel_devices())
def test_bias_gelu_linear_keeps_only_its_input(device):
    """The saved tensors: h, the bias and the weight, not the GELU output (as large as h)."""
    h = randn(64, 384, device=device, requires_grad=True)
    b1, w2 = randn(384, device=device, requires_grad=True), randn(96, 384, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fastvision.ops.bias_gelu_linear(h, b1, w2)
    assert sorted(saved) == sorted([h.numel(), b1.numel(), w2.numel()])


def test_bias_gelu_linear_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="weight"):
        fastvision.ops.bias_gelu_linear(torch.randn(3, 8), torch.randn(8), torch.randn(4, 7))
    with pytest.raises(ValueError, match="bias"):
        fastvision.ops.bias_gelu_linear(torch.randn(3, 8), torch.randn(7), torch.randn(4, 8))
