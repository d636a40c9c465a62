"""Row-wise softmax over the last dimension, forward and backward.

Forward:  y = exp(x - max(x)) / sum(exp(x - max(x)))
Backward: dx = y * (dy - sum(dy * y))
Rows up to MAX_SINGLE_BLOCK wide are held in registers, several rows per program when
they are short (a ViT's 197-wide attention rows: 8 rows of 256 lanes per program, not one
row per warp); wider rows use an online max/sum pass (per-lane running max and rescaled
sum) followed by a write pass.
A row that is entirely -inf gives NaN, as torch.softmax does.
"""
import torch
import triton
import triton.language as tl

from ._launch import cdiv, new_output, next_power_of_2, pointer, rows_of, warps_for_row

MAX_SINGLE_BLOCK = 16384
STREAM_BLOCK = 4096
TILE_ELEMENTS = 2048


@triton.jit
def softmax_fwd_kernel(X, Y, stride_x, stride_y, M, N,
                       BLOCK_N: tl.constexpr, ROWS: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    acc_ty = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    if SINGLE_BLOCK:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=-float("inf")).to(acc_ty)
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], e / tl.sum(e, axis=1)[:, None], mask=mask)
    else:
        row = tl.program_id(0).to(tl.int64)
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
def softmax_bwd_kernel(DY, Y, DX, stride_dy, stride_y, stride_dx, M, N,
                       BLOCK_N: tl.constexpr, ROWS: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    acc_ty = tl.float64 if Y.dtype.element_ty == tl.float64 else tl.float32
    if SINGLE_BLOCK:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        dot = tl.sum(y * dy, axis=1)[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], y * (dy - dot), mask=mask)
    else:
        row = tl.program_id(0).to(tl.int64)
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


def _tile(block: int, single: bool):
    """(rows per program, warps): short rows are grouped into tiles of about TILE_ELEMENTS."""
    if not single:
        return 1, warps_for_row(block)
    rows = max(1, TILE_ELEMENTS // block)
    return rows, warps_for_row(block * rows)


def softmax_fwd(x):
    """Softmax over the last dimension. x: contiguous, or (M, N) with unit column stride; y has x's shape."""
    M, stride_x = rows_of(x)
    N = x.shape[-1]
    y = new_output(x.shape, dtype=x.dtype, device=x.device)
    if M > 0 and N > 0:
        block, single = _block(N)
        rows, warps = _tile(block, single)
        softmax_fwd_kernel[(cdiv(M, rows),)](x, y, stride_x, N, M, N,
                                             BLOCK_N=block, ROWS=rows, SINGLE_BLOCK=single, num_warps=warps)
    return y


def softmax_bwd(dy, y):
    """dy, y: contiguous, or (M, N) with unit column stride; dx has y's shape."""
    M, stride_y = rows_of(y)
    N = y.shape[-1]
    dx = new_output(y.shape, dtype=y.dtype, device=y.device)
    if M > 0 and N > 0:
        block, single = _block(N)
        rows, warps = _tile(block, single)
        softmax_bwd_kernel[(cdiv(M, rows),)](dy, y, dx, rows_of(dy)[1], stride_y, N, M, N,
                                             BLOCK_N=block, ROWS=rows, SINGLE_BLOCK=single, num_warps=warps)
    return dx


def aot_specializations():
    """(kernel, signature, constexprs, options) for each variant the launchers use: see tests/test_aot_compile.py."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        p = pointer(dtype)
        for n in (197, 1000, 8192, 40000):
            block, single = _block(n)
            rows, warps = _tile(block, single)
            constexprs = {"BLOCK_N": block, "ROWS": rows, "SINGLE_BLOCK": single}
            tile = {"BLOCK_N": "constexpr", "ROWS": "constexpr", "SINGLE_BLOCK": "constexpr"}
            yield (softmax_fwd_kernel, {"X": p, "Y": p, "stride_x": "i32", "stride_y": "i32", "M": "i32", "N": "i32",
                                        **tile}, constexprs, {"num_warps": warps})
            yield (softmax_bwd_kernel, {"DY": p, "Y": p, "DX": p, "stride_dy": "i32", "stride_y": "i32",
                                        "stride_dx": "i32", "M": "i32", "N": "i32", **tile}, constexprs,
                   {"num_warps": warps})
