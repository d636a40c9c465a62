"""Row-wise softmax over the last dimension, forward and backward.

Forward:  y = exp(x - max(x)) / sum(exp(x - max(x)))
Backward: dx = y * (dy - sum(dy * y))
Rows up to MAX_SINGLE_BLOCK wide are held in registers, ROWS rows per program (see _rows.py):
up to 32 threads share a row and read adjacent columns (a warp's load covers 64 contiguous bytes
of a 197-wide bf16 row; 16-byte vectors where rows are 16-byte aligned), each thread holds a
segment of BLOCK_N // SEG columns of one row, and the row's max and sum stay within a warp.
N is a compile-time constant: segments wholly past N compile to nothing (197 of 256 columns cost
7 of 8 loads, with no per-element mask arithmetic). Rows wider than WARP_ROW take a program each.
Rows wider than MAX_SINGLE_BLOCK use an online max/sum pass (per-lane running max and rescaled
sum) followed by a write pass.
exp(x - m) is computed as exp2(x*log2(e) - m*log2(e)) (one FFMA and one MUFU.EX2 per element),
and the division by the row sum as one reciprocal per row times a product per element.
A row that is entirely -inf gives NaN, as torch.softmax does.
"""
import torch
import triton
import triton.language as tl

from ._launch import cdiv, new_output, next_power_of_2, pointer, rows_of, vector_width, warps_for_row
from ._rows import by_row, flat, row_tile

MAX_SINGLE_BLOCK = 16384
STREAM_BLOCK = 4096
ROW_ELEMENTS_PER_THREAD = 16  # columns of a row per thread, for rows wider than WARP_ROW
WARP_ROW = 1024  # widest row a single warp holds (32 columns per thread); wider rows span warps
WARPS = 4  # per program, for rows a warp holds
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _row_max(x):
    return tl.max(tl.max(x, axis=0), axis=1)[None, :, None]


@triton.jit
def _row_sum(x):
    return tl.sum(tl.sum(x, axis=0), axis=1)[None, :, None]


@triton.jit
def _exp_minus(x, m):
    """exp(x - m); for float32, exp2 of one FFMA (its rounding error is the same for every x of a row)."""
    if x.dtype == tl.float64:
        return tl.exp(x - m)
    return tl.math.exp2(x * LOG2E - m * LOG2E)


@triton.jit
def softmax_fwd_kernel(X, Y, stride_x, stride_y, M, N: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
                       SINGLE_BLOCK: tl.constexpr, SEG: tl.constexpr):
    acc_ty = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    if SINGLE_BLOCK:
        rows, cols = row_tile(tl.program_id(0) * ROWS, ROWS, BLOCK_N, SEG)
        rows = tl.minimum(rows, M - 1).to(tl.int64)  # rows past M repeat row M - 1: no row mask needed
        mask = cols < N
        x = by_row(tl.load(X + rows * stride_x + cols, mask=mask, other=-float("inf")).to(acc_ty), ROWS)
        # where(): padded columns give 0 without an exp (and segments past N vanish at compile time).
        e = tl.where(by_row(mask, ROWS), _exp_minus(x, _row_max(x)), 0.0)
        tl.store(Y + rows * stride_y + cols, flat(e * (1.0 / _row_sum(e))), mask=mask)
    else:
        row = tl.program_id(0).to(tl.int64)
        X += row * stride_x
        Y += row * stride_y
        run_max = tl.full([BLOCK_N], -float("inf"), dtype=acc_ty)
        run_sum = tl.zeros([BLOCK_N], dtype=acc_ty)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            x = tl.load(X + cols, mask=cols < N, other=-float("inf")).to(acc_ty)
            new_max = tl.maximum(run_max, x)
            # A lane that has seen only -inf keeps a sum of 0 instead of exp(-inf + inf) = NaN.
            safe_max = tl.where(new_max == -float("inf"), 0.0, new_max)
            run_sum = run_sum * _exp_minus(run_max, safe_max) + _exp_minus(x, safe_max)
            run_max = new_max
        row_max = tl.max(run_max, axis=0)
        inv_sum = 1.0 / tl.sum(run_sum * _exp_minus(run_max, row_max), axis=0)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=-float("inf")).to(acc_ty)
            tl.store(Y + cols, _exp_minus(x, row_max) * inv_sum, mask=mask)


