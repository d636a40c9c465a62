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
import time
from typing import Callable, Dict, Iterator, Tuple

import torch
import torch.nn.functional as F


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


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

    for module in (tk.layer_norm, tk.softmax, tk.gelu, tk.attention, tk.dino_loss):
        for name, value in list(vars(module).items()):
            if isinstance(value, (triton.runtime.JITFunction, triton.runtime.Autotuner)) or \
                    type(value).__name__ == "InterpretedFunction":
                swap(module, name, _NoLaunch())
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


def _grad(fn, *inputs):
    leaves = [t for t in inputs if t.requires_grad]

    def step():
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out.sum(), leaves)
    return step


def cases() -> Dict[str, Tuple[Callable, Callable, tuple]]:
    from fastvision import ops

    def t(*shape):
        return torch.randn(*shape, requires_grad=True)

    x, w, b, r = t(8, 384), t(384), t(384), t(8, 384)
    qkv = t(2, 37, 3, 6, 64)

    def sdpa_packed(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    return {
        "layer_norm": (lambda x, w, b: ops.layer_norm(x, (384,), w, b),
                       lambda x, w, b: F.layer_norm(x, (384,), w, b), (x, w, b)),
        "add_layer_norm": (lambda x, r, w, b: ops.add_layer_norm(x, r, (384,), w, b),
                           lambda x, r, w, b: F.layer_norm(x + r, (384,), w, b), (x, r, w, b)),
        "bias_gelu": (lambda x, b: ops.bias_gelu(x, b), lambda x, b: F.gelu(x + b), (t(8, 1536), t(1536))),
        "softmax": (lambda x: ops.softmax(x, -1), lambda x: torch.softmax(x, -1), (t(8, 197),)),
        "attention_qkvpacked": (ops.attention_qkvpacked, sdpa_packed, (qkv,)),
    }


def measure(calls: int):
    rows = []
    with stubbed_kernels():
        for name, (ours, eager, inputs) in cases().items():
            row = {"op": name}
            with torch.no_grad():
                row["fwd"] = per_call_us(lambda: ours(*inputs), calls)
                row["eager fwd"] = per_call_us(lambda: eager(*inputs), calls)
            row["fwd+bwd"] = per_call_us(_grad(ours, *inputs), calls)
            row["eager fwd+bwd"] = per_call_us(_grad(eager, *inputs), calls)
            rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args(argv)
    rows = measure(args.calls)
    print(f"{'op (µs per call)':<22}{'fwd':>8}{'eager fwd':>11}{'fwd+bwd':>9}{'eager fwd+bwd':>15}")
    for r in rows:
        print(f"{r['op']:<22}{r['fwd']:>8.1f}{r['eager fwd']:>11.1f}{r['fwd+bwd']:>9.1f}{r['eager fwd+bwd']:>15.1f}")
    return rows


if __name__ == "__main__":
    main()
