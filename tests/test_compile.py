"""torch.compile(fullgraph=True) traces through every op: no graph breaks, same numbers as eager."""
import pytest
import torch
import torch.nn.functional as F

import fastvision
from fastvision.modules.linear import linear
from fastvision.testing import assert_close
from conftest import kernel_devices
from helpers import randn


class TinyBlock(torch.nn.Module):
    """Uses every fused op of the package once."""

    def __init__(self, dim=48):
        super().__init__()
        self.norm1 = fastvision.modules.LayerNorm(dim)
        self.norm2 = fastvision.modules.LayerNorm(dim)
        self.fc = torch.nn.Linear(dim, dim)
        self.act = fastvision.modules.GELU(approximate="tanh")
        self.softmax = fastvision.modules.Softmax(dim=-1)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        y, h = self.norm1.forward_add(x, x * 0.5)
        y = self.act.forward_bias(y @ self.fc.weight.t(), self.fc.bias)
        y = self.act(self.norm2(y))
        return linear(self.out, self.softmax(y)) + h


class EagerBlock(torch.nn.Module):
    def __init__(self, fused: TinyBlock):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        f = self.fused
        h = x + x * 0.5
        y = F.layer_norm(h, f.norm1.normalized_shape, f.norm1.weight, f.norm1.bias, f.norm1.eps)
        y = F.gelu(F.linear(y, f.fc.weight, f.fc.bias), approximate="tanh")
        y = F.gelu(F.layer_norm(y, f.norm2.normalized_shape, f.norm2.weight, f.norm2.bias, f.norm2.eps),
                   approximate="tanh")
        return F.linear(torch.softmax(y, -1), f.out.weight, f.out.bias) + h


def _forward_backward(model, x):
    x = x.detach().requires_grad_()
    out = model(x)
    out.pow(2).sum().backward()
    return out, x.grad, [p.grad.clone() for p in model.parameters()]


@pytest.fixture
def compile_ops():
    """Run with fastvision.modules.set_compile_ops(...) and restore the policy afterwards."""
    before = fastvision.modules.compile_ops()
    yield fastvision.modules.set_compile_ops
    fastvision.modules.set_compile_ops(before)
    torch._dynamo.reset()


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("backend", ("aot_eager", "inductor"))
@pytest.mark.parametrize("policy", ("all", ""))
def test_compile_fullgraph_matches_eager(device, backend, policy, compile_ops):
    compile_ops(policy)
    torch._dynamo.reset()
    model = TinyBlock().to(device)
    x = randn(2, 37, 48, device=device)
    ref_out, ref_dx, ref_grads = _forward_backward(EagerBlock(model), x)
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out, dx, grads = _forward_backward(compiled, x)
    assert_close(out, ref_out, torch.float32, tol=1e-5)
    assert_close(dx, ref_dx, torch.float32, tol=1e-5)
    for g, ref_g in zip(grads, ref_grads):
        assert_close(g, ref_g, torch.float32, tol=1e-5)


def _traced_ops(model, x):
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch.compile(model, fullgraph=True, backend=backend)(x)
    return " ".join(seen)


FUSED_ELEMENTWISE = ("fastvision.layer_norm", "fastvision.add_layer_norm", "fastvision.bias_gelu", "fastvision.gelu",
                     "fastvision.softmax")


@pytest.mark.parametrize("device", kernel_devices())
def test_compiled_graph_calls_the_custom_ops(device, compile_ops):
    compile_ops("all")
    joined = _traced_ops(TinyBlock().to(device), randn(2, 5, 48, device=device))
    for op in FUSED_ELEMENTWISE:
        assert op in joined, f"{op} not in the traced graph: {joined}"


def test_compiled_model_keeps_fused_attention_and_leaves_the_rest_to_inductor(compile_ops):
    timm = pytest.importorskip("timm")
    compile_ops("")  # the default
    model = fastvision.patch(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=0))
    joined = _traced_ops(model, randn(1, 3, 32, 32))
    assert "fastvision.attention_qkvpacked" in joined
    assert not any(op in joined for op in FUSED_ELEMENTWISE), joined
    compile_ops("layer_norm")
    joined = _traced_ops(model, randn(1, 3, 32, 32))
    assert "fastvision.layer_norm" in joined and "fastvision.bias_gelu" not in joined


def test_compile_policy_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown fused ops"):
        fastvision.modules.set_compile_ops("attention")
