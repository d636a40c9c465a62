import pytest
import torch

import fastvision
from fastvision.modules import Softmax
from fastvision.testing import assert_close
from conftest import kernel_devices
from helpers import DTYPES, check_against_float64, randn

ROWS = (1, 7, 197 * 3)
WIDTHS = (1, 37, 197, 384, 1000, 4096, 8192)


def _softmax(x):
    return fastvision.ops.softmax(x, -1)


def _reference(x):
    return torch.softmax(x, -1)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_softmax_matches_float64(device, dtype, rows, width):
    if rows * width > 197 * 3 * 4096:
        rows = 7  # keeps the interpreter run short; wide rows are covered at 7 and 1
    x = randn(rows, width, dtype=dtype, device=device, std=3.0, requires_grad=True)
    check_against_float64(_softmax, _reference, (x,), randn(rows, width, dtype=dtype, device=device),
                          dtype, ("x",))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("width", (16385, 40000))
def test_softmax_wide_rows_streamed(device, width):
    x = randn(3, width, device=device, std=3.0, requires_grad=True)
    check_against_float64(_softmax, _reference, (x,), randn(3, width, device=device), torch.float32, ("x",))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("width", (37, 20000))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_extremes_and_masked_rows(device, width, dtype):
    x = randn(6, width, dtype=torch.float32, device=device)
    x[0, ::3] = 1e4
    x[1, ::5] = -1e4
    x[2, : width // 2] = -float("inf")  # partially masked, the first blocks entirely
    x[3, 1::2] = -float("inf")
    x[4, :] = -float("inf")  # fully masked: torch gives NaN
    x[5, 0] = 3e4
    x = x.to(dtype)
    out = fastvision.ops.softmax(x, -1)
    ref = torch.softmax(x.double().cpu(), -1)
    assert torch.isnan(out[4]).all() and torch.isnan(ref[4]).all()
    assert_close(out[:4], ref[:4], dtype)
    assert_close(out[5:], ref[5:], dtype)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dim", (0, 1, -2))
def test_softmax_other_dims_and_non_contiguous(device, dim):
    x = randn(5, 12, 37, device=device).transpose(0, 2).detach().requires_grad_()  # (37, 12, 5)
    fn = lambda x: fastvision.ops.softmax(x, dim)  # noqa: E731
    ref = lambda x: torch.softmax(x, dim)  # noqa: E731
    check_against_float64(fn, ref, (x,), randn(37, 12, 5, device=device), torch.float32, ("x",))


@pytest.mark.parametrize("device", kernel_devices())
def test_softmax_gradcheck_float64(device):
    x = randn(4, 37, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(_softmax, (x,))


def test_softmax_module_is_drop_in():
    mod, ref = Softmax(dim=-1), torch.nn.Softmax(dim=-1)
    assert isinstance(mod, torch.nn.Softmax) and mod.dim == ref.dim
    assert mod.state_dict().keys() == ref.state_dict().keys()
    x = randn(3, 50)
    assert_close(mod(x), ref(x), torch.float32)
    with pytest.raises(ValueError, match="dim"):
        Softmax(dim=None)


@pytest.mark.parametrize("bad, match", [
    (lambda: fastvision.ops.softmax(torch.arange(6), -1), "input"),
    (lambda: fastvision.ops.softmax(torch.randn(3, 4), 2), "dim"),
    (lambda: fastvision.ops.softmax(torch.randn(3, 4), "x"), "dim"),
    (lambda: fastvision.ops.softmax(torch.tensor(1.0), 0), "input"),
])
def test_softmax_bad_input_names_the_argument(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


@pytest.mark.parametrize("device", kernel_devices())
def test_softmax_reads_row_strided_slices_in_place(device):
    """A (M, N) slice of a wider tensor (row stride > N), M not a multiple of the rows per program."""
    x = randn(37, 250, device=device, std=3.0)[:, 20:217].detach().requires_grad_()
    check_against_float64(lambda x: fastvision.ops.softmax(x, -1), lambda x: torch.softmax(x, -1), (x,),
                          randn(37, 197, device=device), torch.float32, ("x",))
