"""What every benchmark shares: environment record, ceilings, timing, progress, tables, JSON, plots.

On CUDA, times are the median of triton.testing.do_bench (it clears a 256 MB buffer before every
call, so inputs never sit in L2 between calls); where Triton is unusable, CUDA events with the same
L2 flush. In --smoke mode (CPU) they are time.perf_counter medians of a few calls.
"""
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pick_device(smoke: bool) -> torch.device:
    if torch.cuda.is_available() and not smoke:
        return torch.device("cuda")
    if not smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU smoke version")
    return torch.device("cpu")


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is not None and out.returncode == 0:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    return os.environ.get("FASTVISION_COMMIT")


def _version(module_name: str) -> Optional[str]:
    try:
        module = __import__(module_name)
    except Exception:
        return None
    return getattr(module, "__version__", "unknown")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(device: torch.device) -> Dict[str, object]:
    info: Dict[str, object] = {
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "fastvision": _version("fastvision"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git_commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        # launch options (FASTVISION_AUTOTUNE, _TUNING_CACHE, ...) change what is measured
        "fastvision_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FASTVISION_")},
        # host time depends on it: compare host-bound numbers only across runs on the same CPU model
        "host_cpu": _cpu_model(),
        "host_cpus": os.cpu_count(),
        "argv": sys.argv,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "device_name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_cache_mb": round(getattr(props, "L2_cache_size", 0) / 1e6, 1),
            "tuned_choices_on_disk_at_start": stored_tuning_choices(device),
        })
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def device_slug(info: Dict[str, object]) -> str:
    return "".join(c if c.isalnum() else "-" for c in str(info.get("device_name", "unknown"))).strip("-").lower()


# --------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _triton_do_bench():
    try:
        from triton.testing import do_bench
    except Exception:
        return None
    return do_bench


def _do_bench_median(do_bench, fn, warmup, rep) -> float:
    try:
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except TypeError:  # older Triton: no return_mode
        return float(do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])[0])


def _cuda_event_median(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / estimate))):
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _host_clock_median(fn: Callable[[], object], iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(fn: Callable[[], object], device: torch.device, *, warmup: float = 25, rep: float = 100,
          host_iters: int = 3) -> float:
    """Median time of ``fn()`` in milliseconds (warmup and rep in ms of device time, as do_bench takes them)."""
    if device.type != "cuda":
        return _host_clock_median(fn, host_iters)
    do_bench = _triton_do_bench()
    if do_bench is not None and os.environ.get("TRITON_INTERPRET", "0") != "1":
        try:
            return _do_bench_median(do_bench, fn, warmup, rep)
        except Exception as exc:  # fall through to CUDA events
            print(f"[bench] do_bench failed ({type(exc).__name__}: {exc}); using CUDA events", file=sys.stderr)
    return _cuda_event_median(fn, warmup, rep)


def bench_graph(fn: Callable[[], object], rep: float = 20) -> float:
    """Median milliseconds of ``fn()`` replayed from a CUDA graph: device time alone, no host launch cost.

    ``bench`` times what a caller sees, host time included when the host is the slower side;
    this says what the kernels themselves cost (the gap between the two is host overhead).
    """
    from triton.testing import do_bench_cudagraph
    try:
        return float(do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    except TypeError:  # older Triton: no return_mode
        return float(do_bench_cudagraph(fn, rep=rep, quantiles=[0.5])[0])


# --------------------------------------------------------------------------- ceilings

def _copy_ms(nbytes: int, device: torch.device) -> float:
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src), device)


def _matmul_ms(n: int, dtype: torch.dtype, device: torch.device) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return bench(lambda: torch.mm(a, b), device)


def measure_ceilings(device: torch.device, smoke: bool) -> Dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written) and large bf16 matmul rate, on random data."""
    copy_bytes = 4 * 2**20 if smoke else 2 * 2**30
    n = 256 if smoke else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    copy_ms = _copy_ms(copy_bytes, device)
    mm_ms = _matmul_ms(n, dtype, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        "copy_bytes": copy_bytes,
        "matmul_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
        "matmul_n": n,
        "matmul_dtype": str(dtype).replace("torch.", ""),
    }


# --------------------------------------------------------------------------- progress, budget

class Progress:
    """tqdm when it is installed, else one printed line per step."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.count = total, desc, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def step(self, label: str) -> None:
        self.count += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label[:60], refresh=False)
            self._bar.update(1)
        else:
            print(f"[{self.desc} {self.count}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Budget:
    """Wall-clock budget: once spent, remaining cases are recorded as skipped."""

    def __init__(self, max_seconds: Optional[float]):
        self.start = time.perf_counter()
        self.max_seconds = max_seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return self.max_seconds is not None and self.elapsed() > self.max_seconds


# --------------------------------------------------------------------------- output

def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
        return f"{value:.2e}"
    return str(value)


def print_table(rows: Sequence[Dict[str, object]], columns: Sequence[str], title: str = "") -> str:
    cells = [[format_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _json_safe(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return value


def write_json(path: str, payload: Dict[str, object]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_json_safe(payload), f, indent=1)
    os.replace(tmp, path)
    return path


def plot_speedups(panels: Dict[str, Dict[str, List[tuple]]], path: str, xlabel: str = "sequence length",
                  title: str = "") -> Optional[str]:
    """One subplot per panel (op/mode), one line per baseline: speedup of ours (baseline time / ours) vs x.

    ``panels[panel][line] = [(x, speedup), ...]``. Returns the path, or None without matplotlib or data.
    """
    panels = {k: v for k, v in panels.items() if any(v.values())}
    if not panels:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"[plot] matplotlib unavailable ({type(exc).__name__}); no plot written to {path}", file=sys.stderr)
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        for label, points in sorted(lines.items()):
            if not points:
                continue
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("speedup of fastvision (x)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    from fastvision.testing import relative_error as rel
    return rel(out, ref)


def tolerance(dtype: torch.dtype) -> float:
    from fastvision.testing import tolerance as tol
    return tol(dtype)


def configure_dynamo(cache_limit: int = 256) -> None:
    """Every shape gets its own static compile; keep dynamo from falling back to eager after 8."""
    try:
        import torch._dynamo as dynamo
    except Exception:
        return
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(cache_limit, getattr(dynamo.config, name)))


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def iter_names(value: Optional[str], known: Iterable[str]) -> List[str]:
    known = list(known)
    if not value:
        return known
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown names {unknown}; known: {', '.join(known)}")
    return names


def stored_tuning_choices(device: torch.device) -> int:
    """Launch choices already in fastvision's tuning cache file for this GPU: with some, the time to first
    step leaves out their timing (-1 without Triton)."""
    try:
        from fastvision.triton_kernels._launch import stored_choices
    except Exception:
        return -1
    return len(stored_choices(device.index))


def tuned_configurations() -> Dict[str, str]:
    """The launch configurations fastvision timed and picked during this run (empty without Triton)."""
    try:
        from fastvision.triton_kernels._launch import tuned_configurations as picked
    except Exception:  # no Triton: nothing was tuned
        return {}
    return picked()
