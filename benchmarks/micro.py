"""Microbenchmarks: fastvision's fused ops against eager PyTorch, every SDPA backend and torch.compile.

    python -m benchmarks.micro --out DIR [--quick] [--ops attention,layer_norm,...] [--smoke]

Attention runs over the sequence lengths ViTs see (image 96/224/384 x patch 8/14/16, plus the CLS
token and optional register tokens), head dims 64 and 128, batch x heads sized to ~2^20 token-heads;
its rate is TFLOP/s (4*B*H*N^2*d forward, 2.5x that backward) as a fraction of the bf16 matmul
ceiling. The memory-bound ops (LayerNorm, residual + LayerNorm, softmax, GELU, bias + GELU) run over
ViT-S/B/L widths and B*197 tokens; their rate is GB/s (each input read once, each output written
once) as a fraction of the device-to-device copy ceiling. The DINO loss runs over a DINO step's head
outputs (B=64 images per GPU, 2 global + 10 local crops, K=65536), also in GB/s. conv_bn_act runs
over ResNet-50's layer shapes at batch 32, channels_last: forward with the BatchNorm folded (inference)
against eager conv + BN + (residual +) ReLU, eager's conv with the folded weights and torch.compile of
eager; forward + backward with eval-mode statistics and a trainable affine (frozen BN); TFLOP/s of the
convolution. Before a case is
timed, fastvision's output (and gradients, for fwd+bwd) is compared with a float32 reference; a case
that fails is not timed.
Writes DIR/micro.json and DIR/micro.png (speedup of fastvision over each baseline, per op).
"""
import argparse
import contextlib
import functools
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import common

OPS = ("attention", "attention_qkvpacked", "attention_varlen", "layer_norm", "add_layer_norm", "softmax", "gelu",
       "bias_gelu", "dino_loss", "conv_bn_act")
MODES = ("fwd", "fwd+bwd")
EPS = 1e-6
TOKENS_PER_IMAGE = 197  # ViT /16 at 224 px with the CLS token
TARGET_TOKEN_HEADS = 2**20
WIDTHS = (384, 768, 1024)        # ViT-S/B/L
BATCHES, QUICK_BATCHES = (64, 128, 256), (64, 256)


@dataclass
class Case:
    op: str
    mode: str
    params: Dict[str, object]
    x: int                                   # plotted against (sequence length or tokens)
    panel: str
    series: str                              # appended to each baseline's line label
    make_inputs: Callable[[], List[torch.Tensor]]
    differentiable: Sequence[int]            # indices of inputs that get gradients in fwd+bwd
    reference: Callable                      # float32/float64 reference of the op
    ours: Optional[Callable]
    ours_error: Optional[str]
    baselines: Dict[str, Callable]
    contexts: Dict[str, Callable] = field(default_factory=dict)
    skipped_baselines: Dict[str, str] = field(default_factory=dict)
    work: float = 0.0                        # FLOPs or bytes
    unit: str = "GB/s"
    check_batch: Optional[int] = None        # compare only the first entries of dim 0 (attention)


# --------------------------------------------------------------------------- fastvision ops (lazy)

def _fastvision_op(name: str) -> Tuple[Optional[Callable], Optional[str]]:
    try:
        import fastvision.ops as ops
        return getattr(ops, name), None
    except Exception as exc:  # the attention op is optional while it is being written
        return None, f"fastvision.ops.{name} unavailable: {common.first_line(exc)}"


# --------------------------------------------------------------------------- attention

def eager_attention(q, k, v):
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v


def _qkv_views(qkv):
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, 3, H, d) -> 3 x (B, H, N, d), as timm does


def eager_attention_packed(qkv):
    B, N, _, H, d = qkv.shape
    return eager_attention(*_qkv_views(qkv)).transpose(1, 2).reshape(B, N, H * d)


def sdpa_packed(qkv):
    B, N, _, H, d = qkv.shape
    return F.scaled_dot_product_attention(*_qkv_views(qkv)).transpose(1, 2).reshape(B, N, H * d)


