"""fastvision.verify on full-size timm models on the GPU: patched vs eager vs float64, per module and gradient.

    python -m benchmarks.verify_models --out verify.json [--models vit_small_patch16_224,...] [--dtype bfloat16]
"""
import argparse
import json
import time

import torch

import fastvision

DEFAULT_MODELS = "vit_small_patch16_224,vit_base_patch16_224"


SMOKE_KWARGS = {"img_size": 32, "depth": 1}  # --smoke: one block at 32 px, on the CPU


def verify_model(name: str, dtype: torch.dtype, batch: int, device: str, **create_kwargs) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **create_kwargs).eval()
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)  # the model's own, e.g. --smoke's
    size = (3, *img_size) if img_size else model.pretrained_cfg.get("input_size", (3, 224, 224))
    images = torch.randn(batch, *size)
    start = time.perf_counter()
    report = fastvision.verify(model, images, dtype=dtype, device=device)
    print(report.table())
    return {
        "model": name, "dtype": str(dtype), "device": device, "batch": batch, "passed": report.passed,
        "seconds": round(time.perf_counter() - start, 1), "declined": report.declined,
        "checks": [{"name": c.name, "kind": c.kind, "patched_error": c.patched_error, "eager_error": c.eager_error,
                    "tolerance": c.tolerance, "passed": c.passed} for c in report.checks],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="CPU, float32, a one-block ViT-Tiny at 32 px")
    args = parser.parse_args(argv)
    create_kwargs = {}
    if args.smoke:
        args.models, args.dtype, args.batch, args.device = "vit_tiny_patch16_224", "float32", 2, "cpu"
        create_kwargs = SMOKE_KWARGS
    results = []
    for name in args.models.split(","):
        try:
            results.append(verify_model(name, getattr(torch, args.dtype), args.batch, args.device, **create_kwargs))
        except Exception as exc:  # one model's failure is recorded, the others still run
            results.append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with open(args.out, "w") as f:
        json.dump({"device": device_name, "torch": torch.__version__, "results": results}, f, indent=1)
    for r in results:
        print(r["model"], "PASSED" if r.get("passed") else f"FAILED {r.get('error', '')}")
    return results


if __name__ == "__main__":
    main()
