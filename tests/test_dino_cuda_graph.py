"""DINOStep(cuda_graph=True): the forward/backward replayed from a CUDA graph equals the eager step.

On the CPU the graphed step declines (and says why) and runs the eager step; the replay itself
needs a GPU (`pytest -m gpu`).
"""
import copy

import pytest
import torch

import fastvision
from fastvision import dino
from fastvision.testing import assert_close
from helpers import EagerCall

pytest.importorskip("timm")
OUT_DIM = 256


def tiny_dino(drop_path_rate=0.0, device="cpu"):
    torch.manual_seed(0)
    student, teacher = dino.build_dino("vit_tiny", 16, OUT_DIM, img_size=32, depth=2, drop_path_rate=drop_path_rate)
    return student.to(device), teacher.to(device)


def crops_for(batch, device="cpu", n_local=3):
    return ([torch.randn(batch, 3, 32, 32, device=device) for _ in range(2)]
            + [torch.randn(batch, 3, 16, 16, device=device) for _ in range(n_local)])


def make_step(student, teacher, n_crops, **kwargs):
    device = next(student.parameters()).device
    loss_fn = dino.DINOLoss(OUT_DIM, n_crops, 0.04, 0.07, 2, 4).to(device)  # teacher temp changes at epoch 1
    optimizer = torch.optim.AdamW(dino.param_groups(student), lr=1e-3, weight_decay=0.04)
    return dino.DINOStep(student, teacher, loss_fn, optimizer, clip_grad=3.0, freeze_last_layer=1, **kwargs)


def run_steps(step, batches):
    """(epoch, crops) per step; returns the losses, then the final student, teacher and centre."""
    losses = [step(crops, epoch, teacher_momentum=0.99) for epoch, crops in batches]
    state = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (step.student, step.teacher)]
    return torch.stack(losses), state[0], state[1], step.loss_fn.center.clone()


def test_graphed_step_declines_on_cpu_and_runs_the_eager_step():
    student, teacher = tiny_dino()
    crops = crops_for(2)
    batches = [(0, crops), (1, crops)]
    graphed = make_step(student, teacher, len(crops), cuda_graph=True)
    reason = graphed.why_not_graphed(crops)
    assert reason is not None and "CUDA" in reason
    out = run_steps(graphed, batches)
    assert not graphed.graphed and not graphed.graph.captured
    ref = run_steps(make_step(*tiny_dino(), len(crops)), batches)
    for got, want in zip(out, ref):
        assert torch.equal(got, want)
    assert make_step(student, teacher, len(crops)).why_not_graphed(crops) == "cuda_graph=False"


def test_forward_backward_then_update_is_the_train_step():
    (s1, t1), (s2, t2) = tiny_dino(), tiny_dino()
    crops = crops_for(2, n_local=1)
    ref = run_steps(make_step(s1, t1, len(crops)), [(0, crops), (1, crops)])
    step = make_step(s2, t2, len(crops))
    losses = []
    for epoch in (0, 1):
        step.optimizer.zero_grad(set_to_none=True)
        losses.append(dino.forward_backward(s2, t2, step.loss_fn, crops, epoch, clip_grad=3.0))
        dino.apply_update(s2, t2, step.optimizer, epoch, 0.99, freeze_last_layer=1)
    state = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (s2, t2)]
    for got, want in zip((torch.stack(losses), *state, step.loss_fn.center), ref):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", ("eager", "fastvision", "fastvision+packing"))
