"""DINO training-step benchmark: eager vs torch.compile vs fastvision.patch (without and with packed
multi-crop) vs fastvision.patch + compile.

    python -m benchmarks.dino_step --out dino_step.json [--quick] [--arch vit_small_patch16_224] [--batch 64]
    python -m benchmarks.dino_step --smoke --out /tmp/dino.json        # CPU, tiny model, a couple of steps

One step is fastvision.dino.dino_train_step: teacher on the 2 global crops (no grad), student on
all crops (same-resolution crops concatenated, one backbone pass each; "fastvision+packing": every
crop's tokens in one packed pass, fastvision.packing), DINO loss (out_dim
65536), backward, per-parameter gradient clipping, AdamW, EMA teacher update; bf16 autocast.
Images/s counts source images (each brings 2 global + N local crops). Step times are CUDA-event
medians after warm-up; the time to first step includes torch.compile. The JSON is rewritten
after every variant, so a run cut short keeps what it measured.
"""
import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional

import torch

from .common import tuned_configurations

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# compiled last; fastvision+compile keeps only the fused attention (the default policy, see
# fastvision/modules/_compiled.py), fastvision+compile-all keeps every fused op. "+graph" (any variant):
# DINOStep(cuda_graph=True), the forward/backward replayed from a CUDA graph. "+recompute" (fastvision):
# patch(mlp_recompute=True), the MLPs' GELU outputs recomputed in the backward instead of kept.
VARIANTS = ("eager", "fastvision", "fastvision+packing", "compile", "fastvision+compile", "fastvision+compile-all")
GRAPH_VARIANTS = ("eager+graph", "fastvision+graph", "fastvision+packing+graph", "compile+graph",
                  "fastvision+compile+graph")
OPTIONS = ("packing", "compile", "compile-all", "graph", "recompute")


def parse_variant(name: str) -> Dict[str, object]:
    """"fastvision+packing+graph" → {patched, packing, compile (None, "" or "all"), graph, recompute}."""
    base, *options = name.split("+")
    bad = [o for o in options if o not in OPTIONS] + ([base] if base not in ("eager", "fastvision", "compile") else [])
    patched = base == "fastvision"
    if (bad or (not patched and ({"packing", "compile-all", "recompute"} & set(options)))
            or len(set(options)) != len(options)):
        raise ValueError(f"unknown variant {name!r}: eager, fastvision or compile, then any of +{', +'.join(OPTIONS)} "
                         "(packing, compile-all and recompute need fastvision)")
    compile_ops = "all" if "compile-all" in options else "" if base == "compile" or "compile" in options else None
    return {"patched": patched, "packing": "packing" in options, "compile": compile_ops, "graph": "graph" in options,
            "recompute": "recompute" in options}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--arch", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 64; 32 with --quick)")
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=10)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 6 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 5; 2 quick)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, e.g. {VARIANTS + GRAPH_VARIANTS}")
    p.add_argument("--no-amp", action="store_true", help="fp32 instead of bf16 autocast")
    p.add_argument("--max-seconds", type=float, default=None, help="skip the variants left once this is spent")
    p.add_argument("--profile", action="store_true", help="add each variant's top CUDA kernels to the JSON")
    p.add_argument("--quick", action="store_true", help="fewer steps, batch 32: < 2 minutes on an H100")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny ViT, two steps: checks the script runs")
    args = p.parse_args(argv)
    _fill_defaults(args)
    return args


