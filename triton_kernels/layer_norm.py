"""LayerNorm over the last dimension, optionally fused with a residual add.

Forward, per row:  h = x (+ r * s);  y = (h - mean) * rstd * w + b
                   (s: an optional per-row scale of the residual, e.g. drop path's keep / keep_prob)
Backward, per row: xhat = (h - mean) * rstd,  g = dy * w
                   dh = rstd * (g - mean(g * xhat) * xhat - mean(g)) (+ dh_skip)
                   dr = dh * s (written in r's dtype: no separate cast pass)
                   dw = sum_rows dy * xhat,  db = sum_rows dy
dw and db are reduced deterministically: each program accumulates the rows it
owns into a private row of a partial buffer (dw rows, then db rows, in one
allocation), then one sum over the partial rows gives both.
Rows with a large mean and a tiny spread (mean 1e4, std 1e-2) keep their precision:
a first sum gives a rough mean m, values are shifted by it (h - m is exact for h near m),
and a second sum over the shifted values d gives the correction mean(d) and the variance
mean(d^2) - mean(d)^2, which cancels little since mean(d) is only m's rounding error. The
backward recomputes the shifted values the same way instead of subtracting a rounded mean.

Rows up to WARP_ROW wide are held in registers, ROWS rows per program and each row within one
warp: the tile's rows are segments of SEG columns (16-byte vectors on adjacent threads), tile
row k * ROWS + r holding segment k of row r. Triton puts warps along tile rows, so a row's
sums need shuffles only, no shared memory or barrier, and its rstd, mean and partial sums are
per-thread registers. N is a compile-time constant: segments wholly past N (the last quarter
of 768 in a 1024 block) compile to nothing. Wider rows (up to MAX_SINGLE_BLOCK) take a program
of several warps each (ROWS = 1, one segment); wider still, rows are streamed in STREAM_BLOCK chunks.
"""
import functools

import torch
import triton
import triton.language as tl

from ._launch import (accumulator_dtype, cdiv, new_output, next_power_of_2, pointer, reduction_programs, rows_of,
                      rows_per_reduction_program, timed_choice, tuning_enabled, vector_width, warps_for_row)
from ._rows import by_row, flat, row_tile
from .partial_sum import sum_partials

MAX_SINGLE_BLOCK = 8192
STREAM_BLOCK = 4096
WARP_ROW = 1024  # widest row one warp holds (32 columns per thread)
WARPS = 4  # per program, for rows a warp holds


