"""Fused ops: torch.library custom ops with autograd, fake (meta) kernels and eager fallbacks.

Each public function is a drop-in for its torch.nn.functional counterpart. It runs
the Triton kernel where the inputs are supported and the eager op otherwise; the
``*_decline`` functions say why a kernel would not run (None when it would).
"""
from .attention import Segments, attention, attention_decline, attention_qkvpacked, attention_varlen, varlen_decline
from ._common import device_decline, triton_interpreted
from .batchnorm import fold_batchnorm
from .conv import conv_bn_act, conv_bn_act_decline
from .dino_loss import dino_loss, dino_loss_decline
from .gelu import APPROXIMATIONS as GELU_APPROXIMATIONS
from .gelu import bias_gelu, bias_gelu_linear, gelu, gelu_decline
from .layer_norm import add_layer_norm, layer_norm, layer_norm_decline, residual_sum
from .linear import bias_grad, linear, linear_decline
from .softmax import softmax, softmax_decline

__all__ = [
    "Segments", "attention", "attention_decline", "attention_qkvpacked", "attention_varlen", "varlen_decline",
    "GELU_APPROXIMATIONS", "add_layer_norm", "bias_gelu", "bias_grad", "bias_gelu_linear", "conv_bn_act",
    "conv_bn_act_decline", "device_decline",
    "dino_loss", "dino_loss_decline",
    "fold_batchnorm", "gelu", "gelu_decline", "layer_norm",
    "layer_norm_decline", "linear", "linear_decline", "residual_sum", "softmax", "softmax_decline",
    "triton_interpreted",
]
