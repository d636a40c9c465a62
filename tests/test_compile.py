"""torch.compile(fullgraph=True) traces through every op: no graph breaks, same numbers as eager."""
import pytest
import torch
import torch.nn.functional as F

import fastvision
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

    def forward(self, x):
        y, h = self.norm1.forward_add(x, x * 0.5)
        y = self.act.forward_bias(y @ self.fc.weight.t(), self.fc.bias)
        y = self.act(self.norm2(y))
        return self.softmax(y) + h


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
        return torch.softmax(y, -1) + h


def _forward_backward(model, x):
    x = x.detach().requires_grad_()
    out = model(x)
    out.pow(2).sum().backward()
    return out, x.grad, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("backend", ("aot_eager", "inductor"))
def test_compile_fullgraph_matches_eager(device, backend):
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


@pytest.mark.parametrize("device", kernel_devices())
def test_compiled_graph_calls_the_custom_ops(device):
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    model = TinyBlock().to(device)
    torch.compile(model, fullgraph=True, backend=backend)(randn(2, 5, 48, device=device))
    joined = " ".join(seen)
    for op in ("fastvision.layer_norm", "fastvision.add_layer_norm", "fastvision.bias_gelu", "fastvision.gelu",
               "fastvision.softmax"):
        assert op in joined, f"{op} not in the traced graph: {seen}"
