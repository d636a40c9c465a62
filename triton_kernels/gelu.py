"""GELU, exact (erf) and tanh forms, plain and fused with a bias add; forward and backward.

exact: gelu(x) = x * Phi(x),                  gelu'(x) = Phi(x) + x * phi(x)
tanh:  gelu(x) = x/2 * (1 + tanh(u)) = x * sigmoid(2u),  u = sqrt(2/pi) * (x + 0.044715 x^3)
       gelu'(x) = s + 2 x s (1 - s) * sqrt(2/pi) * (1 + 3 * 0.044715 x^2),  s = sigmoid(2u)
The bias variant computes gelu(x + b) over rows of width N (the sum in float32, not
rounded to the input dtype first); its backward also
reduces db = sum_rows(dy * gelu'(x + b)) through per-program partial rows.
"""
import torch
import triton
import triton.language as tl

from ._launch import accumulator_dtype, cdiv, new_output, next_power_of_2, pointer, reduction_programs, rows_of

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
TANH_COEF = tl.constexpr(0.044715)
ELEMENTWISE_BLOCK = 1024


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
def _normal_cdf(x):
    """Phi(x) with small relative error in the left tail too.

    1 + erf(x/sqrt2) cancels for x << 0, so the tail e = erfc(|x|/sqrt2)/2 is evaluated
    directly. In float32 (and below) Phi = e for x < 0 and 1 - e otherwise: one reciprocal
    (the approximate one, 2 ulp, far below the fit's error) and one exp per element. float64
    keeps erf at double precision for x >= -1.
    """
    z = tl.abs(x) * INV_SQRT_2
    if x.dtype == tl.float64:
        tail = 0.5 * _erfc_from(z, 1.0 / (1.0 + 0.5 * z))
        cdf = tl.where(x < -1.0, tail, 0.5 * (1.0 + tl.math.erf(x * INV_SQRT_2)))
    else:
        tail = 0.5 * _erfc_from(z, tl.fdiv(1.0, 1.0 + 0.5 * z))
        cdf = tl.where(x < 0.0, tail, 1.0 - tail)
    return cdf


