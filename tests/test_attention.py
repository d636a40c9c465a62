"""Fused attention vs a float64 reference: outputs, dq/dk/dv, CLS rows, bias, fallbacks, compile.

Every N class of ViT/DINO (1, 37, 145, 197, 257, 577, 785, 3137) and every head dim
(32, 64, 80, 96, 128) appears; the interpreter grid is reduced, the GPU runs the same cases.
"""
import pytest
import torch
import torch.nn.functional as F

from fastvision import ops
from fastvision.testing import assert_close, relative_error
from conftest import kernel_devices
from helpers import float64_copies, randn

# (batch, heads, tokens, head_dim, dtype, packed)
CASES = [
    (1, 1, 1, 64, torch.float32, False),
    (2, 3, 37, 32, torch.float16, True),
    (1, 2, 37, 64, torch.bfloat16, False),
    (1, 2, 145, 80, torch.bfloat16, True),
    (2, 1, 197, 64, torch.float32, True),
    (1, 2, 197, 96, torch.float16, False),
    (1, 1, 257, 128, torch.bfloat16, True),
    (1, 1, 257, 64, torch.float16, False),
    (1, 1, 577, 64, torch.float16, True),
    (1, 1, 785, 64, torch.bfloat16, False),
    (1, 1, 3137, 32, torch.float16, True),
    # multiples of every block size: only the unmasked full-block paths run
    (1, 2, 128, 64, torch.float16, True),
    (2, 1, 256, 80, torch.float32, False),
]


def reference(q, k, v, scale, bias=None):
    s = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias
    return s.softmax(-1) @ v


def _qkv(B, H, N, d, dtype, device, packed, std=3.0):
    """q, k, v leaves as (B, H, N, d) tensors, or one packed (B, N, 3, H, d) leaf."""
    if packed:
        return (randn(B, N, 3, H, d, dtype=dtype, device=device, std=std, requires_grad=True),)
    return tuple(randn(B, H, N, d, dtype=dtype, device=device, std=std, requires_grad=True) for _ in range(3))


def _as_heads(inputs):
    if len(inputs) == 1:
        return tuple(inputs[0].select(2, i).transpose(1, 2) for i in range(3))
    return inputs


def _fused(inputs, scale, **kwargs):
    if len(inputs) == 1:
        return ops.attention_qkvpacked(inputs[0], scale=scale, **kwargs)
    return ops.attention(*inputs, scale=scale, **kwargs)


def _to_heads_out(out, packed):
    return out.transpose(1, 2) if packed else out


def _additive(bias):
    if bias.dtype != torch.bool:
        return bias
    return torch.zeros(bias.shape, device=bias.device).masked_fill(~bias, float("-inf"))


def _check(inputs, dtype, scale=None, bias=None, names=("q", "k", "v")):
    q = _as_heads(inputs)[0]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    packed = len(inputs) == 1
    out = _fused(inputs, scale, attn_bias=bias)
    grad_out = randn(*out.shape, dtype=dtype, device=out.device)
    out.backward(grad_out)

    ref_inputs = float64_copies(*inputs)
    ref_bias = None if bias is None else _additive(bias).double().cpu()
    ref = reference(*_as_heads(ref_inputs), scale, ref_bias)
    ref_out = ref.transpose(1, 2) if packed else ref
    ref_out.backward(grad_out.double().cpu())

    assert out.dtype == dtype
    assert_close(out, ref_out, dtype, name="output")
    for name, t, r in zip(("qkv",) if packed else names, inputs, ref_inputs):
        assert_close(t.grad, r.grad, dtype, name=f"grad of {name}")


