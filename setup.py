"""Build fastvision: the Python package, its Triton kernels and the C++/CUDA extension fastvision._C.

Environment switches:
  FASTVISION_SKIP_EXTENSION=1  build no extension at all (pure Python; ops that need _C say so)
  FASTVISION_SKIP_CUDA=1       build only the C++ (CPU) part of the extension
  TORCH_CUDA_ARCH_LIST         CUDA architectures, default "8.0;9.0"
  CUDA_HOME                    CUDA toolkit; /usr/local/cuda is used when unset and present
Build against the installed torch: pip install --no-build-isolation -e .
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _prepare_cuda_env() -> None:
    # torch guesses CUDA_HOME from `which nvcc`, which can land on /usr/local and fail to link -lcudart.
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    # With no GPU to query, torch would otherwise compile for every architecture it knows.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)


def _sources(pattern: str):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extensions():
    if _flag("FASTVISION_SKIP_EXTENSION"):
        return [], {}
    _prepare_cuda_env()
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("fastvision: torch is not importable at build time; building without fastvision._C "
              "(install torch first and use --no-build-isolation)")
        return [], {}
    with_cuda = not _flag("FASTVISION_SKIP_CUDA") and cpp_extension.CUDA_HOME is not None
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3"]  # torch adds the C++ standard its headers need
    extra = {"cxx": cxx_flags}
    macros = []
    if with_cuda:
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        macros.append(("FASTVISION_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
    else:
        print("fastvision: building the C++ (CPU) part of fastvision._C only "
              f"(CUDA_HOME={cpp_extension.CUDA_HOME}, FASTVISION_SKIP_CUDA={os.environ.get('FASTVISION_SKIP_CUDA')})")
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="fastvision._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args=extra,
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    name="fastvision",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for vision transformers and CNNs, patched into timm models",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fastvision", "fastvision.*"]) + ["fastvision.triton_kernels"],
    package_dir={"fastvision.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest>=7", "timm>=1.0", "torchvision>=0.19", "numpy>=1.22", "matplotlib>=3.5"],
        "bench": ["timm>=1.0", "torchvision>=0.19", "matplotlib>=3.5", "tqdm>=4.60"],
    },
    zip_safe=False,
)
