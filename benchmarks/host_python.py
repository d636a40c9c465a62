"""The Python host cost of fastvision's op layers, measured on CPU with every Triton launch a no-op.

    python -m benchmarks.host_python [--calls 3000]

On the GPU machine the patched ViTs were bound by host time per fused call (H200 notes,
2026-11-26). That cost is Python: argument checks, dispatch, autograd, launchers. This
runs the real op code on small CPU tensors, with the kernels' launches replaced by
no-ops (outputs are allocated, not written), so the Python layers can be measured and
trimmed on any machine. Eager PyTorch on the same tensors is printed beside it for scale.
"""
import argparse
import contextlib
import importlib
import pkgutil
import time
from typing import Callable, Iterator

import torch

from . import common
from .host_overhead import grad_step, pairs


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing. It hashes and compares as the
    kernel it replaces, which launchers use as a key into their tables."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

    def __hash__(self):
        return hash(self.kernel)

    def __eq__(self, other):
        return other is self or other is self.kernel


@contextlib.contextmanager
def stubbed_kernels() -> Iterator[None]:
    """Triton launches become no-ops and CPU tensors count as supported, for the duration."""
    import triton
    from fastvision import triton_kernels as tk
    from fastvision.ops import _common as C
    saved = []

    def swap(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    modules = [importlib.import_module(f"{tk.__name__}.{info.name}") for info in pkgutil.iter_modules(tk.__path__)]
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, (triton.runtime.JITFunction, triton.runtime.Autotuner)) or \
                    type(value).__name__ == "InterpretedFunction":
                swap(module, name, _NoLaunch(value))
    swap(C, "device_decline", lambda x: None)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def per_call_us(fn: Callable[[], object], calls: int, repeats: int = 5) -> float:
    """Best of ``repeats`` runs of ``calls`` calls: the least disturbed estimate on a shared machine."""
    for _ in range(max(calls // 10, 1)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls // repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / (calls // repeats) * 1e6)
    return best


def measure(calls: int):
    rows = []
    with stubbed_kernels():
        for name, (ours, eager, inputs) in pairs(torch.device("cpu"), torch.float32).items():
            row = {"op": name}
            with torch.no_grad():
                row["fwd"] = per_call_us(lambda: ours(*inputs), calls)
                row["eager fwd"] = per_call_us(lambda: eager(*inputs), calls)
            row["fwd+bwd"] = per_call_us(grad_step(ours, *inputs), calls)
            row["eager fwd+bwd"] = per_call_us(grad_step(eager, *inputs), calls)
            rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args(argv)
    rows = measure(args.calls)
    common.print_table(rows, ["op", "fwd", "eager fwd", "fwd+bwd", "eager fwd+bwd"], title="µs per call")
    return rows


if __name__ == "__main__":
    main()
