"""Eager calls run the fused ops directly; traced calls go through the registered custom ops."""
import pytest
import torch

import fastvision
from fastvision.ops import _dispatch
from helpers import randn


def _fused_layer_norm(x):
    return fastvision.ops.layer_norm(x, (x.shape[-1],), None, None)


@pytest.mark.skipif(not (fastvision.ops.triton_interpreted() or torch.cuda.is_available()), reason="needs kernels")
def test_eager_call_is_direct_and_differentiable():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = randn(3, 40, device=device, requires_grad=True)
    y = _fused_layer_norm(x)
    assert type(y.grad_fn).__name__ == "_DirectBackward"
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        assert _fused_layer_norm(x).grad_fn is None


def test_fake_tensors_use_the_registered_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 33, 7)
        y = _fused_layer_norm(x)
        out = fastvision.ops.attention_qkvpacked(torch.empty(2, 9, 3, 2, 16, dtype=torch.bfloat16))
    assert y.shape == x.shape and out.shape == (2, 9, 2, 16) and out.dtype == torch.bfloat16


def test_every_op_is_registered_with_fake_and_direct_paths():
    expected = {"layer_norm", "add_layer_norm", "layer_norm_backward", "softmax", "softmax_backward", "gelu",
                "gelu_backward", "bias_gelu", "bias_gelu_backward", "attention", "attention_backward",
                "attention_qkvpacked", "attention_qkvpacked_backward"}
    assert expected <= set(_dispatch.REGISTRY)
    for name in expected:
        entry = _dispatch.REGISTRY[name]
        assert entry.op is getattr(torch.ops.fastvision, name)
        assert (entry.backward is None) == name.endswith("_backward")