def sdpa_backends() -> Dict[str, Callable]:
    """name -> context manager factory restricting SDPA to one backend (those this torch knows)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    names = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
             "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}
    return {name: (lambda b=getattr(SDPBackend, attr): sdpa_kernel([b]))
            for name, attr in names.items() if hasattr(SDPBackend, attr)}


def sequence_lengths(quick: bool, smoke: bool, registers: int) -> Dict[int, List[str]]:
    """Tokens per image (patches + CLS + registers) -> the image/patch sizes giving it."""
    if smoke:
        pairs = [(32, 16), (32, 8)]
    elif quick:  # and 224 px at patch 14 (257 tokens), named by issue 3's goal (ahead of SDPA up to N = 257)
        pairs = [(img, p) for img in (96, 224, 384) for p in (8, 16)] + [(224, 14)]
    else:
        pairs = [(img, p) for img in (96, 224, 384) for p in (8, 14, 16)] + [(224, 4)]
    lengths: Dict[int, List[str]] = {}
    for img, p in pairs:
        lengths.setdefault((img // p) ** 2 + 1 + registers, []).append(f"{img}/{p}")
    return dict(sorted(lengths.items()))


def _attention_fits_eager(batch_heads: int, n: int, device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return None
    need = 5 * batch_heads * n * n * 2  # scores, probabilities and their gradients in bf16
    free, _ = torch.cuda.mem_get_info(device)
    return None if need < 0.6 * free else f"N x N scores need ~{need / 2**30:.0f} GiB"


def attention_cases(args, device, dtype) -> List[Case]:
    cases = []
    ours, ours_error = _fastvision_op("attention")
    packed_ours, packed_error = _fastvision_op("attention_qkvpacked")
    backends = {} if args.smoke else sdpa_backends()
    if args.quick:
        backends.pop("sdpa_math", None)
    for mode, d, (n, labels) in itertools.product(MODES, args.head_dims, sequence_lengths(
            args.quick, args.smoke, args.registers).items()):
        heads = max(1, 768 // d) if not args.smoke else 2
        batch = 2 if args.smoke else max(1, round(TARGET_TOKEN_HEADS / (heads * n)))
        flops = 4 * batch * heads * n * n * d * (3.5 if mode == "fwd+bwd" else 1.0)
        too_big = _attention_fits_eager(batch * heads, n, device)
        params = dict(B=batch, H=heads, N=n, d=d, images=labels, registers=args.registers)

        def make_qkv(shape=(batch, heads, n, d)):
            return [torch.randn(shape, device=device, dtype=dtype) for _ in range(3)]

        baselines = {"eager": eager_attention}
        baselines.update({name: F.scaled_dot_product_attention for name in backends})
        skipped = {}
        for name in ("eager", "sdpa_math"):
            if too_big and name in baselines:
                baselines.pop(name)
                skipped[name] = f"skipped: {too_big}"
        cases.append(Case(
            op="attention", mode=mode, params=params, x=n, panel=f"attention {mode} d={d}", series="",
            make_inputs=make_qkv, differentiable=(0, 1, 2), reference=eager_attention, ours=ours,
            ours_error=ours_error, baselines=baselines, contexts=dict(backends), skipped_baselines=skipped,
            work=flops, unit="TFLOP/s", check_batch=min(batch, 2)))
        if "attention_qkvpacked" not in args.ops or (args.quick and d != args.head_dims[0]):
            continue

        def make_packed(shape=(batch, n, 3, heads, d)):
            return [torch.randn(shape, device=device, dtype=dtype)]

        packed_baselines = {name: sdpa_packed for name in backends if name != "sdpa_math"}
        if not too_big:
            packed_baselines["eager"] = eager_attention_packed
        cases.append(Case(
            op="attention_qkvpacked", mode=mode, params=params, x=n, panel=f"attention_qkvpacked {mode} d={d}",
            series="", make_inputs=make_packed, differentiable=(0,), reference=eager_attention_packed,
            ours=None if packed_ours is None else (lambda qkv, f=packed_ours: f(qkv).flatten(2)),
            ours_error=packed_error, baselines=packed_baselines, contexts=dict(backends),
            work=flops, unit="TFLOP/s", check_batch=min(batch, 2)))
    if "attention" not in args.ops:
        cases = [c for c in cases if c.op != "attention"]
    return cases


# --------------------------------------------------------------------------- packed multi-crop attention

DINO_CROPS = ((224, 2), (96, 10))  # (image size, crops per image) of a DINO step at patch 16


def _per_resolution_runs(images: int, patch: int = 16) -> List[Tuple[int, int]]:
    """(tokens per crop, number of crops) for each crop resolution of ``images`` images."""
    return [((size // patch) ** 2 + 1, count * images) for size, count in DINO_CROPS]


def _run_views(qkv, runs):
    """(count, n, 3, H, d) views of each run of equal-length sequences in a packed (T, 3, H, d) qkv."""
    views, start = [], 0
    for n, count in runs:
        views.append(qkv[start:start + n * count].view(count, n, *qkv.shape[1:]))
        start += n * count
    return views


def attention_varlen_cases(args, device, dtype) -> List[Case]:
    """DINO's crops (2 x 197 + 10 x 37 tokens per image) in one packed call vs one SDPA call per resolution."""
    ours_op, ours_error = _fastvision_op("attention_varlen")
    images = 2 if args.smoke else 64
    heads, d = (2, 16) if args.smoke else (6, 64)
    runs = _per_resolution_runs(images)
    lengths = [n for n, count in runs for _ in range(count)]
    segments = None
    if ours_op is not None:
        from fastvision.ops import Segments
        segments = Segments.from_lengths(lengths, device)
    total = sum(lengths)

    def make():
        return [torch.randn(total, 3, heads, d, device=device, dtype=dtype)]

    def reference(qkv):
        return torch.cat([eager_attention_packed(v).reshape(-1, heads, d) for v in _run_views(qkv, runs)])

    def per_resolution_sdpa(qkv):
        """DINO's MultiCropWrapper: one SDPA call per resolution (the final cat, ~1% here, keeps one output)."""
        return torch.cat([sdpa_packed(v).reshape(-1, heads, d) for v in _run_views(qkv, runs)])

    ours = None if ours_op is None else (lambda qkv: ours_op(qkv, segments))
    flops = 4 * heads * d * sum(n * n for n in lengths)
    return [Case(
        op="attention_varlen", mode=mode, params=dict(images=images, H=heads, d=d, runs=runs, tokens=total),
        x=total, panel=f"attention_varlen {mode}", series="", make_inputs=make, differentiable=(0,),
        reference=reference, ours=ours, ours_error=ours_error,
        baselines={"sdpa_per_resolution": per_resolution_sdpa},
        work=flops * (3.5 if mode == "fwd+bwd" else 1.0), unit="TFLOP/s") for mode in MODES]


