"""Drop-in nn.Modules backed by the fused ops (subclasses of the torch modules they replace)."""
from .attention import Attention
from .conv import ConvBnAct, FoldedBatchNorm2d, FusedConv2d, FusedSequential
from .gelu import GELU
from .layer_norm import LayerNorm
from .softmax import Softmax

__all__ = ["Attention", "ConvBnAct", "FoldedBatchNorm2d", "FusedConv2d", "FusedSequential", "GELU", "LayerNorm", "Softmax"]
