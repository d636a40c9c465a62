"""Row-wise softmax over the last dimension, forward and backward.

Forward:  y = exp(x - max(x)) / sum(exp(x - max(x)))
Backward: dx = y * (dy - sum(dy * y))
Rows up to MAX_SINGLE_BLOCK wide are held in registers; wider rows use an online
max/sum pass (per-lane running max and rescaled sum) followed by a write pass.
A row that is entirely -inf gives NaN, as torch.softmax does.
"""
import torch
import triton
import triton.language as tl

from ._launch import new_output, next_power_of_2, pointer, warps_for_row

MAX_SINGLE_BLOCK = 16384
STREAM_BLOCK = 4096


@triton.jit
def softmax_fwd_kernel(X, Y, stride_x, stride_y, N, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_ty = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=-float("inf")).to(acc_ty)
        e = tl.exp(x - tl.max(x, axis=0))
        tl.store(Y + row * stride_y + cols, e / tl.sum(e, axis=0), mask=mask)
    else:
        run_max = tl.full([BLOCK_N], -float("inf"), dtype=acc_ty)
        run_sum = tl.zeros([BLOCK_N], dtype=acc_ty)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            x = tl.load(X + row * stride_x + cols, mask=cols < N, other=-float("inf")).to(acc_ty)
            new_max = tl.maximum(run_max, x)
            # A lane that has seen only -inf keeps a sum of 0 instead of exp(-inf + inf) = NaN.
            safe_max = tl.where(new_max == -float("inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe_max) + tl.exp(x - safe_max)
            run_max = new_max
        row_max = tl.max(run_max, axis=0)
        row_sum = tl.sum(run_sum * tl.exp(run_max - row_max), axis=0)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + row * stride_x + cols, mask=mask, other=-float("inf")).to(acc_ty)
            tl.store(Y + row * stride_y + cols, tl.exp(x - row_max) / row_sum, mask=mask)


@triton.jit
def softmax_bwd_kernel(DY, Y, DX, stride_dy, stride_y, stride_dx, N,
                       BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_ty = tl.float64 if Y.dtype.element_ty == tl.float64 else tl.float32
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(acc_ty)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(acc_ty)
        dot = tl.sum(y * dy, axis=0)
        tl.store(DX + row * stride_dx + cols, y * (dy - dot), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], dtype=acc_ty)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(acc_ty)
            acc += y * dy
        dot = tl.sum(acc, axis=0)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(acc_ty)
            tl.store(DX + row * stride_dx + cols, y * (dy - dot), mask=mask)


def _block(n: int):
    block = next_power_of_2(n)
    if block <= MAX_SINGLE_BLOCK:
        return block, True
    return STREAM_BLOCK, False


def softmax_fwd(x):
    """x: (M, N) with unit column stride."""
    M, N = x.shape
    y = new_output((M, N), dtype=x.dtype, device=x.device)
    if M > 0 and N > 0:
        block, single = _block(N)
        softmax_fwd_kernel[(M,)](x, y, x.stride(0), y.stride(0), N,
                                 BLOCK_N=block, SINGLE_BLOCK=single, num_warps=warps_for_row(block))
    return y


def softmax_bwd(dy, y):
    M, N = y.shape
    dx = new_output((M, N), dtype=y.dtype, device=y.device)
    if M > 0 and N > 0:
        block, single = _block(N)
        softmax_bwd_kernel[(M,)](dy, y, dx, dy.stride(0), y.stride(0), dx.stride(0), N,
                                 BLOCK_N=block, SINGLE_BLOCK=single, num_warps=warps_for_row(block))
    return dx


def aot_specializations():
    """(kernel, signature, constexprs, options) for each variant the launchers use: see tests/test_aot_compile.py."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        p = pointer(dtype)
        for n in (197, 1000, 8192, 40000):
            block, single = _block(n)
            constexprs = {"BLOCK_N": block, "SINGLE_BLOCK": single}
            options = {"num_warps": warps_for_row(block)}
            yield (softmax_fwd_kernel, {"X": p, "Y": p, "stride_x": "i32", "stride_y": "i32", "N": "i32",
                                        "BLOCK_N": "constexpr", "SINGLE_BLOCK": "constexpr"}, constexprs, options)
            yield (softmax_bwd_kernel, {"DY": p, "Y": p, "DX": p, "stride_dy": "i32", "stride_y": "i32",
                                        "stride_dx": "i32", "N": "i32", "BLOCK_N": "constexpr",
                                        "SINGLE_BLOCK": "constexpr"}, constexprs, options)
