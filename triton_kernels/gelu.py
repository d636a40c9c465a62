"""GELU, exact (erf) and tanh forms, plain and fused with a bias add; forward and backward.

exact: gelu(x) = x * Phi(x),                  gelu'(x) = Phi(x) + x * phi(x)
tanh:  gelu(x) = x/2 * (1 + tanh(u)) = x * sigmoid(2u),  u = sqrt(2/pi) * (x + 0.044715 x^3)
       gelu'(x) = s + 2 x s (1 - s) * sqrt(2/pi) * (1 + 3 * 0.044715 x^2),  s = sigmoid(2u)
The bias variant computes gelu(x + b) over rows of width N (the sum in float32, not
rounded to the input dtype first); its backward also
reduces db = sum_rows(dy * gelu'(x + b)) through per-program partial rows.
In float32 (the arithmetic for 16-bit inputs too) the exact form costs one exp2 and one rsqrt
(MUFU instructions) and a degree-7 polynomial per element, about 20 instructions in all.
gelu(-inf) is 0 (the limit; torch's x * Phi(x) gives -inf * 0 = NaN) and gelu(inf) is inf.
"""
import torch
import triton
import triton.language as tl

from ._launch import (accumulator_dtype, cdiv, new_output, next_power_of_2, pointer, rows_of,
                      rows_per_reduction_program)
from .partial_sum import sum_partials

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
TANH_COEF = tl.constexpr(0.044715)
MINUS_2_LOG2E = tl.constexpr(-2.0 * 1.4426950408889634)
# float32 exact GELU. phi(x) = exp2(-x^2 * HALF_LOG2E - LOG2_SQRT_2PI); the upper tail
# Q(a) = 1 - Phi(a) = phi(a) * P(t), t = 1 / (1 + p a), with p and the degree-7 P fitted here
# (minimax in relative error) to the Mills ratio Q / phi on 0 <= a <= 13.2 (Q underflows
# beyond): relative error 2.6e-7, so Q keeps its relative accuracy deep in the left tail.
HALF_LOG2E = tl.constexpr(0.7213475204444817)
LOG2_SQRT_2PI = tl.constexpr(1.3257480647361595)
TAIL_2P = tl.constexpr(2 * 0.34789066)  # TAIL_P = 0.34789066: (1 + p a)^2 = 1 + 2p a + p^2 a^2
TAIL_P_SQ = tl.constexpr(0.34789066 * 0.34789066)
TAIL_C0 = tl.constexpr(-8.722713471556135e-05)
TAIL_C1 = tl.constexpr(0.349844698053124)
TAIL_C2 = tl.constexpr(0.3295251007440709)
TAIL_C3 = tl.constexpr(0.40008227628474696)
TAIL_C4 = tl.constexpr(-0.06574147825228276)
TAIL_C5 = tl.constexpr(0.6326416659429837)
TAIL_C6 = tl.constexpr(-0.515782351090773)
TAIL_C7 = tl.constexpr(0.12283177201264206)
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
# 32 elements per thread (four 16-byte loads of bf16): the block's address and mask setup is
# shared by more elements.
ELEMENTWISE_BLOCK = 4096
ELEMENTWISE_WARPS = 4


@triton.jit
def _erfc_from(z, t):
    """erfc(z) for z >= 0 given t = 1/(1 + z/2): Chebyshev fit of Numerical Recipes, fractional error < 1.2e-7."""
    poly = -0.82215223 + t * 0.17087277
    poly = 1.48851587 + t * poly
    poly = -1.13520398 + t * poly
    poly = 0.27886807 + t * poly
    poly = -0.18628806 + t * poly
    poly = 0.09678418 + t * poly
    poly = 0.37409196 + t * poly
    poly = 1.00002368 + t * poly
    return t * tl.exp(-z * z - 1.26551223 + t * poly)


@triton.jit
def _pdf_and_tail(x):
    """float32 (phi(x), Q(|x|)) with one exp2 and one rsqrt, single MUFU instructions each.

    x^2 is exact for 16-bit inputs, so the exponent is rounded once. t = rsqrt((1 + p|x|)^2):
    Triton's division and reciprocal carry a range fix-up of ~8 instructions, rsqrt has none.
    """
    # Tensors on the left: in the interpreter a tl.constexpr on the left wraps the result.
    x2 = x * x
    pdf = tl.exp2(x2 * -HALF_LOG2E - LOG2_SQRT_2PI)
    t = tl.rsqrt(x2 * TAIL_P_SQ + (tl.abs(x) * TAIL_2P + 1.0))
    poly = t * TAIL_C7 + TAIL_C6
    poly = t * poly + TAIL_C5
    poly = t * poly + TAIL_C4
    poly = t * poly + TAIL_C3
    poly = t * poly + TAIL_C2
    poly = t * poly + TAIL_C1
    poly = t * poly + TAIL_C0
    return pdf, pdf * poly


