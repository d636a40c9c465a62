"""Model-level throughput: timm models eager, torch.compile'd, fastvision-patched, and both.

    python -m benchmarks.models --out DIR [--quick] [--models vit_small_patch16_224,...] [--smoke]

For each model: inference (eval, no_grad) and a training step (forward, cross-entropy, backward,
AdamW step), both under bf16 autocast, in images per second; the peak memory the step allocates and
the time to the first step (compilation and autotuning count there). Patched inference logits are
compared with eager ones (same seed, same weights). The patch variant also records which fused
modules ran their eager fallback in its first step, and why (``declined_modules``). Writes DIR/models.json.
"+graph" variants (not in the default set: --variants eager+graph,patch+graph) replay the forward
(inference) or the forward and backward (training; AdamW stays outside) from a CUDA graph
(fastvision.cuda_graphs.CapturedCall): device time without the host's launch cost.
"""
import argparse
import gc
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import common

MODELS = {  # name -> batch size of the full run
    "vit_small_patch16_224": 256,
    "vit_base_patch16_224": 256,
    "vit_small_patch8_224": 64,
    "resnet50": 256,
}
QUICK_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224")
SMOKE_MODEL = "vit_tiny_patch16_224"
VARIANTS = ("eager", "compile", "patch", "patch+compile")
GRAPH_VARIANTS = ("eager+graph", "patch+graph", "compile+graph", "patch+compile+graph")
TASKS = ("infer", "train")


def create_model(name: str, smoke: bool, device: torch.device) -> torch.nn.Module:
    import timm
    # num_classes: timm's vit_small_patch8_224 (a DINO backbone) defaults to no head, 0 classes
    kwargs = dict(num_classes=1000, **(dict(img_size=32, depth=1) if smoke else {}))
    torch.manual_seed(0)  # every variant starts from the same weights
    model = timm.create_model(name, pretrained=False, **kwargs).to(device)
    if is_cnn(name):
        model = model.to(memory_format=torch.channels_last)
    return model


def is_cnn(name: str) -> bool:
    return name.startswith("resnet")


def prepare(model: torch.nn.Module, variant: str, task: str) -> Callable:
    model.train(task == "train")
    if "patch" in variant:
        import fastvision
        model = fastvision.patch(model)
    return torch.compile(model) if "compile" in variant else model


def graphed(step: Callable, model: torch.nn.Module, task: str) -> Callable:
    """The step's forward (and backward) replayed from a CUDA graph; the optimizer step runs after it."""
    from fastvision.cuda_graphs import CapturedCall

    if task == "infer":
        call = CapturedCall(step)
        return lambda: call().clone()
    call = CapturedCall(step.forward_backward, grad_params=model.parameters())

    def train():
        loss = call().clone()
        step.optimizer.step()
        return loss
    return train


def autocast(device: torch.device, amp: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


def make_step(runner: Callable, model: torch.nn.Module, task: str, images, labels, device, amp) -> Callable:
    if task == "infer":
        def infer():
            with torch.no_grad(), autocast(device, amp):
                return runner(images)
        return infer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                                  **({"fused": True} if device.type == "cuda" else {}))

    def forward_backward():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = F.cross_entropy(runner(images).float(), labels)
        loss.backward()
        return loss.detach()

    def train():
        loss = forward_backward()
        optimizer.step()
        return loss
    train.forward_backward, train.optimizer = forward_backward, optimizer
    return train


def measure(name: str, variant: str, task: str, args, device, reference: Dict[str, torch.Tensor]) -> Dict:
    record = {"model": name, "task": task, "variant": variant, "batch": args.batch_for(name)}
    model = create_model(name, args.smoke, device)
    runner = prepare(model, variant, task)
    if "patch" in variant:
        import fastvision
        report = fastvision.patch_report(model)
        record["patched_modules"] = len(report.replaced)
        record["skipped_modules"] = len(report.skipped)
    img = 32 if args.smoke else 224
    batch = record["batch"]
    images = torch.randn(batch, 3, img, img, device=device)
    if is_cnn(name):
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    step = make_step(runner, model, task, images, labels, device, args.amp)
    if variant.endswith("+graph"):
        step = graphed(step, model, task)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    common.synchronize(device)
    start = time.perf_counter()
    if variant == "patch":  # which fused modules ran eager in the step, and why (the graph variant runs the same)
        from fastvision.verify import recording_declines
        with recording_declines(model) as declined:
            first = step()
        record["declined_modules"] = dict(declined)
        record["declined"] = len(declined)
    else:
        first = step()
    common.synchronize(device)
    record["first_step_s"] = time.perf_counter() - start
    if task == "infer":
        compare_logits(record, variant, first, reference)
    for _ in range(args.warmup_iters):
        step()
    common.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    common.synchronize(device)
    elapsed = time.perf_counter() - start
    record.update(status="ok", iters=args.iters, ms_per_step=1e3 * elapsed / args.iters,
                  img_per_s=batch * args.iters / elapsed, host_ms_per_step=host_ms(step, device, min(args.iters, 5)))
    if device.type == "cuda":
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def host_ms(step: Callable, device: torch.device, steps: int) -> float:
    """Median host time to issue one step with the GPU idle at its start: near ms_per_step, the step is
    host-bound (the GPU waits on the Python), well under it, GPU-bound."""
    times = []
    for _ in range(steps):
        common.synchronize(device)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    common.synchronize(device)
    return 1e3 * statistics.median(times)