# --------------------------------------------------------------------------- memory-bound ops

def eager_layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, EPS)


def eager_add_layer_norm(x, residual, w, b):
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), w, b, EPS), h


def eager_softmax(x):
    return torch.softmax(x, dim=-1)


def eager_gelu(x):
    return F.gelu(x)


def eager_bias_gelu(x, bias):
    return F.gelu(x + bias)


def _ours_memory_op(op: str) -> Tuple[Optional[Callable], Optional[str]]:
    fn, error = _fastvision_op(op)
    if fn is None:
        return None, error
    wrappers = {
        "layer_norm": lambda x, w, b: fn(x, (x.shape[-1],), w, b, EPS),
        "add_layer_norm": lambda x, r, w, b: fn(x, r, (x.shape[-1],), w, b, EPS),
        "softmax": lambda x: fn(x, dim=-1),
        "gelu": lambda x: fn(x, approximate="none"),
        "bias_gelu": lambda x, bias: fn(x, bias, approximate="none"),
    }
    return wrappers[op], None


# op -> (eager fn, bytes moved per element of the main tensor: forward, backward)
MEMORY_OPS = {
    "layer_norm": (eager_layer_norm, 2, 3),        # x -> y; dy, x -> dx
    "add_layer_norm": (eager_add_layer_norm, 4, 4),  # x, r -> y, h; dy, dh, h -> dx (= dr)
    "softmax": (eager_softmax, 2, 3),              # x -> y; y, dy -> dx
    "gelu": (eager_gelu, 2, 3),                    # x -> y; x, dy -> dx
    "bias_gelu": (eager_bias_gelu, 2, 3),
}


