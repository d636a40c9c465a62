"""Drop-in nn.Modules backed by the fused ops (subclasses of the torch modules they replace)."""
from ._compiled import COMPILE_OP_NAMES, compile_ops, set_compile_ops
from .attention import Attention
from .conv import ConvBnAct, FoldedBatchNorm2d, FusedConv2d, FusedSequential
from .gelu import GELU
from .layer_norm import LayerNorm
from .patch_embed import PatchConv2d
from .softmax import Softmax

__all__ = ["Attention", "COMPILE_OP_NAMES", "ConvBnAct", "FoldedBatchNorm2d", "FusedConv2d", "FusedSequential", "GELU",
           "LayerNorm", "PatchConv2d", "Softmax", "compile_ops", "set_compile_ops"]