def compare_logits(record: Dict, variant: str, logits: torch.Tensor, reference: Dict[str, torch.Tensor]) -> None:
    logits = logits.detach().float()
    if variant == "eager":
        reference["logits"] = logits
    elif "logits" in reference:
        diff = torch.linalg.vector_norm(logits - reference["logits"]).item()
        record["logits_rel_err_vs_eager"] = diff / max(torch.linalg.vector_norm(reference["logits"]).item(), 1e-30)


def release(device: torch.device) -> None:
    gc.collect()
    try:
        torch._dynamo.reset()
    except Exception:
        pass
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_speedups(results: List[Dict]) -> None:
    eager = {(r["model"], r["task"]): r["img_per_s"] for r in results
             if r["variant"] == "eager" and r.get("status") == "ok"}
    for r in results:
        base = eager.get((r["model"], r["task"]))
        if r.get("status") == "ok" and base:
            r["speedup_vs_eager"] = r["img_per_s"] / base


def run_or_skip(name, task, variant, args, device, reference, budget: common.Budget) -> Dict:
    if budget.exhausted():
        return {"model": name, "task": task, "variant": variant, "status": "skipped",
                "reason": f"--max-seconds {args.max_seconds:g} spent"}
    try:
        return measure(name, variant, task, args, device, reference)
    except Exception as exc:  # one failing variant must not end the run
        return {"model": name, "task": task, "variant": variant, "status": "error", "error": common.first_line(exc)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (models.json)")
    p.add_argument("--quick", action="store_true",
                   help="ViT-S/16 and ViT-B/16, batch 128, 10 steps (~3 min on an H100)")
    p.add_argument("--smoke", action="store_true", help=f"CPU, a one-block {SMOKE_MODEL} at 32 px, eager and patch")
    p.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS + GRAPH_VARIANTS)} (default: the first four)")
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--batch", type=int, default=None, help="batch size for every model (default: per model)")
    p.add_argument("--iters", type=int, default=None, help="timed steps")
    p.add_argument("--warmup-iters", type=int, default=None, help="untimed steps after the first")
    p.add_argument("--max-seconds", type=float, default=None, help="skip remaining runs after this long")
    args = p.parse_args(argv)
    default_models = QUICK_MODELS if args.quick or args.smoke else tuple(MODELS)
    args.models = common.iter_names(args.models, MODELS) if args.models else list(default_models)
    if args.smoke:
        args.models = [SMOKE_MODEL]
    args.variants = common.iter_names(args.variants, VARIANTS + GRAPH_VARIANTS) if args.variants else (
        ["eager", "patch"] if args.smoke else list(VARIANTS))
    args.tasks = common.iter_names(args.tasks, TASKS)
    fixed_batch = args.batch or (2 if args.smoke else (128 if args.quick else None))
    args.batch_for = lambda name: fixed_batch or MODELS[name]
    args.iters = args.iters or (2 if args.smoke else (10 if args.quick else 30))
    args.warmup_iters = args.warmup_iters if args.warmup_iters is not None else (0 if args.smoke else 3)
    if args.max_seconds is None:
        args.max_seconds = 60.0 if args.smoke else (180.0 if args.quick else 1800.0)
    args.amp = None if args.smoke else torch.bfloat16
    return args


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    device = common.pick_device(args.smoke)
    budget = common.Budget(args.max_seconds)
    env = common.environment_info(device)
    print(f"[models] {env['device_name']} torch {env['torch']} timm {env['timm']} commit {env['git_commit']}",
          flush=True)
    runs = [(m, t, v) for m in args.models for t in args.tasks for v in args.variants]
    results: List[Dict] = []
    payload = {"benchmark": "models", "env": env, "amp": str(args.amp), "complete": False,
               "args": {k: v for k, v in vars(args).items() if not callable(v)}, "results": results}
    progress = common.Progress(len(runs), "models")
    reference: Dict[str, torch.Tensor] = {}
    for name, task, variant in runs:
        if variant == "eager":
            reference = {}
        record = run_or_skip(name, task, variant, args, device, reference, budget)
        release(device)
        results.append(record)
        add_speedups(results)
        payload["elapsed_s"] = budget.elapsed()
        common.write_json(os.path.join(args.out, "models.json"), payload)  # a timeout keeps what was measured
        progress.step(f"{name} {task} {variant}: {common.format_cell(record.get('img_per_s', record['status']))}")
    progress.close()
    payload.update(complete=True, elapsed_s=budget.elapsed())
    common.write_json(os.path.join(args.out, "models.json"), payload)
    common.print_table(results, ["model", "task", "variant", "batch", "status", "img_per_s", "speedup_vs_eager",
                                 "ms_per_step", "host_ms_per_step", "peak_mem_gib", "first_step_s",
                                 "logits_rel_err_vs_eager", "declined", "error"],
                       title=f"models: {len(results)} runs in {budget.elapsed():.0f} s (autocast {args.amp})")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
