import pytest
import torch
import torch.nn.functional as F

import fastvision
from fastvision.modules import LayerNorm
from helpers import DTYPES, check_against_float64, float64_copies, randn
from fastvision.testing import assert_close
from conftest import kernel_devices

ROWS = (1, 7, 197 * 3)
HIDDEN = (1, 37, 384, 768, 1000, 4096)


def _ln(n):
    return lambda x, w, b: fastvision.ops.layer_norm(x, (n,), w, b, 1e-5)


def reference_layer_norm(x, w, b, eps=1e-5, dims=1):
    """Float64 LayerNorm spelled out (torch's own float64 kernel rounds xhat=0 to 1e-15 at width 1)."""
    axes = tuple(range(-dims, 0))
    xc = x - x.mean(axes, keepdim=True)
    y = xc / torch.sqrt((xc * xc).mean(axes, keepdim=True) + eps)
    y = y * w if w is not None else y
    return y + b if b is not None else y


def _ref_ln(n):
    return lambda x, w, b: reference_layer_norm(x, w, b)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_layer_norm_matches_float64(device, dtype, rows, hidden):
    x = randn(rows, hidden, dtype=dtype, device=device, std=2.0, mean=0.5, requires_grad=True)
    w = randn(hidden, dtype=dtype, device=device, mean=1.0, requires_grad=True)
    b = randn(hidden, dtype=dtype, device=device, requires_grad=True)
    dy = randn(rows, hidden, dtype=dtype, device=device)
    # At width 1 the gradient of x is exactly zero: dy * w * rstd minus its own row mean, with
    # rstd = eps^-1/2 ~ 316, so its rounding is measured against the size of those terms.
    scales = {"x": (dy.double() * w.double()).norm().item() * 1e-5 ** -0.5} if hidden == 1 else None
    check_against_float64(_ln(hidden), _ref_ln(hidden), (x, w, b), dy, dtype, ("x", "weight", "bias"), scales)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("hidden", (5000, 10007))
def test_layer_norm_wide_rows_streamed(device, hidden):
    x = randn(3, hidden, device=device, std=3.0, requires_grad=True)
    w = randn(hidden, device=device, requires_grad=True)
    b = randn(hidden, device=device, requires_grad=True)
    check_against_float64(_ln(hidden), _ref_ln(hidden), (x, w, b), randn(3, hidden, device=device),
                          torch.float32, ("x", "weight", "bias"))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("affine", ("none", "weight_only"))
def test_layer_norm_without_affine(device, affine):
    x = randn(2, 13, 96, device=device, requires_grad=True)
    w = randn(96, device=device, requires_grad=True) if affine == "weight_only" else None
    fn = lambda x, w: fastvision.ops.layer_norm(x, (96,), w, None)  # noqa: E731
    ref = lambda x, w: reference_layer_norm(x, w, None)  # noqa: E731
    check_against_float64(fn, ref, (x, w), randn(2, 13, 96, device=device), torch.float32, ("x", "weight"))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("hidden", (37, 768, 10007))
def test_layer_norm_large_mean_tiny_variance(device, hidden):
    x = randn(4, hidden, device=device, mean=1e4, std=1e-2, requires_grad=True)
    w = randn(hidden, device=device, requires_grad=True)
    b = randn(hidden, device=device, requires_grad=True)
    check_against_float64(_ln(hidden), _ref_ln(hidden), (x, w, b), randn(4, hidden, device=device),
                          torch.float32, ("x", "weight", "bias"))


