"""DINO loss (Caron et al. 2021) over all crop pairs of each image, forward and backward.

Student logits S: (ncrops·B, K), crop-major (row v·B + b is crop v of image b); teacher
logits T: (G·B, K), G global crops. With x = S / τs and u = (T - c) / τt:

    loss = 1/(B·P) Σ_b Σ_{i<G} Σ_{v≠i} [lse(x_v) - Σ_k q_ik x_vk],   q_i = softmax(u_i), P = G·(ncrops - 1)
         = 1/(B·P) Σ_b Σ_i [(L - lse(x_i)) - Σ_k q_ik (X_k - x_ik)],  L = Σ_v lse(x_v), X = Σ_v x_v

so each crop's log-normaliser is computed once and every pair's cross term comes from one
product with X. One program owns one image and BLOCK_K columns of all its crops: a
(CROPS, BLOCK_K) student tile (rows v >= ncrops masked) and a (GLOBALS, BLOCK_K) teacher tile,
so exp runs on about ncrops + G rows, not on every pair. Forward, one pass over K: per-block
max / sum of exp of every student and teacher row and the unnormalised cross term
Σ_k e_ik (X_k - x_ik), e = exp(u - block max); the combine kernel merges the blocks per image
(max first, then rescaled sums: no atomics, fixed order) into the log-normalisers and the
image's loss term. Backward, one pass over K, from the saved log-normalisers:

    dL/dS_vk = g/(B·P·τs) · (n_v p_vk - Σ_i q_ik + [v<G] q_vk),   n_v = G - [v<G]

Logits are assumed finite (as DINO's head gives); all math is float32.
"""
import torch
import triton
import triton.language as tl

from ._launch import cdiv, new_output, next_power_of_2, pointer

TILE_ELEMENTS = 8192       # (CROPS, BLOCK_K) tile held in registers per program
MAX_BLOCK_K = 4096
COMBINE_BLOCK = 64         # K-blocks merged per step of the combine kernel
PARTIALS = 5               # student max, student sum, teacher max, teacher sum, teacher cross


@triton.jit
def _student_tile(S, rows, row_ok, cols, col_ok, stride_s, inv_student_temp):
    """x = S/τs over (rows, cols), masked entries 0, and its mask."""
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(S + rows.to(tl.int64)[:, None] * stride_s + cols[None, :], mask=mask, other=0.0)
    return x.to(tl.float32) * inv_student_temp, mask


