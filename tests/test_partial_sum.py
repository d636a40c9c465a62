"""sum_partials: the second stage of the deterministic row reductions, against a float64 sum."""
import pytest
import torch

from fastvision.testing import assert_close
from conftest import kernel_devices
from helpers import randn

partial_sum = pytest.importorskip("fastvision.triton_kernels.partial_sum")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (130, 384), (2, 65, 33), (2, 1056, 384)], ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_sum_partials_matches_float64(device, shape, dtype):
    partial = randn(*shape, dtype=dtype, device=device, std=3.0)
    out = partial_sum.sum_partials(partial)
    assert out.shape == shape[:-2] + shape[-1:] and out.dtype == dtype
    assert_close(out, partial.double().cpu().sum(-2), dtype, name="sum over the partial rows")
    assert torch.equal(out, partial_sum.sum_partials(partial))  # a fixed order: the same bits again


@pytest.mark.parametrize("device", kernel_devices())
def test_sum_partials_of_no_rows_is_zero(device):
    assert torch.equal(partial_sum.sum_partials(torch.empty(2, 0, 5, device=device)), torch.zeros(2, 5, device=device))