# bf16 keeps 8 bits: at std 3 (logits of std 9) the gradients of q and k lose more than 1e-2
# in any bf16 attention, eager PyTorch included; test_bf16_large_logits compares with eager there.
STD = {torch.float32: 3.0, torch.float16: 3.0, torch.bfloat16: 1.5}


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("B,H,N,d,dtype,packed", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_attention_matches_float64(device, B, H, N, d, dtype, packed):
    _check(_qkv(B, H, N, d, dtype, device, packed, std=STD[dtype]), dtype)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("split_tail", [False, True], ids=["one_masked_block", "tail_tiles"])
@pytest.mark.parametrize("block", [64, 32])
@pytest.mark.parametrize("N", [1, 145, 197])
def test_short_ragged_end_either_way(device, N, block, split_tail, monkeypatch):
    """64-row blocks leave 1, 17 and 5 rows (queries, and keys for dk/dv) that SPLIT_TAIL runs in 16-row
    tiles; 32-row blocks 1, 17 (not split: more than half) and 5."""
    from fastvision.triton_kernels import attention as kernels

    blocks = {"BLOCK_M": block, "BLOCK_N": block, "SPLIT_TAIL": split_tail}
    if device == "cuda":
        monkeypatch.setattr(kernels, "forced_config", kernels._config(block, block, 4, 2, split_tail))
    else:
        monkeypatch.setattr(kernels, "INTERPRETER_BLOCKS", blocks)
    inputs = _qkv(2, 2, N, 64, torch.float16, device, packed=True)
    _check(inputs, torch.float16)
    out, rows = _fused(inputs, 0.125, return_attn_rows=3)
    q, k, _ = _as_heads(float64_copies(*inputs))
    assert_close(rows, ((q @ k.transpose(-2, -1)) * 0.125).softmax(-1)[:, :, :3], torch.float16, name="rows")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("N", [37, 197])
def test_bf16_large_logits_no_worse_than_eager(device, N):
    """std 3 inputs in bf16: output within 1e-2; every gradient within 1.25x eager bf16 autograd's error."""
    inputs = _qkv(2, 2, N, 64, torch.bfloat16, device, packed=False, std=3.0)
    eager_inputs = tuple(t.detach().clone().requires_grad_() for t in inputs)
    ref_inputs = float64_copies(*inputs)
    grad_out = randn(2, 2, N, 64, dtype=torch.bfloat16, device=device)
    outs = []
    for fn, args in ((ops.attention, inputs), (lambda *a: reference(*a, 0.125), eager_inputs),
                     (lambda *a: reference(*a, 0.125), ref_inputs)):
        out = fn(*args)
        out.backward(grad_out.to(out.dtype).to(out.device))
        outs.append(out)
    assert_close(outs[0], outs[2], torch.bfloat16)
    for name, fused, eager, ref in zip("qkv", inputs, eager_inputs, ref_inputs):
        eager_error = relative_error(eager.grad, ref.grad)
        assert_close(fused.grad, ref.grad, name=f"grad of {name}", tol=max(1e-2, 1.25 * eager_error))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("bias_shape", [(1, 2, 77, 77), (3, 1, 1, 77), (77, 77)], ids=str)
def test_attention_additive_bias(device, bias_shape):
    inputs = _qkv(3, 2, 77, 64, torch.float32, device, packed=False)
    _check(inputs, torch.float32, bias=randn(*bias_shape, device=device, std=2.0))


@pytest.mark.parametrize("device", kernel_devices())
def test_attention_bool_mask_matches_sdpa(device):
    q, k, v = _qkv(2, 2, 50, 32, torch.float32, device, packed=False)
    keep = torch.rand(2, 1, 1, 50, device=device) > 0.3
    keep[..., 0] = True  # every row keeps one key
    additive = torch.zeros(keep.shape, device=device).masked_fill(~keep, float("-inf"))
    _check((q, k, v), torch.float32, bias=keep)
    q.grad = k.grad = v.grad = None
    _check((q, k, v), torch.float32, bias=additive)


@pytest.mark.parametrize("device", kernel_devices())
def test_fully_masked_row_is_nan_like_softmax(device):
    q, k, v = (randn(1, 1, 20, 32, device=device) for _ in range(3))
    bias = torch.zeros(1, 1, 20, 20, device=device)
    bias[..., 3, :] = float("-inf")
    out = ops.attention(q, k, v, attn_bias=bias)
    assert torch.isnan(out[0, 0, 3]).all()
    rest = torch.cat([out[0, 0, :3], out[0, 0, 4:]])
    ref = reference(*float64_copies(q, k, v), 32 ** -0.5, bias.double().cpu())[0, 0]
    assert_close(rest, torch.cat([ref[:3], ref[4:]]), torch.float32)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("N,n_rows,packed,dtype", [(37, 1, True, torch.bfloat16), (197, 1, False, torch.float16),
                                                   (100, 5, True, torch.float32), (3, 16, False, torch.float32)])
def test_attention_rows_match_eager_softmax(device, N, n_rows, packed, dtype):
    inputs = _qkv(2, 3, N, 64, dtype, device, packed)
    scale = 0.1
    out, rows = _fused(inputs, scale, return_attn_rows=n_rows)
    q, k, v = _as_heads(float64_copies(*inputs))
    probs = ((q @ k.transpose(-2, -1)) * scale).softmax(-1)
    assert rows.shape == (2, 3, min(n_rows, N), N) and rows.dtype == dtype
    assert_close(rows, probs[:, :, :n_rows], dtype, name="attention rows")
    assert_close(_to_heads_out(out, packed), probs @ v, dtype)


@pytest.mark.parametrize("device", kernel_devices())
def test_attention_rows_with_bias(device):
    q, k, v = (randn(1, 2, 40, 32, device=device) for _ in range(3))
    bias = randn(1, 2, 40, 40, device=device)
    _, rows = ops.attention(q, k, v, attn_bias=bias, return_attn_rows=2)
    qd, kd, _ = float64_copies(q, k, v)
    probs = ((qd @ kd.transpose(-2, -1)) * 32 ** -0.5 + bias.double().cpu()).softmax(-1)
    assert_close(rows, probs[:, :, :2], torch.float32)


@pytest.mark.parametrize("device", kernel_devices())
def test_attention_deterministic(device):
    inputs = _qkv(1, 2, 145, 64, torch.float16, device, packed=True)
    results = []
    for _ in range(2):
        inputs[0].grad = None
        out = ops.attention_qkvpacked(inputs[0])
        out.backward(torch.ones_like(out))
        results.append((out.detach().clone(), inputs[0].grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("device", kernel_devices())
def test_attention_gradcheck_float64(device):
    q, k, v = (randn(1, 2, 9, 16, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3))
    bias = randn(1, 1, 9, 9, dtype=torch.float64, device=device)
    if device == "cuda":  # the eager fallback's gradient (see the next test)
        assert "float64 on CUDA" in ops.attention_decline(q)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.attention(a, b, c, attn_bias=bias), (q, k, v),
                                    fast_mode=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled float64 kernels need a GPU")
@pytest.mark.xfail(reason="failed on an H100 (Triton 3.6) at the float64 tolerance; ops decline float64 on CUDA. "
                          "Likely cause: compiled Triton takes Python float arguments (scale, scale*log2 e) as fp32 "
                          "(triton/_utils.py maps float to fp32), ~1e-7 relative error; the interpreter keeps them")
def test_float64_kernels_on_cuda_match_float64():
    """The compiled kernels in float64, called directly (the ops send float64 on CUDA to eager): which of
    forward and backward disagrees with the reference, at the gradcheck's shape and at a longer one."""
    from fastvision.triton_kernels import attention as kernels

    for N, d in ((9, 16), (197, 64)):
        q, k, v, dout = (randn(1, 2, N, d, dtype=torch.float64, device="cuda") for _ in range(4))
        bias = randn(1, 1, N, N, dtype=torch.float64, device="cuda")
        out, lse, _ = kernels.attention_fwd(q, k, v, scale=d ** -0.5, bias=bias)
        ref_q, ref_k, ref_v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        ref = reference(ref_q, ref_k, ref_v, d ** -0.5, bias)
        assert_close(out, ref, torch.float64, name=f"out N={N}")
        ref.backward(dout)
        grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
        kernels.attention_bwd(dout, q, k, v, out, lse, *grads, scale=d ** -0.5, bias=bias)
        for name, got, want in zip(("dq", "dk", "dv"), grads, (ref_q.grad, ref_k.grad, ref_v.grad)):
            assert_close(got, want, torch.float64, name=f"{name} N={N}")


def test_attention_decline_reasons():
    q = torch.empty(1, 2, 8, 256)
    assert "head dim 256" in (ops.attention_decline(q) or "") or ops.attention_decline(q).startswith("CPU")
    if ops.triton_interpreted():
        assert "head dim 256" in ops.attention_decline(q)
        assert "dropout" in ops.attention_decline(torch.empty(1, 2, 8, 64), dropout_p=0.1)
        assert "causal" in ops.attention_decline(torch.empty(1, 2, 8, 64), is_causal=True)
        assert ops.attention_decline(torch.empty(1, 2, 8, 64)) is None


@pytest.mark.parametrize("case", ["head_dim_256", "cross_attention", "dropout_eval_equivalent", "bias_requires_grad",
                                  "negative_scale"])
def test_unsupported_inputs_fall_back_to_eager(case):
    torch.manual_seed(0)
    if case == "head_dim_256":
        q, k, v = (randn(1, 2, 10, 256, requires_grad=True) for _ in range(3))
        bias = None
    elif case == "cross_attention":
        q = randn(1, 2, 10, 64, requires_grad=True)
        k, v = (randn(1, 2, 13, 64, requires_grad=True) for _ in range(2))
        bias = None
    elif case == "dropout_eval_equivalent":
        q, k, v = (randn(1, 2, 10, 64, requires_grad=True) for _ in range(3))
        bias = None
    elif case == "bias_requires_grad":
        q, k, v = (randn(1, 2, 10, 64, requires_grad=True) for _ in range(3))
        bias = randn(1, 2, 10, 10, requires_grad=True)
    else:
        q, k, v = (randn(1, 2, 10, 64, requires_grad=True) for _ in range(3))
        bias = None
    scale = -0.3 if case == "negative_scale" else q.shape[-1] ** -0.5
    out = ops.attention(q, k, v, attn_bias=bias, scale=scale)
    out.backward(torch.ones_like(out))
    refs = float64_copies(q, k, v, bias)
    ref = reference(*refs[:3], scale, refs[3])
    ref.backward(torch.ones_like(ref))
    assert_close(out, ref, torch.float32)
    for t, r in zip((q, k, v, bias), refs):
        if t is not None:
            assert_close(t.grad, r.grad, torch.float32)


def test_dropout_falls_back_to_sdpa_dropout():
    q, k, v = (randn(1, 2, 16, 32) for _ in range(3))
    torch.manual_seed(1)
    out = ops.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(1)
    ref = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("bad, message", [
    (lambda: ops.attention(torch.ones(1, 2, 3, 4, dtype=torch.int32), torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4)),
     "q must be a floating-point"),
    (lambda: ops.attention(torch.ones(2, 3, 4), torch.ones(2, 3, 4), torch.ones(2, 3, 4)), "q must be 4-D"),
    (lambda: ops.attention(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 8), torch.ones(1, 2, 3, 4)), "do not match"),
    (lambda: ops.attention(*(torch.ones(1, 2, 3, 4),) * 3, attn_bias=torch.ones(5, 5)), "attn_bias of shape"),
    (lambda: ops.attention(*(torch.ones(1, 2, 3, 4),) * 3, attn_bias=torch.ones(3, 3, dtype=torch.int64)),
     "attn_bias must be a bool or floating-point"),
    (lambda: ops.attention(*(torch.ones(1, 2, 3, 4),) * 3, return_attn_rows=17), "return_attn_rows"),
    (lambda: ops.attention_qkvpacked(torch.ones(1, 3, 2, 2, 4)), "qkv must have shape"),
])
def test_bad_input_raises_clear_error(bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        bad()


@pytest.mark.parametrize("device", kernel_devices())
def test_attention_autocast_runs_in_lower_precision(device):
    q, k, v = (randn(1, 2, 33, 32, device=device) for _ in range(3))
    with torch.autocast(device, dtype=torch.bfloat16):
        out = ops.attention(q, k, v)
        ref = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_close(out, reference(*float64_copies(q, k, v), 32 ** -0.5), torch.bfloat16)


@pytest.mark.parametrize("device", kernel_devices())
def test_attention_compiles_fullgraph(device):
    torch._dynamo.reset()

    def block(qkv):
        out, rows = ops.attention_qkvpacked(qkv, return_attn_rows=1)
        return out.sum() + rows.sum()

    qkv = randn(2, 37, 3, 2, 32, device=device, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(qkv)
    loss.backward()
    expected = qkv.detach().clone().requires_grad_()
    block(expected).backward()
    assert_close(qkv.grad, expected.grad, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotune configurations run on CUDA only")
@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_every_autotune_config_is_correct(kernel, monkeypatch):
    from fastvision.triton_kernels import attention as kernels

    configs = {"fwd": kernels.FWD_CONFIGS, "dkdv": kernels.DKDV_CONFIGS, "dq": kernels.DQ_CONFIGS}[kernel]
    for cfg in configs:
        monkeypatch.setattr(kernels, "forced_config", cfg)
        for d, dtype in ((80, torch.float16), (64, torch.bfloat16)):
            inputs = _qkv(2, 3, 197, d, dtype, "cuda", packed=True, std=1.5)
            try:
                _check(inputs, dtype, bias=randn(1, 3, 197, 197, device="cuda"))
            except AssertionError as exc:
                raise AssertionError(f"{cfg}: {exc}") from None
            except Exception as exc:  # out of shared memory: autotuning skips such configurations too
                if "OutOfResources" not in type(exc).__name__:
                    raise


def test_tuning_picks_the_fastest_fitting_configuration_once(monkeypatch):
    """The CUDA tuning cache (exercised here with a fake timer): fastest wins, out-of-resources skipped, cached."""
    import triton

    from fastvision.triton_kernels import _launch
    from fastvision.triton_kernels import attention as kernels

    candidates = kernels.candidate_configs(kernels.attention_fwd_kernel, 197, 64, 2)
    assert candidates and all(
        kernels.shared_memory_estimate(kernels.attention_fwd_kernel, c, 64, 2) <= kernels.SHARED_MEMORY_BUDGET
        and c.kwargs["BLOCK_M"] <= 256 for c in candidates)
    fast, broken = candidates[-1], candidates[0]
    timings = {id(c): 1.0 + i for i, c in enumerate(candidates)}
    timings[id(fast)] = 0.1
    calls = []

    def fake_do_bench(fn, **kwargs):
        return fn()

    def launch(cfg):
        calls.append(cfg)
        if cfg is broken:
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        return timings[id(cfg)]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(_launch, "_TUNED", {})
    monkeypatch.setenv("FASTVISION_TUNING_CACHE", "0")
    assert _launch.timed_choice(("key",), candidates, launch, 0) is fast
    assert len(calls) == len(candidates)
    assert _launch.timed_choice(("key",), candidates, launch, 0) is fast and len(calls) == len(candidates)


def test_cuda_launch_choice_is_looked_up_after_the_first_call(monkeypatch):
    """Listing the candidates hashes the kernel ~80 times (Triton hashes its source key): on the H100's host
    that was ~70 µs per attention launch. It happens once per shape, tuned or heuristic."""
    from types import SimpleNamespace

    from fastvision.triton_kernels import _launch
    from fastvision.triton_kernels import attention as kernels

    real = kernels.attention_fwd_kernel
    grids = []

    class Recorder:  # stands in for the kernel: records the grid instead of launching
        __name__ = real.__name__

        def __getitem__(self, grid):
            return lambda *args, **kwargs: grids.append((grid, kwargs["BLOCK_M"]))

        def __hash__(self):
            return hash(real)

        def __eq__(self, other):
            return other is self or other is real

    listed = []
    candidate_configs = kernels.candidate_configs
    monkeypatch.setattr(kernels, "candidate_configs", lambda *a: listed.append(a) or candidate_configs(*a))
    tensor = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, element_size=lambda: 2)
    meta = dict(HEAD_DIM=64, D_PAD=64, HAS_BIAS=False, PRECISION="ieee", VARLEN=False)
    monkeypatch.setattr(kernels, "_HEURISTIC", {})
    monkeypatch.setenv("FASTVISION_AUTOTUNE", "0")
    for _ in range(3):
        kernels._launch(Recorder(), tensor, 197, 8, **meta)
    assert len(listed) == 1 and len(grids) == 3
    tuned = kernels.candidate_configs(real, 197, 64, 2)[-1]
    key = (real.__name__, 197, 64, torch.bfloat16, False, "ieee", False, 0)
    monkeypatch.setattr(_launch, "_TUNED", {key: tuned})
    monkeypatch.setenv("FASTVISION_AUTOTUNE", "1")
    listed.clear()
    kernels._launch(Recorder(), tensor, 197, 8, **meta)
    assert not listed and grids[-1] == ((kernels.cdiv(197, tuned.kwargs["BLOCK_M"]), 8), tuned.kwargs["BLOCK_M"])


def test_split_tail_candidates_only_where_n_leaves_a_short_end():
    from fastvision.triton_kernels import attention as kernels

    def split_blocks(kernel, n):
        axis = kernels.GRID_AXIS[kernel]
        return sorted(c.kwargs[axis] for c in kernels.candidate_configs(kernel, n, 64, 2) if c.kwargs["SPLIT_TAIL"])

    fwd, dkdv = kernels.attention_fwd_kernel, kernels.attention_bwd_dkdv_kernel
    assert split_blocks(fwd, 197) == [32, 64, 64]      # 197 = 6·32 + 5 = 3·64 + 5; 128 + 69 is no short end
    assert split_blocks(fwd, 785) == [64, 64, 128]     # 785 = 12·64 + 17 = 6·128 + 17; 24·32 + 17 is not
    assert split_blocks(fwd, 37) == split_blocks(dkdv, 37) == [32]
    assert split_blocks(dkdv, 197) == [32, 64, 64]
    assert split_blocks(fwd, 256) == split_blocks(fwd, 120) == split_blocks(dkdv, 4096) == []  # 120 = 64 + 56
    for kernel in kernels.CONFIGS:
        assert not kernels.heuristic_config(kernel, 197, 64, 64, 2).kwargs["SPLIT_TAIL"]


def test_candidates_fit_shared_memory_for_every_dtype_and_head_dim():
    from fastvision.triton_kernels import attention as kernels

    for kernel in kernels.CONFIGS:
        for element_bytes in (2, 4, 8):
            for d in (32, 64, 80, 96, 128):
                d_pad = kernels.head_dim_padded(d)
                for n in (1, 37, 197, 4096):
                    configs = kernels.candidate_configs(kernel, n, d_pad, element_bytes)
                    assert configs
                    chosen = kernels.heuristic_config(kernel, n, d, d_pad, element_bytes)
                    assert chosen in configs
                    fits = [kernels.shared_memory_estimate(kernel, c, d_pad, element_bytes)
                            <= kernels.SHARED_MEMORY_BUDGET for c in configs]
                    assert all(fits) or configs == [kernels.SMALLEST_CONFIG]


def test_each_vit_sequence_length_tunes_on_its_own():
    """145 and 197 tokens (96 px at patch 8, 224 px at patch 16) fill 256-row tiles very differently."""
    from fastvision.triton_kernels import attention as kernels

    lengths = (37, 145, 197, 257, 577, 785)
    assert len({kernels.tuning_class(n) for n in lengths}) == len(lengths)
    assert kernels.tuning_class(2000) == kernels.tuning_class(2048) == 2048
    assert kernels.tuning_class(3137) == kernels.tuning_class(100000) == 4096
