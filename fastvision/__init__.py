"""fastvision: fused Triton and CUDA kernels for vision models, patched into timm models."""
__version__ = "0.1.0"

from . import modules, ops  # noqa: E402

__all__ = ["modules", "ops", "__version__"]
