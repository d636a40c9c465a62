"""Column sums: the second stage of the deterministic row reductions, and the bias gradient of a Linear.

The backward kernels of LayerNorm (dweight, dbias) and bias+GELU (dbias) write one partial
row per program, a few hundred to a few thousand rows of N columns. Summing them with
``tensor.sum(dim)`` runs one thread per output column down all the rows (a few hundred
threads for N = 384: 25-30 us on an H200); here each program sums BLOCK_P x BLOCK_N tiles of
a column block in a fixed order, then its BLOCK_P lanes, so the result does not depend on
scheduling. There are only N / BLOCK_N programs (12 for N = 384), so each must keep many loads
in flight: tiles of up to 256 partial rows, the next STAGES - 1 tiles loaded (cp.async) while one
is summed. (64-row tiles without pipelining took 15.7 us per call in the DINO step on an H200,
for about 3 MB of partial sums.)

``column_sum`` sums a tall (tokens, features) tensor, a Linear's bias gradient, with the same
kernel in two stages: programs over row splits x column blocks write partial rows, then
``sum_partials`` adds them. torch's dim-0 sum of the bf16 gradients took 53 us per call in the
same DINO step, about a quarter of the copy bandwidth.
"""
import torch
import triton
import triton.language as tl

from ._launch import accumulator_dtype, cdiv, next_power_of_2, pointer, reduction_programs

MAX_TILE = 8192  # elements per loaded tile: 32 per thread at 8 warps
ROW_BYTES = 128  # columns per program: one 128-byte line of each row
STAGES = 3


@triton.jit
def sum_partials_kernel(X, Y, P, N, stride_group, stride_row, rows_per_split,
                        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """Y[split, group, cols] = sum of X[group, rows of this split, cols], rows in a fixed order."""
    group = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, P)
    acc_ty = Y.dtype.element_ty
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=acc_ty)
    for start in tl.range(row_start, row_end, BLOCK_P, num_stages=STAGES):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows[:, None] < row_end) & (cols[None, :] < N)
        acc += tl.load(X + group * stride_group + rows[:, None] * stride_row + cols[None, :], mask=mask,
                       other=0.0).to(acc_ty)
    out = Y + (split * tl.num_programs(1) + group) * N
    tl.store(out + cols, tl.sum(acc, axis=0), mask=cols < N)


def _meta(rows: int, itemsize: int) -> dict:
    block_n = ROW_BYTES // itemsize
    block_p = min(max(next_power_of_2(rows), 16), MAX_TILE // block_n)
    return dict(BLOCK_P=block_p, BLOCK_N=block_n, STAGES=STAGES, num_warps=8 if block_p * block_n >= MAX_TILE else 4)


def _sum_rows(x, out, groups, rows, n, stride_group, stride_row, splits):
    rows_per_split = cdiv(rows, splits)
    meta = _meta(rows_per_split, x.element_size())
    grid = (cdiv(n, meta["BLOCK_N"]), groups, splits)
    sum_partials_kernel[grid](x, out, rows, n, stride_group, stride_row, rows_per_split, **meta)


def sum_partials(partial: torch.Tensor) -> torch.Tensor:
    """partial (P, N) or (G, P, N), contiguous: the sum over P, (N,) or (G, N), same dtype."""
    grouped = partial if partial.dim() == 3 else partial[None]
    G, P, N = grouped.shape
    out = torch.empty((G, N), dtype=partial.dtype, device=partial.device)
    if P == 0:
        out.zero_()
    elif N:
        _sum_rows(grouped, out, G, P, N, P * N, N, 1)
    return out if partial.dim() == 3 else out[0]


def column_sum(x: torch.Tensor) -> torch.Tensor:
    """x (M, N) with unit column stride: the sum over its rows, (N,) in float32 (float64 for float64 x)."""
    M, N = x.shape
    out_dtype = accumulator_dtype(x.dtype)
    if M == 0 or N == 0:
        return torch.zeros(N, dtype=out_dtype, device=x.device)
    column_blocks = cdiv(N, ROW_BYTES // x.element_size())
    splits = max(1, min(reduction_programs(M, x.device) // column_blocks, cdiv(M, 256)))
    partial = torch.empty((splits, N), dtype=out_dtype, device=x.device)
    _sum_rows(x, partial, 1, M, N, 0, x.stride(0), splits)
    return partial[0] if splits == 1 else sum_partials(partial)


def aot_specializations():
    """(kernel, signature, constexprs, options): see tests/test_aot_compile.py."""
    for x_dtype, y_dtype in ((torch.float32, torch.float32), (torch.float64, torch.float64),
                             (torch.bfloat16, torch.float32)):
        signature = {"X": pointer(x_dtype), "Y": pointer(y_dtype), "P": "i32", "N": "i32", "stride_group": "i32",
                     "stride_row": "i32", "rows_per_split": "i32", "BLOCK_P": "constexpr", "BLOCK_N": "constexpr",
                     "STAGES": "constexpr"}
        for rows in (16, 100, 5000):
            meta = _meta(rows, x_dtype.itemsize)
            warps = {"num_warps": meta.pop("num_warps")}
            yield sum_partials_kernel, signature, meta, warps
