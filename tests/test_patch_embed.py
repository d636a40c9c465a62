"""PatchConv2d: a ViT's patchify convolution as one GEMM, against the float64 convolution."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastvision
from fastvision.modules import PatchConv2d
from fastvision.testing import assert_close
from helpers import float64_copies, randn

timm = pytest.importorskip("timm")


def devices():
    found = [pytest.param("cpu", id="cpu")]
    if torch.cuda.is_available():
        found.append(pytest.param("cuda", id="cuda", marks=pytest.mark.gpu))
    return found


def _conv(in_ch, out_ch, patch, device, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Conv2d(in_ch, out_ch, patch, stride=patch).to(device, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("patch, size", [((16, 16), (96, 96)), ((16, 16), (224, 224)), ((14, 14), (37, 45)),
                                         ((8, 4), (24, 20))])
def test_patch_conv_matches_float64_convolution(device, dtype, patch, size):
    """Output and gradients of input, weight and bias; sizes that are not whole patches drop the rest."""
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("CPU half-precision matmul is slow and not what runs")
    conv = _conv(3, 48, patch, device, dtype)
    fused = PatchConv2d.from_module(conv)
    assert fused.weight is conv.weight and fused.bias is conv.bias
    assert list(fused.state_dict()) == list(conv.state_dict())
    x = randn(3, 3, *size, dtype=dtype, device=device, requires_grad=True)
    assert fused.why_not(x) is None
    out = fused(x)
    dy = randn(*out.shape, dtype=dtype, device=device)
    out.backward(dy)
    xr, wr, br = float64_copies(x, conv.weight, conv.bias)
    ref = F.conv2d(xr, wr, br, stride=patch)
    ref.backward(dy.double().cpu())
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype, name="output")
    for name, t, r in (("input", x, xr), ("weight", conv.weight, wr), ("bias", conv.bias, br)):
        assert_close(t.grad, r.grad, dtype, name=f"grad of {name}")


@pytest.mark.parametrize("device", devices())
def test_patch_conv_under_autocast_matches_the_autocast_convolution(device):
    dtype = torch.bfloat16
    conv = _conv(3, 64, (16, 16), device)
    fused = PatchConv2d.from_module(conv)
    x = randn(2, 3, 64, 48, device=device)
    with torch.autocast(device, dtype=dtype):
        out = fused(x)
        ref = conv(x)
    assert out.dtype == ref.dtype == dtype
    xr, wr, br = float64_copies(x, conv.weight, conv.bias)
    assert_close(out, F.conv2d(xr, wr, br, stride=16), dtype, name="autocast output")


def test_other_convolutions_decline_and_run_conv2d():
    for conv, reason in ((torch.nn.Conv2d(3, 8, 3, stride=1, padding=1), "kernel_size"),
                         (torch.nn.Conv2d(4, 8, 2, stride=2, groups=2), "groups"),
                         (torch.nn.Conv2d(3, 8, 2, stride=2, padding=1), "padding")):
        fused = PatchConv2d.from_module(conv)
        assert reason in fused.why_not_module()
        x = randn(1, conv.in_channels, 9, 9)
        assert torch.equal(fused(x), conv(x))
    fused = PatchConv2d.from_module(torch.nn.Conv2d(3, 8, 2, stride=2))
    assert "dimensions" in fused.why_not(randn(3, 8, 8))


@pytest.mark.parametrize("dynamic", (False, True), ids=("fixed-size", "dynamic_img_size"))
def test_patch_replaces_the_vit_patch_embedding(dynamic):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=64,
                              dynamic_img_size=dynamic).eval()
    patched = fastvision.patch(copy.deepcopy(model))
    proj = patched.patch_embed.proj
    assert isinstance(proj, PatchConv2d) and proj.weight is patched.patch_embed.proj.weight
    assert "vit.patch_embed" in fastvision.patch_report(patched).counts()
    assert list(patched.state_dict()) == list(model.state_dict())
    sizes = ((64, 64), (32, 48)) if dynamic else ((64, 64),)
    for size in sizes:
        x = randn(2, 3, *size)
        with torch.no_grad():
            assert_close(patched(x), model(x), torch.float32, name=f"logits at {size}")
    unpatched = fastvision.unpatch(patched)
    assert type(unpatched.patch_embed.proj) is torch.nn.Conv2d
    assert fastvision.patch(copy.deepcopy(model), patch_embed=False).patch_embed.proj.__class__ is torch.nn.Conv2d
