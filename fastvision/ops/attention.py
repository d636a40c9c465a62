"""Fused multi-head self-attention as torch.library custom ops.

``attention(q, k, v)`` takes (B, H, N, d) tensors like F.scaled_dot_product_attention;
``attention_qkvpacked(qkv)`` takes the (B, N, 3, H, d) output of a qkv Linear as it lies
in memory (no permute copy) and returns (B, N, H, d), ready for ``reshape(B, N, H*d)``.
Both can also return the softmax probabilities of the first ``return_attn_rows`` query
rows (DINO's CLS attention maps), computed in the same fused pass.

float32 inputs use TF32 matrix products on the GPU when
``torch.backends.cuda.matmul.allow_tf32`` is set (as torch.matmul does); otherwise IEEE fp32.
"""
import itertools
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _common as C
from ._dispatch import call, define

MAX_HEAD_DIM = 128
MAX_ATTENTION_ROWS = 16
LOG2E = 1.0 / math.log(2.0)


def _kernels():
    return C.triton_kernels.attention


def _allow_tf32() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


# --- eager math (CPU without the interpreter; also the reference for the op's contract) --------

def _eager_scores(q, k, bias, scale):
    acc = C.accumulator_dtype(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    return s if bias is None else s + bias.to(acc)


def _eager_forward(q, k, v, bias, scale, n_rows):
    s = _eager_scores(q, k, bias, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    out = (p @ v.to(p.dtype)).to(q.dtype)
    B, H, N, _ = q.shape
    return out, (lse * LOG2E).reshape(B * H, N), p[:, :, :n_rows].to(q.dtype)


def _eager_backward(dout, q, k, v, out, lse, bias, scale):
    B, H, N, _ = q.shape
    acc = lse.dtype
    s = _eager_scores(q, k, bias, scale)
    p = torch.exp(s - lse.view(B, H, N, 1) / LOG2E)
    do = dout.to(acc)
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (do @ v.to(acc).transpose(-2, -1) - delta)
    dq = (ds @ k.to(acc)) * scale
    dk = (ds.transpose(-2, -1) @ q.to(acc)) * scale
    dv = p.transpose(-2, -1) @ do
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --- (B, H, N, d) custom ops ---------------------------------------------------------------

def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _attention_impl(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float, n_rows: int,
                  allow_tf32: bool) -> Tuple[Tensor, Tensor, Tensor]:
    if not C.use_triton(q):
        return _eager_forward(q, k, v, bias, scale, n_rows)
    return _kernels().attention_fwd(_unit_stride(q), _unit_stride(k), _unit_stride(v), scale=scale, bias=bias,
                                    n_rows=n_rows, allow_tf32=allow_tf32)


def _attention_fake(q, k, v, bias, scale, n_rows, allow_tf32):
    B, H, N, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B * H, N), dtype=C.accumulator_dtype(q.dtype)), q.new_empty((B, H, n_rows, N))


def _attention_backward_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           bias: Optional[Tensor], scale: float, allow_tf32: bool) -> Tuple[Tensor, Tensor, Tensor]:
    if not C.use_triton(q):
        return _eager_backward(dout, q, k, v, out, lse, bias, scale)
    dq, dk, dv = (_new_grad(t) for t in (q, k, v))
    return _kernels().attention_bwd(_unit_stride(dout), _unit_stride(q), _unit_stride(k), _unit_stride(v), out, lse,
                                    dq, dk, dv, scale=scale, bias=bias, allow_tf32=allow_tf32)


def _attention_backward_fake(dout, q, k, v, out, lse, bias, scale, allow_tf32):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _new_grad(t: Tensor) -> Tensor:
    from fastvision.triton_kernels._launch import new_output
    return new_output(t.shape, dtype=t.dtype, device=t.device)


def _setup_attention(ctx, inputs, output):
    q, k, v, bias, scale, _, allow_tf32 = inputs
    out, lse, rows = output
    ctx.scale, ctx.allow_tf32, ctx.has_bias = scale, allow_tf32, bias is not None
    ctx.save_for_backward(q, k, v, out, lse, bias)
    ctx.mark_non_differentiable(lse, rows)


