"""ops.linear: F.linear with the bias gradient summed by the column-sum kernel."""
import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvision
from fastvision.testing import assert_close
from conftest import kernel_devices
from helpers import float64_copies, randn

linear_op = importlib.import_module("fastvision.ops.linear")


@pytest.fixture(autouse=True)
def column_sum_everywhere(monkeypatch):
    """The kernel path on the default CUDA stream too, so these tests check it on a GPU."""
    monkeypatch.setattr(linear_op, "COLUMN_SUM_ON_DEFAULT_STREAM", True)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", [(1, 5, 3), (2, 37, 384, 1152), (197, 65, 33)], ids=str)
def test_linear_matches_float64(device, dtype, shape):
    *rows, n_in, n_out = shape
    x = randn(*rows, n_in, dtype=dtype, device=device, requires_grad=True)
    w = randn(n_out, n_in, dtype=dtype, device=device, std=n_in ** -0.5, requires_grad=True)
    b = randn(n_out, dtype=dtype, device=device, requires_grad=True)
    dy = randn(*rows, n_out, dtype=dtype, device=device)
    y = fastvision.ops.linear(x, w, b)
    y.backward(dy)
    refs = float64_copies(x, w, b)
    ref = F.linear(*refs)
    ref.backward(dy.double().cpu())
    assert y.dtype == dtype
    assert_close(y, ref, dtype)
    for name, t, rt in zip(("input", "weight", "bias"), (x, w, b), refs):
        assert t.grad.dtype == dtype
        assert_close(t.grad, rt.grad, dtype, name=f"grad of {name}")


@pytest.mark.parametrize("device", kernel_devices())
def test_linear_under_autocast_matches_eager_autocast(device):
    """The same casts as autocast's Linear; the fp32 bias gets its gradient summed in fp32."""
    x = randn(3, 37, 64, device=device, requires_grad=True)
    layer = nn.Linear(64, 96).to(device)
    eager = nn.Linear(64, 96).to(device)
    eager.load_state_dict(layer.state_dict())
    dy = randn(3, 37, 96, dtype=torch.bfloat16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = fastvision.ops.linear(x, layer.weight, layer.bias)
        x_eager = x.detach().clone().requires_grad_()
        y_eager = eager(x_eager)
    assert y.dtype == y_eager.dtype == torch.bfloat16
    assert torch.equal(y, y_eager)
    y.backward(dy)
    y_eager.backward(dy)
    assert layer.bias.grad.dtype == torch.float32
    assert torch.equal(x.grad, x_eager.grad) and torch.equal(layer.weight.grad, eager.weight.grad)
    assert_close(layer.bias.grad, dy.double().cpu().sum((0, 1)), torch.float32, name="grad of bias")


def test_linear_declines_to_f_linear_with_reason():
    x, w, b = torch.randn(4, 8), torch.randn(5, 8), torch.randn(5, requires_grad=True)
    decline = fastvision.ops.linear_decline
    assert decline(x, w, None) == "no bias"
    assert decline(x, w, b.detach()) == "the bias needs no gradient"
    assert "bias is torch.float16" in decline(x, w, b.half().detach().requires_grad_())
    with pytest.raises(RuntimeError):  # F.linear's own dtype error, as without fastvision
        fastvision.ops.linear(x, w, b.half().detach().requires_grad_())
    assert torch.equal(fastvision.ops.linear(x, w, None), F.linear(x, w))


def test_patched_linear_keeps_forward_hooks():
    """A Linear with a hook (feature extraction, adapters) is called as the module, so the hook fires."""
    from fastvision.modules.linear import linear

    layer = nn.Linear(8, 4)
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(2, 8, requires_grad=True)
    assert torch.equal(linear(layer, x), layer(x)) and len(seen) == 2


def test_on_cuda_the_kernel_runs_only_off_the_default_stream(monkeypatch):
    """On the default stream the host cost of the Python node outweighs the kernel: F.linear, with the reason.
    A CUDA graph's capture and warm-up run on another stream, and take the kernel both times."""
    monkeypatch.setattr(linear_op, "COLUMN_SUM_ON_DEFAULT_STREAM", False)
    cuda_input = SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(linear_op, "_current_raw_stream", lambda index: 0)
    assert "on the default CUDA stream" in linear_op.host_cost_decline(cuda_input)
    monkeypatch.setattr(linear_op, "_current_raw_stream", lambda index: 0x7F00)
    assert linear_op.host_cost_decline(cuda_input) is None
    assert linear_op.host_cost_decline(torch.randn(2)) is None  # the interpreter's CPU tensors: the kernel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_default_stream_is_f_linear_side_stream_the_kernel(monkeypatch):
    monkeypatch.setattr(linear_op, "COLUMN_SUM_ON_DEFAULT_STREAM", False)
    x = torch.randn(3, 37, 64, device="cuda", requires_grad=True)
    layer = nn.Linear(64, 96).cuda()
    y = fastvision.ops.linear(x, layer.weight, layer.bias)
    assert type(y.grad_fn).__name__ != "_LinearBackward"  # F.linear's own C++ autograd node
    assert torch.equal(y, layer(x))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y_side = fastvision.ops.linear(x, layer.weight, layer.bias)
    torch.cuda.current_stream().wait_stream(side)
    assert type(y_side.grad_fn).__name__ == "_LinearBackward" and torch.equal(y_side, y)
