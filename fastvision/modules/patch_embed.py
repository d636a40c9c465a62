"""A ViT's patch embedding (a convolution whose kernel equals its stride) as one matrix product.

Non-overlapping p x q patches make the convolution a GEMM: (images x patches, C*p*q) times
(C*p*q, out). cuDNN runs this stride-16 NCHW convolution as an implicit-GEMM kernel plus layout
conversions (about 0.8 ms per 224-px ViT-S batch of 128 on an H200, several times the GEMM);
here the patches are gathered by one copy (which also casts to autocast's dtype) and multiplied
by cuBLAS. The output has the convolution's NCHW shape in channels-last memory, so timm's
flatten/transpose (or NHWC view) after it is free.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastvision import ops
from fastvision.modules._compiled import fused
from fastvision.ops import _common as ops_common


_CONV_ATTRIBUTES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                    "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice")


class PatchConv2d(nn.Conv2d):
    """nn.Conv2d with kernel_size == stride (no padding, dilation or groups) computed as one GEMM.

    Same parameters (the very objects, via ``from_module``), attributes and state_dict keys as
    the convolution it replaces; other convolutions and inputs run F.conv2d (``why_not``).
    Like the convolution, rows and columns past the last whole patch are ignored.
    """

    @classmethod
    def from_module(cls, conv: nn.Conv2d) -> "PatchConv2d":
        """A PatchConv2d holding ``conv``'s very Parameter objects (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in _CONV_ATTRIBUTES:
            setattr(new, name, getattr(conv, name))
        new.register_parameter("weight", conv.weight)
        new.register_parameter("bias", conv.bias)
        return new

    def why_not_module(self) -> Optional[str]:
        """Why this convolution is not a patch embedding (None when it is)."""
        if tuple(self.kernel_size) != tuple(self.stride):
            return f"kernel_size {tuple(self.kernel_size)} != stride {tuple(self.stride)}"
        if self.padding not in ("valid", (0, 0)) or tuple(self.dilation) != (1, 1) or self.groups != 1:
            return "padding, dilation or groups"
        return None

    def why_not(self, x: torch.Tensor) -> Optional[str]:
        """Why the GEMM path declines ``x`` (None when it runs)."""
        reason = self.why_not_module()
        if reason is not None:
            return reason
        if x.dim() != 4:
            return f"input has {x.dim()} dimensions, expected 4 (N, C, H, W)"
        if not x.is_floating_point():
            return f"dtype {x.dtype}"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.why_not(x) is not None:
            return super().forward(x)
        n, c, height, width = x.shape
        p, q = self.kernel_size
        h, w = height // p, width // q
        x = x[:, :, :h * p, :w * q]
        dtype = ops_common.autocast_dtype_for(x.device.type, "lower") or x.dtype
        patches = torch.empty((n, h, w, c, p, q), dtype=dtype, device=x.device)
        patches.copy_(x.reshape(n, c, h, p, w, q).permute(0, 2, 4, 1, 3, 5))  # gather and cast in one pass
        project = ops.linear if fused("linear") else F.linear  # ops.linear: the bias gradient by column sums
        out = project(patches.view(n, h, w, c * p * q), self.weight.reshape(self.out_channels, -1), self.bias)
        return out.permute(0, 3, 1, 2)
