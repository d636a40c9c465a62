"""Launch heuristics shared by the kernels: block sizes, warps, grid sizes, timed configuration choice."""
import hashlib
import json
import math
import os
import re
import tempfile
import warnings

import torch
import triton


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1). Plain Python: triton's helper costs microseconds per call."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def warps_for_row(block: int) -> int:
    """Warps for a program that owns one row of ``block`` elements."""
    return min(max(block // 256, 1), 16)


def rows_of(x: torch.Tensor):
    """(rows, row stride) of ``x`` read as rows of its last dimension.

    ``x`` is contiguous (any number of dimensions) or 2-D with unit column stride: the two
    layouts a launcher reads without a copy.
    """
    n = x.shape[-1]
    if x.is_contiguous():
        return (x.numel() // n if n else math.prod(x.shape[:-1])), n
    return x.shape[0], x.stride(0)


def vector_width(itemsize: int, *tensors_and_strides) -> int:
    """Elements per 16-byte access when every pointer and row stride allows it (as Triton sees them:
    16-byte aligned pointers, strides divisible by 16), else 1. None tensors are skipped."""
    for t, stride in tensors_and_strides:
        if t is not None and (t.data_ptr() % 16 or stride % 16):
            return 1
    return max(16 // itemsize, 1)


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was created under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def reduction_programs(rows: int, device: torch.device) -> int:
    """Programs for a row-parallel reduction that writes per-program partial sums.

    Enough programs to fill the GPU a few times over; few on the interpreter,
    where every program is a Python loop.
    """
    if device.type == "cuda":
        return max(1, min(rows, 4 * multiprocessors(device.index)))
    return max(1, min(rows, 4))


def rows_per_reduction_program(rows: int, row_step: int, warps_per_program: int, device: torch.device,
                               warps_per_sm: int = 32) -> int:
    """Rows each program of a row reduction sums into its own partial row, a multiple of row_step.

    Programs for about ``warps_per_sm`` resident warps per SM and no more, since each adds a partial
    row to reduce afterwards; 4 programs on the interpreter.
    """
    target = warps_per_sm * multiprocessors(device.index) // warps_per_program if device.type == "cuda" else 4
    return row_step * cdiv(rows, row_step * max(target, 1))


def tuning_enabled() -> bool:
    """Whether launch configurations are timed on the GPU (``FASTVISION_AUTOTUNE=1``, the default) rather
    than taken from a fixed heuristic. Off under ``torch.use_deterministic_algorithms(True)``: the choice
    can change the order in which a reduction adds its partial sums, so two processes could round apart."""
    return os.environ.get("FASTVISION_AUTOTUNE", "1") != "0" and not torch.are_deterministic_algorithms_enabled()


_TUNED = {}


def cached_choice(key):
    """What timed_choice picked for ``key`` in this process, or None (a dictionary lookup)."""
    return _TUNED.get(key)


def timed_choice(key, candidates, launch, device_index):
    """The fastest of ``candidates`` for ``key``, each run through ``launch(candidate)`` and timed (median of
    do_bench) on the first call; the winner is cached in memory and on disk (``tuning_cache_file``), so a
    later process on the same kind of GPU starts with it. Candidates the GPU cannot run (out of shared
    memory or registers) are skipped. Nothing can be timed while a CUDA graph is captured: the stored
    choice then, else the first candidate, not cached. Tuning is done here rather than with triton.autotune,
    whose per-launch bookkeeping costs tens of microseconds. ``FASTVISION_TUNING_LOG=1`` prints every
    candidate's time."""
    best = _TUNED.get(key)
    if best is not None:
        return best
    path = tuning_cache_file(device_index)
    best = _stored_choice(path, key, candidates)
    if best is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return candidates[0]
        times = {}
        for i, candidate in enumerate(candidates):
            try:
                times[i] = triton.testing.do_bench(lambda: launch(candidate), warmup=5, rep=20, return_mode="median")
            except triton.runtime.errors.OutOfResources:
                continue
        if not times:
            raise RuntimeError(f"no launch configuration of {key[0]} fits this GPU")
        best = candidates[min(times, key=times.get)]
        if os.environ.get("FASTVISION_TUNING_LOG") == "1":
            for i in sorted(times, key=times.get):
                print(f"tuning {key[0]} {key[1:]}: {times[i] * 1e3:8.2f} us  {candidates[i]}", flush=True)
        _store_choice(path, key, best)
    _TUNED[key] = best
    return best


def tuned_configurations() -> dict:
    """What timed_choice picked so far, as strings (key: choice), for benchmark reports."""
    return {", ".join(map(str, key)): str(choice) for key, choice in _TUNED.items()}


def tuning_cache_file(device_index):
    """JSON file of the launch choices timed on this GPU model with these torch and triton versions:
    ``$FASTVISION_TUNING_CACHE`` (a directory; default ``~/.cache/fastvision``, or under ``$XDG_CACHE_HOME``),
    None when that variable is ``0``."""
    root = os.environ.get("FASTVISION_TUNING_CACHE")
    if root == "0":
        return None
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastvision")
    props = torch.cuda.get_device_properties(device_index)
    name = f"tuning-{props.name}-sm{props.major}{props.minor}-torch{torch.__version__}-triton{triton.__version__}"
    return os.path.join(root, re.sub(r"[^A-Za-z0-9_.+-]+", "_", name) + ".json")


def _kernel_sources_digest() -> str:
    """Hash of this package's kernel sources: a cache written by other kernels is not reused."""
    global _SOURCES_DIGEST
    if _SOURCES_DIGEST is None:
        digest = hashlib.sha256()
        folder = os.path.dirname(os.path.abspath(__file__))
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(name.encode() + f.read())
        _SOURCES_DIGEST = digest.hexdigest()[:16]
    return _SOURCES_DIGEST


_SOURCES_DIGEST = None


def _read_choices(path) -> dict:
    """{repr(key): str(choice)} stored at ``path`` for the current kernel sources; {} if absent or unreadable."""
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict) or stored.get("kernel_sources") != _kernel_sources_digest():
        return {}
    choices = stored.get("choices")
    return choices if isinstance(choices, dict) else {}


def stored_choices(device_index) -> dict:
    """The tuning cache file's choices for this GPU ({} when there is none, or caching is off)."""
    path = tuning_cache_file(device_index)
    return _read_choices(path) if path else {}


def _stored_choice(path, key, candidates):
    if path is None:
        return None
    stored = _read_choices(path).get(repr(key))
    return next((c for c in candidates if str(c) == stored), None)  # a candidate list may have changed


def _store_choice(path, key, choice) -> None:
    """Add one choice to the file (read, merge, write a temporary file, rename over it). A directory that
    cannot be written leaves tuning in memory only, with one warning."""
    global _STORE_WARNED
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        choices = {**_read_choices(path), repr(key): str(choice)}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"kernel_sources": _kernel_sources_digest(), "choices": choices}, f, indent=1,
                          sort_keys=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        if not _STORE_WARNED:
            _STORE_WARNED = True
            warnings.warn(f"fastvision: cannot write the tuning cache {path} ({exc}); set FASTVISION_TUNING_CACHE "
                          "to a writable directory, or to 0 to turn it off")


_STORE_WARNED = False


_MULTIPROCESSORS = {}


def multiprocessors(index) -> int:
    """SM count of CUDA device ``index`` (None: the current one), looked up once per device."""
    if index is None:
        index = torch.cuda.current_device()
    count = _MULTIPROCESSORS.get(index)
    if count is None:
        count = _MULTIPROCESSORS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


# Tests switch this on so that every output a kernel should fully write starts as NaN:
# an element the kernel forgets then fails the comparison instead of passing by luck.
_POISON_OUTPUTS = False


def set_poison_outputs(enabled: bool) -> None:
    global _POISON_OUTPUTS
    _POISON_OUTPUTS = bool(enabled)


def new_output(shape, *, dtype, device) -> torch.Tensor:
    """An uninitialised output buffer, filled with NaN when poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and partial sums are float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def pointer(dtype: torch.dtype) -> str:
    """Triton signature string of a pointer to ``dtype``, for ahead-of-time compile checks."""
    return "*" + TORCH_TO_TRITON[dtype]