def test_graph_replays_match_the_eager_step(variant, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    student, teacher = tiny_dino(device="cuda")
    if variant != "eager":
        fastvision.patch(student)
        fastvision.patch(teacher)
        student.packed = teacher.packed = variant.endswith("packing")
    copies = copy.deepcopy(student), copy.deepcopy(teacher)
    # Epoch 0 (last layer frozen, warm-up teacher temperature): 2 eager steps, a capture, 2 replays;
    # epoch 1 changes the teacher temperature: warm-up and capture again.
    batches = [(epoch, crops_for(3, "cuda")) for epoch in (0,) * 5 + (1,) * 4]
    graphed = make_step(student, teacher, 5, cuda_graph=True)
    out = run_steps(graphed, batches)
    assert graphed.graphed and graphed.graph.captured
    ref = run_steps(make_step(*copies, 5), batches)
    for name, got, want in zip(("losses", "student", "teacher", "center"), out, ref):
        assert_close(got, want, torch.float32, name=name)
    frozen_at_start = tiny_dino()[0].head.last_layer.parametrizations.weight.original1
    assert not torch.equal(student.head.last_layer.parametrizations.weight.original1.cpu(), frozen_at_start)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_step_inside_caller_autocast_runs_eagerly():
    student, teacher = tiny_dino(device="cuda")
    crops = crops_for(2, "cuda")
    step = make_step(student, teacher, len(crops), cuda_graph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert "autocast" in step.why_not_graphed(crops)
        step(crops, 1, 0.99)
    assert not step.graphed


def test_failed_capture_warns_once_and_leaves_the_step_eager(monkeypatch):
    from fastvision.cuda_graphs import CaptureError

    calls = []

    def failing_capture(self, step, crops, epoch):
        calls.append(epoch)
        raise CaptureError("CUDA graph capture failed: RuntimeError: operation not permitted when stream is capturing")

    monkeypatch.setattr(dino, "why_not_graphed", lambda student, crops: None)  # as if on a GPU
    monkeypatch.setattr(dino.GraphedForwardBackward, "__call__", failing_capture)
    student, teacher = tiny_dino()
    crops = crops_for(2)
    step = make_step(student, teacher, len(crops), cuda_graph=True)
    with pytest.warns(RuntimeWarning, match="runs eagerly from now on: CUDA graph capture failed"):
        out = run_steps(step, [(0, crops)])
    out = run_steps(step, [(1, crops)])  # no second attempt, no second warning
    assert calls == [0] and not step.graphed and "not permitted" in step.why_not_graphed(crops)
    ref_step = make_step(*tiny_dino(), len(crops))
    ref = run_steps(ref_step, [(0, crops)]), run_steps(ref_step, [(1, crops)])
    for got, want in zip(out, ref[1]):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replays_match_the_ddp_step(tmp_path, monkeypatch):
    """A DistributedDataParallel student (one NCCL process): the graph runs the wrapped module, the flat
    gradients and the centre are all-reduced after each replay; the same model as DDP's own step."""
    import torch.distributed as dist

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        models = []
        for _ in range(2):
            student, teacher = tiny_dino(device="cuda")
            models.append((torch.nn.parallel.DistributedDataParallel(student), teacher))
        # Epoch 0 drops the frozen last layer's gradients after each step; epoch 1 (a new teacher
        # temperature: capture again) averages them again.
        batches = [(epoch, crops_for(3, "cuda")) for epoch in (0,) * 4 + (1,) * 4]
        graphed = make_step(*models[0], 5, cuda_graph=True)
        assert graphed.why_not_graphed(batches[0][1]) is None
        out = run_steps(graphed, batches)
        assert graphed.graphed and graphed.graph.captured
        ref = run_steps(make_step(*models[1], 5), batches)
        for name, got, want in zip(("losses", "student", "teacher", "center"), out, ref):
            assert_close(got, want, torch.float32, name=name)
    finally:
        dist.destroy_process_group()


def test_graphed_step_logic_without_the_graph_is_the_train_step():
    crops = crops_for(2)
    batches = [(0, crops), (0, crops_for(2)), (1, crops)]
    step = make_step(*tiny_dino(), len(crops))
    graph = dino.GraphedForwardBackward(warmup_steps=1, call_factory=EagerCall)
    losses = []
    EagerCall.built = 0
    for epoch, batch in batches:
        losses.append(graph(step, batch, epoch))
        dino.apply_update(step.student, step.teacher, step.optimizer, epoch, 0.99, freeze_last_layer=1)
    assert EagerCall.built == 2  # one recorded call per teacher temperature, kept across steps
    state = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (step.student, step.teacher)]
    ref = run_steps(make_step(*tiny_dino(), len(crops)), batches)
    for got, want in zip((torch.stack(losses), *state, step.loss_fn.center), ref):
        assert torch.equal(got, want)