@triton.jit
def softmax_bwd_kernel(DY, Y, DX, stride_dy, stride_y, stride_dx, M, N: tl.constexpr, BLOCK_N: tl.constexpr,
                       ROWS: tl.constexpr, SINGLE_BLOCK: tl.constexpr, SEG: tl.constexpr):
    acc_ty = tl.float64 if Y.dtype.element_ty == tl.float64 else tl.float32
    if SINGLE_BLOCK:
        rows, cols = row_tile(tl.program_id(0) * ROWS, ROWS, BLOCK_N, SEG)
        rows = tl.minimum(rows, M - 1).to(tl.int64)  # rows past M repeat row M - 1: no row mask needed
        mask = cols < N
        y = by_row(tl.load(Y + rows * stride_y + cols, mask=mask, other=0.0).to(acc_ty), ROWS)
        dy = by_row(tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(acc_ty), ROWS)
        tl.store(DX + rows * stride_dx + cols, flat(y * (dy - _row_sum(y * dy))), mask=mask)
    else:
        row = tl.program_id(0).to(tl.int64)
        Y += row * stride_y
        DY += row * stride_dy
        DX += row * stride_dx
        acc = tl.zeros([BLOCK_N], dtype=acc_ty)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            y = tl.load(Y + cols, mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(DY + cols, mask=mask, other=0.0).to(acc_ty)
            acc += y * dy
        dot = tl.sum(acc, axis=0)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            y = tl.load(Y + cols, mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(DY + cols, mask=mask, other=0.0).to(acc_ty)
            tl.store(DX + cols, y * (dy - dot), mask=mask)


def _block(n: int):
    block = next_power_of_2(n)
    if block <= MAX_SINGLE_BLOCK:
        return block, True
    return STREAM_BLOCK, False


def _threads_per_row(block: int) -> int:
    """Threads that share a row (up to a warp): 8 columns or more each; 32 lanes on one row coalesce best."""
    return min(max(block // 8, 1), 32)


def _segment(block: int, vec: int) -> int:
    """SEG: adjacent columns one row's threads read together, vec per thread; a whole row past WARP_ROW."""
    if block > WARP_ROW:
        return block
    return min(_threads_per_row(block) * vec, block)


def _tile(block: int, single: bool):
    """(rows per program, warps): each thread holds one row (two rows per thread measured slower on an
    H200); rows wider than WARP_ROW take a program each."""
    if not single:
        return 1, warps_for_row(block)
    if block > WARP_ROW:
        return 1, min(block // (32 * ROW_ELEMENTS_PER_THREAD), 16)
    return 32 // _threads_per_row(block) * WARPS, WARPS


def _config(n: int, itemsize: int, *tensors_and_strides):
    block, single = _block(n)
    vec = vector_width(itemsize, *tensors_and_strides) if single else 1
    rows, warps = _tile(block, single)
    return dict(BLOCK_N=block, ROWS=rows, SINGLE_BLOCK=single, SEG=_segment(block, vec), num_warps=warps), rows


def softmax_fwd(x):
    """Softmax over the last dimension. x: contiguous, or (M, N) with unit column stride; y has x's shape."""
    M, stride_x = rows_of(x)
    N = x.shape[-1]
    y = new_output(x.shape, dtype=x.dtype, device=x.device)
    if M > 0 and N > 0:
        meta, rows = _config(N, x.element_size(), (x, stride_x), (y, N))
        softmax_fwd_kernel[(cdiv(M, rows),)](x, y, stride_x, N, M, N, **meta)
    return y


def softmax_bwd(dy, y):
    """dy, y: contiguous, or (M, N) with unit column stride; dx has y's shape."""
    M, stride_y = rows_of(y)
    stride_dy = rows_of(dy)[1]
    N = y.shape[-1]
    dx = new_output(y.shape, dtype=y.dtype, device=y.device)
    if M > 0 and N > 0:
        meta, rows = _config(N, y.element_size(), (y, stride_y), (dy, stride_dy), (dx, N))
        softmax_bwd_kernel[(cdiv(M, rows),)](dy, y, dx, stride_dy, stride_y, N, M, N, **meta)
    return dx


def aot_specializations():
    """(kernel, signature, constexprs, options) for each variant the launchers use: see tests/test_aot_compile.py."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        p = pointer(dtype)
        for n, vec in ((37, 1), (197, 1), (256, 16 // dtype.itemsize), (1000, 1), (8192, 16 // dtype.itemsize),
                       (40000, 1)):
            block, single = _block(n)
            rows, warps = _tile(block, single)
            constexprs = {"N": n, "BLOCK_N": block, "ROWS": rows, "SINGLE_BLOCK": single, "SEG": _segment(block, vec)}
            tile = {name: "constexpr" for name in constexprs}
            yield (softmax_fwd_kernel, {"X": p, "Y": p, "stride_x": "i32", "stride_y": "i32", "M": "i32", **tile},
                   constexprs, {"num_warps": warps})
            yield (softmax_bwd_kernel, {"DY": p, "Y": p, "DX": p, "stride_dy": "i32", "stride_y": "i32",
                                        "stride_dx": "i32", "M": "i32", **tile}, constexprs, {"num_warps": warps})
