"""Launch heuristics shared by the kernels: block sizes, warps, grid sizes."""
import torch
import triton


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def warps_for_row(block: int) -> int:
    """Warps for a program that owns one row of ``block`` elements."""
    return min(max(block // 256, 1), 16)


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was created under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def reduction_programs(rows: int, device: torch.device) -> int:
    """Programs for a row-parallel reduction that writes per-program partial sums.

    Enough programs to fill the GPU a few times over; few on the interpreter,
    where every program is a Python loop.
    """
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))


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
