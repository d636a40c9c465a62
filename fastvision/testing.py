"""The one tolerance table, and the comparison every fastvision check uses (tests and verify).

Errors are relative in the 2-norm: ||out - ref|| / ||ref||, computed in float64 against
a float64 reference. NaN and inf must sit where the reference has them.
"""
from typing import Optional

import torch

TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
# float32 matrix products on tensor cores (tf32: 10-bit mantissa) land near 3e-4.
TF32_TOLERANCE = 5e-4


def tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    if dtype == torch.float32 and tf32:
        return TF32_TOLERANCE
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype}") from None


def relative_error(out: torch.Tensor, ref: torch.Tensor, scale: Optional[float] = None) -> float:
    """||out - ref|| / ||ref|| in float64; inf when NaN/inf patterns differ or shapes do.

    ``scale`` replaces ||ref|| where the exact result cancels to (nearly) zero: then the size of
    the cancelling terms is what rounding errors are relative to."""
    if out.shape != ref.shape:
        return float("inf")
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if not torch.equal(torch.isnan(out), torch.isnan(ref)):
        return float("inf")
    ref_inf, out_inf = torch.isinf(ref), torch.isinf(out)
    if not torch.equal(ref_inf, out_inf) or not torch.equal(ref[ref_inf], out[out_inf]):
        return float("inf")
    finite = torch.isfinite(ref)
    diff = torch.linalg.vector_norm(out[finite] - ref[finite]).item()
    if scale is None:
        scale = torch.linalg.vector_norm(ref[finite]).item()
    if scale == 0.0:
        return diff
    return diff / scale


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: Optional[torch.dtype] = None, *,
                 name: str = "output", tol: Optional[float] = None, scale: Optional[float] = None) -> float:
    """Raise AssertionError unless ``out`` is within the tolerance of ``dtype`` (default out.dtype);
    ``scale``: see relative_error."""
    limit = tol if tol is not None else tolerance(dtype or out.dtype)
    err = relative_error(out, ref, scale)
    if not err <= limit:
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds {limit:.1e} "
                             f"(shape {tuple(out.shape)}, dtype {out.dtype})")
    return err