@triton.jit
def _teacher_tile(T, CENTER, rows, row_ok, cols, col_ok, stride_t, inv_teacher_temp):
    """u = (T - c)/τt over (rows, cols), masked entries 0, and its mask."""
    mask = row_ok[:, None] & col_ok[None, :]
    t = tl.load(T + rows.to(tl.int64)[:, None] * stride_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(CENTER + cols, mask=col_ok, other=0.0).to(tl.float32)
    return (t - c[None, :]) * inv_teacher_temp, mask


@triton.jit
def _block_max(v, mask, row_ok):
    m = tl.max(tl.where(mask, v, -float("inf")), axis=1)
    return tl.where(row_ok, m, 0.0)


@triton.jit
def _image_tiles(S, T, CENTER, b, j, B, K, NCROPS, NGLOBAL, stride_s, stride_t, inv_student_temp,
                 inv_teacher_temp, CROPS: tl.constexpr, GLOBALS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Image b's student (all crops) and teacher (global crops) tiles over column block j, with their masks."""
    crops = tl.arange(0, CROPS)
    globals_ = tl.arange(0, GLOBALS)
    s_ok = crops < NCROPS
    t_ok = globals_ < NGLOBAL
    cols = j * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    x, s_mask = _student_tile(S, crops * B + b, s_ok, cols, col_ok, stride_s, inv_student_temp)
    u, t_mask = _teacher_tile(T, CENTER, globals_ * B + b, t_ok, cols, col_ok, stride_t, inv_teacher_temp)
    return crops, globals_, s_ok, t_ok, cols, col_ok, x, s_mask, u, t_mask


@triton.jit
def dino_loss_fwd_kernel(S, T, CENTER, PART, stride_s, stride_t, B, K, NCROPS, NGLOBAL, NBLOCKS,
                         inv_student_temp, inv_teacher_temp, CROPS: tl.constexpr, GLOBALS: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    crops, globals_, s_ok, t_ok, cols, col_ok, x, s_mask, u, t_mask = _image_tiles(
        S, T, CENTER, b, j, B, K, NCROPS, NGLOBAL, stride_s, stride_t, inv_student_temp, inv_teacher_temp,
        CROPS, GLOBALS, BLOCK_K)
    # The student crops that share a view with a teacher crop, again (an L1/L2 hit), row-aligned with u.
    x_own, _ = _student_tile(S, globals_ * B + b, t_ok, cols, col_ok, stride_s, inv_student_temp)
    s_max = _block_max(x, s_mask, s_ok)
    s_sum = tl.sum(tl.where(s_mask, tl.exp(x - s_max[:, None]), 0.0), axis=1)
    t_max = _block_max(u, t_mask, t_ok)
    e = tl.where(t_mask, tl.exp(u - t_max[:, None]), 0.0)
    t_sum = tl.sum(e, axis=1)
    x_all = tl.sum(x, axis=0)  # Σ_v x_v (masked entries are 0)
    t_cross = tl.sum(e * (x_all[None, :] - x_own), axis=1)
    # PART: (PARTIALS, B, CROPS, NBLOCKS); teacher crop i at row i
    plane = B * CROPS * NBLOCKS
    s_offs = (b * CROPS + crops) * NBLOCKS + j
    t_offs = (b * CROPS + globals_) * NBLOCKS + j
    tl.store(PART + s_offs, s_max, mask=s_ok)
    tl.store(PART + plane + s_offs, s_sum, mask=s_ok)
    tl.store(PART + 2 * plane + t_offs, t_max, mask=t_ok)
    tl.store(PART + 3 * plane + t_offs, t_sum, mask=t_ok)
    tl.store(PART + 4 * plane + t_offs, t_cross, mask=t_ok)


@triton.jit
def dino_loss_combine_kernel(PART, IMAGE_LOSS, LSE_S, LSE_T, B, NCROPS, NGLOBAL, NBLOCKS, scale,
                             CROPS: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(0)
    crops = tl.arange(0, CROPS)
    s_ok = crops < NCROPS
    t_ok = crops < NGLOBAL
    plane = B * CROPS * NBLOCKS
    base = (b * CROPS + crops) * NBLOCKS
    s_max = tl.full([CROPS], -float("inf"), dtype=tl.float32)
    t_max = tl.full([CROPS], -float("inf"), dtype=tl.float32)
    for start in range(0, NBLOCKS, BLOCK_J):
        js = start + tl.arange(0, BLOCK_J)
        offs = base[:, None] + js[None, :]
        j_ok = (js < NBLOCKS)[None, :]
        s_max = tl.maximum(s_max, tl.max(tl.load(PART + offs, mask=s_ok[:, None] & j_ok, other=-float("inf")), 1))
        t_max = tl.maximum(t_max, tl.max(tl.load(PART + 2 * plane + offs, mask=t_ok[:, None] & j_ok,
                                                 other=-float("inf")), 1))
    s_max = tl.where(s_ok, s_max, 0.0)
    t_max = tl.where(t_ok, t_max, 0.0)
    s_sum = tl.zeros([CROPS], dtype=tl.float32)
    t_sum = tl.zeros([CROPS], dtype=tl.float32)
    t_cross = tl.zeros([CROPS], dtype=tl.float32)
    for start in range(0, NBLOCKS, BLOCK_J):
        js = start + tl.arange(0, BLOCK_J)
        offs = base[:, None] + js[None, :]
        j_ok = (js < NBLOCKS)[None, :]
        s_mask = s_ok[:, None] & j_ok
        t_mask = t_ok[:, None] & j_ok
        s_block_max = tl.load(PART + offs, mask=s_mask, other=0.0)
        s_scale = tl.where(s_mask, tl.exp(s_block_max - s_max[:, None]), 0.0)
        s_sum += tl.sum(s_scale * tl.load(PART + plane + offs, mask=s_mask, other=0.0), 1)
        t_block_max = tl.load(PART + 2 * plane + offs, mask=t_mask, other=0.0)
        t_scale = tl.where(t_mask, tl.exp(t_block_max - t_max[:, None]), 0.0)
        t_sum += tl.sum(t_scale * tl.load(PART + 3 * plane + offs, mask=t_mask, other=0.0), 1)
        t_cross += tl.sum(t_scale * tl.load(PART + 4 * plane + offs, mask=t_mask, other=0.0), 1)
    s_lse = s_max + tl.log(tl.where(s_ok, s_sum, 1.0))
    t_lse = t_max + tl.log(tl.where(t_ok, t_sum, 1.0))
    cross = tl.where(t_ok, t_cross / tl.where(t_ok, t_sum, 1.0), 0.0)
    s_lse_all = tl.sum(tl.where(s_ok, s_lse, 0.0), 0)
    # Σ_{i<G} [(L - lse_i) - cross_i]
    image_loss = tl.sum(tl.where(t_ok, s_lse_all - s_lse - cross, 0.0), 0)
    rows = crops * B + b
    tl.store(LSE_S + rows, s_lse, mask=s_ok)
    tl.store(LSE_T + rows, t_lse, mask=t_ok)
    tl.store(IMAGE_LOSS + b, image_loss * scale)


@triton.jit
def dino_loss_bwd_kernel(S, T, CENTER, LSE_S, LSE_T, GRAD, DS, stride_s, stride_t, stride_ds, B, K, NCROPS, NGLOBAL,
                         inv_student_temp, inv_teacher_temp, scale, CROPS: tl.constexpr, GLOBALS: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    crops, globals_, s_ok, t_ok, cols, col_ok, x, s_mask, u, t_mask = _image_tiles(
        S, T, CENTER, b, j, B, K, NCROPS, NGLOBAL, stride_s, stride_t, inv_student_temp, inv_teacher_temp,
        CROPS, GLOBALS, BLOCK_K)
    s_lse = tl.load(LSE_S + crops * B + b, mask=s_ok, other=0.0)
    t_lse = tl.load(LSE_T + globals_ * B + b, mask=t_ok, other=0.0)
    p = tl.exp(x - s_lse[:, None])
    q = tl.where(t_mask, tl.exp(u - t_lse[:, None]), 0.0)
    q_all = tl.sum(q, axis=0)
    # q moved onto the student rows of the same view (row i for teacher crop i; 0 on the local crops).
    q_own = tl.zeros([CROPS, BLOCK_K], dtype=tl.float32)
    for i in tl.static_range(GLOBALS):
        q_i = tl.sum(tl.where(globals_[:, None] == i, q, 0.0), axis=0)
        q_own += tl.where(crops[:, None] == i, q_i[None, :], 0.0)
    n_teachers = (NGLOBAL - (crops < NGLOBAL).to(tl.int32)).to(tl.float32)
    g = tl.load(GRAD).to(tl.float32) * scale
    ds = g * (n_teachers[:, None] * p - q_all[None, :] + q_own)
    rows = (crops * B + b).to(tl.int64)
    tl.store(DS + rows[:, None] * stride_ds + cols[None, :], ds, mask=s_mask)


def _launch_shape(ncrops: int, n_global: int, K: int):
    crops, n_globals = next_power_of_2(ncrops), next_power_of_2(n_global)
    block_k = min(next_power_of_2(K), MAX_BLOCK_K, max(TILE_ELEMENTS // crops, 128))
    num_warps = 8 if crops * block_k >= 4096 else 4
    return crops, n_globals, block_k, num_warps


def dino_loss_fwd(student, teacher, center, ncrops: int, student_temp: float, teacher_temp: float):
    """student (ncrops·B, K), teacher (G·B, K), center (K,), unit column strides.

    Returns (loss: 0-d float32, student lse over S/τs: (ncrops·B,), teacher lse over (T - c)/τt: (G·B,)).
    """
    rows, K = student.shape
    B = rows // ncrops
    n_global = teacher.shape[0] // B
    crops, n_globals, block_k, num_warps = _launch_shape(ncrops, n_global, K)
    n_blocks = cdiv(K, block_k)
    device = student.device
    part = new_output((PARTIALS, B, crops, n_blocks), dtype=torch.float32, device=device)
    image_loss = new_output((B,), dtype=torch.float32, device=device)
    lse_s = new_output((rows,), dtype=torch.float32, device=device)
    lse_t = new_output((teacher.shape[0],), dtype=torch.float32, device=device)
    dino_loss_fwd_kernel[(B, n_blocks)](student, teacher, center, part, student.stride(0), teacher.stride(0), B, K,
                                        ncrops, n_global, n_blocks, 1.0 / student_temp, 1.0 / teacher_temp,
                                        CROPS=crops, GLOBALS=n_globals, BLOCK_K=block_k, num_warps=num_warps)
    pairs = n_global * (ncrops - 1)
    dino_loss_combine_kernel[(B,)](part, image_loss, lse_s, lse_t, B, ncrops, n_global, n_blocks, 1.0 / (B * pairs),
                                   CROPS=crops, BLOCK_J=COMBINE_BLOCK, num_warps=4)
    return image_loss.sum(), lse_s, lse_t


def dino_loss_bwd(grad, student, teacher, center, lse_s, lse_t, ncrops: int, student_temp: float,
                  teacher_temp: float):
    """d loss / d student, in the student's dtype; ``grad`` is the 0-d gradient of the loss (read on device)."""
    rows, K = student.shape
    B = rows // ncrops
    n_global = teacher.shape[0] // B
    crops, n_globals, block_k, num_warps = _launch_shape(ncrops, n_global, K)
    ds = new_output((rows, K), dtype=student.dtype, device=student.device)
    pairs = n_global * (ncrops - 1)
    dino_loss_bwd_kernel[(B, cdiv(K, block_k))](
        student, teacher, center, lse_s, lse_t, grad, ds, student.stride(0), teacher.stride(0), ds.stride(0), B, K,
        ncrops, n_global, 1.0 / student_temp, 1.0 / teacher_temp, 1.0 / (B * pairs * student_temp),
        CROPS=crops, GLOBALS=n_globals, BLOCK_K=block_k, num_warps=num_warps)
    return ds


def aot_specializations():
    """(kernel, signature, constexprs, options) for each variant the launchers use: see tests/test_aot_compile.py."""
    for dtype in (torch.bfloat16, torch.float32):
        p = pointer(dtype)
        for ncrops in (2, 12):
            crops, n_globals, block_k, num_warps = _launch_shape(ncrops, 2, 65536)
            constexprs = {"CROPS": crops, "GLOBALS": n_globals, "BLOCK_K": block_k}
            options = {"num_warps": num_warps}
            yield (dino_loss_fwd_kernel, {
                "S": p, "T": p, "CENTER": "*fp32", "PART": "*fp32", "stride_s": "i32", "stride_t": "i32", "B": "i32",
                "K": "i32", "NCROPS": "i32", "NGLOBAL": "i32", "NBLOCKS": "i32", "inv_student_temp": "fp32",
                "inv_teacher_temp": "fp32", "CROPS": "constexpr", "GLOBALS": "constexpr", "BLOCK_K": "constexpr"},
                constexprs, options)
            yield (dino_loss_bwd_kernel, {
                "S": p, "T": p, "CENTER": "*fp32", "LSE_S": "*fp32", "LSE_T": "*fp32", "GRAD": "*fp32", "DS": p,
                "stride_s": "i32", "stride_t": "i32", "stride_ds": "i32", "B": "i32", "K": "i32", "NCROPS": "i32",
                "NGLOBAL": "i32", "inv_student_temp": "fp32", "inv_teacher_temp": "fp32", "scale": "fp32",
                "CROPS": "constexpr", "GLOBALS": "constexpr", "BLOCK_K": "constexpr"}, constexprs, options)
            if dtype == torch.float32:
                yield (dino_loss_combine_kernel, {
                    "PART": "*fp32", "IMAGE_LOSS": "*fp32", "LSE_S": "*fp32", "LSE_T": "*fp32", "B": "i32",
                    "NCROPS": "i32", "NGLOBAL": "i32", "NBLOCKS": "i32", "scale": "fp32",
                    "CROPS": "constexpr", "BLOCK_J": "constexpr"},
                    {"CROPS": crops, "BLOCK_J": COMBINE_BLOCK}, {"num_warps": 4})
