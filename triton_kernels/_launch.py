"""Launch heuristics shared by the kernels: block sizes, warps, grid sizes, timed configuration choice."""
import math
import os

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


def timed_choice(key, candidates, launch):
    """The fastest of ``candidates`` for ``key``, each run through ``launch(candidate)`` and timed (median of
    do_bench) on the first call; the winner is cached. Candidates the GPU cannot run (out of shared memory
    or registers) are skipped. Nothing can be timed while a CUDA graph is captured: the first candidate
    then, not cached. Tuning is done here rather than with triton.autotune, whose per-launch bookkeeping
    costs tens of microseconds."""
    best = _TUNED.get(key)
    if best is not None:
        return best
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
    best = _TUNED[key] = candidates[min(times, key=times.get)]
    return best


def tuned_configurations() -> dict:
    """What timed_choice picked so far, as strings (key: choice), for benchmark reports."""
    return {", ".join(map(str, key)): str(choice) for key, choice in _TUNED.items()}


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
