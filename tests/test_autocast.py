"""Under torch.autocast the fused ops give what the eager ops give (dtype and values)."""
import pytest
import torch
import torch.nn.functional as F

import fastvision
from fastvision.testing import assert_close
from conftest import kernel_devices
from helpers import randn

CASES = {
    "layer_norm": (lambda x, w, b: fastvision.ops.layer_norm(x, (64,), w, b),
                   lambda x, w, b: F.layer_norm(x, (64,), w, b)),
    "softmax": (lambda x, w, b: fastvision.ops.softmax(x, -1), lambda x, w, b: torch.softmax(x, -1)),
    "gelu": (lambda x, w, b: fastvision.ops.gelu(x), lambda x, w, b: F.gelu(x)),
    "bias_gelu": (lambda x, w, b: fastvision.ops.bias_gelu(x, b), lambda x, w, b: F.gelu(x + b)),
    "add_layer_norm": (lambda x, w, b: fastvision.ops.add_layer_norm(x, x.float(), (64,), w, b)[0],
                       lambda x, w, b: F.layer_norm(x + x.float(), (64,), w, b)),
}


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("autocast_dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("input_dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("op", sorted(CASES))
def test_autocast_matches_eager(device, op, input_dtype, autocast_dtype):
    fused, eager = CASES[op]
    x = randn(3, 7, 64, dtype=input_dtype, device=device)
    w, b = randn(64, device=device), randn(64, device=device)
    with torch.autocast(device_type=device, dtype=autocast_dtype):
        out, ref = fused(x, w, b), eager(x, w, b)
    assert out.dtype == ref.dtype, f"{op}: {out.dtype} under autocast, eager gives {ref.dtype}"
    assert_close(out, ref, ref.dtype)
