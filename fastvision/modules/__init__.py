"""Drop-in nn.Modules backed by the fused ops (subclasses of the torch modules they replace)."""
from .attention import Attention
from .gelu import GELU
from .layer_norm import LayerNorm
from .softmax import Softmax

__all__ = ["Attention", "GELU", "LayerNorm", "Softmax"]