def memory_shape(op: str, width: int, batch: int, tokens: int) -> Tuple[Tuple[int, ...], int]:
    """The main tensor's shape and the size of its last dimension."""
    if op == "softmax":  # attention-score rows: (B, H, N, N) with H = width / 64
        heads = max(1, width // 64)
        return (batch, heads, tokens, tokens), tokens
    if op in ("gelu", "bias_gelu"):
        return (batch, tokens, 4 * width), 4 * width
    return (batch, tokens, width), width


def memory_cases(args, device, dtype) -> List[Case]:
    widths = (32,) if args.smoke else WIDTHS
    batches = (2,) if args.smoke else (QUICK_BATCHES if args.quick else BATCHES)
    tokens = 5 if args.smoke else TOKENS_PER_IMAGE
    cases = []
    for op in [o for o in OPS if o in MEMORY_OPS and o in args.ops]:
        eager, fwd_bytes, bwd_bytes = MEMORY_OPS[op]
        ours, ours_error = _ours_memory_op(op)
        for mode, width, batch in itertools.product(MODES, widths, batches):
            shape, last = memory_shape(op, width, batch, tokens)
            numel = math.prod(shape)
            per_element = fwd_bytes + (bwd_bytes if mode == "fwd+bwd" else 0)

            def make(op=op, shape=shape, last=last):
                main = torch.randn(shape, device=device, dtype=dtype)
                if op == "layer_norm":
                    return [main, _param(last, device, dtype, 1.0), _param(last, device, dtype, 0.0)]
                if op == "add_layer_norm":
                    return [main, torch.randn_like(main), _param(last, device, dtype, 1.0),
                            _param(last, device, dtype, 0.0)]
                if op == "bias_gelu":
                    return [main, _param(last, device, dtype, 0.0)]
                return [main]

            n_inputs = {"layer_norm": 3, "add_layer_norm": 4, "bias_gelu": 2}.get(op, 1)
            cases.append(Case(
                op=op, mode=mode, params=dict(shape=list(shape), width=width, B=batch, N=tokens),
                x=batch * tokens, panel=f"{op} {mode}", series=f" w{width}", make_inputs=make,
                differentiable=tuple(range(n_inputs)), reference=eager, ours=ours, ours_error=ours_error,
                baselines={"eager": eager}, work=per_element * numel * torch.finfo(dtype).bits / 8,
                unit="GB/s"))
    return cases


def _param(size: int, device, dtype, center: float) -> torch.Tensor:
    return (center + 0.1 * torch.randn(size, device=device)).to(dtype)


# --------------------------------------------------------------------------- DINO loss

DINO_STUDENT_TEMP, DINO_TEACHER_TEMP = 0.1, 0.04


def eager_dino_loss(student, teacher, center, ncrops: int = 12):
    """fastvision.dino.DINOLoss's eager math (without the centre update)."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    log_p = F.log_softmax(student.to(dtype) / DINO_STUDENT_TEMP, dim=-1)
    log_p = log_p.view(ncrops, -1, log_p.shape[-1])
    q = F.softmax((teacher.detach().to(dtype) - center) / DINO_TEACHER_TEMP, dim=-1).view(-1, *log_p.shape[1:])
    sum_log_p = log_p.sum(0)
    total = sum(-(q[i] * (sum_log_p - log_p[i])).sum(-1).mean() for i in range(q.shape[0]))
    return total / (q.shape[0] * (ncrops - 1))


def dino_loss_cases(args, device, dtype) -> List[Case]:
    ours_op, ours_error = _fastvision_op("dino_loss")
    batch, ncrops, out_dim = (2, 4, 257) if args.smoke else (64, 12, 65536)
    n_global = 2
    eager = functools.partial(eager_dino_loss, ncrops=ncrops)
    ours = None if ours_op is None else (lambda s, t, c: ours_op(
        s, t, c, ncrops=ncrops, student_temp=DINO_STUDENT_TEMP, teacher_temp=DINO_TEACHER_TEMP))

    def make():
        return [torch.randn(ncrops * batch, out_dim, device=device, dtype=dtype),
                torch.randn(n_global * batch, out_dim, device=device, dtype=dtype),
                0.1 * torch.randn(1, out_dim, device=device)]

    cases = []
    for mode in MODES:
        # fwd reads student and teacher; bwd reads them again and writes the student gradient.
        rows = (ncrops + n_global) * (2 if mode == "fwd+bwd" else 1) + (ncrops if mode == "fwd+bwd" else 0)
        cases.append(Case(
            op="dino_loss", mode=mode, params=dict(shape=[ncrops * batch, out_dim], B=batch, ncrops=ncrops,
                                                   K=out_dim),
            x=batch, panel=f"dino_loss {mode}", series=f" ncrops{ncrops}", make_inputs=make, differentiable=(0,),
            reference=eager, ours=ours, ours_error=ours_error, baselines={"eager": eager},
            work=rows * batch * out_dim * torch.finfo(dtype).bits / 8, unit="GB/s"))
    return cases


# --------------------------------------------------------------------------- conv + BN (+ residual) + ReLU

# ResNet-50 layers: name -> (in channels, out channels, kernel, stride, input size, adds the residual)
RESNET50_LAYERS = {
    "stem_7x7s2": (3, 64, 7, 2, 224, False),
    "l1_conv1_1x1": (256, 64, 1, 1, 56, False),
    "l1_conv2_3x3": (64, 64, 3, 1, 56, False),
    "l1_conv3_1x1+res": (64, 256, 1, 1, 56, True),
    "l2_conv2_3x3s2": (128, 128, 3, 2, 56, False),
    "l3_conv1_1x1": (1024, 256, 1, 1, 14, False),
    "l3_conv3_1x1+res": (256, 1024, 1, 1, 14, True),
    "l4_conv2_3x3": (512, 512, 3, 1, 7, False),
}
BN_EPS = 1e-5


def _conv_out(size: int, k: int, stride: int) -> int:
    return (size + 2 * (k // 2) - k) // stride + 1


def eager_conv_bn_relu(x, w, gamma, beta, mean, var, w_folded, b_folded, res=None, *, stride=1):
    y = F.batch_norm(F.conv2d(x, w, None, stride, w.shape[-1] // 2), mean, var, gamma, beta, False, 0.0, BN_EPS)
    return F.relu(y if res is None else y + res)


def eager_folded_conv_relu(x, w, gamma, beta, mean, var, w_folded, b_folded, res=None, *, stride=1):
    y = F.conv2d(x, w_folded, b_folded.to(x.dtype), stride, w.shape[-1] // 2)
    return F.relu(y if res is None else y + res)


def _ours_conv_bn_act(mode: str, stride: int) -> Tuple[Optional[Callable], Optional[str]]:
    """Folded weights for inference; eval-mode statistics with a differentiable affine (ConvBnFusion's
    frozen-BN path) when gradients are wanted."""
    op, error = _fastvision_op("conv_bn_act")
    if op is None:
        return None, error
    from fastvision.ops._common import accumulator_dtype

    def folded(x, w, gamma, beta, mean, var, w_folded, b_folded, res=None):
        return op(x, w_folded, None, b_folded, res, stride, w.shape[-1] // 2, 1, 1, relu=True)

    def frozen(x, w, gamma, beta, mean, var, w_folded, b_folded, res=None):
        acc = accumulator_dtype(x.dtype)
        scale = gamma.to(acc) * torch.rsqrt(var.to(acc) + BN_EPS)
        shift = beta.to(acc) - mean.to(acc) * scale
        return op(x, w, scale, shift, res, stride, w.shape[-1] // 2, 1, 1, relu=True)

    return (folded if mode == "fwd" else frozen), None


def conv_bn_act_cases(args, device, dtype) -> List[Case]:
    layers = {"tiny_3x3+res": (4, 8, 3, 1, 6, True)} if args.smoke else RESNET50_LAYERS
    batch = 2 if args.smoke else 32
    cases = []
    for mode, (name, (c_in, c_out, k, stride, size, adds)) in itertools.product(MODES, layers.items()):
        ours, ours_error = _ours_conv_bn_act(mode, stride)
        out_size = _conv_out(size, k, stride)
        flops = 2 * batch * c_out * out_size ** 2 * c_in * k * k * (3 if mode == "fwd+bwd" else 1)

        def make(c_in=c_in, c_out=c_out, k=k, size=size, out_size=out_size, adds=adds):
            def channels_last(t):
                return t.contiguous(memory_format=torch.channels_last)

            x = channels_last(torch.randn(batch, c_in, size, size, device=device, dtype=dtype))
            w = channels_last(torch.randn(c_out, c_in, k, k, device=device) / math.sqrt(c_in * k * k))
            gamma, beta = 1 + 0.2 * torch.randn(c_out, device=device), 0.2 * torch.randn(c_out, device=device)
            mean, var = 0.2 * torch.randn(c_out, device=device), 0.5 + torch.rand(c_out, device=device)
            scale = gamma * torch.rsqrt(var + BN_EPS)
            w_folded = channels_last(w * scale.view(-1, 1, 1, 1)).to(dtype)
            b_folded = beta - mean * scale
            inputs = [x, w.to(dtype), gamma.to(dtype), beta.to(dtype), mean.to(dtype), var.to(dtype), w_folded,
                      b_folded]
            if adds:  # the residual, last: the callables take it as an optional argument
                inputs.append(channels_last(torch.randn(batch, c_out, out_size, out_size, device=device, dtype=dtype)))
            return inputs

        eager = functools.partial(eager_conv_bn_relu, stride=stride)
        baselines = {"eager": eager}
        if mode == "fwd":
            baselines["eager_folded"] = functools.partial(eager_folded_conv_relu, stride=stride)
        cases.append(Case(
            op="conv_bn_act", mode=mode, params=dict(layer=name, B=batch, C_in=c_in, C_out=c_out, k=k, stride=stride,
                                                     size=size, residual=adds),
            x=batch * out_size ** 2, panel=f"conv_bn_act {mode}", series="", make_inputs=make,
            differentiable=(0, 1, 2, 3), reference=eager, ours=ours, ours_error=ours_error, baselines=baselines,
            work=flops, unit="TFLOP/s"))
    return cases


# --------------------------------------------------------------------------- compile baselines

def wants_compile(case: Case, policy: str, first_head_dim: int) -> bool:
    if policy == "none":
        return False
    if policy == "all":
        return True
    if case.op == "attention":
        return case.params["d"] == first_head_dim and case.params["N"] in (197, 785)
    if case.op == "attention_qkvpacked":
        return False
    if case.op == "dino_loss":
        return True
    if case.op == "conv_bn_act":
        return case.params["layer"] in ("l1_conv3_1x1+res", "l3_conv1_1x1")
    return case.params["width"] == 768 and case.params["B"] == 256


def add_compile_baselines(cases: List[Case], policy: str, first_head_dim: int) -> None:
    compiled: Dict[str, Callable] = {}
    for case in cases:
        if "eager" not in case.baselines:
            continue
        if not wants_compile(case, policy, first_head_dim):
            case.skipped_baselines["compile"] = f"skipped: --compile {policy} compiles only a few shapes"
            continue
        if case.op not in compiled:  # one compiled callable per op; each shape is a static recompile
            compiled[case.op] = torch.compile(case.baselines["eager"], dynamic=False)
        case.baselines["compile"] = compiled[case.op]


# --------------------------------------------------------------------------- running one case

def as_tuple(out) -> Tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def make_step(fn: Callable, inputs: List[torch.Tensor], mode: str, differentiable: Sequence[int],
              grad_outputs: Optional[Tuple[torch.Tensor, ...]]) -> Callable[[], object]:
    if mode == "fwd":
        return lambda: fn(*inputs)
    leaves = [inputs[i] for i in differentiable]
    return lambda: torch.autograd.grad(as_tuple(fn(*inputs)), leaves, grad_outputs)


def rotating_step(fn, case: Case, inputs, grad_outputs, l2_bytes: int, max_sets: int = 8):
    """(step, sets): a step that cycles through enough copies of the inputs (and output gradients) to
    outgrow the L2 cache three times over, at most ``max_sets``. Calls replayed back to back from a CUDA
    graph over one small input set would read it from L2 and report more than the memory bandwidth."""
    tensors = [*inputs, *(grad_outputs or ())]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    sets = max(1, min(max_sets, math.ceil(3 * l2_bytes / max(nbytes, 1))))

    def copy(ts):
        return [t.detach().clone().requires_grad_(t.requires_grad) for t in ts]

    copies = [(inputs, grad_outputs)] + [(copy(inputs), grad_outputs and tuple(copy(grad_outputs)))
                                         for _ in range(sets - 1)]
    steps = [make_step(fn, xs, case.mode, case.differentiable, gs) for xs, gs in copies]
    calls = itertools.count()
    return (lambda: steps[next(calls) % sets]()), sets


def device_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        return float("inf")
    out, ref = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    scale = torch.linalg.vector_norm(ref).item()
    diff = torch.linalg.vector_norm(out - ref).item()
    return diff / scale if scale else diff


def outputs_and_grads(fn, inputs, mode, differentiable, grad_outputs) -> List[torch.Tensor]:
    if mode == "fwd":
        with torch.no_grad():
            return list(as_tuple(fn(*inputs)))
    outs = as_tuple(fn(*inputs))
    grads = torch.autograd.grad(outs, [inputs[i] for i in differentiable], grad_outputs)
    return [o.detach() for o in outs] + list(grads)


def check_correctness(case: Case, inputs, grad_outputs, dtype) -> Dict[str, object]:
    """Compare fastvision's outputs (and gradients) with the reference in higher precision."""
    got = outputs_and_grads(case.ours, inputs, case.mode, case.differentiable, grad_outputs)
    ref_dtype = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    k = case.check_batch

    def cut(t):
        return t[:k] if k is not None else t

    ref_inputs = [cut(t.detach()).to(ref_dtype).requires_grad_(t.requires_grad) for t in inputs]
    ref_grad_outputs = None if grad_outputs is None else tuple(cut(g).to(ref_dtype) for g in grad_outputs)
    want = outputs_and_grads(case.reference, ref_inputs, case.mode, case.differentiable, ref_grad_outputs)
    n_outputs = len(got) - (len(case.differentiable) if case.mode == "fwd+bwd" else 0)
    names = [f"out{i}" for i in range(n_outputs)] + [f"grad{i}" for i in case.differentiable][: len(got) - n_outputs]
    errors = {}
    for name, g, w in zip(names, got, want):
        errors[name] = device_rel_err(cut(g), w)
    tol = common.tolerance(dtype)
    worst = max(errors.values()) if errors else float("inf")
    return {"rel_err": worst, "per_tensor": errors, "tolerance": tol, "passed": worst <= tol,
            "reference_dtype": str(ref_dtype).replace("torch.", ""), "checked_batch": k}


def rate(case: Case, ms: float, ceilings: Dict[str, float]) -> Dict[str, float]:
    if case.unit == "TFLOP/s":
        value = case.work / (ms * 1e-3) / 1e12
        return {"tflops": value, "fraction_of_ceiling": value / ceilings["matmul_tflops"]}
    value = case.work / (ms * 1e-3) / 1e9
    return {"gbps": value, "fraction_of_ceiling": value / ceilings["copy_gbps"]}


def time_impl(name, fn, case, inputs, grad_outputs, device, args, ceilings) -> Dict[str, object]:
    context = case.contexts.get(name, contextlib.nullcontext)
    step = make_step(fn, inputs, case.mode, case.differentiable, grad_outputs)
    try:
        with context():
            start = time.perf_counter()
            step()  # first call: compiles, autotunes, or says the backend does not support the case
            common.synchronize(device)
            first_s = time.perf_counter() - start
    except Exception as exc:
        status = "unsupported" if name.startswith("sdpa_") else "error"
        return {"status": status, "error": common.first_line(exc)}
    try:
        with context():
            ms = common.bench(step, device, warmup=args.warmup, rep=args.rep, host_iters=args.host_iters)
    except Exception as exc:
        return {"status": "error", "error": common.first_line(exc)}
    result = {"status": "ok", "ms": ms, "first_call_s": first_s, **rate(case, ms, ceilings)}
    if args.graph and device.type == "cuda" and not name.startswith("compile"):
        try:
            l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
            graph_step, result["graph_input_sets"] = rotating_step(fn, case, inputs, grad_outputs, l2_bytes)
            with context():
                result["graph_ms"] = common.bench_graph(graph_step)
            # the kernels' own rate: at small sizes the plain timing is mostly host launch time
            result["graph_fraction_of_ceiling"] = rate(case, result["graph_ms"], ceilings)["fraction_of_ceiling"]
        except Exception as exc:  # a baseline that cannot be captured keeps its plain timing
            result["graph_error"] = common.first_line(exc)
    return result


def run_case(case: Case, device, dtype, args, ceilings) -> Dict[str, object]:
    record: Dict[str, object] = {"op": case.op, "mode": case.mode, "params": case.params, "x": case.x,
                                 "unit": case.unit, "work": case.work, "timings": {}}
    timings: Dict[str, Dict[str, object]] = record["timings"]
    for name, reason in case.skipped_baselines.items():
        timings[name] = {"status": "skipped", "error": reason}
    inputs = case.make_inputs()
    grad_outputs = None
    if case.mode == "fwd+bwd":
        for i in case.differentiable:
            inputs[i].requires_grad_(True)
        with torch.no_grad():  # output shapes from the reference run on meta tensors: no memory, no time
            shapes = [o.shape for o in as_tuple(case.reference(*[t.detach().to("meta") for t in inputs]))]
        grad_outputs = tuple(torch.randn(s, device=device, dtype=dtype) for s in shapes)
    if case.ours is None:
        record["status"] = "error"
        timings["fastvision"] = {"status": "error", "error": case.ours_error}
    else:
        try:
            record["correctness"] = check_correctness(case, inputs, grad_outputs, dtype)
        except Exception as exc:
            record["correctness"] = {"passed": False, "error": common.first_line(exc)}
        if record["correctness"]["passed"]:
            timings["fastvision"] = time_impl("fastvision", case.ours, case, inputs, grad_outputs, device, args,
                                              ceilings)
            record["status"] = timings["fastvision"]["status"]
        else:
            timings["fastvision"] = {"status": "failed_correctness"}
            record["status"] = "failed_correctness"
    if record["status"] != "failed_correctness":
        for name, fn in case.baselines.items():
            timings[name] = time_impl(name, fn, case, inputs, grad_outputs, device, args, ceilings)
    summarize(record)
    del inputs, grad_outputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def summarize(record: Dict[str, object]) -> None:
    timings = record["timings"]
    ok = {n: t["ms"] for n, t in timings.items() if t.get("status") == "ok" and n != "fastvision"}
    if ok:
        best = min(ok, key=ok.get)
        record["best_baseline"], record["best_baseline_ms"] = best, ok[best]
    ours = timings.get("fastvision", {})
    if ours.get("status") == "ok":
        for t in timings.values():
            if t.get("status") == "ok":
                t["speedup_of_fastvision"] = t["ms"] / ours["ms"]
        if ok:
            record["speedup_vs_best"] = ok[record["best_baseline"]] / ours["ms"]
    graphed = {n: t["graph_ms"] for n, t in timings.items() if "graph_ms" in t and n != "fastvision"}
    if "graph_ms" in ours and graphed:
        best = min(graphed, key=graphed.get)
        record["best_baseline_graph"], record["graph_speedup_vs_best"] = best, graphed[best] / ours["graph_ms"]


# --------------------------------------------------------------------------- driver

def interleave(groups: List[List[Case]]) -> List[Case]:
    """Round-robin over ops, so a time budget that runs out still leaves every op some cases."""
    order = []
    for batch in itertools.zip_longest(*groups):
        order += [c for c in batch if c is not None]
    return order


def build_cases(args, device, dtype) -> List[Case]:
    attention = attention_cases(args, device, dtype) if {"attention", "attention_qkvpacked"} & set(args.ops) else []
    attention += attention_varlen_cases(args, device, dtype) if "attention_varlen" in args.ops else []
    memory = memory_cases(args, device, dtype)
    memory += dino_loss_cases(args, device, dtype) if "dino_loss" in args.ops else []
    memory += conv_bn_act_cases(args, device, dtype) if "conv_bn_act" in args.ops else []
    if not args.smoke:
        add_compile_baselines(attention + memory, args.compile, args.head_dims[0])
    groups = [[c for c in attention + memory if c.op == op] for op in OPS]
    return interleave([g for g in groups if g])


def shape_label(record) -> str:
    p = record["params"]
    if record["op"] == "attention_varlen":
        return f"{p['images']} img x " + "+".join(f"{count // p['images']}x{n}" for n, count in p["runs"]) + \
            f" H{p['H']} d{p['d']}"
    if record["op"].startswith("attention"):
        return f"B{p['B']} H{p['H']} N{p['N']} d{p['d']}"
    if record["op"] == "conv_bn_act":
        return f"B{p['B']} {p['layer']} {p['C_in']}->{p['C_out']} {p['size']}px"
    return "x".join(str(s) for s in p["shape"])


def table_rows(results) -> List[Dict[str, object]]:
    rows = []
    for r in results:
        ours = r["timings"].get("fastvision", {})
        rows.append({
            "op": r["op"], "mode": r["mode"], "shape": shape_label(r), "status": r["status"],
            "ours ms": ours.get("ms"), "best baseline": r.get("best_baseline"), "best ms": r.get("best_baseline_ms"),
            "speedup": r.get("speedup_vs_best"), "graph ms": ours.get("graph_ms"),
            "graph speedup": r.get("graph_speedup_vs_best"), "rate": ours.get("tflops", ours.get("gbps")),
            "% ceiling": None if "fraction_of_ceiling" not in ours else 100 * ours["fraction_of_ceiling"],
            "graph % ceiling": (None if "graph_fraction_of_ceiling" not in ours
                                else 100 * ours["graph_fraction_of_ceiling"]),
            "rel err": r.get("correctness", {}).get("rel_err"),
        })
    return rows


def plot_panels(results) -> Dict[str, Dict[str, List[tuple]]]:
    panels: Dict[str, Dict[str, List[tuple]]] = {}
    for r in results:
        panel = panels.setdefault(r["panel"], {})
        for name, t in r["timings"].items():
            if name != "fastvision" and "speedup_of_fastvision" in t:
                panel.setdefault(name + r["series"], []).append((r["x"], t["speedup_of_fastvision"]))
    return panels


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.micro", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (micro.json, micro.png)")
    p.add_argument("--quick", action="store_true", help="fewer shapes; finishes in ~2.5 minutes on an H100")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, eager baselines only (CI)")
    p.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--head-dims", default="64,128", help="attention head dims")
    p.add_argument("--registers", type=int, default=0, help="register tokens added to every sequence")
    p.add_argument("--compile", choices=("all", "some", "none"), default=None,
                   help="torch.compile baselines: every shape, a few (default with --quick) or none")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default bfloat16 (float32 with --smoke, where the CPU interpreter runs the kernels)")
    p.add_argument("--max-seconds", type=float, default=None, help="skip remaining cases after this long")
    p.add_argument("--no-graph", dest="graph", action="store_false",
                   help="skip the CUDA-graph timings (device time without host launch cost)")
    p.add_argument("--warmup", type=float, default=None, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=float, default=None, help="do_bench repetitions, ms")
    args = p.parse_args(argv)
    args.ops = common.iter_names(args.ops, OPS)
    args.head_dims = [int(d) for d in args.head_dims.split(",")]
    if args.smoke:
        args.head_dims = [16]
    args.compile = args.compile or ("none" if args.smoke else ("some" if args.quick else "all"))
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    if args.max_seconds is None:
        args.max_seconds = 120.0 if args.quick else (60.0 if args.smoke else 1800.0)
    args.warmup = args.warmup if args.warmup is not None else (10.0 if args.quick else 25.0)
    args.rep = args.rep if args.rep is not None else (40.0 if args.quick else 100.0)
    args.host_iters = 2 if args.smoke else 5
    return args