def _fill_defaults(args: argparse.Namespace) -> None:
    if args.smoke:
        args.arch, args.out_dim, args.global_size, args.local_size, args.local_crops = (
            "vit_tiny_patch16_224", 256, 32, 16, 2)
        args.batch, args.steps, args.warmup, args.no_amp = args.batch or 2, args.steps or 1, args.warmup or 0, True
        if args.variants == ",".join(VARIANTS):
            args.variants = "eager,fastvision,fastvision+packing,eager+graph"  # +graph: declines on the CPU
    args.batch = args.batch or (32 if args.quick else 64)
    args.steps = args.steps or (6 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in args.variants:
        try:
            parse_variant(name)
        except ValueError as exc:
            raise SystemExit(str(exc))


# --- environment --------------------------------------------------------------------------------

def git_commit() -> Optional[str]:
    if os.environ.get("FASTVISION_COMMIT"):
        return os.environ["FASTVISION_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> Dict[str, Optional[str]]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "timm", "fastvision"):
        try:
            found[name] = getattr(__import__(name), "__version__", "unknown")
        except Exception:
            found[name] = None
    return found


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


# --- one variant ----------------------------------------------------------------------------------

def make_crops(args, device) -> List[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops
    return [torch.randn(args.batch, 3, s, s, generator=g).to(device) for s in sizes]


def build_step(variant: str, args, device):
    from fastvision import dino

    torch.manual_seed(0)
    kwargs = dict(depth=1) if args.smoke else {}
    student, teacher = dino.build_dino(args.arch, out_dim=args.out_dim, img_size=args.global_size, **kwargs)
    student, teacher = student.to(device), teacher.to(device)
    options = parse_variant(variant)
    if options["patched"]:
        import fastvision

        fastvision.patch(student, mlp_recompute=options["recompute"])
        fastvision.patch(teacher, mlp_recompute=options["recompute"])
    student.packed = teacher.packed = options["packing"]  # True: an error says why it cannot pack
    if options["compile"] is not None:
        from fastvision.modules import set_compile_ops

        set_compile_ops(options["compile"])  # read when the graphs are traced
        torch._dynamo.reset()
        student.backbone.compile(dynamic=False)
        teacher.backbone.compile(dynamic=False)
    # The fused loss kernel belongs to the fastvision variants; eager and compile keep DINO's own loss.
    fused_loss = None if options["patched"] else False
    loss_fn = dino.DINOLoss(args.out_dim, 2 + args.local_crops, 0.04, 0.04, 0, 100, fused=fused_loss).to(device)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(dino.param_groups(student), lr=5e-4 * args.batch / 256, weight_decay=0.04,
                                  **fused)
    amp = None if args.no_amp else torch.bfloat16
    return dino.DINOStep(student, teacher, loss_fn, optimizer, clip_grad=3.0, freeze_last_layer=1,
                         autocast_dtype=amp, cuda_graph=options["graph"])


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, crops, n: int, device) -> List[float]:
    """Seconds per step: CUDA events on a GPU, perf_counter on the CPU."""
    times = []
    for _ in range(n):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(crops, 1, 0.996)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step(crops, 1, 0.996)
            times.append(time.perf_counter() - t0)
    return times


# Kernel families, matched in order against the lower-cased kernel name (first match wins).
KERNEL_FAMILIES = (
    ("attention", r"attention|attn|flash|fmha|sdpa"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|matmul|mm_"),
    ("layer_norm", r"layer_norm|layernorm"),
    ("gelu", r"gelu"),
    ("dino_loss/softmax", r"dino_loss|softmax"),
    ("optimizer/ema/clip", r"foreach|multi_tensor|adam|lerp|norm_kernel"),
    ("triton (compiled)", r"^triton_"),
    ("reduction", r"reduce"),
    ("copy/cast/fill", r"copy|cat_|memcpy|memset|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
)


def _device_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value:
            return float(value)
    return 0.0


def kernel_families(events, steps: int) -> Dict[str, float]:
    """Milliseconds of GPU time per step in each of KERNEL_FAMILIES (plus "other"), largest first."""
    totals: Dict[str, float] = {}
    for event in events:
        us = _device_us(event)
        if not us or getattr(event, "device_type", None) is None or "cuda" not in str(event.device_type).lower():
            continue
        name = event.key.lower()
        family = next((f for f, pattern in KERNEL_FAMILIES if re.search(pattern, name)), "other")
        totals[family] = totals.get(family, 0.0) + us / 1e3 / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def profile_top_kernels(step, crops, device, rows: int = 25, steps: int = 2):
    """(table of the top kernels by GPU time, GPU milliseconds per step by kernel family)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(crops, 1, 0.996)
        synchronize(device)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return events.table(sort_by=sort, row_limit=rows, max_name_column_width=70), kernel_families(events, steps)


def run_variant(variant: str, args, device) -> Dict[str, object]:
    result: Dict[str, object] = {"name": variant}
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step = build_step(variant, args, device)
        if variant.startswith("fastvision"):
            import fastvision

            report = fastvision.patch_report(step.student)
            result["patched"] = report.counts()
            result["patch_skipped"] = sorted({s.reason for s in report.skipped})
            result["packing"] = step.student.why_not_packed() or "packed"
        crops = make_crops(args, device)
        synchronize(device)
        t0 = time.perf_counter()
        loss = step(crops, 1, 0.996)
        synchronize(device)
        result["time_to_first_step_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            # The first step compiles and times launch configurations (Triton, Inductor) with scratch
            # buffers of their own; peak_memory_gib is the training peak from the second step on,
            # CUDA-graph capture included.
            result["peak_memory_first_step_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        timed_steps(step, crops, args.warmup, device)
        if step.graph is not None:
            result["cuda_graph"] = "replayed" if step.graphed and step.graph.captured else (
                step.why_not_graphed(crops) or "not captured yet: raise --warmup")
        times = timed_steps(step, crops, args.steps, device)
        median = statistics.median(times)
        result.update(step_ms_median=median * 1e3, step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
                      images_per_s=args.batch / median, first_loss=float(loss))
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        if args.profile:
            result["profile"], result["gpu_ms_per_step_by_kernel_family"] = profile_top_kernels(step, crops, device)
    except Exception as exc:  # one variant failing must not lose the others
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        step = crops = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


# --- report ---------------------------------------------------------------------------------------

def add_speedups(variants: List[Dict[str, object]]) -> None:
    rates = {v["name"]: v.get("images_per_s") for v in variants}
    eager_loss = next((v.get("first_loss") for v in variants if v["name"] == "eager"), None)
    for v in variants:
        if eager_loss and v.get("first_loss") is not None:  # same seed, weights and crops: same first loss
            v["first_loss_rel_err_vs_eager"] = abs(v["first_loss"] - eager_loss) / abs(eager_loss)
        for base in ("eager", "compile"):
            if v.get("images_per_s") and rates.get(base):
                v[f"speedup_vs_{base}"] = v["images_per_s"] / rates[base]


def table(variants: List[Dict[str, object]]) -> str:
    lines = [f"{'variant':<24} {'img/s':>9} {'step ms':>9} {'vs eager':>9} {'vs compile':>10} {'peak GiB':>9} "
             f"{'first s':>8}"]
    for v in variants:
        if v.get("error"):
            lines.append(f"{v['name']:<24} ERROR {v['error'][:120]}")
            continue

        def num(key, fmt):
            width = int(fmt.split(".")[0])
            return format(v[key], fmt) if v.get(key) is not None else "-".rjust(width)

        lines.append(f"{v['name']:<24} {num('images_per_s', '9.1f')} {num('step_ms_median', '9.2f')} "
                     f"{num('speedup_vs_eager', '9.2f')} {num('speedup_vs_compile', '10.2f')} "
                     f"{num('peak_memory_gib', '9.2f')} {num('time_to_first_step_s', '8.1f')}")
    return "\n".join(lines)


def write_json(path: str, payload: Dict[str, object]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU smoke version")
    device = torch.device("cpu" if args.smoke else "cuda")
    config = {k: v for k, v in vars(args).items() if k not in ("out",)}
    config.update(amp=None if args.no_amp else "bfloat16", crops=f"2x{args.global_size} + "
                  f"{args.local_crops}x{args.local_size}")
    payload = {"benchmark": "dino_step", "device": device_name(device), "versions": versions(),
               "git_commit": git_commit(), "config": config, "variants": []}
    start = time.perf_counter()
    for i, variant in enumerate(args.variants):
        if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
            payload["variants"].append({"name": variant, "error": "skipped: --max-seconds spent"})
            continue
        print(f"[{i + 1}/{len(args.variants)}] {variant} ...", file=sys.stderr, flush=True)
        result = run_variant(variant, args, device)
        payload["variants"].append(result)
        add_speedups(payload["variants"])
        payload["elapsed_s"] = time.perf_counter() - start
        payload["tuned"] = tuned_configurations()
        write_json(args.out, payload)
        summary = result.get("error") or "{:.1f} img/s".format(result["images_per_s"])
        print(f"    {summary}", file=sys.stderr, flush=True)
    print(f"DINO step, {args.arch}, batch {args.batch}, {config['crops']}, out_dim {args.out_dim}, "
          f"amp {config['amp']}, {payload['device']}")
    print(table(payload["variants"]))
    for v in payload["variants"]:
        if v.get("profile"):
            families = ", ".join(f"{k} {ms:.2f}" for k, ms in v.get("gpu_ms_per_step_by_kernel_family", {}).items())
            print(f"\n-- {v['name']}: GPU ms per step by kernel family: {families}\n{v['profile']}")
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
