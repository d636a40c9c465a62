"""Row tiles for row-wise kernels (softmax, LayerNorm): several rows per program, each row within one warp.

A program's ROWS rows are cut into segments of SEG adjacent columns; tile row k * ROWS + r holds
segment k of row r. Triton lays a 2-D tile out with threads along its contiguous columns and
warps along tile rows, so the rows spread over lanes and warps and all segments of a row stay in
the same threads: viewed as [segments, rows, columns] (``by_row``, same registers), sums over axes 0
and 2 are per row and need warp shuffles only, no shared memory or barrier. (A 3-D pointer tile
built directly is not laid out that way by Triton 3.6: it put warps along the segments, and a
softmax built on it ran 4 to 15 times slower on an H200.)
"""
import triton
import triton.language as tl


@triton.jit
def row_tile(row0, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SEG: tl.constexpr):
    """Rows ([T, 1], from row0) and columns ([T, SEG]) of a tile of T = BLOCK_N // SEG * ROWS tile rows."""
    t = tl.arange(0, BLOCK_N // SEG * ROWS)
    rows = row0 + (t % ROWS)[:, None]
    cols = (t // ROWS * SEG)[:, None] + tl.arange(0, SEG)[None, :]
    return rows, cols


@triton.jit
def by_row(x, ROWS: tl.constexpr):
    """The tile as [segments, rows, columns] (same registers): reductions over axes 0 and 2 are per row."""
    return tl.reshape(x, [x.shape[0] // ROWS, ROWS, x.shape[1]])


@triton.jit
def flat(x):
    """by_row's inverse: the [T, SEG] tile to load from and store to."""
    return tl.reshape(x, [x.shape[0] * x.shape[1], x.shape[2]])