def run_or_skip(case: Case, device, dtype, args, ceilings, budget: common.Budget) -> Dict[str, object]:
    base = {"op": case.op, "mode": case.mode, "params": case.params, "x": case.x, "unit": case.unit,
            "panel": case.panel, "series": case.series, "timings": {}}
    if budget.exhausted():
        return {**base, "status": "skipped", "reason": f"--max-seconds {args.max_seconds:g} spent"}
    try:
        return {**run_case(case, device, dtype, args, ceilings), "panel": case.panel, "series": case.series}
    except Exception as exc:  # one broken case must not end the run
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**base, "status": "error", "error": common.first_line(exc)}


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    device = common.pick_device(args.smoke)
    dtype = getattr(torch, args.dtype)
    budget = common.Budget(args.max_seconds)
    common.configure_dynamo()
    torch.manual_seed(0)
    env = common.environment_info(device)
    print(f"[micro] {env['device_name']} torch {env['torch']} triton {env['triton']} commit {env['git_commit']}",
          flush=True)
    ceilings = common.measure_ceilings(device, args.smoke)
    print(f"[micro] ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, matmul {ceilings['matmul_tflops']:.1f} TFLOP/s",
          flush=True)
    cases = build_cases(args, device, dtype)
    results: List[Dict[str, object]] = []
    os.makedirs(args.out, exist_ok=True)
    payload = {"benchmark": "micro", "env": env, "ceilings": ceilings, "dtype": args.dtype,
               "args": dict(vars(args)), "complete": False, "results": results, "plot": None}
    json_path = os.path.join(args.out, "micro.json")
    progress = common.Progress(len(cases), "micro")
    for case in cases:
        results.append(run_or_skip(case, device, dtype, args, ceilings, budget))
        payload["elapsed_s"] = budget.elapsed()
        common.write_json(json_path, payload)  # after every case: a run killed by a timeout keeps its results
        progress.step(f"{case.op} {case.mode} {case.params.get('N', '')} {case.params.get('shape', '')}")
    progress.close()
    plot = common.plot_speedups(plot_panels(results), os.path.join(args.out, "micro.png"),
                                xlabel="sequence length N (attention) / tokens B*N (others)",
                                title=f"fastvision speedup over each baseline, {env['device_name']}, {args.dtype}")
    payload.update(plot=None if plot is None else os.path.basename(plot), complete=True, elapsed_s=budget.elapsed(),
                   tuned=common.tuned_configurations())
    common.write_json(json_path, payload)
    common.print_table(table_rows(results), ["op", "mode", "shape", "status", "ours ms", "best baseline", "best ms",
                                             "speedup", "graph ms", "graph speedup", "rate", "% ceiling",
                                             "rel err"],
                       title=f"micro: {len(results)} cases in {budget.elapsed():.0f} s "
                             f"(rate: TFLOP/s for attention and conv_bn_act, GB/s otherwise)")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