@triton.jit
def _normal_cdf_f64(x):
    """Phi(x) in float64: erf at double precision for x >= -1, the erfc fit (relative error
    1.2e-7) in the left tail, where 1 + erf(x/sqrt2) cancels."""
    z = tl.abs(x) * INV_SQRT_2
    tail = 0.5 * _erfc_from(z, 1.0 / (1.0 + 0.5 * z))
    return tl.where(x < -1.0, tail, 0.5 * (1.0 + tl.math.erf(x * INV_SQRT_2)))


@triton.jit
def _tanh_gate(x):
    # (1 + tanh(u)) / 2 = sigmoid(2u): no cancellation for x << 0.
    u = (x + x * x * x * TANH_COEF) * SQRT_2_OVER_PI
    if u.dtype == tl.float64:
        gate = 1.0 / (1.0 + tl.exp(-2.0 * u))
    else:
        # 1 / (1 + e) as rsqrt((1 + e)^2), see _pdf_and_tail; e = inf gives 0.
        e = tl.exp2(u * MINUS_2_LOG2E)
        gate = tl.rsqrt(1.0 + e * (2.0 + e))
    return gate


@triton.jit
def gelu_math(x, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        y = x * _tanh_gate(x)
    elif x.dtype == tl.float64:
        y = x * _normal_cdf_f64(x)
    else:
        # x Phi(x) = max(x, 0) - |x| Q(|x|); |x| capped so that x = inf gives inf, not inf * 0.
        _, tail = _pdf_and_tail(x)
        y = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL) - tl.minimum(tl.abs(x), FLOAT32_MAX) * tail
    return y


@triton.jit
def gelu_grad_math(x, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        # d/dx [x s(2u)] = s + 2 x s (1 - s) u'(x)
        s = _tanh_gate(x)
        g = s + 2.0 * x * s * (1.0 - s) * SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_COEF * x * x)
    elif x.dtype == tl.float64:
        g = _normal_cdf_f64(x) + x * tl.exp(-0.5 * x * x) * INV_SQRT_2PI
    else:
        pdf, tail = _pdf_and_tail(x)
        g = tl.where(x < 0.0, tail, 1.0 - tail) + x * pdf
    return g


