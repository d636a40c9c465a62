"""The CUDA-graph DINO step under torch.distributed, run here without the graph (CPU, gloo, 2 processes).

GraphedForwardBackward with a DistributedDataParallel student runs the wrapped module, keeps the
gradients in flat buffers averaged by one all-reduce after the backward, clips after that average,
and all-reduces the teacher centre after the step. Two steps of that must give the parameters,
teacher and centre of DistributedDataParallel's own step on every rank.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import EagerCall

pytest.importorskip("timm")
WORLD = 2


def _crops(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return ([torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
            + [torch.randn(2, 3, 16, 16, generator=g) for _ in range(2)])


def _train(rank: int, flat: bool):
    import fastvision
    from fastvision import dino

    torch.manual_seed(0)
    student, teacher = dino.build_dino("vit_tiny", 16, 64, img_size=32, depth=1, drop_path_rate=0.0)
    # Patched, so the graphed step's functional_call on parameter aliases runs through fastvision's modules.
    student, teacher = fastvision.patch(student), fastvision.patch(teacher)
    student = torch.nn.parallel.DistributedDataParallel(student)
    loss_fn = dino.DINOLoss(64, 4, 0.04, 0.07, 0, 10)
    optimizer = torch.optim.SGD(dino.param_groups(student), lr=0.5)
    step = dino.DINOStep(student, teacher, loss_fn, optimizer, clip_grad=0.05, freeze_last_layer=1)
    graph = dino.GraphedForwardBackward(warmup_steps=1, call_factory=EagerCall)
    losses = []
    # Epoch 0 drops the head's last-layer gradients after the step (freeze_last_layer=1); epoch 1 must
    # average them again.
    for i, epoch in enumerate((0, 1, 1)):
        crops = _crops(rank, i)
        if flat:
            losses.append(graph(step, crops, epoch))
            dino.apply_update(step.student, step.teacher, step.optimizer, epoch, 0.9, freeze_last_layer=1)
        else:
            losses.append(step(crops, epoch, 0.9))  # no graph: DDP's own forward, backward and all-reduce
    if flat:
        assert EagerCall.built == 1  # one recorded call, kept across steps (the teacher temperature is constant)
    flat_grads = [p.grad.detach().clone() for p in student.module.parameters() if p.requires_grad]
    return {"student": [p.detach().clone() for p in student.module.parameters()],
            "teacher": [p.detach().clone() for p in teacher.parameters()],
            "center": loss_fn.center.clone(), "losses": torch.stack(losses), "grads": flat_grads}


def _worker(rank: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {"ddp": _train(rank, flat=False), "flat": _train(rank, flat=True)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_flat_gradient_step_equals_ddp_step(tmp_path):
    from fastvision.testing import assert_close

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for rank, results in enumerate(per_rank):
        ddp, flat = results["ddp"], results["flat"]
        assert_close(flat["losses"], ddp["losses"], torch.float32, name=f"rank {rank} losses")
        assert_close(flat["center"], ddp["center"], torch.float32, name=f"rank {rank} centre")
        for name in ("student", "teacher", "grads"):
            for i, (got, want) in enumerate(zip(flat[name], ddp[name])):
                assert_close(got, want, torch.float32, name=f"rank {rank} {name}[{i}]")
    # The ranks saw different crops, yet hold the same averaged model.
    for got, want in zip(per_rank[1]["flat"]["student"], per_rank[0]["flat"]["student"]):
        assert torch.equal(got, want)
    assert not torch.equal(per_rank[0]["flat"]["losses"], per_rank[1]["flat"]["losses"])
