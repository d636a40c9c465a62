"""Test harness: kernels run in Triton's CPU interpreter unless a GPU is present.

TRITON_INTERPRET is read when @triton.jit runs, so it is set here, before any
fastvision module is imported. On a GPU machine run with TRITON_INTERPRET=0 (or
unset) to test the compiled kernels: `pytest -m gpu`.
"""
import os
import sys
import zlib

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# One heuristic configuration per kernel instead of autotuning every shape (compile time);
# tests/test_attention.py runs every autotune configuration on its own.
os.environ.setdefault("FASTVISION_AUTOTUNE", "0")
# Tuning, where a test turns it on, stays in memory: nothing written to ~/.cache.
os.environ.setdefault("FASTVISION_TUNING_CACHE", "0")


def _fix_interpreter_bf16() -> None:
    """Make Triton's CPU interpreter compute with bfloat16 values instead of their bit patterns.

    The interpreter stores bf16 as numpy uint16 (numpy has no bf16), so tl.dot, +, *,
    max, exp... on bf16 operands act on the raw bits (seen with triton 3.8). Here bf16
    operands are widened to float32 (exact) and results rounded back to bf16 (nearest
    even), which is what the GPU does. The kernels themselves are untouched.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_fastvision_bf16_fix", False):
        return
    handle_cls = interpreter.TensorHandle

    def is_bf16(h):
        return h.dtype == tl.bfloat16

    def widen(h):
        return (h.data.astype(np.uint32) << 16).view(np.float32) if is_bf16(h) else h.data

    def to_bf16_bits(values):
        values = np.asarray(values, dtype=np.float32)
        bits = values.view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)

    def result(values, like):
        if values.dtype == np.bool_:
            return handle_cls(values, like.dtype.scalar)
        return handle_cls(to_bf16_bits(values), tl.bfloat16)

    original_binary, original_unary = builder.binary_op, builder.unary_op
    original_fma, original_dot = builder.create_fma, builder.create_dot

    def binary_op(self, lhs, rhs, op):
        if not (is_bf16(lhs) or is_bf16(rhs)):
            return original_binary(self, lhs, rhs, op)
        return result(op(widen(lhs), widen(rhs)), lhs)

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            return original_unary(self, arg, op)
        return result(op(widen(arg)), arg)

    def create_fma(self, x, y, z):
        if not any(is_bf16(h) for h in (x, y, z)):
            return original_fma(self, x, y, z)
        return result(widen(x) * widen(y) + widen(z), z)

    def as_float32(h):
        return handle_cls(widen(h), tl.float32) if is_bf16(h) else h

    def create_dot(self, a, b, d, *args, **kwargs):
        return original_dot(self, as_float32(a), as_float32(b), d, *args, **kwargs)

    builder.binary_op, builder.unary_op = binary_op, unary_op
    builder.create_fma, builder.create_dot = create_fma, create_dot
    builder._fastvision_bf16_fix = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_bf16()

from fastvision import ops  # noqa: E402  (after TRITON_INTERPRET is settled)
from fastvision.triton_kernels import _launch  # noqa: E402

_launch.set_poison_outputs(True)


def kernel_devices():
    """Devices on which the Triton kernels (not the eager fallback) run in this session."""
    devices = []
    if ops.triton_interpreted():
        devices.append(pytest.param("cpu", id="cpu"))
    if torch.cuda.is_available():
        devices.append(pytest.param("cuda", id="cuda", marks=pytest.mark.gpu))
    return devices


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Fresh random inputs per test, reproducible from the test id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def pytest_runtest_logreport(report):
    """With FASTVISION_REPORT_FAILURES=1 (the GPU suite sets it) each failure's traceback is printed as it
    happens: a run stopped by its time limit never reaches pytest's summary of failures."""
    if report.failed and os.environ.get("FASTVISION_REPORT_FAILURES") == "1":
        sys.stderr.write(f"\n== FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
