"""fastvision.cuda_graphs.CapturedCall: warm-up, capture and replays give the eager results."""
import pytest
import torch
from torch import nn

from fastvision.cuda_graphs import CapturedCall
from fastvision.testing import assert_close


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only error")
def test_needs_a_cuda_device():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CapturedCall(lambda: None)


def test_warmup_steps_must_be_positive():
    with pytest.raises(ValueError, match="warmup_steps must be at least 1"):
        CapturedCall(lambda: None, warmup_steps=0)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(37, 64), nn.GELU(), nn.Linear(64, 5)).cuda()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("warmup_steps", (1, 2))
def test_training_replays_match_eager_steps(warmup_steps, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    graphed, eager = _model(), _model()
    inputs = torch.empty(19, 37, device="cuda")
    graphed_opt, eager_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (graphed, eager))

    def forward_backward():
        graphed_opt.zero_grad(set_to_none=True)
        loss = graphed(inputs).square().mean()
        loss.backward()
        return loss.detach()

    call = CapturedCall(forward_backward, warmup_steps=warmup_steps, grad_params=graphed.parameters())
    for i in range(5):
        batch = torch.randn(19, 37, device="cuda")
        inputs.copy_(batch)
        loss = call().clone()
        assert graphed[0].weight.grad is not None  # re-attached after the replay
        graphed[0].weight.grad = None  # dropped between steps, as a frozen layer's
        graphed_opt.step()
        eager_opt.zero_grad(set_to_none=True)
        ref = eager(batch).square().mean()
        ref.backward()
        eager[0].weight.grad = None
        eager_opt.step()
        assert_close(loss, ref.detach(), torch.float32, name=f"loss {i}")
    assert call.captured
    for got, want in zip(graphed.parameters(), eager.parameters()):
        assert_close(got.detach(), want.detach(), torch.float32, name="parameters")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_failed_capture_raises_and_leaves_random_draws_working():
    from fastvision.cuda_graphs import CaptureError

    x = torch.randn(64, device="cuda")

    def syncs_with_the_host():
        y = torch.nn.functional.dropout(x, 0.5)  # registers the CUDA generator with the capture
        return y.sum().item()  # a host sync: not allowed while capturing

    call = CapturedCall(syncs_with_the_host, warmup_steps=1)
    call()
    with pytest.raises(CaptureError, match="capture failed"):
        call()
    assert not call.captured
    dropped = torch.nn.functional.dropout(x, 0.5)  # raised "Offset increment outside graph capture" before the fix
    assert 0 < int((dropped == 0).sum()) < 64

    scaled = CapturedCall(lambda: torch.nn.functional.dropout(x, 0.5), warmup_steps=1)  # a new capture works
    scaled()
    first, second = scaled().clone(), scaled().clone()
    assert call.captured is False and scaled.captured
    assert not torch.equal(first, second)  # fresh random numbers on each replay
    assert set(torch.unique(first / x).tolist()) <= {0.0, 2.0}
