"""Where the host time of a patched ViT's training step goes: fused ops, Triton launches, the rest.

    python -m benchmarks.host_step --out host_step.json [--model vit_small_patch16_224] [--batch 32] [--smoke]

Without a CUDA graph a patched ViT-S trains slower than eager on an H100 (models.json, 709751e:
0.5x at batch 128) while its GPU time is half of eager's: the host is the limit. This times one
forward + backward (bf16 autocast, no optimizer) of the eager and the patched model, then the
patched one again with timers around every fused op's forward and backward (which run on the
autograd engine's device thread) and around every Triton launch, split by thread. What the timers
do not cover is PyTorch's own share: module calls, autograd recording, aten ops, the engine.
--smoke: a tiny ViT on the CPU with the Triton launches stubbed out (benchmarks.host_python).
"""
import argparse
import contextlib
import cProfile
import io
import pstats
import threading
import time
from collections import defaultdict
from typing import Callable, Dict, Iterator

import torch

from . import common


class Timers:
    """Seconds and calls per (label, thread) where thread is 'main' or 'autograd'."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self._main = threading.main_thread()

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                key = (label, "main" if threading.current_thread() is self._main else "autograd")
                self.seconds[key] += time.perf_counter() - start
                self.calls[key] += 1
        return timed

    def rows(self, steps: int):
        return [{"what": label, "thread": thread, "calls per step": self.calls[(label, thread)] / steps,
                 "us per call": round(self.seconds[(label, thread)] / self.calls[(label, thread)] * 1e6, 1),
                 "ms per step": round(self.seconds[(label, thread)] / steps * 1e3, 3)}
                for label, thread in sorted(self.seconds, key=lambda k: -self.seconds[k])]


@contextlib.contextmanager
def instrumented(timers: Timers) -> Iterator[None]:
    """Timers around every fused op's impl and backward, ops.linear's autograd Function and Triton's launch."""
    import triton
    import importlib
    from fastvision.ops import _dispatch
    linear = importlib.import_module("fastvision.ops.linear")
    saved = []

    def swap(owner, name, value):
        saved.append((owner, name, owner[name] if isinstance(owner, dict) else getattr(owner, name)))
        if isinstance(owner, dict):
            owner[name] = value
        else:
            setattr(owner, name, value)

    for name, entry in list(_dispatch.REGISTRY.items()):
        swap(_dispatch.REGISTRY, name, _dispatch.FusedOp(
            entry.name, timers.wrap(f"{name} forward", entry.impl), entry.setup_context,
            None if entry.backward is None else timers.wrap(f"{name} backward", entry.backward)))
    swap(linear._Linear, "forward", staticmethod(timers.wrap("linear forward", linear._Linear.forward)))
    swap(linear._Linear, "backward", staticmethod(timers.wrap("linear backward", linear._Linear.backward)))
    jit = triton.runtime.jit.JITFunction
    swap(jit, "run", timers.wrap("triton launch (JITFunction.run)", jit.run))
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            if isinstance(owner, dict):
                owner[name] = value
            else:
                setattr(owner, name, value)


def build(name: str, device: torch.device, smoke: bool, patched: bool) -> torch.nn.Module:
    import timm

    import fastvision
    torch.manual_seed(0)
    if smoke:
        model = timm.models.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=12, num_heads=2,
                                              num_classes=10)
    else:
        model = timm.create_model(name, num_classes=1000)
    model = model.to(device)
    return fastvision.patch(model) if patched else model


def step_fn(model: torch.nn.Module, images: torch.Tensor, device: torch.device) -> Callable[[], None]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = model(images).float().square().mean()
        loss.backward()
    return step


def ms_per_step(step: Callable[[], None], device: torch.device, steps: int) -> float:
    for _ in range(3):
        step()
    common.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    common.synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3


def main_thread_profile(step: Callable[[], None], steps: int, top: int) -> str:
    """cProfile of the main thread (module calls, forwards, the call into the engine), by own time."""
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(steps):
        step()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def measure(args, device: torch.device) -> Dict[str, object]:
    size = 32 if args.smoke else 224
    images = torch.randn(args.batch, 3, size, size, device=device)
    eager = step_fn(build(args.model, device, args.smoke, False), images, device)
    step = step_fn(build(args.model, device, args.smoke, True), images, device)
    result = {"eager ms per step": round(ms_per_step(eager, device, args.steps), 3),
              "patched ms per step": round(ms_per_step(step, device, args.steps), 3)}
    timers = Timers()
    with instrumented(timers):
        result["patched ms per step, instrumented"] = round(ms_per_step(step, device, args.steps), 3)
    # ms_per_step's warm-up steps are timed too: count them in the per-step figures
    result["breakdown"] = timers.rows(args.steps + 3)
    result["main thread profile"] = main_thread_profile(step, max(args.steps // 4, 1), args.top)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    device = common.pick_device(args.smoke)
    if args.smoke:
        args.batch, args.steps = min(args.batch, 2), min(args.steps, 4)
    stub = contextlib.nullcontext()
    if device.type == "cpu":
        from .host_python import stubbed_kernels
        stub = stubbed_kernels()
    with stub:
        result = measure(args, device)
    print({k: v for k, v in result.items() if k.endswith("step") or k.endswith("instrumented")})
    common.print_table(result["breakdown"], ["what", "thread", "calls per step", "us per call", "ms per step"],
                       title=f"host time per training step, {'tiny ViT' if args.smoke else args.model}, batch {args.batch}")
    print(result["main thread profile"])
    if args.out:
        common.write_json(args.out, {"env": common.environment_info(device), "args": vars(args), **result})
    return result


if __name__ == "__main__":
    main()