@pytest.mark.parametrize("device", kernel_devices())
def test_layer_norm_non_contiguous_and_multidim_shape(device):
    base = randn(6, 40, 24, device=device)
    x = base.transpose(0, 1)[:, ::2].detach().requires_grad_()  # (40, 3, 24), rows not contiguous
    w = randn(3, 24, device=device, requires_grad=True)
    b = randn(3, 24, device=device, requires_grad=True)
    fn = lambda x, w, b: fastvision.ops.layer_norm(x, (3, 24), w, b)  # noqa: E731
    ref = lambda x, w, b: reference_layer_norm(x, w, b, dims=2)  # noqa: E731
    check_against_float64(fn, ref, (x, w, b), randn(40, 3, 24, device=device), torch.float32, ("x", "w", "b"))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", (37, 384, 5000))
def test_add_layer_norm_matches_float64(device, dtype, hidden):
    x = randn(2, 37, hidden, dtype=dtype, device=device, requires_grad=True)
    r = randn(2, 37, hidden, dtype=dtype, device=device, std=3.0, requires_grad=True)
    w = randn(hidden, dtype=dtype, device=device, requires_grad=True)
    b = randn(hidden, dtype=dtype, device=device, requires_grad=True)
    dy = randn(2, 37, hidden, dtype=dtype, device=device)
    dh = randn(2, 37, hidden, dtype=dtype, device=device)

    def both(fn, x, r, w, b):
        y, h = fn(x, r, w, b)
        return torch.stack([y.to(torch.float64), h.to(torch.float64)])

    def fused(x, r, w, b):
        return fastvision.ops.add_layer_norm(x, r, (hidden,), w, b)

    def eager(x, r, w, b):
        h = x + r
        return reference_layer_norm(h, w, b), h

    inputs = (x, r, w, b)
    out = both(fused, *inputs)
    out.backward(torch.stack([dy, dh]).to(device, torch.float64))
    refs = float64_copies(*inputs)
    ref = both(eager, *refs)
    ref.backward(torch.stack([dy, dh]).double().cpu())
    assert_close(out[0], ref[0], dtype, name="y")
    assert_close(out[1], ref[1], dtype, name="x + residual")
    for name, t, rt in zip(("x", "residual", "weight", "bias"), inputs, refs):
        assert_close(t.grad, rt.grad, dtype, name=f"grad of {name}")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("x_dtype, r_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.float16),
                                              (torch.float32, torch.float32)], ids=str)
@pytest.mark.parametrize("hidden", (37, 384, 5000, 10000))
@pytest.mark.parametrize("scale_shape", ((2, 1), (2, 37)), ids=("per-sample", "per-row"))
def test_add_layer_norm_residual_scale_matches_float64(device, x_dtype, r_dtype, hidden, scale_shape):
    """h = x + residual * scale (drop path's keep / keep_prob per sample or per packed sequence)."""
    x = randn(2, 37, hidden, dtype=x_dtype, device=device, requires_grad=True)
    r = randn(2, 37, hidden, dtype=r_dtype, device=device, std=3.0, requires_grad=True)
    w, b = randn(hidden, device=device, requires_grad=True), randn(hidden, device=device, requires_grad=True)
    scale = torch.tensor([0.0, 1.25], device=device).view(2, 1).expand(scale_shape).clone()
    if scale_shape[1] > 1:
        scale[1, ::3] = 0.0
    dy, dh = randn(2, 37, hidden, device=device), randn(2, 37, hidden, device=device)
    y, h = fastvision.ops.add_layer_norm(x, r, (hidden,), w, b, residual_scale=scale)
    assert h.dtype == torch.promote_types(x_dtype, r_dtype)
    torch.autograd.backward((y, h), (dy.to(y.dtype), dh.to(h.dtype)))
    xr, rr, wr, br = float64_copies(x, r, w, b)
    hr = xr + rr * scale.double().cpu()[..., None]
    yr = reference_layer_norm(hr, wr, br)
    torch.autograd.backward((yr, hr), (dy.double().cpu(), dh.double().cpu()))
    low = r_dtype if r_dtype != torch.float32 else x_dtype
    assert_close(h, hr, low, name="x + residual * scale")
    assert_close(y, yr, low, name="y")
    assert r.grad.dtype == r_dtype and x.grad.dtype == x_dtype
    for name, t, rt in (("x", x, xr), ("residual", r, rr), ("weight", w, wr), ("bias", b, br)):
        assert_close(t.grad, rt.grad, low, name=f"grad of {name}")


