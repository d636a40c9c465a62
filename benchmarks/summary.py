"""Short summary of a suite's JSON results: `python -m benchmarks.summary OUTDIR [--compare OLD_MICRO_JSON]`.

Per micro op and mode: cases, how many passed the correctness guard, the range and median of
fastvision's speedup over the best baseline and of its fraction of the ceiling. Per model run: img/s and
speedup over eager. Short enough to read in the last lines of a log. ``--compare`` adds, per micro
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
                                                "speedup_vs_eager", "peak_mem_gib", "first_step_s",
                                                "logits_rel_err_vs_eager"])
        for r in models["results"]:
            if r.get("status") == "error":
                print(f"  {r['model']} {r['task']} {r['variant']}: {r['error'][:200]}")
    if not micro and not models:
        print(f"no micro/micro.json or models/models.json under {out}")


if __name__ == "__main__":
    main()
