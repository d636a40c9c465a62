"""Host time per call of each fused op against its eager counterpart, on tiny tensors (launch-bound).

    python -m benchmarks.host_overhead --out host_overhead.json [--smoke]

A patched model is GPU-bound only while its ops cost the host less than the GPU work they
launch; this measures that cost (wall time per call, synchronised once per batch of calls),
forward only and forward + backward. It is what the 2026-11-26 H200 profile found limiting.
"""
import argparse
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from . import common

CALLS = 2000


def per_call_us(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    for _ in range(max(calls // 20, 1)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def grad_step(fn: Callable, *inputs: torch.Tensor) -> Callable[[], object]:
    """A step running fn(*inputs) and the gradients of its (first) output's sum w.r.t. the inputs that need them."""
    leaves = [t for t in inputs if t.requires_grad]

    def step():
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out.sum(), leaves)
    return step


def pairs(device: torch.device, dtype: torch.dtype) -> Dict[str, Tuple[Callable, Callable, List[torch.Tensor]]]:
    """name -> (fastvision op, eager op, inputs), all tiny."""
    from fastvision import ops

    def t(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    x, w, b = t(8, 384), t(384), t(384)
    qkv = t(2, 37, 3, 6, 64)

    def sdpa_packed(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    return {
        "layer_norm": (lambda x, w, b: ops.layer_norm(x, (384,), w, b),
                       lambda x, w, b: F.layer_norm(x, (384,), w, b), [x, w, b]),
        "add_layer_norm": (lambda x, r, w, b: ops.add_layer_norm(x, r, (384,), w, b),
                           lambda x, r, w, b: F.layer_norm(x + r, (384,), w, b), [x, t(8, 384), w, b]),
        "bias_gelu": (lambda x, b: ops.bias_gelu(x, b), lambda x, b: F.gelu(x + b), [t(8, 1536), t(1536)]),
        "softmax": (lambda x: ops.softmax(x, -1), lambda x: torch.softmax(x, -1), [t(8, 197)]),
        "attention_qkvpacked": (ops.attention_qkvpacked, sdpa_packed, [qkv]),
    }


def measure(device: torch.device, dtype: torch.dtype, calls: int) -> List[Dict[str, object]]:
    rows = []
    for name, (ours, eager, inputs) in pairs(device, dtype).items():
        for mode in ("fwd", "fwd+bwd"):
            row = {"op": name, "mode": mode}
            for label, fn in (("fastvision_us", ours), ("eager_us", eager)):
                step = (lambda f=fn: f(*inputs)) if mode == "fwd" else grad_step(fn, *inputs)
                if mode == "fwd":
                    with torch.no_grad():
                        row[label] = round(per_call_us(step, device, calls), 2)
                else:
                    row[label] = round(per_call_us(step, device, calls), 2)
            row["extra_us"] = round(row["fastvision_us"] - row["eager_us"], 2)
            rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, few calls (checks the script runs)")
    args = parser.parse_args(argv)
    device = common.pick_device(args.smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = measure(device, dtype, 2 if args.smoke else CALLS)
    result = {"env": common.environment_info(device), "dtype": str(dtype), "results": rows}
    common.write_json(args.out, result)
    common.print_table(rows, ["op", "mode", "fastvision_us", "eager_us", "extra_us"])
    return result


if __name__ == "__main__":
    main()
