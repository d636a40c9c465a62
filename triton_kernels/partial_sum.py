"""Second stage of the deterministic row reductions: sum the per-program partial rows.

The backward kernels of LayerNorm (dweight, dbias) and bias+GELU (dbias) write one partial
row per program, a few hundred to a few thousand rows of N columns. Summing them with
``tensor.sum(dim)`` runs one thread per output column down all the rows (a few hundred
threads for N = 384: 25-30 us on an H200); here each program sums BLOCK_P x BLOCK_N tiles of
a column block in a fixed order, then its BLOCK_P lanes, so the result does not depend on
scheduling.
"""
import torch
import triton
import triton.language as tl

from ._launch import cdiv, pointer

BLOCK_P = 64
BLOCK_N = 32  # 128 bytes of float32 per partial row and load


@triton.jit
def sum_partials_kernel(X, Y, P, N, stride_group, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    group = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=Y.dtype.element_ty)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows[:, None] < P) & (cols[None, :] < N)
        acc += tl.load(X + group * stride_group + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask,
                       other=0.0)
    tl.store(Y + group * N + cols, tl.sum(acc, axis=0), mask=cols < N)


def sum_partials(partial: torch.Tensor) -> torch.Tensor:
    """partial (P, N) or (G, P, N), contiguous: the sum over P, (N,) or (G, N), same dtype."""
    grouped = partial if partial.dim() == 3 else partial[None]
    G, P, N = grouped.shape
    out = torch.empty((G, N), dtype=partial.dtype, device=partial.device)
    if P == 0:
        out.zero_()
    elif N:
        sum_partials_kernel[(cdiv(N, BLOCK_N), G)](grouped, out, P, N, P * N, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
                                                   num_warps=4)
    return out if partial.dim() == 3 else out[0]


def aot_specializations():
    """(kernel, signature, constexprs, options): see tests/test_aot_compile.py."""
    for dtype in (torch.float32, torch.float64):
        p = pointer(dtype)
        yield (sum_partials_kernel, {"X": p, "Y": p, "P": "i32", "N": "i32", "stride_group": "i32",
                                     "BLOCK_P": "constexpr", "BLOCK_N": "constexpr"},
               {"BLOCK_P": BLOCK_P, "BLOCK_N": BLOCK_N}, {"num_warps": 4})
