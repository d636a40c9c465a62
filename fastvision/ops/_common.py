"""What every fused op shares: is a Triton kernel usable here, autocast policy, row views."""
from typing import Optional, Sequence

import torch

try:
    from fastvision import triton_kernels
    from fastvision.triton_kernels._launch import is_interpreted
except Exception as exc:  # no Triton on this platform: every op takes its eager path
    triton_kernels = None
    TRITON_IMPORT_ERROR: Optional[str] = f"{type(exc).__name__}: {exc}"
else:
    TRITON_IMPORT_ERROR = None

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_interpreted() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return triton_kernels is not None and is_interpreted(triton_kernels.layer_norm.layer_norm_fwd_kernel)


def device_decline(x: torch.Tensor) -> Optional[str]:
    """Why no Triton kernel can run on ``x``'s device, or None when one can."""
    if triton_kernels is None:
        return f"Triton is not importable ({TRITON_IMPORT_ERROR})"
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu":
        if triton_interpreted():
            return None
        return "CPU tensor: Triton kernels need CUDA (or TRITON_INTERPRET=1 to run them on CPU)"
    return f"{x.device.type} tensors are not supported by the Triton kernels"


def dtype_decline(x: torch.Tensor, allowed: Sequence[torch.dtype] = FLOATING_DTYPES) -> Optional[str]:
    if x.dtype not in allowed:
        return f"dtype {x.dtype} is not supported (supported: {', '.join(str(d) for d in allowed)})"
    return None


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics, sums and eager reference math run in float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def first_decline(*reasons: Optional[str]) -> Optional[str]:
    return next((r for r in reasons if r is not None), None)


def check_floating(name: str, t: Optional[torch.Tensor]) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    if len({t.device for t in tensors.values() if t is not None}) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in tensors.items() if v is not None)
        raise ValueError(f"tensors must be on one device: {listing}")


def as_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """View ``x`` as (rows, width) with unit column stride, copying only when it must."""
    rows = x.reshape(-1, width) if width else x.reshape(-1, 0)
    if width > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def row_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when a launcher can read it as rows without a copy (contiguous, or 2-D with unit
    column stride), else its rows as in ``as_rows``."""
    if x.is_contiguous() or (x.dim() == 2 and x.stride(1) == 1):
        return x
    return as_rows(x, x.shape[-1])


def autocast_dtype_for(device_type: str, policy: str) -> Optional[torch.dtype]:
    """The dtype eager autocast would run an op in, or None when autocast leaves it alone.

    policy "fp32": the op is on autocast's float32 list on CUDA (layer_norm, softmax);
    policy "lower": the op runs in the autocast dtype (scaled_dot_product_attention).
    """
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    if policy == "fp32":
        return torch.float32 if device_type == "cuda" else None
    if policy == "lower":
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast(dtype: Optional[torch.dtype], *tensors):
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def use_triton(x: torch.Tensor) -> bool:
    return device_decline(x) is None
