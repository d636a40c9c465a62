"""Linear whose bias gradient is summed by the column-sum kernel inside CUDA graphs.

F.linear's backward sums the bias gradient over the tokens with torch's generic dim-0 reduction.
On a ViT's tall (tokens, features) gradients that ran at about a quarter of the copy bandwidth
(DINO step on an H200: 41 sums per step, 2.2 ms of GPU time). ``linear`` keeps F.linear's
forward and its two matmuls in the backward, and sums the bias gradient with
``triton_kernels.partial_sum.column_sum`` (per-program partial rows, then their sum: deterministic).

It does so for CUDA graphs, where only GPU time counts: on any stream but the default one, which is
where a graph is captured and where its warm-up runs (torch.cuda.graph's recipe, CapturedCall,
DINOStep), so that the warm-up compiles what the capture launches. On the default stream the host
pays for a Python autograd node and two launches per Linear: on the H100 machine's CPU that was
57 µs forward and 159 µs backward (93 µs of it the column sum), 8 ms of a ViT-S training step's
36 ms of host time at batch 32 (benchmarks/results/h100/host_step_602a418.json), where the whole
step's GPU time is a few ms. There F.linear, with its C++ autograd node, runs instead
(``COLUMN_SUM_ON_DEFAULT_STREAM`` turns the kernel on everywhere).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _common as C
from ._dispatch import call, define, is_compiling


def _column_sum_impl(x: Tensor) -> Tensor:
    rows = C.as_rows(x, x.shape[-1])
    if not C.use_triton(x):
        return rows.sum(0, dtype=C.accumulator_dtype(x.dtype))
    return C.triton_kernels.partial_sum.column_sum(rows)


def _column_sum_fake(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[-1:], dtype=C.accumulator_dtype(x.dtype))


define("column_sum", _column_sum_impl, _column_sum_fake)


def bias_grad(grad_output: Tensor, dtype: torch.dtype) -> Tensor:
    """The gradient of a bias added along grad_output's last dimension: its column sums, summed in
    float32 (float64 for float64) and returned in ``dtype``. Under create_graph=True (grad mode on in
    the backward) torch's own sum, which is differentiable."""
    if torch.is_grad_enabled():
        acc = C.accumulator_dtype(grad_output.dtype)
        return grad_output.sum(tuple(range(grad_output.dim() - 1)), dtype=acc).to(dtype)
    return call("column_sum", grad_output).to(dtype)


def linear_backward(dy: Tensor, x: Tensor, weight: Tensor, bias_dtype: Optional[torch.dtype], needs_input: bool,
                    needs_weight: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dweight, dbias) of F.linear(x, weight, bias): cuBLAS matmuls, the bias gradient by column sums
    in ``bias_dtype`` (None: no bias gradient); None for what is not needed."""
    dx = dy.matmul(weight) if needs_input else None
    dw = dy.reshape(-1, dy.shape[-1]).t().mm(x.reshape(-1, x.shape[-1])) if needs_weight else None
    db = bias_grad(dy, bias_dtype) if bias_dtype is not None else None
    return dx, dw, db


class _Linear(torch.autograd.Function):
    """F.linear(x, weight, bias) with bias cast to x's dtype in the forward and its gradient summed in
    float32 by the column-sum kernel, returned in the bias's own dtype (an fp32 parameter under
    autocast gets its float32 sum, not a bf16 rounding of it)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = bias.dtype
        return F.linear(x, weight, bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        return linear_backward(dy, x, weight, ctx.bias_dtype if needs[2] else None, needs[0], needs[1])


# Tests set this to run the column-sum kernel on the default CUDA stream too.
COLUMN_SUM_ON_DEFAULT_STREAM = False
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _on_default_stream(x: Tensor) -> bool:
    if _current_raw_stream is None:  # the capture itself is all that can be told apart then
        return not torch.cuda.is_current_stream_capturing()
    return _current_raw_stream(x.device.index) == 0


def host_cost_decline(x: Tensor) -> Optional[str]:
    """Why the column-sum path costs more than it saves here: CUDA work on the default stream, so not
    a CUDA graph's capture or warm-up (see the module docstring); None otherwise and on the interpreter."""
    # Compiled graphs (fastvision.set_compile_ops("linear")) keep the kernel: their host cost is not this one's.
    if COLUMN_SUM_ON_DEFAULT_STREAM or x.device.type != "cuda" or is_compiling() or not _on_default_stream(x):
        return None
    return ("on the default CUDA stream (no graph captured or warmed up): the host time of a Python autograd "
            "node and two launches exceeds the GPU time the column-sum kernel saves")


def linear_decline(x: Tensor, weight: Tensor, bias: Optional[Tensor], autocast: bool = False) -> Optional[str]:
    """Why ``linear`` runs plain F.linear here (None: the bias gradient goes through the column-sum kernel).
    ``autocast``: x and weight are already in autocast's dtype, and the bias is cast like them."""
    return _bias_decline(bias) or host_cost_decline(x) or _kernel_decline(x, weight, bias, autocast)


def _bias_decline(bias: Optional[Tensor]) -> Optional[str]:
    if bias is None:
        return "no bias"
    if not (torch.is_grad_enabled() and bias.requires_grad):
        return "the bias needs no gradient"
    return None


def _kernel_decline(x: Tensor, weight: Tensor, bias: Tensor, autocast: bool) -> Optional[str]:
    """linear_decline's checks of the inputs themselves: dtypes and device."""
    mismatch = next((f"{name} is {t.dtype}, input {x.dtype}" for name, t in (("weight", weight), ("bias", bias))
                     if t.dtype != x.dtype and not (autocast and name == "bias")), None)
    return C.first_decline(C.device_decline(x), C.dtype_decline(x), mismatch)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Drop-in for F.linear, autocast included: the same forward and matmuls, the bias gradient summed by
    the column-sum kernel off the default CUDA stream, as in CUDA graphs (see the module docstring)."""
    # linear_decline's checks; those that need no cast first, so that declining there costs none
    if _bias_decline(bias) is not None or host_cost_decline(x) is not None:
        return F.linear(x, weight, bias)
    dtype = C.autocast_dtype_for(x.device.type, "lower")
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)  # autocast's casts; the bias is cast in the forward
    if _kernel_decline(x, weight, bias, autocast=dtype is not None) is not None:
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)
