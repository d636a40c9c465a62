"""Fused multi-head attention (FlashAttention-2 scheme), forward and backward.

Forward, per (batch, head) and block of BLOCK_M query rows, streaming over key blocks:
    s = q kᵀ · scale (+ bias),  m = running max,  l = running Σ exp(s - m),
    acc = Σ exp(s - m) v  →  o = acc / l,  lse = m + log l   (no N×N matrix in memory)
Scores are kept in base 2 (scale · log2 e) so the exponentials are exp2. Every loop runs its full
blocks unmasked, then the ragged end masked: one more full block when it fills more than half of
one, else TAIL_BLOCK-wide blocks. The grid's blocks may do the same (SPLIT_TAIL, a tuned option): the
program holding a short ragged end of the queries (of the keys for dk/dv) runs it in TAIL_BLOCK-row tiles.
With N_ROWS > 0 the tile holding the first N_ROWS query rows also writes their softmax(s)
(DINO's CLS attention maps) in a second sweep that reuses the final lse.

Backward (recompute, no atomics, deterministic), two launches:
    delta = rowsum(dO ∘ O),  p = exp(s - lse),  dp = dO vᵀ,  ds = p ∘ (dp - delta)
    dq = ds k · scale                  (first: one program per query block, loops over keys; it
                                        computes its rows' delta from the dO it holds and stores it)
    dv = pᵀ dO,  dk = dsᵀ q · scale   (then: one program per key block, loops over queries, reads delta)
The delta pre-pass of FlashAttention-2 is folded into the dq launch: one launch and one read of dO fewer.

q, k, v are (B, H, N, d) (or (B, N, H, d)) views with unit stride along d and any other strides, so the
packed (B, N, 3, H, d) output of a qkv Linear is read in place. Head dims that are not
a power of two (80, 96) are padded to D_PAD inside the kernel with masked loads.
"""
import math

import torch
import triton
import triton.language as tl

from ._launch import (accumulator_dtype, cached_choice, cdiv, new_output, next_power_of_2, pointer, timed_choice,
                      tuning_enabled)

LOG2E = tl.constexpr(1.4426950408889634)
# A short ragged end of a sequence (N mod block, at most half a block) runs in blocks of 16 instead of
# one full masked block: at N = 197 with 64-wide blocks, 208 keys of work per query instead of 256.
TAIL_BLOCK = tl.constexpr(16)
# Those 16-row tiles run on mma.sync, whose operands sit in registers: the other axis streams past them in
# 32-wide blocks (sm_90, 64×64 blocks: 156 registers for the whole forward kernel instead of 178).
TAIL_STREAM_BLOCK = tl.constexpr(32)