@triton.jit
def gelu_fwd_kernel(X, Y, numel, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    # 64-bit block start, 32-bit offsets within the block.
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < numel - start
    acc_ty = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    x = tl.load(X + start + offs, mask=mask).to(acc_ty)
    tl.store(Y + start + offs, gelu_math(x, APPROX_TANH), mask=mask)


@triton.jit
def gelu_bwd_kernel(DY, X, DX, numel, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < numel - start
    acc_ty = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    x = tl.load(X + start + offs, mask=mask).to(acc_ty)
    dy = tl.load(DY + start + offs, mask=mask).to(acc_ty)
    tl.store(DX + start + offs, dy * gelu_grad_math(x, APPROX_TANH), mask=mask)


@triton.jit
def bias_gelu_fwd_kernel(X, Bias, Y, M, N, stride_x, stride_y,
                         APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M - row0) & (cols < N)[None, :]
    acc_ty = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    b = tl.load(Bias + cols[None, :], mask=(cols < N)[None, :]).to(acc_ty)
    rows = (row0 + rows).to(tl.int64)
    x = tl.load(X + rows * stride_x + cols[None, :], mask=mask)
    y = gelu_math(x.to(acc_ty) + b, APPROX_TANH)
    tl.store(Y + rows * stride_y + cols[None, :], y, mask=mask)


@triton.jit
def bias_gelu_bwd_kernel(DY, X, Bias, DX, DB_PARTIAL, M, N, stride_dy, stride_x, stride_dx, rows_per_program,
                         APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = (cols < N)[None, :]
    rows = tl.arange(0, BLOCK_M)[:, None]
    acc_ty = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    b = tl.load(Bias + cols[None, :], mask=col_mask).to(acc_ty)
    # Summed over rows once at the end; masked lanes load dy = 0 and add nothing.
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_ty)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row0 in range(row_start, row_end, BLOCK_M):
        mask = (rows < row_end - row0) & col_mask
        r = row0 + rows
        x = tl.load(X + r * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + r * stride_dy + cols[None, :], mask=mask, other=0.0)
        dx = dy.to(acc_ty) * gelu_grad_math(x.to(acc_ty) + b, APPROX_TANH)
        tl.store(DX + r * stride_dx + cols[None, :], dx, mask=mask)
        db_acc += dx
    tl.store(DB_PARTIAL + pid.to(tl.int64) * N + cols, tl.sum(db_acc, axis=0), mask=cols < N)


def _elementwise_grid(numel):
    return (cdiv(numel, ELEMENTWISE_BLOCK),)


def gelu_fwd(x, approximate_tanh: bool):
    """x: contiguous, any shape."""
    y = new_output(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        gelu_fwd_kernel[_elementwise_grid(x.numel())](x, y, x.numel(), APPROX_TANH=approximate_tanh,
                                                      BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS)
    return y


def gelu_bwd(dy, x, approximate_tanh: bool):
    dx = new_output(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        gelu_bwd_kernel[_elementwise_grid(x.numel())](dy, x, dx, x.numel(), APPROX_TANH=approximate_tanh,
                                                      BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS)
    return dx


def _bias_tile(N, dtype):
    """(BLOCK_M, BLOCK_N, num_warps) for the bias kernels.

    Each warp spans one 16-byte vector per thread of a row (256 bf16 columns), warps side by
    side along the row and rows repeated inside each thread: a thread's rows share its bias
    registers, and the bias load needs no reshuffle through shared memory. The widest such
    tile (up to 4 warps) that pads N by at most 1/8; about 32 elements per thread.
    """
    warp_cols = 32 * max(16 // dtype.itemsize, 1)
    if N <= warp_cols:
        block_n, warps = next_power_of_2(N), 1
    else:
        warps = next((w for w in (4, 2) if cdiv(N, w * warp_cols) * w * warp_cols * 8 <= 9 * N), 1)
        block_n = warps * warp_cols
    return max(1024 * warps // block_n, 1), block_n, warps


def bias_gelu_fwd(x, bias, approximate_tanh: bool):
    """x: contiguous, or (M, N) with unit column stride; bias: (N,). y has x's shape."""
    M, stride_x = rows_of(x)
    N = x.shape[-1]
    y = new_output(x.shape, dtype=x.dtype, device=x.device)
    if M and N:
        block_m, block_n, warps = _bias_tile(N, x.dtype)
        grid = (cdiv(M, block_m), cdiv(N, block_n))
        bias_gelu_fwd_kernel[grid](x, bias, y, M, N, stride_x, N, APPROX_TANH=approximate_tanh,
                                   BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y


def bias_gelu_bwd(dy, x, bias, approximate_tanh: bool):
    """dy, x: contiguous, or (M, N) with unit column stride. Returns dx (x's shape and dtype)
    and dbias (float32, float64 for float64 inputs)."""
    M, stride_x = rows_of(x)
    N = x.shape[-1]
    dx = new_output(x.shape, dtype=x.dtype, device=x.device)
    if not (M and N):
        return dx, dx.new_zeros(N, dtype=accumulator_dtype(x.dtype))
    block_m, block_n, warps = _bias_tile(N, x.dtype)
    col_blocks = cdiv(N, block_n)
    rows_per_program = rows_per_reduction_program(M, block_m, warps * col_blocks, x.device)
    programs = cdiv(M, rows_per_program)
    db_partial = new_output((programs, N), dtype=accumulator_dtype(x.dtype), device=x.device)
    bias_gelu_bwd_kernel[(programs, col_blocks)](
        dy, x, bias, dx, db_partial, M, N, rows_of(dy)[1], stride_x, N, rows_per_program,
        APPROX_TANH=approximate_tanh, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return dx, sum_partials(db_partial)


def aot_specializations():
    """(kernel, signature, constexprs, options) for each variant the launchers use: see tests/test_aot_compile.py."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        p, acc = pointer(dtype), pointer(accumulator_dtype(dtype))
        for tanh in (False, True):
            flat = {"BLOCK": ELEMENTWISE_BLOCK, "APPROX_TANH": tanh}
            warps = {"num_warps": ELEMENTWISE_WARPS}
            yield (gelu_fwd_kernel, {"X": p, "Y": p, "numel": "i32", "APPROX_TANH": "constexpr",
                                     "BLOCK": "constexpr"}, flat, warps)
            yield (gelu_bwd_kernel, {"DY": p, "X": p, "DX": p, "numel": "i32", "APPROX_TANH": "constexpr",
                                     "BLOCK": "constexpr"}, flat, warps)
            for n in (37, 768, 1536, 3072):  # each tile shape _bias_tile picks
                block_m, block_n, warps = _bias_tile(n, dtype)
                tiles = {"APPROX_TANH": tanh, "BLOCK_M": block_m, "BLOCK_N": block_n}
                tile_sig = {"APPROX_TANH": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
                yield (bias_gelu_fwd_kernel, {"X": p, "Bias": p, "Y": p, "M": "i32", "N": "i32", "stride_x": "i32",
                                              "stride_y": "i32", **tile_sig}, tiles, {"num_warps": warps})
                yield (bias_gelu_bwd_kernel, {"DY": p, "X": p, "Bias": p, "DX": p, "DB_PARTIAL": acc, "M": "i32",
                                              "N": "i32", "stride_dy": "i32", "stride_x": "i32",
                                              "stride_dx": "i32", "rows_per_program": "i32", **tile_sig}, tiles,
                                   {"num_warps": warps})
