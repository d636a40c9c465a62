"""The interpreter's bf16 fix (conftest) computes what the GPU would."""
import pytest
import torch

from conftest import kernel_devices

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _bf16_arith_kernel(A, B, OUT_ADD, OUT_MAX, OUT_SUB, OUT_DOT, OUT_LT, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    tile = r[:, None] * BLOCK + r[None, :]
    a = tl.load(A + tile)
    b = tl.load(B + tile)
    tl.store(OUT_ADD + tile, a * b + a)
    tl.store(OUT_MAX + tile, tl.maximum(a, b))
    tl.store(OUT_SUB + tile, a - b)
    tl.store(OUT_DOT + tile, tl.dot(a, b))
    tl.store(OUT_LT + tile, (a < b).to(tl.int8))


@pytest.mark.parametrize("device", kernel_devices())
def test_bf16_arithmetic_matches_rounded_float32(device):
    a = torch.randn(16, 16, device=device).to(torch.bfloat16)
    b = torch.randn(16, 16, device=device).to(torch.bfloat16)
    outs = [torch.empty(16, 16, device=device, dtype=torch.bfloat16) for _ in range(3)]
    dot = torch.empty(16, 16, device=device)
    lt = torch.empty(16, 16, device=device, dtype=torch.int8)
    _bf16_arith_kernel[(1,)](a, b, *outs, dot, lt, BLOCK=16)
    fa, fb = a.float(), b.float()
    assert torch.allclose(outs[0].float(), (fa * fb).bfloat16().float() + fa, rtol=1e-2, atol=1e-2)
    assert torch.equal(outs[1], torch.maximum(a, b))
    assert torch.equal(outs[2], a - b)
    assert torch.allclose(dot, fa @ fb, rtol=1e-4, atol=1e-4)
    assert torch.equal(lt.bool(), a < b)
