"""Where a fused op's host time goes: launcher, custom-op layers, autograd, backward thread.

    python -m benchmarks.host_breakdown --out host_breakdown.json [--profile profile.txt] [--smoke]

host_overhead.py says how much more host time a fused call costs than eager; this splits that
cost into layers (raw Triton launch, launcher with allocations, the op entry point, autograd
recording, the backward pass) for softmax and LayerNorm, so the expensive layer is named.
"""
import argparse
import gc
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from . import common
from .host_overhead import grad_step, per_call_us


class _EagerSoftmax(torch.autograd.Function):
    """Control: a Python autograd.Function around eager softmax (what any Python backward costs)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, -1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return y * (dy - (dy * y).sum(-1, keepdim=True))


def softmax_layers(device, dtype) -> Dict[str, Callable[[], object]]:
    from fastvision import ops
    from fastvision.triton_kernels import softmax as kernels
    from fastvision.triton_kernels._launch import cdiv
    x = torch.randn(8, 197, device=device, dtype=dtype, requires_grad=True)
    x0 = x.detach()
    y = torch.empty_like(x0)
    dy = torch.randn_like(x0)
    meta, rows = kernels._config(197, x0.element_size(), (x0, x0.stride(0)), (y, y.stride(0)))

    def raw_launch():
        kernels.softmax_fwd_kernel[(cdiv(8, rows),)](x0, y, x0.stride(0), y.stride(0), 8, 197, **meta)
    return {
        "eager fwd": lambda: torch.softmax(x0, -1),
        "raw triton launch": raw_launch,
        "launcher fwd (alloc + launch)": lambda: kernels.softmax_fwd(x0),
        "launcher bwd (main thread)": lambda: kernels.softmax_bwd(dy, y),
        "ops.softmax fwd, no grad": lambda: ops.softmax(x0, -1),
        "ops.softmax fwd, grad recorded": lambda: ops.softmax(x, -1),
        "torch.ops.fastvision.softmax fwd, no grad": lambda: torch.ops.fastvision.softmax(x0),
        "eager fwd+bwd": grad_step(lambda t: torch.softmax(t, -1), x),
        "python Function(eager) fwd+bwd": grad_step(_EagerSoftmax.apply, x),
        "ops.softmax fwd+bwd": grad_step(lambda t: ops.softmax(t, -1), x),
        "torch.ops.fastvision.softmax fwd+bwd": grad_step(torch.ops.fastvision.softmax, x),
    }


def layer_norm_layers(device, dtype) -> Dict[str, Callable[[], object]]:
    from fastvision import ops
    from fastvision.triton_kernels import layer_norm as kernels
    x = torch.randn(8, 384, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(384, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(384, device=device, dtype=dtype, requires_grad=True)
    x0 = x.detach()
    _, _, _, rstd = kernels.layer_norm_fwd(x0, w.detach(), b.detach(), 1e-5)
    dy = torch.randn_like(x0)
    return {
        "eager fwd": lambda: F.layer_norm(x0, (384,), w.detach(), b.detach()),
        "launcher fwd": lambda: kernels.layer_norm_fwd(x0, w.detach(), b.detach(), 1e-5),
        "launcher bwd with weight grads (main thread)": lambda: kernels.layer_norm_bwd(dy, x0, w.detach(), rstd),
        "launcher bwd, dx only (main thread)": lambda: kernels.layer_norm_bwd(dy, x0, w.detach(), rstd,
                                                                             needs_weight_grad=False),
        "ops.layer_norm fwd, grad recorded": lambda: ops.layer_norm(x, (384,), w, b),
        "eager fwd+bwd": grad_step(lambda *t: F.layer_norm(t[0], (384,), t[1], t[2]), x, w, b),
        "ops.layer_norm fwd+bwd": grad_step(lambda *t: ops.layer_norm(t[0], (384,), t[1], t[2]), x, w, b),
        "ops.layer_norm fwd+bwd, x only": grad_step(lambda t: ops.layer_norm(t, (384,), w.detach(), b.detach()), x),
    }


class _Probe(torch.autograd.Function):
    """Runs ``work`` inside backward (in the autograd engine's device thread) and times it there."""

    @staticmethod
    def forward(ctx, x, work, timings):
        ctx.work, ctx.timings = work, timings
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        start = time.perf_counter()
        ctx.work(dy)
        ctx.timings.append(time.perf_counter() - start)
        return dy, None, None


def backward_thread_layers(device, dtype) -> Dict[str, Callable[[], object]]:
    """The same host work timed in the main thread and inside a backward pass."""
    from fastvision.ops._dispatch import call
    from fastvision.triton_kernels import softmax as kernels
    from fastvision.triton_kernels._launch import cdiv
    x = torch.randn(8, 197, device=device, dtype=dtype, requires_grad=True)
    y, dx = torch.softmax(x.detach(), -1), torch.empty_like(x.detach())
    args = (y, y, dx, y.stride(0), y.stride(0), dx.stride(0), 8, 197)
    meta, rows = kernels._config(197, y.element_size(), (y, y.stride(0)), (dx, dx.stride(0)))
    constexprs = [meta[name] for name in ("BLOCK_N", "ROWS", "SINGLE_BLOCK", "SEG")]
    grid = (cdiv(8, rows),)
    compiled = kernels.softmax_bwd_kernel[grid](*args, **meta)
    runner = compiled[grid + (1, 1)] if compiled is not None else (lambda *a: None)  # None on the interpreter
    works = {
        "nothing": lambda dy: None,
        "torch.empty_like": lambda dy: torch.empty_like(dy),
        "jit launch": lambda dy: kernels.softmax_bwd_kernel[grid](*args, **meta),
        "compiled-kernel launch": lambda dy: runner(*args, *constexprs),
        "launcher softmax_bwd": lambda dy: kernels.softmax_bwd(y, y),
        "call softmax_backward": lambda dy: call("softmax_backward", y, y),
    }
    layers = {}
    for name, work in works.items():
        timings = []
        layers[f"main thread: {name}"] = (lambda w=work: w(y))
        step = grad_step(lambda t, w=work, tm=timings: _Probe.apply(t, w, tm), x)
        layers[f"fwd+bwd with it in backward: {name}"] = step
        layers[f"inside backward: {name}"] = _InsideTimer(step, timings)
    return layers


class _TritonSoftmax(torch.autograd.Function):
    """Our kernels in a plain autograd.Function: output as allocated (no view), saved for backward."""

    @staticmethod
    def forward(ctx, x):
        from fastvision.triton_kernels import softmax as kernels
        y = kernels.softmax_fwd(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        from fastvision.triton_kernels import softmax as kernels
        (y,) = ctx.saved_tensors
        return kernels.softmax_bwd(dy.contiguous(), y)


def _no_gc(step):
    def run():
        gc.disable()
        try:
            return step()
        finally:
            gc.enable()
    return run


def autograd_variants(device, dtype) -> Dict[str, Callable[[], object]]:
    """Which part of the autograd round trip makes ops.softmax fwd+bwd cost more than its pieces."""
    from fastvision import ops
    x = torch.randn(8, 197, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(8, 197, device=device, dtype=dtype)

    def with_grad_outputs(fn):
        return lambda: torch.autograd.grad(fn(x), [x], g)
    return {
        "ops.softmax fwd+bwd": grad_step(lambda t: ops.softmax(t, -1), x),
        "ops.softmax fwd+bwd, gc off": _no_gc(grad_step(lambda t: ops.softmax(t, -1), x)),
        "Function(triton) fwd+bwd": grad_step(_TritonSoftmax.apply, x),
        "Function(triton) view output fwd+bwd": grad_step(lambda t: _TritonSoftmax.apply(t).view(8, 197), x),
        "eager, grad_outputs": with_grad_outputs(lambda t: torch.softmax(t, -1)),
        "Function(triton), grad_outputs": with_grad_outputs(_TritonSoftmax.apply),
        "ops.softmax, grad_outputs": with_grad_outputs(lambda t: ops.softmax(t, -1)),
        "ops.softmax, grad_outputs, gc off": _no_gc(with_grad_outputs(lambda t: ops.softmax(t, -1))),
    }


class _InsideTimer:
    """Runs the step, but reports the mean time measured inside backward (set by per_call_us's caller)."""

    def __init__(self, step, timings):
        self.step, self.timings = step, timings

    def __call__(self):
        return self.step()


def profile_table(device, dtype, path: str) -> None:
    """torch.profiler over ops.layer_norm and ops.softmax fwd+bwd: which calls take the host time."""
    steps = [layer_norm_layers(device, dtype)["ops.layer_norm fwd+bwd"],
             softmax_layers(device, dtype)["ops.softmax fwd+bwd"]]
    for step in steps:
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(20):
            for step in steps:
                step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--profile", help="also write a torch.profiler table here")
    parser.add_argument("--smoke", action="store_true", help="CPU, few calls (checks the script runs)")
    args = parser.parse_args(argv)
    device = common.pick_device(args.smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    calls = 2 if args.smoke else 1000
    results = {}
    for op, layers in (("softmax", softmax_layers), ("layer_norm", layer_norm_layers),
                       ("probe", backward_thread_layers), ("autograd", autograd_variants)):
        for name, fn in layers(device, dtype).items():
            try:
                fn()
            except Exception as exc:  # report and go on: a probe that cannot run says so
                print(f"{op}: {name}: {type(exc).__name__}: {exc}", flush=True)
                results[f"{op}: {name}"] = None
                continue
            if isinstance(fn, _InsideTimer):
                fn.timings.clear()
                per_call_us(fn, device, calls)
                results[f"{op}: {name}"] = round(sum(fn.timings) / max(len(fn.timings), 1) * 1e6, 2)
            else:
                results[f"{op}: {name}"] = round(per_call_us(fn, device, calls), 2)
            print(f"{op + ': ' + name:<60}{results[f'{op}: {name}']:>10} µs", flush=True)
    payload = {"env": common.environment_info(device), "dtype": str(dtype), "us_per_call": results}
    common.write_json(args.out, payload)
    if args.profile:
        profile_table(device, dtype, args.profile)
    return payload


if __name__ == "__main__":
    main()
