"""Higher-order gradients (create_graph=True): exact where the backward is made of differentiable torch
ops, a clear error where it is made of kernels, never a gradient that silently lost its graph."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastvision
from fastvision import ops
from fastvision.testing import assert_close

timm = pytest.importorskip("timm")


def x64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


FUSED = {
    "layer_norm": lambda x, w, b: ops.layer_norm(x, (16,), w, b),
    "add_layer_norm": lambda x, w, b: ops.add_layer_norm(x, x.flip(0), (16,), w, b)[0],
    "softmax": lambda x, w, b: ops.softmax(x * w, -1),
    "gelu": lambda x, w, b: ops.gelu(x * w),
    "bias_gelu": lambda x, w, b: ops.bias_gelu(x, b),
    "attention": lambda x, w, b: ops.attention(*[(x * w).view(1, 1, 4, 16)] * 3),
    "bias_gelu_linear": lambda x, w, b: ops.bias_gelu_linear(x, b, w.view(1, 16).expand(3, 16).contiguous()),
}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_ops_refuse_create_graph(name):
    x, w, b = x64(4, 16), x64(16), x64(16)
    y = FUSED[name](x, w, b)
    (g,) = torch.autograd.grad(y.square().sum(), x)  # first order: fine
    assert g.shape == x.shape
    y = FUSED[name](x, w, b)
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_registered_op_path_refuses_create_graph_too():
    """The custom op as torch.compile and functorch call it (the dispatcher's autograd)."""
    x, w, b = x64(4, 16), x64(16), x64(16)
    y, _, _ = torch.ops.fastvision.layer_norm(x, w, b, 1e-5, None)
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_linear_second_order_matches_eager():
    """ops.linear's backward is matmuls and, under create_graph, torch's column sum: differentiable."""
    x, w, b = x64(5, 3, 8), x64(6, 8), x64(6)
    results = []
    for fn in (ops.linear, F.linear):
        (gx,) = torch.autograd.grad(fn(x, w, b).square().sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), (w, b)))
    for ours, ref in zip(*results):
        assert_close(ours, ref, torch.float64)


def test_gradient_penalty_on_a_patched_vit_raises_clearly():
    """An input-gradient penalty (R1, WGAN-GP) needs second order through every block: the patched model
    says so instead of dropping the penalty's gradient; unpatched, the same parameters train as before."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=1)
    reference = copy.deepcopy(model)
    fastvision.patch(model)
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(model(images).sum(), images, create_graph=False)
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(model(images).sum(), images, create_graph=True)
    fastvision.unpatch(model)
    for m in (model, reference):
        for block in m.blocks:
            block.attn.fused_attn = False  # SDPA's backward has no derivative either
        (g,) = torch.autograd.grad(m(images).sum(), images, create_graph=True)
        g.square().sum().backward()
    compared = 0
    for p, q in zip(model.parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert_close(p.grad, q.grad, torch.float32)
            compared += 1
    assert compared > 10
