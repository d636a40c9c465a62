"""Triton kernels of fastvision, installed as ``fastvision.triton_kernels``.

One kernel family per file, each with its launch helpers beside it. The
launchers take and return torch tensors and do no validation: the ops layer in
``fastvision.ops`` checks inputs and decides whether a kernel runs at all.
"""
from . import attention, dino_loss, gelu, layer_norm, partial_sum, softmax

__all__ = ["attention", "dino_loss", "gelu", "layer_norm", "partial_sum", "softmax"]