@pytest.mark.parametrize("device", kernel_devices())
def test_layer_norm_gradcheck_float64(device):
    x = randn(3, 37, dtype=torch.float64, device=device, requires_grad=True)
    w = randn(37, dtype=torch.float64, device=device, requires_grad=True)
    b = randn(37, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(_ln(37), (x, w, b))
    r = randn(3, 37, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, r, w, b: fastvision.ops.add_layer_norm(x, r, (37,), w, b), (x, r, w, b))
    scale = torch.rand(3, dtype=torch.float64, device=device) + 0.5
    assert torch.autograd.gradcheck(
        lambda x, r, w, b: fastvision.ops.add_layer_norm(x, r, (37,), w, b, residual_scale=scale), (x, r, w, b))


def test_layer_norm_module_is_drop_in():
    ref = torch.nn.LayerNorm(384, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mod = LayerNorm(384, eps=1e-6)
    mod.load_state_dict(ref.state_dict())
    assert isinstance(mod, torch.nn.LayerNorm)
    assert list(mod.state_dict()) == list(ref.state_dict())
    assert (mod.normalized_shape, mod.eps, mod.elementwise_affine) == (ref.normalized_shape, ref.eps,
                                                                       ref.elementwise_affine)
    x = randn(2, 5, 384)
    assert_close(mod(x), ref(x), torch.float32)
    assert LayerNorm(8, elementwise_affine=False).weight is None


@pytest.mark.parametrize("bad, match", [
    (lambda: fastvision.ops.layer_norm(torch.randn(4, 8), (7,)), "normalized_shape"),
    (lambda: fastvision.ops.layer_norm(torch.randint(0, 5, (4, 8)), (8,)), "input"),
    (lambda: fastvision.ops.layer_norm(torch.randn(4, 8), (8,), torch.randn(7)), "weight"),
    (lambda: fastvision.ops.layer_norm(torch.randn(4, 8), (8,), None, torch.randn(8, 1)), "bias"),
    (lambda: fastvision.ops.layer_norm(torch.randn(4, 8), (8,), torch.ones(8, dtype=torch.int64)), "weight"),
    (lambda: fastvision.ops.add_layer_norm(torch.randn(4, 8), torch.randn(3, 8), (8,)), "residual"),
    (lambda: fastvision.ops.add_layer_norm(torch.randn(4, 8), torch.randn(4, 8), (8,), residual_scale=torch.ones(3)),
     "residual_scale"),
    (lambda: fastvision.ops.add_layer_norm(torch.randn(4, 8), torch.randn(4, 8), (8,),
                                           residual_scale=torch.ones(4, dtype=torch.int64)), "residual_scale"),
])
def test_layer_norm_bad_input_names_the_argument(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


def test_layer_norm_declines_with_reason():
    x = torch.randn(2, 8)
    reason = fastvision.ops.layer_norm_decline(x.to(torch.complex64))
    assert reason is not None and "dtype" in reason


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("residual_dtype", (torch.bfloat16, torch.float16), ids=str)
def test_add_layer_norm_mixed_dtypes_read_in_place(device, residual_dtype):
    """A float32 residual stream plus a low-precision branch: the sum is float32, as `x + r` gives."""
    hidden = 197
    x = randn(3, hidden, device=device, requires_grad=True)
    r = randn(3, hidden, dtype=residual_dtype, device=device, requires_grad=True)
    w, b = randn(hidden, device=device), randn(hidden, device=device)
    y, h = fastvision.ops.add_layer_norm(x, r, (hidden,), w, b)
    assert h.dtype == y.dtype == torch.float32
    (y.sum() + (h * h).sum()).backward()
    xr, rr, wr, br = float64_copies(x, r, w, b)
    hr = xr + rr
    yr = reference_layer_norm(hr, wr, br)
    (yr.sum() + (hr * hr).sum()).backward()
    assert_close(h, hr, torch.float32, name="x + residual")
    assert_close(y, yr, torch.float32, name="y")
    assert x.grad.dtype == torch.float32 and r.grad.dtype == residual_dtype
    assert_close(x.grad, xr.grad, torch.float32, name="grad of x")
    assert_close(r.grad, rr.grad, residual_dtype, name="grad of residual")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("out_dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
def test_layer_norm_out_dtype(device, out_dtype):
    """Statistics in float32 from a float32 input, one rounding to out_dtype at the store."""
    x = randn(5, 384, device=device, std=2.0, mean=3.0, requires_grad=True)
    w, b = randn(384, device=device, requires_grad=True), randn(384, device=device, requires_grad=True)
    y = fastvision.ops.layer_norm(x, (384,), w, b, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    dy = randn(5, 384, dtype=out_dtype, device=device)
    y.backward(dy)
    refs = float64_copies(x, w, b)
    ref = reference_layer_norm(*refs)
    ref.backward(dy.double().cpu())
    assert_close(y, ref, out_dtype)
    for name, t, rt in zip(("x", "weight", "bias"), (x, w, b), refs):
        assert t.grad.dtype == torch.float32
        assert_close(t.grad, rt.grad, out_dtype, name=f"grad of {name}")


@pytest.mark.parametrize("device", kernel_devices())
def test_layer_norm_reads_row_strided_slices_in_place(device):
    """(M, N) slices of wider tensors (row stride > N) as input and residual: no copies, same result."""
    x = randn(37, 80, device=device)[:, 8:72].detach().requires_grad_()
    r = randn(37, 96, device=device)[:, 16:80].detach().requires_grad_()
    w, b = randn(64, device=device, requires_grad=True), randn(64, device=device, requires_grad=True)
    grad = randn(37, 64, device=device)
    check_against_float64(lambda x, w, b: fastvision.ops.layer_norm(x, (64,), w, b),
                          lambda x, w, b: F.layer_norm(x, (64,), w, b), (x, w, b), grad, torch.float32,
                          ("x", "weight", "bias"))
    for t in (x, w, b):
        t.grad = None  # check_against_float64 reads .grad
    check_against_float64(lambda x, r, w, b: fastvision.ops.add_layer_norm(x, r, (64,), w, b)[0],
                          lambda x, r, w, b: F.layer_norm(x + r, (64,), w, b), (x, r, w, b), grad, torch.float32,
                          ("x", "residual", "weight", "bias"))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("x_dtype, r_dtype, scaled, writes_residual_grad", [
    (torch.bfloat16, torch.bfloat16, False, False),
    (torch.float32, torch.float32, False, False),
    (torch.float32, torch.bfloat16, False, True),
    (torch.bfloat16, torch.bfloat16, True, True),
], ids=("bf16", "fp32", "fp32+bf16", "bf16-scaled"))
def test_add_layer_norm_residual_grad_written_only_when_it_differs(device, x_dtype, r_dtype, scaled,
                                                                   writes_residual_grad, monkeypatch):
    """Unscaled and in h's dtype, the residual's gradient is dx: the backward writes it once and both
    inputs get it; gradients accumulate into both over two backward passes as eager's do."""
    from fastvision.triton_kernels import layer_norm as kernels

    asked = []
    original = kernels.layer_norm_bwd

    def spy(*args, **kwargs):
        asked.append(kwargs.get("residual_dtype"))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "layer_norm_bwd", spy)
    hidden = 384
    x = randn(2, 37, hidden, dtype=x_dtype, device=device, requires_grad=True)
    r = randn(2, 37, hidden, dtype=r_dtype, device=device, std=3.0, requires_grad=True)
    w, b = randn(hidden, device=device, requires_grad=True), randn(hidden, device=device, requires_grad=True)
    scale = torch.tensor([[0.0], [1.25]], device=device) if scaled else None
    dy, dh = randn(2, 37, hidden, device=device), randn(2, 37, hidden, device=device)
    for _ in range(2):
        y, h = fastvision.ops.add_layer_norm(x, r, (hidden,), w, b, residual_scale=scale)
        torch.autograd.backward((y, h), (dy.to(y.dtype), dh.to(h.dtype)))
    refs = float64_copies(x, r, w, b)
    hr = refs[0] + refs[1] * (scale.double().cpu()[..., None] if scaled else 1.0)
    grads = (dy.double().cpu(), dh.double().cpu())
    torch.autograd.backward((reference_layer_norm(hr, *refs[2:]), hr), grads)
    tolerance_dtype = torch.bfloat16 if torch.bfloat16 in (x_dtype, r_dtype) else x_dtype
    for name, t, rt in zip(("x", "residual", "weight", "bias"), (x, r, w, b), refs):
        assert_close(t.grad, 2 * rt.grad, tolerance_dtype, name=f"grad of {name}, accumulated twice")
    assert x.grad.data_ptr() != r.grad.data_ptr()
    assert asked == [r_dtype if writes_residual_grad else None] * 2


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("hidden", (384, 768))
def test_add_layer_norm_backward_every_launch_candidate(device, hidden, monkeypatch):
    """Each backward launch the tuner may pick (layout, pipeline depth, grid) gives the float64 gradients:
    the DINO case, a float32 residual stream plus a bf16 branch, bf16 output, drop-path row scales."""
    from fastvision.triton_kernels import layer_norm as kernels

    # Several tiles per program and a ragged last one: 591 rows over the interpreter's 4 programs,
    # 12608 over a GPU's hundreds (the pipelined loops then run 2 to 6 tiles).
    rows = (3, 197) if device == "cpu" else (64, 197)
    seen = []
    original = kernels._bwd_candidates

    def spy(*args):
        seen.append(original(*args))
        return seen[-1]

    monkeypatch.setattr(kernels, "_bwd_candidates", spy)

    def run(candidate=None):
        if candidate is not None:
            monkeypatch.setattr(kernels, "_bwd_candidates", lambda *args: (candidate,))
        torch.manual_seed(7)
        x = randn(*rows, hidden, device=device, requires_grad=True)
        r = randn(*rows, hidden, dtype=torch.bfloat16, device=device, std=3.0, requires_grad=True)
        w, b = randn(hidden, device=device, requires_grad=True), randn(hidden, device=device, requires_grad=True)
        scale = torch.where(torch.arange(rows[0], device=device) % 3 == 1, 0.0, 1.25).view(rows[0], 1)
        y, h = fastvision.ops.add_layer_norm(x, r, (hidden,), w, b, residual_scale=scale, out_dtype=torch.bfloat16)
        dy, dh = randn(*rows, hidden, dtype=torch.bfloat16, device=device), randn(*rows, hidden, device=device)
        torch.autograd.backward((y, h), (dy, dh))
        return (x, r, w, b), scale, dy, dh

    inputs, scale, dy, dh = run()
    refs = float64_copies(*inputs)
    hr = refs[0] + refs[1] * scale.double().cpu()[..., None]
    torch.autograd.backward((reference_layer_norm(hr, *refs[2:]), hr), (dy.double().cpu(), dh.double().cpu()))
    candidates = seen[0]
    assert len({tuple(meta.items()) for meta, _ in candidates}) > 1 and candidates[0][1] == 32
    for candidate in candidates:
        for name, t, rt in zip(("x", "residual", "weight", "bias"), run(candidate)[0], refs):
            assert_close(t.grad, rt.grad, torch.bfloat16, name=f"grad of {name} with {candidate}")