@triton.jit
def _tanh_gate(x):
    # (1 + tanh(u)) / 2 = sigmoid(2u): no cancellation for x << 0.
    u = SQRT_2_OVER_PI * (x + TANH_COEF * x * x * x)
    return tl.fdiv(1.0, 1.0 + tl.exp(-2.0 * u)) if u.dtype != tl.float64 else 1.0 / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def gelu_math(x, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        y = x * _tanh_gate(x)
    else:
        y = x * _normal_cdf(x)
    return y


@triton.jit
def gelu_grad_math(x, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        # d/dx [x s(2u)] = s + 2 x s (1 - s) u'(x)
        s = _tanh_gate(x)
        g = s + 2.0 * x * s * (1.0 - s) * SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_COEF * x * x)
    else:
        g = _normal_cdf(x) + x * tl.exp(-0.5 * x * x) * INV_SQRT_2PI
    return g


@triton.jit
def gelu_fwd_kernel(X, Y, numel, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc_ty = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    x = tl.load(X + offs, mask=mask, other=0.0).to(acc_ty)
    tl.store(Y + offs, gelu_math(x, APPROX_TANH), mask=mask)


@triton.jit
def gelu_bwd_kernel(DY, X, DX, numel, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc_ty = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    x = tl.load(X + offs, mask=mask, other=0.0).to(acc_ty)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(acc_ty)
    tl.store(DX + offs, dy * gelu_grad_math(x, APPROX_TANH), mask=mask)


@triton.jit
def bias_gelu_fwd_kernel(X, Bias, Y, M, N, stride_x, stride_y,
                         APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)[:, None]
    acc_ty = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    b = tl.load(Bias + cols, mask=col_mask, other=0.0)
    x = tl.load(X + rows * stride_x + cols[None, :], mask=mask, other=0.0)
    pre = x.to(acc_ty) + b[None, :].to(acc_ty)
    tl.store(Y + rows * stride_y + cols[None, :], gelu_math(pre, APPROX_TANH), mask=mask)


@triton.jit
def bias_gelu_bwd_kernel(DY, X, Bias, DX, DB_PARTIAL, M, N, stride_dy, stride_x, stride_dx, rows_per_program,
                         APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc_ty = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    b = tl.load(Bias + cols, mask=col_mask, other=0.0)
    db_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        rows = rows[:, None]
        x = tl.load(X + rows * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows * stride_dy + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        pre = x.to(acc_ty) + b[None, :].to(acc_ty)
        dx = tl.where(mask, dy * gelu_grad_math(pre, APPROX_TANH), 0.0)
        tl.store(DX + rows * stride_dx + cols[None, :], dx, mask=mask)
        db_acc += tl.sum(dx, axis=0)
    tl.store(DB_PARTIAL + pid.to(tl.int64) * N + cols, db_acc, mask=col_mask)


def _elementwise_grid(numel):
    return (cdiv(numel, ELEMENTWISE_BLOCK),)


def gelu_fwd(x, approximate_tanh: bool):
    """x: contiguous, any shape."""
    y = new_output(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        gelu_fwd_kernel[_elementwise_grid(x.numel())](x, y, x.numel(), APPROX_TANH=approximate_tanh,
                                                      BLOCK=ELEMENTWISE_BLOCK, num_warps=4)
    return y


def gelu_bwd(dy, x, approximate_tanh: bool):
    dx = new_output(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        gelu_bwd_kernel[_elementwise_grid(x.numel())](dy, x, dx, x.numel(), APPROX_TANH=approximate_tanh,
                                                      BLOCK=ELEMENTWISE_BLOCK, num_warps=4)
    return dx


def _bias_blocks(N):
    """2048-element tiles, as wide as the row allows (up to 256): fewer address computations per element."""
    block_n = min(next_power_of_2(N), 256)
    return max(2048 // block_n, 1), block_n


def bias_gelu_fwd(x, bias, approximate_tanh: bool):
    """x: contiguous, or (M, N) with unit column stride; bias: (N,). y has x's shape."""
    M, stride_x = rows_of(x)
    N = x.shape[-1]
    y = new_output(x.shape, dtype=x.dtype, device=x.device)
    if M and N:
        block_m, block_n = _bias_blocks(N)
        grid = (cdiv(M, block_m), cdiv(N, block_n))
        bias_gelu_fwd_kernel[grid](x, bias, y, M, N, stride_x, N, APPROX_TANH=approximate_tanh,
                                   BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return y


def bias_gelu_bwd(dy, x, bias, approximate_tanh: bool):
    """dy, x: contiguous, or (M, N) with unit column stride. Returns dx (x's shape and dtype)
    and dbias (float32, float64 for float64 inputs)."""
    M, stride_x = rows_of(x)
    N = x.shape[-1]
    dx = new_output(x.shape, dtype=x.dtype, device=x.device)
    if not (M and N):
        return dx, dx.new_zeros(N, dtype=accumulator_dtype(x.dtype))
    block_m, block_n = _bias_blocks(N)
    programs = max(1, reduction_programs(M, x.device) // cdiv(N, block_n))
    rows_per_program = cdiv(M, programs)
    programs = cdiv(M, rows_per_program)
    db_partial = new_output((programs, N), dtype=accumulator_dtype(x.dtype), device=x.device)
    bias_gelu_bwd_kernel[(programs, cdiv(N, block_n))](
        dy, x, bias, dx, db_partial, M, N, rows_of(dy)[1], stride_x, N, rows_per_program,
        APPROX_TANH=approximate_tanh, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return dx, db_partial.sum(0)


def aot_specializations():
    """(kernel, signature, constexprs, options) for each variant the launchers use: see tests/test_aot_compile.py."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        p, acc = pointer(dtype), pointer(accumulator_dtype(dtype))
        for tanh in (False, True):
            flat = {"BLOCK": ELEMENTWISE_BLOCK, "APPROX_TANH": tanh}
            yield (gelu_fwd_kernel, {"X": p, "Y": p, "numel": "i32", "APPROX_TANH": "constexpr",
                                     "BLOCK": "constexpr"}, flat, {"num_warps": 4})
            yield (gelu_bwd_kernel, {"DY": p, "X": p, "DX": p, "numel": "i32", "APPROX_TANH": "constexpr",
                                     "BLOCK": "constexpr"}, flat, {"num_warps": 4})
            block_m, block_n = _bias_blocks(1536)
            tiles = {"APPROX_TANH": tanh, "BLOCK_M": block_m, "BLOCK_N": block_n}
            tile_sig = {"APPROX_TANH": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
            yield (bias_gelu_fwd_kernel, {"X": p, "Bias": p, "Y": p, "M": "i32", "N": "i32", "stride_x": "i32",
                                          "stride_y": "i32", **tile_sig}, tiles, {"num_warps": 4})
            yield (bias_gelu_bwd_kernel, {"DY": p, "X": p, "Bias": p, "DX": p, "DB_PARTIAL": acc, "M": "i32",
                                          "N": "i32", "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32",
                                          "rows_per_program": "i32", **tile_sig}, tiles, {"num_warps": 4})
