"""Short summary of a suite's JSON results: `python -m benchmarks.summary OUTDIR [--compare OLD_MICRO_JSON]`.

Per micro op and mode: cases, how many passed the correctness guard, the range and median of
fastvision's speedup over the best baseline and of its fraction of the ceiling. Per model run: img/s and
speedup over eager; the issues' performance goals, met or not (attention against the best SDPA backend per N,
the memory-bound kernels' fraction of copy bandwidth, the DINO step against eager and torch.compile and its
peak memory). Short enough to read in the last lines of a log. ``--compare`` adds, per micro
case both runs timed, fastvision's time (plain and CUDA-graph) in the old run and this one: what a
kernel change did, measured on the same kind of device.
"""
import json
import os
import statistics
import sys
from typing import Dict, List

from . import common


def _load(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _spread(values: List[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):.2f}/{statistics.median(values):.2f}/{max(values):.2f}"


def micro_rows(payload) -> List[Dict[str, object]]:
    groups: Dict[tuple, List[dict]] = {}
    for r in payload["results"]:
        groups.setdefault((r["op"], r["mode"]), []).append(r)
    rows = []
    for (op, mode), records in groups.items():
        ours = [r["timings"].get("fastvision", {}) for r in records]
        best = {}
        for r in records:
            if r.get("best_baseline"):
                best[r["best_baseline"]] = best.get(r["best_baseline"], 0) + 1
        rows.append({
            "op": op, "mode": mode, "cases": len(records),
            "timed": sum(1 for o in ours if o.get("status") == "ok"),
            "failed": sum(1 for r in records if r["status"] in ("failed_correctness", "error")),
            "skipped": sum(1 for r in records if r["status"] == "skipped"),
            "speedup vs best": _spread([r["speedup_vs_best"] for r in records if "speedup_vs_best" in r]),
            "ceiling fraction": _spread([o["fraction_of_ceiling"] for o in ours if "fraction_of_ceiling" in o]),
            "graph ceiling fraction": _spread([o["graph_fraction_of_ceiling"] for o in ours
                                               if "graph_fraction_of_ceiling" in o]),
            "best baselines": ",".join(f"{k}:{v}" for k, v in sorted(best.items())),
        })
    return rows


def _case_key(record) -> tuple:
    return record["op"], record["mode"], json.dumps(record["params"], sort_keys=True)


def compare_rows(old_payload, payload) -> List[Dict[str, object]]:
    """fastvision's ms and CUDA-graph ms per case in both runs, and new / old."""
    old = {_case_key(r): r["timings"].get("fastvision", {}) for r in old_payload["results"]}
    rows = []
    for r in payload["results"]:
        before, after = old.get(_case_key(r), {}), r["timings"].get("fastvision", {})
        if before.get("status") != "ok" or after.get("status") != "ok":
            continue
        row = {"op": r["op"], "mode": r["mode"], "shape": r["params"].get("shape", r["params"].get("N")),
               "old ms": before["ms"], "new ms": after["ms"], "new/old": after["ms"] / before["ms"]}
        if before.get("graph_ms") and after.get("graph_ms"):
            row.update({"old graph ms": before["graph_ms"], "new graph ms": after["graph_ms"],
                        "graph new/old": after["graph_ms"] / before["graph_ms"]})
        rows.append(row)
    return rows


# The issues' performance goals (H100, bf16), checked against a suite's results.
GOALS = {"dino_vs_eager": 1.5, "dino_vs_compile": 1.2, "kernel_fraction_of_copy": 0.85}
BANDWIDTH_OPS = ("layer_norm", "add_layer_norm", "softmax", "gelu", "bias_gelu")
ATTENTION_OPS = ("attention", "attention_qkvpacked")


def _mark(ok) -> str:
    return "?" if ok is None else ("yes" if ok else "NO")


def dino_goal_lines(payload, label: str) -> List[str]:
    """The fastest fastvision variant against eager, every compile variant and eager's peak memory."""
    ok = {v["name"]: v for v in payload.get("variants", []) if v.get("images_per_s")}
    eager = ok.get("eager")
    ours = [v for n, v in ok.items() if n.startswith("fastvision")]
    if not eager or not ours:
        return [f"{label}: no eager or fastvision variant timed"]
    compiled = {n: v["images_per_s"] for n, v in ok.items() if n.startswith("compile")}
    lines = [f"{label} ({payload.get('device')}): eager {eager['images_per_s']:.0f} img/s, "
             f"peak {eager.get('peak_memory_gib', float('nan')):.2f} GiB; "
             + ", ".join(f"{n} {r:.0f}" for n, r in compiled.items())]
    for v in sorted(ours, key=lambda v: -v["images_per_s"]):
        vs_eager = v["images_per_s"] / eager["images_per_s"]
        vs_compile = {n: v["images_per_s"] / r for n, r in compiled.items()}
        memory = v.get("peak_memory_gib")
        lower = None if memory is None or eager.get("peak_memory_gib") is None else memory < eager["peak_memory_gib"]
        lines.append(
            f"  {v['name']} {v['images_per_s']:.0f} img/s: {vs_eager:.2f}x eager "
            f"[>={GOALS['dino_vs_eager']} {_mark(vs_eager >= GOALS['dino_vs_eager'])}], "
            + ", ".join(f"{r:.2f}x {n} [>={GOALS['dino_vs_compile']} {_mark(r >= GOALS['dino_vs_compile'])}]"
                        for n, r in vs_compile.items())
            + (f", peak {memory:.2f} GiB [<eager {_mark(lower)}]" if memory is not None else ""))
    return lines


def micro_goal_lines(payload) -> List[str]:
    """Attention against the best SDPA backend per N, and the memory-bound kernels' kernel-time fraction
    of copy bandwidth (CUDA-graph replays, inputs rotated past L2)."""
    lines = []
    for mode in ("fwd", "fwd+bwd"):
        ratios = {}
        for r in payload["results"]:
            if r["op"] in ATTENTION_OPS and r["mode"] == mode and "speedup_vs_best" in r:
                key = r["params"].get("N")
                ratios[key] = min(ratios.get(key, float("inf")), r["speedup_vs_best"])
        if ratios:
            behind = [n for n, v in sorted(ratios.items()) if v < 1]
            lines.append(f"attention {mode} vs best baseline, per N (worst layout): "
                         + " ".join(f"{n}:{v:.2f}" for n, v in sorted(ratios.items()))
                         + f" [>=1 everywhere {_mark(not behind)}]")
    copy_gbps = payload.get("ceilings", {}).get("copy_gbps")
    # Judged on the cases that move at least three L2 caches' worth (a 20 MB call cannot reach the
    # bandwidth of the 2 GiB copy that sets the ceiling, whatever the kernel); all cases are listed.
    large = 3 * (payload.get("env", {}).get("l2_cache_mb") or 50) * 1e6
    goal = GOALS["kernel_fraction_of_copy"]
    for op in BANDWIDTH_OPS:
        graphed = {mode: _graphed(payload, op, mode) for mode in ("fwd", "fwd+bwd")}
        fractions = {mode: [(work, fraction) for work, _, fraction in cases.values()]
                     for mode, cases in graphed.items()}
        if copy_gbps:  # the backward alone: the forward's bytes and time taken out of fwd+bwd's
            fractions["bwd, derived"] = [
                (work, (work - graphed["fwd"][k][0]) / ((ms - graphed["fwd"][k][1]) * 1e6) / copy_gbps)
                for k, (work, ms, _) in graphed["fwd+bwd"].items() if k in graphed["fwd"] and ms > graphed["fwd"][k][1]]
        for mode, cases in fractions.items():
            if cases:
                judged = [f for work, f in cases if work >= large]
                verdict = _mark(min(judged) >= goal if judged else None)
                lines.append(f"{op} {mode}: kernel time at {_spread([f for _, f in cases])} of copy bandwidth "
                             f"(min/median/max) [>={goal} over {large / 1e6:.0f} MB: {verdict}]")
    return lines


def _graphed(payload, op: str, mode: str) -> Dict[str, tuple]:
    """{case parameters: (bytes, CUDA-graph ms, fraction of copy bandwidth)} of fastvision's timed cases."""
    cases = {}
    for r in payload["results"]:
        ours = r["timings"].get("fastvision", {})
        if r["op"] == op and r["mode"] == mode and "graph_fraction_of_ceiling" in ours:
            cases[_case_key(r)[2]] = (r["work"], ours["graph_ms"], ours["graph_fraction_of_ceiling"])
    return cases


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    compare = None
    if "--compare" in argv:
        i = argv.index("--compare")
        compare = _load(argv[i + 1]) if i + 1 < len(argv) else None
        del argv[i:i + 2]
    out = argv[0] if argv else "."
    micro = _load(os.path.join(out, "micro", "micro.json"))
    if micro and compare:
        common.print_table(compare_rows(compare, micro), ["op", "mode", "shape", "old ms", "new ms", "new/old",
                                                          "old graph ms", "new graph ms", "graph new/old"],
                           title="fastvision time per case, the --compare run against this one")
    if micro:
        c = micro["ceilings"]
        print(f"micro ({micro['env'].get('device_name')}): copy {c['copy_gbps']:.0f} GB/s, "
              f"matmul {c['matmul_tflops']:.0f} TFLOP/s, {micro['elapsed_s']:.0f} s")
        common.print_table(micro_rows(micro), ["op", "mode", "cases", "timed", "failed", "skipped",
                                               "speedup vs best", "ceiling fraction", "best baselines"],
                           title="speedup over the best baseline and fraction of the ceiling: min/median/max")
        problems: Dict[str, List[str]] = {}
        for r in micro["results"]:
            if r["status"] in ("error", "failed_correctness"):
                detail = r.get("error") or r["timings"].get("fastvision", {}).get("error") or r.get("correctness")
                where = f"{r['op']} {r['mode']} {r['params'].get('N', r['params'].get('shape'))}"
                problems.setdefault(f"{r['status']}: {str(detail)[:160]}", []).append(where)
        for detail, where in list(problems.items())[:8]:
            print(f"  {len(where)} case(s), e.g. {where[0]}: {detail}")
    models = _load(os.path.join(out, "models", "models.json"))
    if models:
        print(f"models ({models['env'].get('device_name')}), {models['elapsed_s']:.0f} s")
        common.print_table(models["results"], ["model", "task", "variant", "batch", "status", "img_per_s",
                                                "speedup_vs_eager", "ms_per_step", "host_ms_per_step",
                                                "peak_mem_gib", "first_step_s",
                                                "logits_rel_err_vs_eager", "declined"])
        for r in models["results"]:
            if r.get("status") == "error":
                print(f"  {r['model']} {r['task']} {r['variant']}: {r['error'][:200]}")
            reasons = sorted(set((r.get("declined_modules") or {}).values()))
            if reasons:  # fused modules that ran their eager fallback in that step
                print(f"  {r['model']} {r['task']} {r['variant']} ran eager: {'; '.join(reasons)[:200]}")
    goals = micro_goal_lines(micro) if micro else []
    bundle = _load(os.path.join(out, "suite.json")) or {}  # where the suite gathered them at its end
    for name, label in (("dino_step", "DINO step"), ("dino_step_s8", "DINO step ViT-S/8")):
        dino = _load(os.path.join(out, name + ".json")) or bundle.get(name)
        if dino:
            goals += dino_goal_lines(dino, label)
    if goals:
        print("goals of the issues (H100, bf16):")
        print("\n".join(goals))
    if not micro and not models and not goals:
        print(f"no micro/micro.json, models/models.json or dino_step.json under {out}")


if __name__ == "__main__":
    main()
