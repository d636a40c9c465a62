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


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("shape, dtype", [((1, 5), torch.float32), ((37, 384), torch.bfloat16),
                                          ((591, 1152), torch.bfloat16), ((1000, 33), torch.float16),
                                          ((785, 65), torch.float64)], ids=str)
def test_column_sum_matches_float64(device, shape, dtype):
    """A Linear's bias gradient: the sum over the rows of a tall tensor, accumulated in float32."""
    x = randn(*shape, dtype=dtype, device=device, std=3.0, mean=0.5)
    out = partial_sum.column_sum(x)
    assert out.shape == shape[-1:] and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(out, x.double().cpu().sum(0), tol_dtype, name="column sum")
    assert torch.equal(out, partial_sum.column_sum(x))


@pytest.mark.parametrize("device", kernel_devices())
def test_column_sum_reads_a_row_strided_slice(device):
    wide = randn(300, 100, device=device)
    assert_close(partial_sum.column_sum(wide[:, 10:74]), wide[:, 10:74].double().cpu().sum(0), torch.float32)
    assert torch.equal(partial_sum.column_sum(torch.empty(0, 7, device=device)), torch.zeros(7, device=device))
