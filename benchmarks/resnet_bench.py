"""Patched timm ResNet-50 inference vs eager vs torch.compile, and conv_bn_act vs eager conv+BN+ReLU.

    python benchmarks/resnet_bench.py --out resnet50.json [--quick] [--batch 256] [--dtype bf16]

Times are medians of CUDA-event timings after warm-up (perf_counter on CPU with --smoke).
Inference: bf16 (default), channels_last, eval mode, torch.no_grad. --quick keeps the whole run
under ~90 s on an H100 (fewer repetitions, torch.compile with the default mode only).
"""
import argparse
import copy
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import fastvision
from fastvision import _extension

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# ResNet-50 layers at 224 px: (C_in, C_out, kernel, stride, H=W of the input), plus a depthwise 3x3.
LAYERS = {
    "l1_conv2_3x3": (64, 64, 3, 1, 56, 1),
    "l1_conv3_1x1": (64, 256, 1, 1, 56, 1),
    "l2_conv2_3x3s2": (128, 128, 3, 2, 56, 1),
    "l3_conv1_1x1": (1024, 256, 1, 1, 14, 1),
    "l4_conv2_3x3": (512, 512, 3, 1, 7, 1),
    "dw_3x3": (256, 256, 3, 1, 28, 256),
}


def timer(device):
    def time_ms(fn, warmup, reps):
        for _ in range(warmup):
            fn()
        if device.type != "cuda":
            samples = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t) * 1e3)
            return statistics.median(samples)
        torch.cuda.synchronize()
        samples = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return statistics.median(samples)
    return time_ms


def environment(device):
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "fastvision": fastvision.__version__, "extension": _extension.extension_decline() or "loaded",
            "extension_cuda": _extension.built_with_cuda(), "device": str(device)}
    try:
        import timm
        info["timm"] = timm.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Trained-looking BatchNorm statistics and affine parameters.

    A fresh timm ResNet has mean 0, var 1, weight 1 (0 on each block's last BN) and bias 0:
    folding then changes nothing and the residual branches are zero, so the error column
    would compare nothing. Random values make the folded model's error a real check.
    """
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=generator) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(c, generator=generator) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(c, generator=generator) * 0.1)


def bench_model(args, device, dtype, time_ms):
    import timm
    model = timm.create_model("resnet50", pretrained=False)
    randomize_batchnorm(model)
    model = model.eval().to(device, dtype)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    patched = fastvision.patch(copy.deepcopy(model))
    variants = {"eager": model, "fastvision": patched}
    if not args.no_compile:
        variants["torch.compile"] = torch.compile(copy.deepcopy(model))
        if not args.quick:
            variants["fastvision+compile"] = torch.compile(patched)
    results = {}
    with torch.no_grad():
        ref = model(x).float()
        for name, m in variants.items():
            ms = time_ms(lambda: m(x), args.warmup, args.reps)
            err = ((m(x).float() - ref).norm() / ref.norm()).item()
            results[name] = {"ms": ms, "img_per_s": args.batch / ms * 1e3, "rel_err_vs_eager": err}
            print(f"resnet50 b{args.batch} {name:>20}: {ms:8.2f} ms  {results[name]['img_per_s']:9.0f} img/s  "
                  f"err {err:.1e}", flush=True)
    for name in results:
        results[name]["speedup_vs_eager"] = results["eager"]["ms"] / results[name]["ms"]
    return results


def bench_layers(args, device, dtype, time_ms):
    ext = _extension.load()
    results = {}
    for name, (c_in, c_out, k, stride, hw, groups) in LAYERS.items():
        x = torch.randn(args.layer_batch, c_in, hw, hw, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False).to(device, dtype)
        conv = conv.to(memory_format=torch.channels_last)
        bn = torch.nn.BatchNorm2d(c_out).to(device, dtype).eval()
        w, b = fastvision.ops.fold_batchnorm(conv.weight, None, bn.running_mean, bn.running_var, bn.weight,
                                             bn.bias, bn.eps, out_dtype=torch.float32)
        w = w.to(dtype).contiguous(memory_format=torch.channels_last)
        res = torch.randn_like(conv(x))
        row = {}
        with torch.no_grad():
            row["eager_conv_bn_relu"] = time_ms(lambda: F.relu(bn(conv(x)) + res), args.warmup, args.reps)
            row["eager_folded_conv_relu"] = time_ms(lambda: F.relu(F.conv2d(x, w, b.to(dtype), stride, k // 2, 1,
                                                                            groups) + res), args.warmup, args.reps)
            engines = ["epilogue", "cudnn_fused", "direct_depthwise"] if device.type == "cuda" and ext is not None else ["epilogue"]
            for engine in engines:
                if ext is not None and device.type == "cuda":
                    ext.set_cuda_conv_engine(engine)
                row[f"conv_bn_act[{engine}]"] = time_ms(
                    lambda: fastvision.ops.conv_bn_act(x, w, None, b, res, stride, k // 2, 1, groups, True),
                    args.warmup, args.reps)
            if ext is not None and device.type == "cuda":
                ext.set_cuda_conv_engine("epilogue")
        results[name] = row
        print(f"{name:>16}: " + "  ".join(f"{k} {v:.3f} ms" for k, v in row.items()), flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file for the results")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--layer-batch", type=int, default=32)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, keep the run < 90 s on an H100")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.size, args.layer_batch, args.no_compile, args.dtype = 2, 64, 1, True, "fp32"
    args.warmup, args.reps = (3, 10) if args.quick else (10, 30)
    if args.smoke:
        args.warmup, args.reps = 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    dtype = DTYPES[args.dtype]
    torch.backends.cudnn.benchmark = True
    time_ms = timer(device)
    report = {"benchmark": "resnet50", "env": environment(device), "dtype": args.dtype, "batch": args.batch,
              "size": args.size, "channels_last": True, "quick": args.quick}
    report["model"] = bench_model(args, device, dtype, time_ms)
    report["layers"] = {"batch": args.layer_batch, "results": bench_layers(args, device, dtype, time_ms)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