@triton.jit
def _negative_zero():
    """-0.0, the identity of +: x + (-0.0) folds to x, x + 0.0 does not (x may be -0.0).
    Built from its bits: a -0.0 literal reaches the IR as +0.0."""
    return tl.full([], -2147483648, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _row_sum(x, in_row):
    """Sum over the columns of each row with in_row, as [1, rows, 1].

    Padded columns count as -0.0, which folds away: segments wholly past N cost nothing.
    Expanded in the reverse order of the sums, which keeps their register layout.
    """
    return tl.sum(tl.sum(tl.where(in_row, x, _negative_zero()), axis=0), axis=1)[:, None][None, :, :]


@triton.jit
def layer_norm_fwd_kernel(
    X, R, S, H, Y, W, B, Mean, Rstd,
    stride_x, stride_r, stride_h, stride_y,
    M, eps, N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_RESIDUAL_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, SEG: tl.constexpr, ROWS: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    acc_ty = Mean.dtype.element_ty
    if SINGLE_BLOCK:
        # Rows past M repeat row M - 1: they store the same values again, and no row mask is needed.
        row0 = tl.program_id(0) * ROWS
        rows, cols = row_tile(row0, ROWS, BLOCK_N, SEG)
        rows = tl.minimum(rows, M - 1).to(tl.int64)
        mask = cols < N
        x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(R + rows * stride_r + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL_SCALE:
                r = r.to(S.dtype.element_ty) * tl.load(S + rows)  # the same address along a row: one L1 line
            x += r
            tl.store(H + rows * stride_h + cols, x, mask=mask)
        x = by_row(x.to(acc_ty), ROWS)
        in_row = by_row(mask, ROWS)
        rough_mean = _row_sum(x, in_row) * (1.0 / N)
        d = x - rough_mean
        mean_d = _row_sum(d, in_row) * (1.0 / N)
        # max(): rounding may take the variance of a constant row just below 0
        rstd = tl.rsqrt(tl.maximum(_row_sum(d * d, in_row) * (1.0 / N) - mean_d * mean_d, 0.0) + eps)
        y = d * rstd - mean_d * rstd
        if HAS_WEIGHT:
            y *= by_row(tl.load(W + cols, mask=mask).to(acc_ty), ROWS)
        if HAS_BIAS:
            y += by_row(tl.load(B + cols, mask=mask).to(acc_ty), ROWS)
        tl.store(Y + rows * stride_y + cols, flat(y), mask=mask)
        stats = tl.minimum(row0 + tl.arange(0, ROWS), M - 1)[None, :, None]
        tl.store(Mean + stats, rough_mean + mean_d)
        tl.store(Rstd + stats, rstd)
    else:
        row = tl.program_id(0).to(tl.int64)
        if HAS_RESIDUAL_SCALE:
            scale = tl.load(S + row)
        total = tl.zeros([BLOCK_N], dtype=acc_ty)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
                if HAS_RESIDUAL_SCALE:
                    r = r.to(S.dtype.element_ty) * scale
                x += r
                tl.store(H + row * stride_h + cols, x, mask=mask)
            total += x.to(acc_ty)
        rough_mean = tl.sum(total, axis=0) * (1.0 / N)
        if HAS_RESIDUAL:
            src = H
            stride_src = stride_h
        else:
            src = X
            stride_src = stride_x
        sum_d = tl.zeros([BLOCK_N], dtype=acc_ty)
        sum_d2 = tl.zeros([BLOCK_N], dtype=acc_ty)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(src + row * stride_src + cols, mask=mask, other=0.0).to(acc_ty)
            d = tl.where(mask, x - rough_mean, 0.0)
            sum_d += d
            sum_d2 += d * d
        mean_d = tl.sum(sum_d, axis=0) * (1.0 / N)
        rstd = tl.rsqrt(tl.maximum(tl.sum(sum_d2, axis=0) * (1.0 / N) - mean_d * mean_d, 0.0) + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(src + row * stride_src + cols, mask=mask, other=0.0).to(acc_ty)
            y = ((x - rough_mean) - mean_d) * rstd
            if HAS_WEIGHT:
                y *= tl.load(W + cols, mask=mask).to(acc_ty)
            if HAS_BIAS:
                y += tl.load(B + cols, mask=mask).to(acc_ty)
            tl.store(Y + row * stride_y + cols, y, mask=mask)
        tl.store(Mean + row, rough_mean + mean_d)
        tl.store(Rstd + row, rstd)


@triton.jit
def layer_norm_bwd_kernel(
    DY, H, W, Rstd, DH_SKIP, S, DX, DR, DW_PARTIAL,
    stride_dy, stride_h, stride_skip, stride_dx, stride_dr,
    M, rows_per_program, N: tl.constexpr,
    HAS_SKIP_GRAD: tl.constexpr, HAS_RESIDUAL_GRAD: tl.constexpr, HAS_RESIDUAL_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, NEEDS_WB_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, SEG: tl.constexpr, ROWS: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    STAGES: tl.constexpr = 1,
):
    pid = tl.program_id(0)
    acc_ty = tl.float64 if H.dtype.element_ty == tl.float64 else tl.float32
    # int64 loop bounds make the row index int64 for the pointer arithmetic below.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    partial_row = pid.to(tl.int64) * N
    if NEEDS_WB_GRAD:  # the db rows follow the dw rows of every program
        DB_PARTIAL = DW_PARTIAL + tl.num_programs(0).to(tl.int64) * N

    if SINGLE_BLOCK:
        tile_rows, cols = row_tile(0, ROWS, BLOCK_N, SEG)
        col_mask = cols < N
        in_row = by_row(col_mask, ROWS)
        # Per thread and column, summed over the ROWS rows (across warps) once, at the end.
        dw_acc = tl.zeros([BLOCK_N // SEG, ROWS, SEG], dtype=acc_ty)
        db_acc = tl.zeros([BLOCK_N // SEG, ROWS, SEG], dtype=acc_ty)
        if HAS_WEIGHT:
            w = by_row(tl.load(W + cols, mask=col_mask, other=0.0).to(acc_ty), ROWS)
        # STAGES > 1: the loads of the next STAGES - 1 tiles are issued (cp.async into shared memory)
        # before this tile is reduced, instead of each tile waiting for its own loads.
        for row0 in tl.range(row_start, row_end, ROWS, num_stages=STAGES):
            rows = row0 + tile_rows
            mask = (rows < row_end) & col_mask
            h = by_row(tl.load(H + rows * stride_h + cols, mask=mask, other=0.0).to(acc_ty), ROWS)
            dy = by_row(tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(acc_ty), ROWS)
            # One rstd per tile row ([T, 1], in the tile's register layout: a [ROWS] vector would be
            # reshuffled through shared memory); a row's segments sit in the same thread, so the max
            # over them is in-thread and gives the row's value as [1, ROWS, 1].
            rstd = tl.load(Rstd + rows, mask=rows < row_end, other=0.0)
            rstd = tl.max(by_row(rstd, ROWS), axis=0)[None, :, :]
            # Rows past row_end load h = dy = 0 and add nothing to dw and db.
            d = h - _row_sum(h, in_row) * (1.0 / N)
            g = dy * w if HAS_WEIGHT else dy
            mean_d = _row_sum(d, in_row) * (1.0 / N)
            c2 = _row_sum(g, in_row) * (1.0 / N)
            # mean(xhat * g), with xhat = (d - mean_d) * rstd
            c1 = (_row_sum(d * g, in_row) * (1.0 / N) - mean_d * c2) * rstd
            xhat = (d - mean_d) * rstd
            dx = (g - (xhat * c1 + c2)) * rstd
            if HAS_SKIP_GRAD:
                dx += by_row(tl.load(DH_SKIP + rows * stride_skip + cols, mask=mask, other=0.0).to(acc_ty), ROWS)
            tl.store(DX + rows * stride_dx + cols, flat(dx), mask=mask)
            if HAS_RESIDUAL_GRAD:
                dr = flat(dx)
                if HAS_RESIDUAL_SCALE:
                    dr *= tl.load(S + rows, mask=rows < row_end, other=0.0)
                tl.store(DR + rows * stride_dr + cols, dr, mask=mask)
            dw_acc = tl.where(in_row, dw_acc + dy * xhat, dw_acc)
            db_acc = tl.where(in_row, db_acc + dy, db_acc)
        if NEEDS_WB_GRAD:
            seg_cols = (tl.arange(0, BLOCK_N // SEG) * SEG)[:, None] + tl.arange(0, SEG)[None, :]
            tl.store(DW_PARTIAL + partial_row + seg_cols, tl.sum(dw_acc, axis=1), mask=seg_cols < N)
            tl.store(DB_PARTIAL + partial_row + seg_cols, tl.sum(db_acc, axis=1), mask=seg_cols < N)
    else:
        # Wide rows: the partial buffers start at zero and this program is the only
        # one touching its partial row, so the read-modify-write needs no atomics.
        for row in range(row_start, row_end):
            rstd = tl.load(Rstd + row)
            if HAS_RESIDUAL_SCALE:
                scale = tl.load(S + row)
            total = tl.zeros([BLOCK_N], dtype=acc_ty)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                total += tl.load(H + row * stride_h + cols, mask=cols < N, other=0.0).to(acc_ty)
            rough_mean = tl.sum(total, axis=0) * (1.0 / N)
            sum_d = tl.zeros([BLOCK_N], dtype=acc_ty)
            sum_dg = tl.zeros([BLOCK_N], dtype=acc_ty)
            sum_g = tl.zeros([BLOCK_N], dtype=acc_ty)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(acc_ty)
                g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(acc_ty)
                if HAS_WEIGHT:
                    g *= tl.load(W + cols, mask=mask, other=0.0).to(acc_ty)
                d = tl.where(mask, h - rough_mean, 0.0)
                sum_d += d
                sum_dg += d * g
                sum_g += g
            mean_d = tl.sum(sum_d, axis=0) * (1.0 / N)
            c2 = tl.sum(sum_g, axis=0) * (1.0 / N)
            c1 = (tl.sum(sum_dg, axis=0) * (1.0 / N) - mean_d * c2) * rstd
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(acc_ty)
                dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(acc_ty)
                xhat = ((h - rough_mean) - mean_d) * rstd
                g = dy
                if HAS_WEIGHT:
                    g = dy * tl.load(W + cols, mask=mask, other=0.0).to(acc_ty)
                dx = (g - (xhat * c1 + c2)) * rstd
                if HAS_SKIP_GRAD:
                    dx += tl.load(DH_SKIP + row * stride_skip + cols, mask=mask, other=0.0).to(acc_ty)
                tl.store(DX + row * stride_dx + cols, dx, mask=mask)
                if HAS_RESIDUAL_GRAD:
                    if HAS_RESIDUAL_SCALE:
                        dx *= scale
                    tl.store(DR + row * stride_dr + cols, dx, mask=mask)
                if NEEDS_WB_GRAD:
                    dw = tl.load(DW_PARTIAL + partial_row + cols, mask=mask)
                    tl.store(DW_PARTIAL + partial_row + cols, dw + dy * xhat, mask=mask)
                    db = tl.load(DB_PARTIAL + partial_row + cols, mask=mask)
                    tl.store(DB_PARTIAL + partial_row + cols, db + dy, mask=mask)


@functools.lru_cache(maxsize=256)
def _config(n: int, vec: int):
    """Launch meta-parameters for rows of n elements read vec at a time (see the module docstring)."""
    block = next_power_of_2(n)
    if block > MAX_SINGLE_BLOCK:
        return dict(BLOCK_N=STREAM_BLOCK, SEG=STREAM_BLOCK, ROWS=1, SINGLE_BLOCK=False,
                    num_warps=warps_for_row(STREAM_BLOCK))
    if block > WARP_ROW:
        # One row per program, the whole row one tile row: its warps meet in shared memory
        # (splitting it into tile rows on several warps reshuffles the tile through shared memory).
        return dict(BLOCK_N=block, SEG=block, ROWS=1, SINGLE_BLOCK=True, num_warps=warps_for_row(block))
    # A warp reads 32 * vec adjacent columns. A narrower segment that tiles n exactly leaves no
    # column masked at run time (384 = 3 x 128: two rows per warp, 24 columns per thread).
    seg = min(32 * vec, block)
    seg = next((s for s in (seg, seg // 2, seg // 4) if s >= vec and n % s == 0 and block // s * vec <= 32), seg)
    return dict(BLOCK_N=block, SEG=seg, ROWS=WARPS * max(32 * vec // seg, 1), SINGLE_BLOCK=True, num_warps=WARPS)


def layer_norm_fwd(x, weight, bias, eps, residual=None, out_dtype=None, residual_scale=None):
    """x, residual: contiguous, or (M, N) with unit column stride. Returns y, h (or None), mean, rstd.

    Outputs have x's shape (statistics: without the last dimension). h = x + residual (times
    ``residual_scale``, one float32 per row, contiguous, when given) has the promoted dtype of
    the two; y has ``out_dtype`` (default: h's).
    """
    M, stride_x = rows_of(x)
    N = x.shape[-1]
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = new_output(x.shape, dtype=out_dtype or h_dtype, device=x.device)
    h = new_output(x.shape, dtype=h_dtype, device=x.device) if residual is not None else None
    stats_dtype = accumulator_dtype(h_dtype)
    mean = new_output(x.shape[:-1], dtype=stats_dtype, device=x.device)
    rstd = new_output(x.shape[:-1], dtype=stats_dtype, device=x.device)
    if M == 0:
        return y, h, mean, rstd
    stride_r = rows_of(residual)[1] if residual is not None else 0
    itemsize = min(t.element_size() for t in (x, residual, y) if t is not None)
    meta = _config(N, vector_width(itemsize, (x, stride_x), (residual, stride_r), (h, N), (y, N), (weight, 0),
                                   (bias, 0)))
    layer_norm_fwd_kernel[(cdiv(M, meta["ROWS"]),)](
        x, residual, residual_scale, h, y, weight, bias, mean, rstd,
        stride_x, stride_r, N, N, M, eps, N,
        HAS_RESIDUAL=residual is not None, HAS_RESIDUAL_SCALE=residual_scale is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **meta,
    )
    return y, h, mean, rstd


# The backward's launch: the layout of _config, or for rows that a warp holds two or more of, one
# row per warp in a wider segment (fewer registers per thread: 149 instead of 221 for N = 384 with
# an fp32 stream and a bf16 gradient, sm_90); the row loop's loads not pipelined or pipelined one or
# two tiles ahead; a grid for 32 resident warps per SM (more programs, fewer tiles each), 12 or 8
# (one wave of the programs that fit at ~150 or ~230 registers, each with a tile loop long enough
# to pipeline). The first candidate is the heuristic choice; on CUDA, unless tuning is off
# (_launch.tuning_enabled), the candidates are timed once per (N, dtypes, options, power-of-two
# class of M) and the fastest kept.
BWD_STAGES = (1, 2, 3)
BWD_WARPS_PER_SM = (32, 12, 8)
BWD_SHARED_MEMORY_BUDGET = 160 * 1024  # under sm_80's 163 KB


@functools.lru_cache(maxsize=256)
def _bwd_candidates(n: int, vec: int, tile_bytes_per_element: int):
    """(kernel meta-parameters, warps per SM) choices for the backward, the heuristic one first (see above)."""
    base = _config(n, vec)
    if not base["SINGLE_BLOCK"]:
        return ((dict(base, STAGES=1), 32),)
    layouts = [base]
    if base["ROWS"] > base["num_warps"] and 32 * vec <= base["BLOCK_N"]:
        layouts.append(dict(base, SEG=32 * vec, ROWS=base["num_warps"]))
    return tuple((dict(layout, STAGES=stages), warps_per_sm)
                 for warps_per_sm in BWD_WARPS_PER_SM for layout in layouts for stages in BWD_STAGES
                 if stages * layout["ROWS"] * layout["BLOCK_N"] * tile_bytes_per_element <= BWD_SHARED_MEMORY_BUDGET)


def _bwd_rows_per_program(M, meta, warps_per_sm, device):
    """Rows each backward program reduces into its partial dw/db rows (wide rows: one program per
    row-parallel slot of reduction_programs)."""
    if not meta["SINGLE_BLOCK"]:
        return cdiv(M, reduction_programs(M, device))
    return rows_per_reduction_program(M, meta["ROWS"], meta["num_warps"], device, warps_per_sm)


def layer_norm_bwd(dy, h, weight, rstd, skip_grad=None, needs_weight_grad=True, residual_dtype=None,
                   residual_scale=None):
    """Gradients of layer_norm_fwd. ``h`` is the normalised input (x, or x + residual).

    dy, h, skip_grad: contiguous, or (M, N) with unit column stride. The mean is recomputed
    from h (see the module docstring), so only rstd is read. ``skip_grad`` is the gradient
    that reached h through the residual stream; it is added to dx. Returns dx (h's shape),
    the residual's gradient dx * residual_scale in ``residual_dtype`` (None without
    residual_dtype), and the (2, N) float32/64 sums [dweight, dbias], or None.
    """
    M, stride_h = rows_of(h)
    N = h.shape[-1]
    dx = new_output(h.shape, dtype=h.dtype, device=h.device)
    dr = new_output(h.shape, dtype=residual_dtype, device=h.device) if residual_dtype is not None else None
    acc = accumulator_dtype(h.dtype)
    if M == 0:
        return dx, dr, (torch.zeros((2, N), dtype=acc, device=h.device) if needs_weight_grad else None)
    stride_dy = rows_of(dy)[1]
    stride_skip = rows_of(skip_grad)[1] if skip_grad is not None else 0
    loaded = [t for t in (dy, h, skip_grad) if t is not None]
    itemsize = min(t.element_size() for t in (*loaded, dr) if t is not None)
    vec = vector_width(itemsize, (dy, stride_dy), (h, stride_h), (skip_grad, stride_skip), (dx, N), (dr, N),
                       (weight, 0))
    flags = dict(HAS_SKIP_GRAD=skip_grad is not None, HAS_RESIDUAL_GRAD=dr is not None,
                 HAS_RESIDUAL_SCALE=residual_scale is not None, HAS_WEIGHT=weight is not None,
                 NEEDS_WB_GRAD=needs_weight_grad)

    def launch(candidate):
        """Writes dx and dr, returns the summed [dweight, dbias] (or None): the same for every candidate."""
        meta, warps_per_sm = candidate
        rows_per_program = _bwd_rows_per_program(M, meta, warps_per_sm, h.device)
        programs = cdiv(M, rows_per_program)
        partial = None
        if needs_weight_grad:
            alloc = new_output if meta["SINGLE_BLOCK"] else (lambda shape, **kw: torch.zeros(shape, **kw))
            partial = alloc((2, programs, N), dtype=acc, device=h.device)
        layer_norm_bwd_kernel[(programs,)](
            dy, h, weight, rstd, skip_grad, residual_scale, dx, dr, partial,
            stride_dy, stride_h, stride_skip, N, N, M, rows_per_program, N, **flags, **meta,
        )
        return sum_partials(partial) if needs_weight_grad else None

    candidates = _bwd_candidates(N, vec, sum(t.element_size() for t in loaded))
    choice = candidates[0]
    if len(candidates) > 1 and h.device.type == "cuda" and tuning_enabled():
        key = ("layer_norm_bwd", N, vec, *(t.dtype for t in loaded), residual_dtype, tuple(flags.values()),
               next_power_of_2(M), h.device.index)
        choice = timed_choice(key, candidates, launch, h.device.index)
    return dx, dr, launch(choice)


def aot_specializations():
    """(kernel, signature, constexprs, options) for each variant the launchers use: see tests/test_aot_compile.py."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        p, stats = pointer(dtype), pointer(accumulator_dtype(dtype))
        for n, residual, vec in ((384, False, 16 // dtype.itemsize), (768, False, 16 // dtype.itemsize),
                                 (768, True, 16 // dtype.itemsize), (197, True, 1), (4096, False, 16 // dtype.itemsize),
                                 (10000, True, 1)):
            meta = dict(_config(n, vec))  # a copy: _config's result is cached
            warps = {"num_warps": meta.pop("num_warps")}
            res_ptr = p if residual else "constexpr"
            signature = {"X": p, "R": res_ptr, "S": "constexpr", "H": res_ptr, "Y": p, "W": p, "B": p, "Mean": stats, "Rstd": stats,
                         "stride_x": "i32", "stride_r": "i32", "stride_h": "i32", "stride_y": "i32",
                         "M": "i32", "eps": "fp32", "N": "constexpr", "HAS_RESIDUAL": "constexpr",
                         "HAS_RESIDUAL_SCALE": "constexpr", "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr", "SEG": "constexpr",
                         "ROWS": "constexpr", "SINGLE_BLOCK": "constexpr"}
            constexprs = {"N": n, "HAS_RESIDUAL": residual, "HAS_RESIDUAL_SCALE": False, "S": None, "HAS_WEIGHT": True,
                          "HAS_BIAS": True, **meta}
            if not residual:
                constexprs.update(R=None, H=None)
            yield layer_norm_fwd_kernel, signature, constexprs, warps
            signature = {"DY": p, "H": p, "W": p, "Rstd": stats, "DH_SKIP": res_ptr, "S": "constexpr", "DX": p,
                         "DR": "constexpr", "DW_PARTIAL": stats, "stride_dy": "i32", "stride_h": "i32",
                         "stride_skip": "i32", "stride_dx": "i32", "stride_dr": "i32", "M": "i32",
                         "rows_per_program": "i32", "N": "constexpr", "HAS_SKIP_GRAD": "constexpr",
                         "HAS_RESIDUAL_GRAD": "constexpr", "HAS_RESIDUAL_SCALE": "constexpr", "HAS_WEIGHT": "constexpr",
                         "NEEDS_WB_GRAD": "constexpr", "BLOCK_N": "constexpr", "SEG": "constexpr", "ROWS": "constexpr",
                         "SINGLE_BLOCK": "constexpr", "STAGES": "constexpr"}
            # x + residual in one dtype, unscaled: the residual's gradient is dx, not written twice
            constexprs = {"N": n, "HAS_SKIP_GRAD": residual, "HAS_RESIDUAL_GRAD": False, "HAS_RESIDUAL_SCALE": False,
                          "S": None, "HAS_WEIGHT": True, "NEEDS_WB_GRAD": True, "DR": None}
            if not residual:
                constexprs.update(DH_SKIP=None)
            tile_bytes = (3 if residual else 2) * dtype.itemsize
            candidates = _bwd_candidates(n, vec, tile_bytes)
            if not (n == 768 and residual):  # every layout and pipeline depth tuning may pick, for one width
                candidates = candidates[:1]
            yield from _bwd_variants(signature, constexprs, candidates)
    # The DINO step's case: an fp32 residual stream with a bf16 gradient and branch, N = 384
    signature = dict(signature, DY="*bf16", H="*fp32", W="*fp32", Rstd="*fp32", DH_SKIP="*fp32", S="*fp32", DX="*fp32",
                     DR="*bf16", DW_PARTIAL="*fp32")
    constexprs = {"N": 384, "HAS_SKIP_GRAD": True, "HAS_RESIDUAL_GRAD": True, "HAS_RESIDUAL_SCALE": True,
                  "HAS_WEIGHT": True, "NEEDS_WB_GRAD": True}
    yield from _bwd_variants(signature, constexprs, _bwd_candidates(384, 8, 2 + 4 + 4))


def _bwd_variants(signature, constexprs, candidates):
    """One AOT variant per distinct kernel meta-parameter set among the backward's launch candidates."""
    variants = {tuple(m.items()): m for m, _ in candidates}
    for meta in map(dict, variants.values()):
        warps = {"num_warps": meta.pop("num_warps")}
        yield layer_norm_bwd_kernel, signature, {**constexprs, **meta}, warps