@triton.jit
def _load_rows(base, rows, cols, stride_row, N, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """A (len(rows), D_PAD) tile; rows past N (when CHECK_ROWS) and columns past HEAD_DIM read as 0."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if CHECK_ROWS:
        if HEAD_DIM == D_PAD:
            tile = tl.load(ptrs, mask=rows[:, None] < N, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < N) & (cols[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == D_PAD:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _sequence(pid_bh, H, N, CuSeqlens, VARLEN: tl.constexpr):
    """(batch or sequence index, head, first token, length) of this program's (sequence, head) pair.

    Packed variable-length sequences (VARLEN) share one token axis; CuSeqlens holds their offsets.
    """
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    if VARLEN:
        start = tl.load(CuSeqlens + b).to(tl.int64)
        n = (tl.load(CuSeqlens + b + 1) - start).to(tl.int32)
    else:
        start = b * 0
        n = N
    return b, h, start, n


@triton.jit
def _store_rows(base, rows, cols, stride_row, tile, N, HEAD_DIM: tl.constexpr):
    """Store a (len(rows), D_PAD) tile in base's dtype, leaving rows past N and columns past HEAD_DIM alone."""
    mask = (rows[:, None] < N) & (cols[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * stride_row + cols[None, :], tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _head_rows(X, b, h, start, stride_b, stride_h, stride_n):
    """Pointer to the first row of (batch or packed sequence b, head h), whose rows begin at token ``start``."""
    return X + b * stride_b + h * stride_h + start * stride_n


@triton.jit
def _head_bases(Q, K, V, Bias, LSE, b, h, start, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_bb, stride_bh, stride_lb, stride_lh):
    """Pointers to (sequence b, head h)'s first row of q, k, v and of its bias and lse, which every kernel reads."""
    return (_head_rows(Q, b, h, start, stride_qb, stride_qh, stride_qn),
            _head_rows(K, b, h, start, stride_kb, stride_kh, stride_kn),
            _head_rows(V, b, h, start, stride_vb, stride_vh, stride_vn),
            Bias + b * stride_bb + h * stride_bh, LSE + b * stride_lb + h * stride_lh + start)


@triton.jit
def _splits_tail(start, N, BLOCK: tl.constexpr, SPLIT_TAIL: tl.constexpr):
    """Whether the block from ``start`` is a short ragged end (at most half a block) to run in TAIL_BLOCK-row
    tiles: 16 rows of work instead of BLOCK for the last 5 of N = 197. Without SPLIT_TAIL the condition folds
    to false at compile time and the tail path is dropped."""
    return (N - start <= BLOCK // 2) & SPLIT_TAIL


@triton.jit
def _scores(q, k, bias_base, stride_bm, stride_bn, offs_m, offs_n, N, bias_mult,
            HAS_BIAS: tl.constexpr, MASK_KEYS: tl.constexpr, PRECISION: tl.constexpr):
    """q kᵀ (+ bias / scale) for a (BLOCK_M, BLOCK_N) tile; key columns past N are -inf when MASK_KEYS.

    The base-2 logits are these scores times scale·log2(e), applied by the caller inside the
    exp2's argument (one FMA per score).
    """
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if HAS_BIAS:
        mask = (offs_m[:, None] < N) & (offs_n[None, :] < N)
        bias = tl.load(bias_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn, mask=mask, other=0.0)
        s += bias.to(s.dtype) * bias_mult
    if MASK_KEYS:
        s = tl.where(offs_n[None, :] < N, s, -float("inf"))
    return s


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_base, v_base, bias_base, start_n, offs_m, offs_d,
               stride_kn, stride_vn, stride_bm, stride_bn, N, scale_log2, bias_mult,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_BIAS: tl.constexpr, MASK_KEYS: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax: returns the updated (acc, l, m)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(k_base, offs_n, offs_d, stride_kn, N, HEAD_DIM, D_PAD, MASK_KEYS)
    s = _scores(q, k, bias_base, stride_bm, stride_bn, offs_m, offs_n, N, bias_mult, HAS_BIAS, MASK_KEYS,
                PRECISION)
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale_log2)
    # A row masked out so far keeps acc = l = 0 instead of exp2(-inf + inf) = NaN.
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    p = tl.exp2(s * scale_log2 - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    v = _load_rows(v_base, offs_n, offs_d, stride_vn, N, HEAD_DIM, D_PAD, MASK_KEYS)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return acc, l_i, m_new


@triton.jit
def _fwd_tile(q_base, k_base, v_base, bias_base, o_base, lse_base, rows_base, start_m, offs_d,
              stride_qn, stride_kn, stride_vn, stride_bm, stride_bn, stride_on, stride_rm, N, scale_log2, bias_mult,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_BIAS: tl.constexpr, N_ROWS: tl.constexpr, PRECISION: tl.constexpr):
    """Output, lse (and attention rows below N_ROWS) of the BLOCK_M query rows from start_m."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(q_base, offs_m, offs_d, stride_qn, N, HEAD_DIM, D_PAD, True)
    acc_ty = tl.float64 if q_base.dtype.element_ty == tl.float64 else tl.float32
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=acc_ty)
    l_i = tl.zeros([BLOCK_M], dtype=acc_ty)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=acc_ty)
    # Full key blocks without masks, then the partial last block with them.
    full_end = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, bias_base, start_n, offs_m, offs_d,
                                   stride_kn, stride_vn, stride_bm, stride_bn, N, scale_log2, bias_mult,
                                   HEAD_DIM, D_PAD, BLOCK_N, HAS_BIAS, False, PRECISION)
    if N - full_end > BLOCK_N // 2:
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, bias_base, full_end, offs_m, offs_d,
                                   stride_kn, stride_vn, stride_bm, stride_bn, N, scale_log2, bias_mult,
                                   HEAD_DIM, D_PAD, BLOCK_N, HAS_BIAS, True, PRECISION)
    else:
        for start_n in range(full_end, N, TAIL_BLOCK):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, bias_base, start_n, offs_m, offs_d,
                                       stride_kn, stride_vn, stride_bm, stride_bn, N, scale_log2, bias_mult,
                                       HEAD_DIM, D_PAD, TAIL_BLOCK, HAS_BIAS, True, PRECISION)

    # A fully masked row gives 0/0 = NaN and lse = -inf, as softmax over all -inf does.
    lse2 = tl.where(m_i == -float("inf"), 0.0, m_i) + tl.log2(l_i)
    _store_rows(o_base, offs_m, offs_d, stride_on, acc / l_i[:, None], N, HEAD_DIM)
    tl.store(lse_base + offs_m, lse2, mask=offs_m < N)

    if N_ROWS > 0:
        if start_m < N_ROWS:
            for start_n in range(0, N, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                k = _load_rows(k_base, offs_n, offs_d, stride_kn, N, HEAD_DIM, D_PAD, True)
                s = _scores(q, k, bias_base, stride_bm, stride_bn, offs_m, offs_n, N, bias_mult,
                            HAS_BIAS, True, PRECISION)
                p = tl.exp2(s * scale_log2 - lse2[:, None])
                r_mask = (offs_m[:, None] < N_ROWS) & (offs_n[None, :] < N)
                r_ptrs = rows_base + offs_m[:, None] * stride_rm + offs_n[None, :]
                tl.store(r_ptrs, p.to(rows_base.dtype.element_ty), mask=r_mask)


@triton.jit(do_not_specialize=["N"])
def attention_fwd_kernel(
    Q, K, V, Bias, O, LSE, Rows, CuSeqlens,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_ob, stride_oh, stride_on, stride_rb, stride_rh, stride_rm,
    stride_lb, stride_lh, H, N, scale_log2, bias_mult,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, N_ROWS: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, start, N = _sequence(pid_bh, H, N, CuSeqlens, VARLEN)
    start_m = pid_m * BLOCK_M
    # A query block past the end of a short packed sequence has nothing to do.
    if start_m < N:
        q_base, k_base, v_base, bias_base, lse_base = _head_bases(
            Q, K, V, Bias, LSE, b, h, start, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
            stride_vb, stride_vh, stride_vn, stride_bb, stride_bh, stride_lb, stride_lh)
        o_base = _head_rows(O, b, h, start, stride_ob, stride_oh, stride_on)
        rows_base = Rows + b * stride_rb + h * stride_rh
        offs_d = tl.arange(0, D_PAD)
        if _splits_tail(start_m, N, BLOCK_M, SPLIT_TAIL):
            for tail_m in range(start_m, N, TAIL_BLOCK):
                _fwd_tile(q_base, k_base, v_base, bias_base, o_base, lse_base, rows_base, tail_m, offs_d,
                          stride_qn, stride_kn, stride_vn, stride_bm, stride_bn, stride_on, stride_rm, N,
                          scale_log2, bias_mult, HEAD_DIM, D_PAD, TAIL_BLOCK, TAIL_STREAM_BLOCK, HAS_BIAS, N_ROWS,
                          PRECISION)
        else:
            _fwd_tile(q_base, k_base, v_base, bias_base, o_base, lse_base, rows_base, start_m, offs_d,
                      stride_qn, stride_kn, stride_vn, stride_bm, stride_bn, stride_on, stride_rm, N,
                      scale_log2, bias_mult, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, HAS_BIAS, N_ROWS, PRECISION)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, bias_base, lse_base, delta_base, start_m, offs_n, offs_d,
                stride_qn, stride_dn, stride_bm, stride_bn, N, scale_log2, bias_mult,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                HAS_BIAS: tl.constexpr, CHECK_ROWS: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv contributions of one query block, from the transposed tile sᵀ (BLOCK_N, BLOCK_M)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    # Query rows past N read q = dO = 0, so whatever p they get contributes nothing.
    q = _load_rows(q_base, offs_m, offs_d, stride_qn, N, HEAD_DIM, D_PAD, CHECK_ROWS)
    do = _load_rows(do_base, offs_m, offs_d, stride_dn, N, HEAD_DIM, D_PAD, CHECK_ROWS)
    if CHECK_ROWS:
        lse2 = tl.load(lse_base + offs_m, mask=offs_m < N, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=offs_m < N, other=0.0)
    else:
        lse2 = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
    if HAS_BIAS:
        mask = (offs_m[None, :] < N) & (offs_n[:, None] < N)
        bias = tl.load(bias_base + offs_m[None, :] * stride_bm + offs_n[:, None] * stride_bn, mask=mask, other=0.0)
        s_t += bias.to(s_t.dtype) * bias_mult
    p_t = tl.exp2(s_t * scale_log2 - lse2[None, :])
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_tile(k_base, v_base, q_base, do_base, bias_base, lse_base, delta_base, dk_base, dv_base, start_n, offs_d,
               stride_kn, stride_vn, stride_qn, stride_dn, stride_bm, stride_bn, stride_dkn, stride_dvn, N, scale,
               scale_log2, bias_mult, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv of the BLOCK_N key rows from start_n, looping over every query block."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # Key rows past N read k = v = 0 and are not stored.
    k = _load_rows(k_base, offs_n, offs_d, stride_kn, N, HEAD_DIM, D_PAD, True)
    v = _load_rows(v_base, offs_n, offs_d, stride_vn, N, HEAD_DIM, D_PAD, True)
    acc_ty = tl.float64 if q_base.dtype.element_ty == tl.float64 else tl.float32
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=acc_ty)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=acc_ty)
    full_end = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, full_end, BLOCK_M):
        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, bias_base, lse_base, delta_base, start_m, offs_n,
                             offs_d, stride_qn, stride_dn, stride_bm, stride_bn, N, scale_log2, bias_mult,
                             HEAD_DIM, D_PAD, BLOCK_M, HAS_BIAS, False, PRECISION)
    if N - full_end > BLOCK_M // 2:
        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, bias_base, lse_base, delta_base, full_end, offs_n,
                             offs_d, stride_qn, stride_dn, stride_bm, stride_bn, N, scale_log2, bias_mult,
                             HEAD_DIM, D_PAD, BLOCK_M, HAS_BIAS, True, PRECISION)
    else:
        for start_m in range(full_end, N, TAIL_BLOCK):
            dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, bias_base, lse_base, delta_base, start_m, offs_n,
                                 offs_d, stride_qn, stride_dn, stride_bm, stride_bn, N, scale_log2, bias_mult,
                                 HEAD_DIM, D_PAD, TAIL_BLOCK, HAS_BIAS, True, PRECISION)
    _store_rows(dk_base, offs_n, offs_d, stride_dkn, dk * scale, N, HEAD_DIM)
    _store_rows(dv_base, offs_n, offs_d, stride_dvn, dv, N, HEAD_DIM)


@triton.jit(do_not_specialize=["N"])
def attention_bwd_dkdv_kernel(
    Q, K, V, Bias, DO, LSE, Delta, DK, DV, CuSeqlens,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_db, stride_dh, stride_dn,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, H, N, scale, scale_log2, bias_mult,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, start, N = _sequence(pid_bh, H, N, CuSeqlens, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n < N:
        q_base, k_base, v_base, bias_base, lse_base = _head_bases(
            Q, K, V, Bias, LSE, b, h, start, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
            stride_vb, stride_vh, stride_vn, stride_bb, stride_bh, stride_lb, stride_lh)
        do_base = _head_rows(DO, b, h, start, stride_db, stride_dh, stride_dn)
        delta_base = Delta + b * stride_lb + h * stride_lh + start
        dk_base = _head_rows(DK, b, h, start, stride_dkb, stride_dkh, stride_dkn)
        dv_base = _head_rows(DV, b, h, start, stride_dvb, stride_dvh, stride_dvn)
        offs_d = tl.arange(0, D_PAD)
        if _splits_tail(start_n, N, BLOCK_N, SPLIT_TAIL):
            for tail_n in range(start_n, N, TAIL_BLOCK):
                _dkdv_tile(k_base, v_base, q_base, do_base, bias_base, lse_base, delta_base, dk_base, dv_base,
                           tail_n, offs_d, stride_kn, stride_vn, stride_qn, stride_dn, stride_bm, stride_bn,
                           stride_dkn, stride_dvn, N, scale, scale_log2, bias_mult, HEAD_DIM, D_PAD,
                           TAIL_STREAM_BLOCK, TAIL_BLOCK, HAS_BIAS, PRECISION)
        else:
            _dkdv_tile(k_base, v_base, q_base, do_base, bias_base, lse_base, delta_base, dk_base, dv_base,
                       start_n, offs_d, stride_kn, stride_vn, stride_qn, stride_dn, stride_bm, stride_bn,
                       stride_dkn, stride_dvn, N, scale, scale_log2, bias_mult, HEAD_DIM, D_PAD, BLOCK_M,
                       BLOCK_N, HAS_BIAS, PRECISION)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_base, v_base, bias_base, start_n, offs_m, offs_d,
              stride_kn, stride_vn, stride_bm, stride_bn, N, scale_log2, bias_mult,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_BIAS: tl.constexpr, MASK_KEYS: tl.constexpr, PRECISION: tl.constexpr):
    """dq contribution of one key block."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(k_base, offs_n, offs_d, stride_kn, N, HEAD_DIM, D_PAD, MASK_KEYS)
    v = _load_rows(v_base, offs_n, offs_d, stride_vn, N, HEAD_DIM, D_PAD, MASK_KEYS)
    s = _scores(q, k, bias_base, stride_bm, stride_bn, offs_m, offs_n, N, bias_mult, HAS_BIAS, MASK_KEYS,
                PRECISION)
    p = tl.exp2(s * scale_log2 - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _dq_tile(q_base, do_base, o_base, k_base, v_base, bias_base, lse_base, delta_base, dq_base, start_m, offs_d,
             stride_qn, stride_dn, stride_on, stride_kn, stride_vn, stride_bm, stride_bn, stride_dqn, N, scale,
             scale_log2, bias_mult, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """dq of the BLOCK_M query rows from start_m, looping over every key block; stores their delta for dk/dv."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    acc_ty = tl.float64 if q_base.dtype.element_ty == tl.float64 else tl.float32
    do = _load_rows(do_base, offs_m, offs_d, stride_dn, N, HEAD_DIM, D_PAD, True)
    o = _load_rows(o_base, offs_m, offs_d, stride_on, N, HEAD_DIM, D_PAD, True)
    tl.store(delta_base + offs_m, tl.sum(o.to(acc_ty) * do.to(acc_ty), axis=1), mask=offs_m < N)
    # Read back after a barrier (which makes the program's stores visible to all its threads) rather than
    # kept: loaded, delta takes the layout of its use in the loop, where the sum's own layout would hold
    # 23 more registers per thread (sm_90, 64×64 blocks: 150 instead of 127, one program fewer per SM).
    tl.debug_barrier()
    delta = tl.load(delta_base + offs_m, mask=offs_m < N, other=0.0)
    q = _load_rows(q_base, offs_m, offs_d, stride_qn, N, HEAD_DIM, D_PAD, True)
    lse2 = tl.load(lse_base + offs_m, mask=offs_m < N, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=acc_ty)
    full_end = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, bias_base, start_n, offs_m, offs_d,
                       stride_kn, stride_vn, stride_bm, stride_bn, N, scale_log2, bias_mult,
                       HEAD_DIM, D_PAD, BLOCK_N, HAS_BIAS, False, PRECISION)
    if N - full_end > BLOCK_N // 2:
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, bias_base, full_end, offs_m, offs_d,
                       stride_kn, stride_vn, stride_bm, stride_bn, N, scale_log2, bias_mult,
                       HEAD_DIM, D_PAD, BLOCK_N, HAS_BIAS, True, PRECISION)
    else:
        for start_n in range(full_end, N, TAIL_BLOCK):
            dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, bias_base, start_n, offs_m, offs_d,
                           stride_kn, stride_vn, stride_bm, stride_bn, N, scale_log2, bias_mult,
                           HEAD_DIM, D_PAD, TAIL_BLOCK, HAS_BIAS, True, PRECISION)
    _store_rows(dq_base, offs_m, offs_d, stride_dqn, dq * scale, N, HEAD_DIM)


@triton.jit(do_not_specialize=["N"])
def attention_bwd_dq_kernel(
    Q, K, V, Bias, DO, O, LSE, Delta, DQ, CuSeqlens,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_db, stride_dh, stride_dn, stride_ob, stride_oh, stride_on,
    stride_dqb, stride_dqh, stride_dqn,
    stride_lb, stride_lh, H, N, scale, scale_log2, bias_mult,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, start, N = _sequence(pid_bh, H, N, CuSeqlens, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m < N:
        q_base, k_base, v_base, bias_base, lse_base = _head_bases(
            Q, K, V, Bias, LSE, b, h, start, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
            stride_vb, stride_vh, stride_vn, stride_bb, stride_bh, stride_lb, stride_lh)
        do_base = _head_rows(DO, b, h, start, stride_db, stride_dh, stride_dn)
        o_base = _head_rows(O, b, h, start, stride_ob, stride_oh, stride_on)
        delta_base = Delta + b * stride_lb + h * stride_lh + start
        dq_base = _head_rows(DQ, b, h, start, stride_dqb, stride_dqh, stride_dqn)
        offs_d = tl.arange(0, D_PAD)
        if _splits_tail(start_m, N, BLOCK_M, SPLIT_TAIL):
            for tail_m in range(start_m, N, TAIL_BLOCK):
                _dq_tile(q_base, do_base, o_base, k_base, v_base, bias_base, lse_base, delta_base, dq_base, tail_m,
                         offs_d, stride_qn, stride_dn, stride_on, stride_kn, stride_vn, stride_bm, stride_bn,
                         stride_dqn, N, scale, scale_log2, bias_mult, HEAD_DIM, D_PAD, TAIL_BLOCK, TAIL_STREAM_BLOCK,
                         HAS_BIAS, PRECISION)
        else:
            _dq_tile(q_base, do_base, o_base, k_base, v_base, bias_base, lse_base, delta_base, dq_base, start_m,
                     offs_d, stride_qn, stride_dn, stride_on, stride_kn, stride_vn, stride_bm, stride_bn, stride_dqn, N,
                     scale, scale_log2, bias_mult, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, HAS_BIAS, PRECISION)


# ---------------------------------------------------------------------------------------------
# Block sizes. Candidates are the configurations whose tiles are not much longer than N and
# whose shared memory (estimated from the tiles, the head dim and the element size) fits
# SHARED_MEMORY_BUDGET. On CUDA, unless tuning is off (_launch.tuning_enabled: FASTVISION_AUTOTUNE=0,
# as in the tests, or deterministic algorithms requested), the candidates are timed once per
# (kernel, tuning_class(N), head dim, dtype, bias) and the fastest is kept; else a heuristic picks one.
# N is not specialised, so one compiled kernel serves every sequence length.

def _config(block_m, block_n, warps, stages, split_tail=False):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_TAIL": split_tail},
                         num_warps=warps, num_stages=stages)


FWD_CONFIGS = [
    _config(128, 64, 4, 3), _config(128, 128, 8, 3), _config(128, 32, 4, 3), _config(64, 64, 4, 3),
    # 2 stages: 41 KB of shared memory, 4 programs per SM instead of 3 (N = 197: four key blocks
    # per program, too few for a third stage to reach a steady state)
    _config(64, 64, 4, 2),
    _config(64, 32, 4, 2), _config(128, 64, 8, 2), _config(64, 128, 4, 2), _config(64, 256, 4, 1),
    _config(128, 256, 8, 1),  # N ≤ 256 (a 224-px image at patch 14 or 16): all keys in one block
    # The last query block in 16-row tiles (_splits_tail): only offered where N leaves a short end.
    _config(64, 64, 4, 3, True), _config(64, 32, 4, 2, True), _config(128, 64, 4, 3, True),
    _config(32, 64, 4, 2, True),  # N = 37 (DINO's 96-px crops): 48 query rows of work instead of 64
]
DKDV_CONFIGS = [
    _config(64, 64, 4, 2), _config(32, 64, 4, 2), _config(64, 128, 8, 2), _config(32, 128, 4, 2),
    _config(16, 64, 4, 2), _config(64, 32, 4, 2),
    _config(64, 64, 4, 2, True), _config(32, 64, 4, 2, True), _config(64, 128, 8, 2, True),
    _config(64, 32, 4, 2, True),  # N = 37: 48 key rows of work instead of 64
]
DQ_CONFIGS = [
    _config(64, 64, 4, 2), _config(128, 64, 8, 2), _config(64, 32, 4, 2), _config(128, 32, 4, 2),
    _config(32, 64, 4, 2),
    _config(64, 64, 4, 2, True), _config(32, 64, 4, 2, True),
]
SMALLEST_CONFIG = _config(16, 32, 4, 1)
# Under sm_80's 163 KB (sm_90 has 227 KB), with room for the compiler's own scratch.
SHARED_MEMORY_BUDGET = 160 * 1024
# The interpreter's cost is per program and loop step: long sequences take big tiles.
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 64, "SPLIT_TAIL": True}
INTERPRETER_LONG_BLOCKS = {"BLOCK_M": 128, "BLOCK_N": 128, "SPLIT_TAIL": False}


def tuning_class(n: int) -> int:
    """Sequence lengths that share a tuned configuration: each length up to 1024 on its own (a ViT
    sees a few: 37, 145, 197, 257, 577, 785; 145 and 197 fill 256-row tiles very differently), longer
    ones by power of two up to 4096."""
    return n if n <= 1024 else min(next_power_of_2(n), 4096)


def shared_memory_estimate(kernel, cfg, d_pad: int, element_bytes: int) -> int:
    """Bytes of shared memory: tiles held for the whole program plus num_stages copies of the streamed ones."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    resident, streamed = {
        attention_fwd_kernel: (bm, 2 * bn),          # q; k and v blocks
        attention_bwd_dkdv_kernel: (2 * bn, 2 * bm),  # k, v; q and dO blocks
        attention_bwd_dq_kernel: (2 * bm, 2 * bn),    # q, dO; k and v blocks
    }[kernel]
    return (resident + cfg.num_stages * streamed) * d_pad * element_bytes


def leaves_short_tail(kernel, cfg, n: int) -> bool:
    """Whether N ends in a partial block of at most half the grid's block, which SPLIT_TAIL runs in
    TAIL_BLOCK-row tiles (N = 197: 5 rows past three 64-row blocks)."""
    block = cfg.kwargs[GRID_AXIS[kernel]]
    return 0 < n % block <= block // 2


def candidate_configs(kernel, n: int, d_pad: int, element_bytes: int):
    """Configurations worth running for this sequence length that fit in shared memory."""
    limit = max(next_power_of_2(n), 16)
    fits = [c for c in CONFIGS[kernel]
            if c.kwargs["BLOCK_M"] <= limit and c.kwargs["BLOCK_N"] <= max(limit, 32)
            and (not c.kwargs["SPLIT_TAIL"] or leaves_short_tail(kernel, c, n))
            and shared_memory_estimate(kernel, c, d_pad, element_bytes) <= SHARED_MEMORY_BUDGET]
    return fits or [SMALLEST_CONFIG]


def heuristic_config(kernel, n: int, head_dim: int, d_pad: int, element_bytes: int):
    """The choice without timing: the first candidate, with smaller tiles for head dims above 64."""
    candidates = candidate_configs(kernel, n, d_pad, element_bytes)
    if head_dim > 64:
        candidates = [c for c in candidates if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64] or candidates
    return candidates[0]


CONFIGS = {attention_fwd_kernel: FWD_CONFIGS, attention_bwd_dkdv_kernel: DKDV_CONFIGS,
           attention_bwd_dq_kernel: DQ_CONFIGS}
# The block the grid tiles N by: query rows forward and for dq, key rows for dk/dv; the other one streams.
GRID_AXIS = {attention_fwd_kernel: "BLOCK_M", attention_bwd_dkdv_kernel: "BLOCK_N",
             attention_bwd_dq_kernel: "BLOCK_M"}
# Tests set this to a triton.Config to run every kernel with that one configuration.
forced_config = None
_HEURISTIC = {}  # (kernel name, n, head dim, padded head dim, element bytes) -> heuristic_config


def _launch(kernel, tensor, n, programs_per_row, *args, **meta):
    """Grid: (blocks along N, B*H). Timed, forced or heuristic blocks on CUDA; fixed in the interpreter."""
    grid_axis = GRID_AXIS[kernel]

    def launch(cfg):
        grid = (cdiv(n, cfg.kwargs[grid_axis]), programs_per_row)
        kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if tensor.device.type != "cuda" and forced_config is None:
        blocks = INTERPRETER_BLOCKS if n <= 1024 else INTERPRETER_LONG_BLOCKS
        kernel[(cdiv(n, blocks[grid_axis]), programs_per_row)](*args, **meta, **blocks)
        return
    d_pad, element_bytes = meta["D_PAD"], tensor.element_size()
    if forced_config is not None:
        cfg = forced_config
    elif tuning_enabled():
        key = (kernel.__name__, tuning_class(n), meta["HEAD_DIM"], tensor.dtype, meta["HAS_BIAS"],
               meta["PRECISION"], meta["VARLEN"], tensor.device.index)  # packed short crops tune apart
        # The candidates are listed only until a choice is cached: listing them hashes the kernel
        # (Triton hashes its source key, ~1 µs) about 80 times.
        cfg = cached_choice(key) or timed_choice(key, candidate_configs(kernel, n, d_pad, element_bytes), launch,
                                                 tensor.device.index)
    else:
        key = (kernel.__name__, n, meta["HEAD_DIM"], d_pad, element_bytes)
        cfg = _HEURISTIC.get(key)
        if cfg is None:
            cfg = _HEURISTIC[key] = heuristic_config(kernel, n, meta["HEAD_DIM"], d_pad, element_bytes)
    launch(cfg)


def _dims(t, heads_last: bool):
    """(B, H, N, d) of a (B, H, N, d) tensor, or of a (B, N, H, d) one when ``heads_last``."""
    if heads_last:
        B, N, H, d = t.shape
        return B, H, N, d
    return tuple(t.shape)


def _strides(t, varlen: bool = False, heads_last: bool = False):
    """(batch, head, row) strides of a (B, H, N, d) tensor, or a (B, N, H, d) one when ``heads_last``;
    packed sequences all sit in batch 0."""
    batch = 0 if varlen else t.stride(0)
    if heads_last:
        return batch, t.stride(2), t.stride(1)
    return batch, t.stride(1), t.stride(2)


def head_dim_padded(d: int) -> int:
    return max(next_power_of_2(d), 16)


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def _bias_args(bias, q, dims):
    """Pointer and strides of a bias broadcast to (B, H, N, N); a dummy pointer when absent."""
    if bias is None:
        return (q, 0, 0, 0, 0)
    B, H, N, _ = dims
    bias = bias.expand(B, H, N, N)
    return (bias, *bias.stride())


def _geometry(dims, cu_seqlens, max_seqlen):
    """(programs along grid axis 1, length that sizes grid axis 0, lse strides (per batch, per head))."""
    B, H, N, _ = dims
    if cu_seqlens is None:
        return B * H, N, (H * N, N)
    return (cu_seqlens.numel() - 1) * H, max_seqlen, (0, N)


def attention_fwd(q, k, v, *, scale: float, bias=None, n_rows: int = 0, allow_tf32: bool = False,
                  heads_last: bool = False, cu_seqlens=None, max_seqlen: int = 0, out=None, lse=None):
    """(out, lse, rows) for q, k, v: (B, H, N, d) tensors with unit stride along d, or (B, N, H, d)
    ones when ``heads_last`` (e.g. views into timm's packed qkv), other strides arbitrary.

    out has the layout of q (allocated contiguous), lse is the base-2 log-sum-exp per row,
    (B*H, N); rows holds softmax of the first n_rows query rows, (B, H, n_rows, N) (empty
    when n_rows is 0). With ``cu_seqlens`` (int32 offsets of packed sequences, B = 1, N =
    all tokens) each token attends only within its own sequence, the longest being
    ``max_seqlen``; no bias or rows then. ``out`` (q's shape, unit stride along d) and ``lse``
    ((B*H, N), contiguous) may be given preallocated, e.g. as views into larger buffers.
    """
    dims = _dims(q, heads_last)
    B, H, N, d = dims
    varlen = cu_seqlens is not None
    acc = accumulator_dtype(q.dtype)
    out = new_output(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    lse = new_output((B * H, N), dtype=acc, device=q.device) if lse is None else lse
    rows = new_output((B, H, n_rows, N), dtype=q.dtype, device=q.device)
    rows_arg = rows if n_rows else out
    rows_strides = rows.stride()[:3] if n_rows else (0, 0, 0)
    programs, grid_len, lse_strides = _geometry(dims, cu_seqlens, max_seqlen)
    bias_ptr, *bias_strides = _bias_args(bias, q, dims)
    _launch(attention_fwd_kernel, q, grid_len, programs,
            q, k, v, bias_ptr, out, lse, rows_arg, q if cu_seqlens is None else cu_seqlens,
            *_strides(q, varlen, heads_last), *_strides(k, varlen, heads_last), *_strides(v, varlen, heads_last),
            *bias_strides, *_strides(out, varlen, heads_last), *rows_strides, *lse_strides,
            H, N, scale * math.log2(math.e), 1.0 / scale,
            HEAD_DIM=d, D_PAD=head_dim_padded(d), HAS_BIAS=bias is not None, N_ROWS=n_rows,
            PRECISION=dot_precision(q.dtype, allow_tf32), VARLEN=varlen)
    return out, lse, rows


def attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, *, scale: float, bias=None, allow_tf32: bool = False,
                  heads_last: bool = False, cu_seqlens=None, max_seqlen: int = 0):
    """Write dq, dk, dv (preallocated, e.g. slices of a packed dqkv); every tensor in q's layout."""
    dims = _dims(q, heads_last)
    B, H, N, d = dims
    varlen = cu_seqlens is not None
    d_pad = head_dim_padded(d)
    programs, grid_len, lse_strides = _geometry(dims, cu_seqlens, max_seqlen)
    cu = q if cu_seqlens is None else cu_seqlens

    def strides(t):
        return _strides(t, varlen, heads_last)

    delta = new_output((B * H, N), dtype=lse.dtype, device=q.device)  # written by the dq launch, read by dk/dv's
    bias_ptr, *bias_strides = _bias_args(bias, q, dims)
    common = (*strides(q), *strides(k), *strides(v), *bias_strides, *strides(dout))
    meta = dict(HEAD_DIM=d, D_PAD=d_pad, HAS_BIAS=bias is not None, PRECISION=dot_precision(q.dtype, allow_tf32),
                VARLEN=varlen)
    scale_log2 = scale * math.log2(math.e)
    _launch(attention_bwd_dq_kernel, q, grid_len, programs,
            q, k, v, bias_ptr, dout, out, lse, delta, dq, cu, *common, *strides(out), *strides(dq),
            *lse_strides, H, N, scale, scale_log2, 1.0 / scale, **meta)
    _launch(attention_bwd_dkdv_kernel, q, grid_len, programs,
            q, k, v, bias_ptr, dout, lse, delta, dk, dv, cu, *common, *strides(dk), *strides(dv),
            *lse_strides, H, N, scale, scale_log2, 1.0 / scale, **meta)
    return dq, dk, dv


def _signature(kernel, pointers, accumulators=("LSE", "Delta")):
    """Triton signature: the listed pointers, fp32 scales, i32 strides/sizes, constexpr the rest."""
    sig = {}
    for name in kernel.arg_names:
        if name in accumulators:
            sig[name] = pointer(torch.float32)
        elif name in ("Q", "K", "V", "Bias", "O", "Rows", "DO", "DQ", "DK", "DV"):
            sig[name] = pointers
        elif name == "CuSeqlens":
            sig[name] = "*i32"
        elif name.startswith("scale") or name == "bias_mult":
            sig[name] = "fp32"
        elif name.startswith("stride_") or name in ("H", "N"):
            sig[name] = "i32"
        else:
            sig[name] = "constexpr"
    return sig


def aot_specializations():
    """(kernel, signature, constexprs, options) for the variants the launchers use: see tests/test_aot_compile.py.

    Every candidate configuration at the main case (bf16, d=64, with and without bias, long
    sequences, N = 785 and 197); the heuristic choice and the first candidate for every other dtype and head dim.
    """
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        element_bytes = torch.empty(0, dtype=dtype).element_size()
        for d in (32, 64, 80, 96, 128):
            main_case = dtype == torch.bfloat16 and d == 64
            d_pad = head_dim_padded(d)
            # (bias, packed variable-length sequences)
            variants = ((False, False), (True, False), (False, True)) if main_case else ((False, False),)
            for has_bias, varlen in variants:
                base = dict(HEAD_DIM=d, D_PAD=d_pad, HAS_BIAS=has_bias, PRECISION=dot_precision(dtype, True),
                            VARLEN=varlen)
                for kernel in CONFIGS:
                    extra = {"N_ROWS": 1} if kernel is attention_fwd_kernel else {}
                    candidates = candidate_configs(kernel, 4096, d_pad, element_bytes)
                    heuristic = heuristic_config(kernel, 4096, d, d_pad, element_bytes)
                    if main_case:  # and the split-tail ones, which N = 785 and 197 leave short ends for
                        chosen = {id(c): c for n in (4096, 785, 197)
                                  for c in candidate_configs(kernel, n, d_pad, 2)}.values()
                    else:
                        chosen = {id(c): c for c in (candidates[0], heuristic)}.values()
                    for cfg in chosen:
                        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                        yield kernel, _signature(kernel, pointer(dtype)), {**base, **extra, **cfg.kwargs}, options
