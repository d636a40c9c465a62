"""fastvision: fused Triton and CUDA kernels for vision models, patched into timm models.

    import fastvision
    model = fastvision.patch(model)
"""
__version__ = "0.1.0"


def _load_source_checkout_kernels() -> None:
    """Make ``fastvision.triton_kernels`` importable when fastvision runs from a source checkout.

    setup.py installs the top-level ``triton_kernels/`` folder as ``fastvision.triton_kernels``;
    a checkout used without installing (or beside an install for another interpreter) has
    only the folder, next to this package.
    """
    import importlib.util
    import os
    import sys

    name = f"{__name__}.triton_kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[__name__], "triton_kernels", module)


_load_source_checkout_kernels()

from . import modules, ops  # noqa: E402
from .patching import patch, patch_report, unpatch  # noqa: E402
from .verify import verify  # noqa: E402
from .attention_maps import get_last_selfattention  # noqa: E402

__all__ = ["get_last_selfattention", "modules", "ops", "patch", "patch_report", "unpatch", "verify",
           "__version__"]
