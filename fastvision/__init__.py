"""fastvision: fused Triton and CUDA kernels for vision models, patched into timm models.

    import fastvision
    model = fastvision.patch(model)
"""
__version__ = "0.1.0"

from . import modules, ops  # noqa: E402
from .patching import patch, patch_report, unpatch  # noqa: E402
from .verify import verify  # noqa: E402
from .attention_maps import get_last_selfattention  # noqa: E402

__all__ = ["get_last_selfattention", "modules", "ops", "patch", "patch_report", "unpatch", "verify",
           "__version__"]