def _attention_backward(ctx, dout, _dlse, _drows):
    q, k, v, out, lse, bias = ctx.saved_tensors
    bias = bias if ctx.has_bias else None
    dq, dk, dv = call("attention_backward", dout, q, k, v, out, lse, bias, ctx.scale, ctx.allow_tf32)
    return dq, dk, dv, None, None, None, None


define("attention_backward", _attention_backward_impl, _attention_backward_fake)
define("attention", _attention_impl, _attention_fake, setup_context=_setup_attention, backward=_attention_backward)


# --- packed (B, N, 3, H, d) custom ops -----------------------------------------------------

def _unpack(qkv: Tensor):
    """(B, H, N, d) views of q, k, v inside a (B, N, 3, H, d) tensor."""
    return tuple(qkv.select(2, i).transpose(1, 2) for i in range(3))


def _attention_qkvpacked_impl(qkv: Tensor, bias: Optional[Tensor], scale: float, n_rows: int, allow_tf32: bool
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    if not C.use_triton(qkv):
        out, lse, rows = _eager_forward(*_unpack(qkv), bias, scale, n_rows)
        return out.transpose(1, 2).contiguous(), lse, rows
    q, k, v = _unit_stride(qkv).unbind(2)  # (B, N, H, d) views, read in place
    return _kernels().attention_fwd(q, k, v, scale=scale, bias=bias, n_rows=n_rows, allow_tf32=allow_tf32,
                                    heads_last=True)


def _attention_packed_fake(qkv, bias, scale, n_rows, allow_tf32):
    B, N, _, H, d = qkv.shape
    lse = qkv.new_empty((B * H, N), dtype=C.accumulator_dtype(qkv.dtype))
    return qkv.new_empty((B, N, H, d)), lse, qkv.new_empty((B, H, n_rows, N))


def _attention_qkvpacked_backward_impl(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, bias: Optional[Tensor],
                                  scale: float, allow_tf32: bool) -> Tensor:
    if not C.use_triton(qkv):
        grads = _eager_backward(dout.transpose(1, 2), *_unpack(qkv), out.transpose(1, 2), lse, bias, scale)
        return torch.stack([g.transpose(1, 2) for g in grads], dim=2)
    dqkv = _new_grad(qkv)
    _kernels().attention_bwd(_unit_stride(dout), *_unit_stride(qkv).unbind(2), out, lse, *dqkv.unbind(2),
                             scale=scale, bias=bias, allow_tf32=allow_tf32, heads_last=True)
    return dqkv


def _attention_packed_backward_fake(dout, qkv, out, lse, bias, scale, allow_tf32):
    return qkv.new_empty(qkv.shape)


def _setup_attention_packed(ctx, inputs, output):
    qkv, bias, scale, _, allow_tf32 = inputs
    out, lse, rows = output
    ctx.scale, ctx.allow_tf32, ctx.has_bias = scale, allow_tf32, bias is not None
    ctx.save_for_backward(qkv, out, lse, bias)
    ctx.mark_non_differentiable(lse, rows)


def _attention_packed_backward(ctx, dout, _dlse, _drows):
    qkv, out, lse, bias = ctx.saved_tensors
    bias = bias if ctx.has_bias else None
    dqkv = call("attention_qkvpacked_backward", dout, qkv, out, lse, bias, ctx.scale, ctx.allow_tf32)
    return dqkv, None, None, None, None


define("attention_qkvpacked_backward", _attention_qkvpacked_backward_impl, _attention_packed_backward_fake)
define("attention_qkvpacked", _attention_qkvpacked_impl, _attention_packed_fake, setup_context=_setup_attention_packed,
       backward=_attention_packed_backward)


# --- public API ----------------------------------------------------------------------------

def attention_decline(q: Tensor, k: Optional[Tensor] = None, v: Optional[Tensor] = None,
                      attn_bias: Optional[Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                      scale: Optional[float] = None) -> Optional[str]:
    """Why the fused kernel will not run on these (B, H, N, d) inputs (None: it will).

    Only q's last dimension, dtype and device are read, so a packed (B, N, 3, H, d) qkv serves as q too.
    """
    d = q.shape[-1]
    return C.first_decline(
        C.device_decline(q), C.dtype_decline(q),
        "float64 on CUDA (the compiled kernels miss the float64 tolerance on an H100 with Triton 3.6, likely "
        "because Triton passes the Python float scale arguments as fp32)"
        if q.is_cuda and q.dtype == torch.float64 else None,
        f"scale={scale} (the kernel needs a positive softmax scale)" if scale is not None and scale <= 0 else None,
        f"head dim {d} > {MAX_HEAD_DIM}" if d > MAX_HEAD_DIM else None,
        "head dim 0" if d == 0 else None,
        "k or v has a different shape, dtype or device than q (cross-attention)"
        if any(t is not None and (t.shape != q.shape or t.dtype != q.dtype or t.device != q.device) for t in (k, v))
        else None,
        "attn_bias requires grad (the kernel does not compute its gradient)"
        if attn_bias is not None and attn_bias.requires_grad and torch.is_grad_enabled() else None,
        f"dropout_p={dropout_p} (attention dropout is not fused)" if dropout_p > 0 else None,
        "is_causal=True (no causal mask in the ViT kernel)" if is_causal else None,
    )


def _validate_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        C.check_floating(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k has {k.shape[2]} tokens but v has {v.shape[2]}")
    C.check_same_device(q=q, k=k, v=v)


def _additive_bias(attn_bias: Optional[Tensor], q_like: Tensor, B: int, H: int, N: int) -> Optional[Tensor]:
    """attn_bias as an additive float bias broadcastable to (B, H, N, N); bool masks keep True."""
    if attn_bias is None:
        return None
    if not isinstance(attn_bias, Tensor):
        raise TypeError(f"attn_bias must be a tensor, got {type(attn_bias).__name__}")
    if attn_bias.dtype == torch.bool:
        attn_bias = torch.zeros(attn_bias.shape, dtype=q_like.dtype, device=attn_bias.device).masked_fill(
            ~attn_bias, float("-inf"))
    elif not attn_bias.is_floating_point():
        raise TypeError(f"attn_bias must be a bool or floating-point tensor, got dtype {attn_bias.dtype}")
    try:
        torch.broadcast_shapes(attn_bias.shape, (B, H, N, N))
    except RuntimeError:
        raise ValueError(f"attn_bias of shape {tuple(attn_bias.shape)} does not broadcast to "
                         f"(batch, heads, tokens, tokens) = {(B, H, N, N)}") from None
    C.check_same_device(q=q_like, attn_bias=attn_bias)
    while attn_bias.dim() < 4:
        attn_bias = attn_bias.unsqueeze(0)
    return attn_bias


def _check_rows(n_rows: int, N: int) -> int:
    n_rows = int(n_rows)
    if not 0 <= n_rows <= MAX_ATTENTION_ROWS:
        raise ValueError(f"return_attn_rows must be between 0 and {MAX_ATTENTION_ROWS}, got {n_rows}")
    return min(n_rows, N)


def _eager_rows(q, k, bias, scale, n_rows):
    if n_rows == 0:
        return None
    b = None if bias is None else bias.expand(*q.shape[:2], q.shape[2], k.shape[2])[:, :, :n_rows]
    return _eager_scores(q[:, :, :n_rows], k, b, scale).softmax(-1).to(q.dtype)


def _sdpa(q, k, v, bias, scale, dropout_p, is_causal):
    bias = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, attn_bias: Optional[Tensor] = None,
              return_attn_rows: int = 0, dropout_p: float = 0.0, is_causal: bool = False):
    """softmax(q kᵀ·scale + attn_bias) v for (B, H, N, d) tensors; drop-in for F.scaled_dot_product_attention.

    ``attn_bias``: additive float bias or bool mask (True = attend) broadcastable to (B, H, N, N).
    ``return_attn_rows=n``: also return the probabilities of the first n query rows, (B, H, n, N).
    Unsupported inputs (see ``attention_decline``) run F.scaled_dot_product_attention.
    """
    _validate_qkv(q, k, v)
    q, k, v = C.autocast_cast(C.autocast_dtype_for(q.device.type, "lower"), q, k, v)
    B, H, N, d = q.shape
    scale = d ** -0.5 if scale is None else float(scale)
    n_rows = _check_rows(return_attn_rows, N)
    bias = _additive_bias(attn_bias, q, B, H, N)
    if attention_decline(q, k, v, bias, dropout_p, is_causal, scale) is not None:
        out = _sdpa(q, k, v, bias, scale, dropout_p, is_causal)
        rows = _eager_rows(q, k, bias, scale, n_rows)
    else:
        out, _, rows = call("attention", q, k, v, bias, scale, n_rows, _allow_tf32())
    return (out, rows) if return_attn_rows else out


def attention_qkvpacked(qkv: Tensor, *, scale: Optional[float] = None, attn_bias: Optional[Tensor] = None,
                        return_attn_rows: int = 0, dropout_p: float = 0.0):
    """Self-attention straight off a qkv projection: qkv (B, N, 3, H, d) → (B, N, H, d).

    ``qkv`` is ``linear(x).view(B, N, 3, H, d)``: the kernel reads q, k and v in place.
    """
    C.check_floating("qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (batch, tokens, 3, heads, head_dim), got {tuple(qkv.shape)}")
    (qkv,) = C.autocast_cast(C.autocast_dtype_for(qkv.device.type, "lower"), qkv)
    B, N, _, H, d = qkv.shape
    scale = d ** -0.5 if scale is None else float(scale)
    n_rows = _check_rows(return_attn_rows, N)
    bias = _additive_bias(attn_bias, qkv, B, H, N)
    if attention_decline(qkv, attn_bias=bias, dropout_p=dropout_p, scale=scale) is not None:
        q, k, v = _unpack(qkv)
        out = _sdpa(q, k, v, bias, scale, dropout_p, False).transpose(1, 2)
        rows = _eager_rows(q, k, bias, scale, n_rows)
    else:
        out, _, rows = call("attention_qkvpacked", qkv, bias, scale, n_rows, _allow_tf32())
    return (out, rows) if return_attn_rows else out


# --- variable-length (block-diagonal) attention over packed sequences ----------------------

@dataclass(frozen=True)
class Segments:
    """Consecutive sequences packed along one token axis: tokens attend only within their own sequence.

    ``lengths`` stays on the host (no device sync to plan a launch or the eager fallback);
    ``cu_seqlens`` (int32, len(lengths) + 1, on the tokens' device) holds the start offsets.
    """
    lengths: Tuple[int, ...]
    cu_seqlens: Tensor

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device=None) -> "Segments":
        """Offsets reach a CUDA device through a pinned, asynchronous copy: no host sync per step."""
        lengths = tuple(int(n) for n in lengths)
        if not lengths or min(lengths) < 1:
            raise ValueError(f"segment lengths must be positive, got {lengths}")
        offsets = torch.tensor((0,) + lengths, dtype=torch.int32).cumsum_(0)
        device = torch.device(device) if device is not None else offsets.device
        if device.type == "cuda":
            offsets = offsets.pin_memory().to(device, non_blocking=True)
        return cls(lengths, offsets.to(device))

    # Derived once here, read by every block of a packed forward.
    total: int = field(init=False)
    max_length: int = field(init=False)
    device_lengths: Tensor = field(init=False, compare=False, repr=False)  # on the offsets' device
    # [length, count, length, count, ...] of the runs of equal consecutive lengths (an op argument)
    run_list: List[int] = field(init=False, compare=False, repr=False)
    first_tokens: Tensor = field(init=False, compare=False, repr=False)  # int64 start of each sequence

    def __post_init__(self):
        object.__setattr__(self, "total", sum(self.lengths))
        object.__setattr__(self, "max_length", max(self.lengths))
        object.__setattr__(self, "device_lengths", self.cu_seqlens.diff())
        object.__setattr__(self, "run_list", [n for length, group in itertools.groupby(self.lengths)
                                              for n in (length, sum(1 for _ in group))])
        object.__setattr__(self, "first_tokens", self.cu_seqlens[:-1].long())

    def runs(self) -> List[Tuple[int, int, int]]:
        """(start token, length, count) of each run of equal consecutive lengths."""
        return _runs_with_starts(self.run_list)


def _runs_with_starts(run_list: List[int]) -> List[Tuple[int, int, int]]:
    """(start token, length, count) of each run of a [length, count, length, count, ...] list."""
    found, start = [], 0
    for length, count in zip(run_list[::2], run_list[1::2]):
        found.append((start, length, count))
        start += length * count
    return found


def _eager_varlen(qkv: Tensor, segments: Segments, scale: float) -> Tensor:
    """Runs of equal-length sequences as one batched SDPA each: (T, 3, H, d) → (T, H, d)."""
    outputs = []
    for start, length, count in segments.runs():
        chunk = qkv[start:start + length * count].reshape(count, length, *qkv.shape[1:])
        q, k, v = _unpack(chunk)
        outputs.append(_sdpa(q, k, v, None, scale, 0.0, False).transpose(1, 2).reshape(-1, *qkv.shape[2:]))
    return torch.cat(outputs)


def _runs_of(cu_seqlens: Tensor, runs: Optional[List[int]]):
    """(start token, length, count) of each run of equal-length sequences: from ``runs``
    ([length, count, length, count, ...]) or, without it, from the device offsets (a host sync)."""
    if runs is None:
        offsets = cu_seqlens.tolist()
        return Segments(tuple(b - a for a, b in zip(offsets, offsets[1:])), cu_seqlens).runs()
    return _runs_with_starts(runs)


# Up to this many runs of equal-length sequences (DINO: 2, the global and the local crops) run as
# one dense launch each, with the block sizes tuned for that length; more (truly ragged lengths)
# run as one variable-length launch sized by the longest sequence.
MAX_DENSE_RUNS = 4


def _dense_runs(cu_seqlens: Tensor, runs: Optional[List[int]]):
    if runs is None or len(runs) // 2 > MAX_DENSE_RUNS:
        return None
    return _runs_of(cu_seqlens, runs)


def _run_tokens(t: Tensor, start: int, length: int, count: int) -> Tensor:
    """(count, length, ...) view of a run of equal-length sequences in a (T, ...) tensor."""
    return t[start:start + length * count].view(count, length, *t.shape[1:])


def _run_heads(t: Tensor, start: int, length: int, count: int) -> Tensor:
    """(count, H, length, d) view of a run of equal-length sequences in a (T, H, d) tensor."""
    return _run_tokens(t, start, length, count).transpose(1, 2)


def _run_lse(lse: Tensor, heads: int, start: int, length: int, count: int) -> Tensor:
    """A run's (count * H, length) log-sum-exp rows inside the (H, T) buffer of the dense-runs layout
    (run after run, each in the dense kernel's own order; only this module's backward reads it)."""
    return lse.view(-1)[heads * start:heads * (start + length * count)].view(count * heads, length)


def _attention_varlen_impl(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float, allow_tf32: bool,
                           runs: Optional[List[int]] = None) -> Tuple[Tensor, Tensor]:
    T, _, H, d = qkv.shape
    if not C.use_triton(qkv):
        out, lse = qkv.new_empty((T, H, d)), qkv.new_empty((H, T), dtype=C.accumulator_dtype(qkv.dtype))
        for start, length, count in _runs_of(cu_seqlens, runs):
            q, k, v = (_run_heads(qkv[:, i], start, length, count) for i in range(3))
            run_out, run_lse, _ = _eager_forward(q, k, v, None, scale, 0)
            _run_heads(out, start, length, count).copy_(run_out)
            lse[:, start:start + length * count] = run_lse.view(count, H, length).transpose(0, 1).reshape(H, -1)
        return out, lse
    qkv = _unit_stride(qkv)
    dense = _dense_runs(cu_seqlens, runs)
    if dense is not None:
        out = _new_grad(qkv[:, 0])
        lse = qkv.new_empty((H, T), dtype=C.accumulator_dtype(qkv.dtype))
        for start, length, count in dense:
            q, k, v = _run_tokens(qkv, start, length, count).unbind(2)  # (count, length, H, d) views
            _kernels().attention_fwd(q, k, v, scale=scale, allow_tf32=allow_tf32, heads_last=True,
                                     out=_run_tokens(out, start, length, count),
                                     lse=_run_lse(lse, H, start, length, count))
        return out, lse
    q, k, v = qkv[None].unbind(2)  # (1, T, H, d) views
    out, lse, _ = _kernels().attention_fwd(q, k, v, scale=scale, allow_tf32=allow_tf32, heads_last=True,
                                           cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return out[0], lse


def _attention_varlen_fake(qkv, cu_seqlens, max_seqlen, scale, allow_tf32, runs=None):
    T, _, H, d = qkv.shape
    return qkv.new_empty((T, H, d)), qkv.new_empty((H, T), dtype=C.accumulator_dtype(qkv.dtype))


def _attention_varlen_backward_impl(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
                                    max_seqlen: int, scale: float, allow_tf32: bool,
                                    runs: Optional[List[int]] = None) -> Tensor:
    T, _, H, d = qkv.shape
    if not C.use_triton(qkv):
        dqkv = qkv.new_empty(qkv.shape)
        for start, length, count in _runs_of(cu_seqlens, runs):
            q, k, v = (_run_heads(qkv[:, i], start, length, count) for i in range(3))
            run_lse = lse[:, start:start + length * count].reshape(H, count, length).transpose(0, 1)
            grads = _eager_backward(_run_heads(dout, start, length, count), q, k, v,
                                    _run_heads(out, start, length, count), run_lse.reshape(count * H, length),
                                    None, scale)
            for i, g in enumerate(grads):
                _run_heads(dqkv[:, i], start, length, count).copy_(g)
        return dqkv
    qkv, dout = _unit_stride(qkv), _unit_stride(dout)
    dqkv = _new_grad(qkv)
    dense = _dense_runs(cu_seqlens, runs)
    if dense is not None:
        for start, length, count in dense:
            run = lambda t: _run_tokens(t, start, length, count)  # noqa: E731
            _kernels().attention_bwd(run(dout), *run(qkv).unbind(2), run(out), _run_lse(lse, H, start, length, count),
                                     *run(dqkv).unbind(2), scale=scale, allow_tf32=allow_tf32, heads_last=True)
        return dqkv
    _kernels().attention_bwd(dout[None], *qkv[None].unbind(2), out[None], lse,
                             *dqkv[None].unbind(2), scale=scale, allow_tf32=allow_tf32, heads_last=True,
                             cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return dqkv


def _attention_varlen_backward_fake(dout, qkv, out, lse, cu_seqlens, max_seqlen, scale, allow_tf32, runs=None):
    return qkv.new_empty(qkv.shape)


def _setup_attention_varlen(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, scale, allow_tf32, runs = inputs
    out, lse = output
    ctx.max_seqlen, ctx.scale, ctx.allow_tf32, ctx.runs = max_seqlen, scale, allow_tf32, runs
    ctx.save_for_backward(qkv, cu_seqlens, out, lse)
    ctx.mark_non_differentiable(lse)


def _attention_varlen_backward(ctx, dout, _dlse):
    qkv, cu_seqlens, out, lse = ctx.saved_tensors
    dqkv = call("attention_varlen_backward", dout, qkv, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale,
                ctx.allow_tf32, ctx.runs)
    return dqkv, None, None, None, None, None


define("attention_varlen_backward", _attention_varlen_backward_impl, _attention_varlen_backward_fake)
define("attention_varlen", _attention_varlen_impl, _attention_varlen_fake, setup_context=_setup_attention_varlen,
       backward=_attention_varlen_backward)


def attention_varlen(qkv: Tensor, segments: Segments, *, scale: Optional[float] = None) -> Tensor:
    """Block-diagonal self-attention over packed sequences: qkv (T, 3, H, d) → (T, H, d).

    Token t attends to the tokens of its own sequence only (``segments``); this is how the
    crops of different resolutions of a DINO step run through one transformer pass.
    """
    C.check_floating("qkv", qkv)
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must have shape (tokens, 3, heads, head_dim), got {tuple(qkv.shape)}")
    if not isinstance(segments, Segments):
        raise TypeError(f"segments must be a fastvision.ops.Segments, got {type(segments).__name__}")
    if segments.total != qkv.shape[0]:
        raise ValueError(f"segments cover {segments.total} tokens but qkv has {qkv.shape[0]}")
    (qkv,) = C.autocast_cast(C.autocast_dtype_for(qkv.device.type, "lower"), qkv)
    scale = qkv.shape[-1] ** -0.5 if scale is None else float(scale)
    if varlen_decline(qkv, scale) is not None:
        return _eager_varlen(qkv, segments, scale)
    cu_seqlens = segments.cu_seqlens.to(qkv.device)
    out, _ = call("attention_varlen", qkv, cu_seqlens, segments.max_length, scale, _allow_tf32(), segments.run_list)
    return out


def varlen_decline(qkv: Tensor, scale: Optional[float] = None) -> Optional[str]:
    """Why the fused variable-length kernel will not run on this packed qkv (None: it will)."""
    return attention_decline(qkv, scale=scale)
