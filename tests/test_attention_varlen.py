"""Variable-length (block-diagonal) attention over packed sequences vs a float64 per-sequence reference."""
import importlib

import pytest
import torch

from fastvision import ops
from fastvision.testing import assert_close
from conftest import kernel_devices
from helpers import randn

attention_ops = importlib.import_module("fastvision.ops.attention")  # the module, not ops.attention

# DINO crop token counts (1 + (96/16)^2 = 37, 197) plus odd ones, as in issue 7.
LENGTH_SETS = [
    (1, 5, 37, 50, 197),
    (197, 197, 37, 37, 37, 37),
    (64, 128, 1),
]


def reference(qkv, lengths, scale):
    """Each sequence on its own: (T, 3, H, d) → (T, H, d)."""
    outs, start = [], 0
    for n in lengths:
        q, k, v = (qkv[start:start + n, i].transpose(0, 1) for i in range(3))
        outs.append((torch.softmax(q @ k.transpose(-2, -1) * scale, -1) @ v).transpose(0, 1))
        start += n
    return torch.cat(outs)


def _check(qkv, segments, dtype, scale=None):
    d = qkv.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    out = ops.attention_varlen(qkv, segments, scale=scale)
    grad_out = randn(*out.shape, dtype=dtype, device=out.device)
    out.backward(grad_out)
    ref_qkv = qkv.detach().to("cpu", torch.float64).requires_grad_()
    ref = reference(ref_qkv, segments.lengths, scale)
    ref.backward(grad_out.double().cpu())
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, name="output")
    assert_close(qkv.grad, ref_qkv.grad, dtype, name="grad of qkv")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("lengths", LENGTH_SETS, ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("dtype,d", [(torch.float32, 64), (torch.float16, 80), (torch.bfloat16, 32)], ids=str)
def test_varlen_matches_float64_per_sequence(device, lengths, dtype, d):
    segments = ops.Segments.from_lengths(lengths, device=device)
    std = 1.5 if dtype == torch.bfloat16 else 3.0
    qkv = randn(segments.total, 3, 2, d, dtype=dtype, device=device, std=std, requires_grad=True)
    _check(qkv, segments, dtype)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("split_tail", [False, True], ids=["one_masked_block", "tail_tiles"])
def test_varlen_short_ends_either_way(device, split_tail, monkeypatch):
    """The one-launch layout (more than 4 runs of equal lengths) with 64-row blocks: each sequence's own
    short end (1, 5 and 197 - 192 rows) in one masked block or in 16-row tiles; 37 and 50 rows fill more
    than half a block, one masked block either way."""
    from fastvision.triton_kernels import attention as kernels

    if device == "cuda":
        monkeypatch.setattr(kernels, "forced_config", kernels._config(64, 64, 4, 2, split_tail))
    else:
        monkeypatch.setattr(kernels, "INTERPRETER_BLOCKS", {"BLOCK_M": 64, "BLOCK_N": 64, "SPLIT_TAIL": split_tail})
    segments = ops.Segments.from_lengths((1, 5, 37, 50, 197), device=device)
    qkv = randn(segments.total, 3, 2, 64, dtype=torch.float16, device=device, requires_grad=True)
    _check(qkv, segments, torch.float16)


def test_eager_fallback_matches_reference():
    """CPU without the interpreter: runs of equal lengths through SDPA."""
    segments = ops.Segments.from_lengths((3, 3, 8, 1))
    qkv = randn(segments.total, 3, 2, 16, dtype=torch.float64, requires_grad=True)
    out = attention_ops._eager_varlen(qkv, segments, 0.25)
    assert_close(out, reference(qkv.detach(), segments.lengths, 0.25), torch.float64)


def test_custom_op_eager_impl_matches_reference(monkeypatch):
    """The op's own eager branch (used when the op is called where no kernel runs) and its backward."""
    monkeypatch.setattr(attention_ops.C, "use_triton", lambda t: False)
    segments = ops.Segments.from_lengths((4, 4, 9))
    qkv = randn(segments.total, 3, 3, 16, dtype=torch.float64, requires_grad=True)
    out, lse = torch.ops.fastvision.attention_varlen(qkv, segments.cu_seqlens, 9, 0.25, False)
    grad_out = randn(*out.shape, dtype=torch.float64)
    out.backward(grad_out)
    ref_qkv = qkv.detach().clone().requires_grad_()
    ref = reference(ref_qkv, segments.lengths, 0.25)
    ref.backward(grad_out)
    assert_close(out, ref, torch.float64)
    assert_close(qkv.grad, ref_qkv.grad, torch.float64)
    assert lse.shape == (3, segments.total)


@pytest.mark.parametrize("device", kernel_devices())
def test_varlen_compiles_fullgraph(device):
    torch._dynamo.reset()
    segments = ops.Segments.from_lengths((5, 9), device=device)

    def fn(qkv):
        return ops.attention_varlen(qkv, segments).sum()

    qkv = randn(14, 3, 2, 16, device=device, requires_grad=True)
    torch.compile(fn, fullgraph=True, backend="aot_eager")(qkv).backward()
    expected = qkv.detach().clone().requires_grad_()
    fn(expected).backward()
    assert_close(qkv.grad, expected.grad, torch.float32)


@pytest.mark.parametrize("device", kernel_devices())
def test_patched_attention_module_takes_segments(device):
    """fastvision.modules.Attention on (1, T, C) packed tokens equals the module on each sequence."""
    pytest.importorskip("timm")
    from timm.models.vision_transformer import Attention as TimmAttention
    from fastvision.modules import Attention

    torch.manual_seed(0)
    attn = Attention.from_timm(TimmAttention(64, num_heads=4, qkv_bias=True)).to(device)
    lengths = (7, 7, 3)
    xs = [randn(1, n, 64, device=device) for n in lengths]
    segments = ops.Segments.from_lengths(lengths, device=device)
    packed = attn(torch.cat(xs, dim=1), attn_mask=segments)
    separate = torch.cat([attn(x) for x in xs], dim=1)
    assert_close(packed, separate, torch.float32)


@pytest.mark.parametrize("bad, message", [
    (lambda: ops.Segments.from_lengths([3, 0]), "positive"),
    (lambda: ops.attention_varlen(torch.ones(6, 3, 2, 8), ops.Segments.from_lengths([2, 3])), "cover 5 tokens"),
    (lambda: ops.attention_varlen(torch.ones(6, 2, 8), ops.Segments.from_lengths([6])), "qkv must have shape"),
    (lambda: ops.attention_varlen(torch.ones(6, 3, 2, 8), [6]), "segments must be"),
])
def test_bad_input_raises_clear_error(bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        bad()
