"""LayerNorm over the last dimension, optionally fused with a residual add.

Forward, per row:  h = x (+ r);  y = (h - mean) * rstd * w + b
Backward, per row: xhat = (h - mean) * rstd,  g = dy * w
                   dh = rstd * (g - mean(g * xhat) * xhat - mean(g)) (+ dh_skip)
                   dw = sum_rows dy * xhat,  db = sum_rows dy
dw and db are reduced deterministically: each program accumulates the rows it
owns into a private row of a partial buffer (dw rows, then db rows, in one
allocation), then one sum over the partial rows gives both.
Rows with a large mean and a tiny spread (mean 1e4, std 1e-2) keep their precision:
values are shifted by the row's first element before any sum (x - shift is exact for
nearby floats), the variance is a second pass over centred values, and the backward
recomputes the centred values the same way instead of subtracting a rounded mean.
"""
import torch
import triton
import triton.language as tl

from ._launch import (accumulator_dtype, cdiv, new_output, next_power_of_2, pointer, reduction_programs, rows_of,
                      warps_for_row)

# Rows up to this width live in registers; wider rows are streamed in blocks.
MAX_SINGLE_BLOCK = 8192
STREAM_BLOCK = 4096


@triton.jit
def layer_norm_fwd_kernel(
    X, R, H, Y, W, B, Mean, Rstd,
    stride_x, stride_r, stride_h, stride_y,
    N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc_ty = Mean.dtype.element_ty
    if HAS_RESIDUAL:
        src = H
        stride_src = stride_h
    else:
        src = X
        stride_src = stride_x

    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            tl.store(H + row * stride_h + cols, x, mask=mask)
        x = x.to(acc_ty)
        shift = tl.sum(tl.where(cols == 0, x, 0.0), axis=0)
        d = tl.where(mask, x - shift, 0.0)
        mean_d = tl.sum(d, axis=0) / N
        xc = tl.where(mask, d - mean_d, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        mean = shift + mean_d
        y = xc * rstd
        if HAS_WEIGHT:
            y *= tl.load(W + cols, mask=mask).to(acc_ty)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask).to(acc_ty)
        tl.store(Y + row * stride_y + cols, y, mask=mask)
    else:
        shift = tl.load(X + row * stride_x)
        if HAS_RESIDUAL:
            shift += tl.load(R + row * stride_r)
        shift = shift.to(acc_ty)
        total = tl.zeros([BLOCK_N], dtype=acc_ty)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
                tl.store(H + row * stride_h + cols, x, mask=mask)
            total += tl.where(mask, x.to(acc_ty) - shift, 0.0)
        mean_d = tl.sum(total, axis=0) / N
        total = tl.zeros([BLOCK_N], dtype=acc_ty)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(src + row * stride_src + cols, mask=mask, other=0.0).to(acc_ty)
            xc = tl.where(mask, (x - shift) - mean_d, 0.0)
            total += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(total, axis=0) / N + eps)
        mean = shift + mean_d
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(src + row * stride_src + cols, mask=mask, other=0.0).to(acc_ty)
            y = ((x - shift) - mean_d) * rstd
            if HAS_WEIGHT:
                y *= tl.load(W + cols, mask=mask).to(acc_ty)
            if HAS_BIAS:
                y += tl.load(B + cols, mask=mask).to(acc_ty)
            tl.store(Y + row * stride_y + cols, y, mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def layer_norm_bwd_kernel(
    DY, H, W, Rstd, DH_SKIP, DX, DW_PARTIAL,
    stride_dy, stride_h, stride_skip, stride_dx,
    M, N, rows_per_program,
    HAS_SKIP_GRAD: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEEDS_WB_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
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
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(acc_ty)
        dw_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
        db_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
        for row in range(row_start, row_end):
            h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(acc_ty)
            rstd = tl.load(Rstd + row)
            shift = tl.sum(tl.where(cols == 0, h, 0.0), axis=0)
            d = tl.where(mask, h - shift, 0.0)
            xhat = tl.where(mask, (d - tl.sum(d, axis=0) / N) * rstd, 0.0)
            g = dy * w if HAS_WEIGHT else dy
            c1 = tl.sum(xhat * g, axis=0) / N
            c2 = tl.sum(g, axis=0) / N
            dx = (g - (xhat * c1 + c2)) * rstd
            if HAS_SKIP_GRAD:
                dx += tl.load(DH_SKIP + row * stride_skip + cols, mask=mask, other=0.0).to(acc_ty)
            tl.store(DX + row * stride_dx + cols, dx, mask=mask)
            dw_acc += dy * xhat
            db_acc += dy
        if NEEDS_WB_GRAD:
            tl.store(DW_PARTIAL + partial_row + cols, dw_acc, mask=mask)
            tl.store(DB_PARTIAL + partial_row + cols, db_acc, mask=mask)
    else:
        # Wide rows: the partial buffers start at zero and this program is the only
        # one touching its partial row, so the read-modify-write needs no atomics.
        for row in range(row_start, row_end):
            rstd = tl.load(Rstd + row)
            shift = tl.load(H + row * stride_h).to(acc_ty)
            sum_d = tl.zeros([BLOCK_N], dtype=acc_ty)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                h = tl.load(H + row * stride_h + cols, mask=cols < N, other=0.0).to(acc_ty)
                sum_d += tl.where(cols < N, h - shift, 0.0)
            mean_d = tl.sum(sum_d, axis=0) / N
            sum_gx = tl.zeros([BLOCK_N], dtype=acc_ty)
            sum_g = tl.zeros([BLOCK_N], dtype=acc_ty)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(acc_ty)
                dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(acc_ty)
                xhat = tl.where(mask, ((h - shift) - mean_d) * rstd, 0.0)
                if HAS_WEIGHT:
                    dy *= tl.load(W + cols, mask=mask, other=0.0).to(acc_ty)
                sum_gx += xhat * dy
                sum_g += dy
            c1 = tl.sum(sum_gx, axis=0) / N
            c2 = tl.sum(sum_g, axis=0) / N
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(acc_ty)
                dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(acc_ty)
                xhat = tl.where(mask, ((h - shift) - mean_d) * rstd, 0.0)
                g = dy
                if HAS_WEIGHT:
                    g = dy * tl.load(W + cols, mask=mask, other=0.0).to(acc_ty)
                dx = (g - (xhat * c1 + c2)) * rstd
                if HAS_SKIP_GRAD:
                    dx += tl.load(DH_SKIP + row * stride_skip + cols, mask=mask, other=0.0).to(acc_ty)
                tl.store(DX + row * stride_dx + cols, dx, mask=mask)
                if NEEDS_WB_GRAD:
                    dw = tl.load(DW_PARTIAL + partial_row + cols, mask=mask)
                    tl.store(DW_PARTIAL + partial_row + cols, dw + dy * xhat, mask=mask)
                    db = tl.load(DB_PARTIAL + partial_row + cols, mask=mask)
                    tl.store(DB_PARTIAL + partial_row + cols, db + dy, mask=mask)


def _block(n: int):
    block = next_power_of_2(n)
    if block <= MAX_SINGLE_BLOCK:
        return block, True
    return STREAM_BLOCK, False


def layer_norm_fwd(x, weight, bias, eps, residual=None, out_dtype=None):
    """x, residual: contiguous, or (M, N) with unit column stride. Returns y, h (or None), mean, rstd.

    Outputs have x's shape (statistics: without the last dimension). h = x + residual has
    the promoted dtype of the two; y has ``out_dtype`` (default: h's).
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
    block, single = _block(N)
    layer_norm_fwd_kernel[(M,)](
        x, residual, h, y, weight, bias, mean, rstd,
        stride_x, rows_of(residual)[1] if residual is not None else 0, N, N,
        N, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block, SINGLE_BLOCK=single, num_warps=warps_for_row(block),
    )
    return y, h, mean, rstd


def layer_norm_bwd(dy, h, weight, rstd, skip_grad=None, needs_weight_grad=True):
    """Gradients of layer_norm_fwd. ``h`` is the normalised input (x, or x + residual).

    dy, h, skip_grad: contiguous, or (M, N) with unit column stride. The mean is recomputed
    from h (see the module docstring), so only rstd is read. ``skip_grad`` is the gradient
    that reached h through the residual stream; it is added to dx. Returns dx (h's shape)
    and the (2, N) float32/64 sums [dweight, dbias], or None.
    """
    M, stride_h = rows_of(h)
    N = h.shape[-1]
    dx = new_output(h.shape, dtype=h.dtype, device=h.device)
    acc = accumulator_dtype(h.dtype)
    if M == 0:
        return dx, (torch.zeros((2, N), dtype=acc, device=h.device) if needs_weight_grad else None)
    block, single = _block(N)
    programs = reduction_programs(M, h.device)
    rows_per_program = cdiv(M, programs)
    programs = cdiv(M, rows_per_program)
    partial = None
    if needs_weight_grad:
        alloc = new_output if single else (lambda shape, **kw: torch.zeros(shape, **kw))
        partial = alloc((2, programs, N), dtype=acc, device=h.device)
    layer_norm_bwd_kernel[(programs,)](
        dy, h, weight, rstd, skip_grad, dx, partial,
        rows_of(dy)[1], stride_h, rows_of(skip_grad)[1] if skip_grad is not None else 0, N,
        M, N, rows_per_program,
        HAS_SKIP_GRAD=skip_grad is not None, HAS_WEIGHT=weight is not None, NEEDS_WB_GRAD=needs_weight_grad,
        BLOCK_N=block, SINGLE_BLOCK=single, num_warps=warps_for_row(block),
    )
    return dx, (partial.sum(1) if needs_weight_grad else None)


def aot_specializations():
    """(kernel, signature, constexprs, options) for each variant the launchers use: see tests/test_aot_compile.py."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        p, stats = pointer(dtype), pointer(accumulator_dtype(dtype))
        for n, residual in ((384, False), (768, True), (4096, False), (10000, True)):
            block, single = _block(n)
            res_ptr = p if residual else "constexpr"
            signature = {"X": p, "R": res_ptr, "H": res_ptr, "Y": p, "W": p, "B": p, "Mean": stats, "Rstd": stats,
                         "stride_x": "i32", "stride_r": "i32", "stride_h": "i32", "stride_y": "i32",
                         "N": "i32", "eps": "fp32", "HAS_RESIDUAL": "constexpr", "HAS_WEIGHT": "constexpr",
                         "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr", "SINGLE_BLOCK": "constexpr"}
            constexprs = {"HAS_RESIDUAL": residual, "HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_N": block,
                          "SINGLE_BLOCK": single}
            if not residual:
                constexprs.update(R=None, H=None)
            yield layer_norm_fwd_kernel, signature, constexprs, {"num_warps": warps_for_row(block)}
            signature = {"DY": p, "H": p, "W": p, "Rstd": stats, "DH_SKIP": res_ptr, "DX": p,
                         "DW_PARTIAL": stats, "stride_dy": "i32", "stride_h": "i32",
                         "stride_skip": "i32", "stride_dx": "i32", "M": "i32", "N": "i32",
                         "rows_per_program": "i32", "HAS_SKIP_GRAD": "constexpr", "HAS_WEIGHT": "constexpr",
                         "NEEDS_WB_GRAD": "constexpr", "BLOCK_N": "constexpr", "SINGLE_BLOCK": "constexpr"}
            constexprs = {"HAS_SKIP_GRAD": residual, "HAS_WEIGHT": True, "NEEDS_WB_GRAD": True, "BLOCK_N": block,
                          "SINGLE_BLOCK": single}
            if not residual:
                constexprs["DH_SKIP"] = None
            yield layer_norm_bwd_kernel, signature, constexprs, {"num_warps": warps_for_row(block)}
