"""Build script for fastguide.

Install where torch is already present, without build isolation (an isolated build would pull a
CUDA torch):

    pip install torch==2.13.0            # CPU build on CPU-only machines
    pip install --no-build-isolation -e ".[test]"
"""

import os
import sys

from setuptools import setup


def _extension():
    """(ext_modules, cmdclass) that build fastguide._C, or empty ones where it is skipped.

    C++ always; CUDA as well when the build's torch has CUDA and nvcc is found (CUDA_HOME).
    FASTGUIDE_NO_EXT=1 skips the extension (the package then runs on its pure-torch path);
    FASTGUIDE_CUDA=0 builds the C++ part only.
    """
    if os.environ.get("FASTGUIDE_NO_EXT") == "1":
        print("fastguide: FASTGUIDE_NO_EXT=1 is set, not building the extension fastguide._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fastguide: torch is not installed, so the extension fastguide._C is not built "
              "(install torch first and build with --no-build-isolation to get it)")  # fmt: skip
        return [], {}
    openmp = {"linux": ["-fopenmp"], "win32": ["/openmp"]}.get(sys.platform, [])
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("FASTGUIDE_CUDA", "1") != "0"
    )
    sources = ["csrc/bindings.cpp", "csrc/ops.cpp", "csrc/ops_cpu.cpp"]
    # torch.__version__ as a bare token: bindings.cpp stringifies it, so no shell quoting is involved
    macros = [("FASTGUIDE_TORCH_VERSION", torch.__version__)]
    # -fno-trapping-math lets the compiler if-convert the clamp so that the element loops vectorise;
    # it changes no result (only whether FP exception flags could be raised)
    args = {"cxx": ["-O3", "-std=c++17", "-fno-trapping-math", *openmp]}
    kind = cpp_extension.CppExtension
    if with_cuda:
        sources += ["csrc/ops_cuda.cpp", "csrc/ops_cuda.cu"]
        macros.append(("FASTGUIDE_WITH_CUDA", None))
        args["nvcc"] = ["-O3", "-std=c++17"]
        kind = cpp_extension.CUDAExtension
    parts = "C++ and CUDA" if with_cuda else "C++ only"
    print(f"fastguide: building fastguide._C ({parts}) for torch {torch.__version__}")
    ext = kind("fastguide._C", sources, define_macros=macros, extra_compile_args=args, extra_link_args=openmp)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extension()

setup(
    name="fastguide",
    version="0.1.0",
    description="Classifier-guided diffusion sampling with entropy-driven guidance (EDS) and ECT training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastguide", "fastguide.adm", "fastguide.adm.networks", "fastguide.kernels", "fastguide.solvers",
              "fastguide.train", "fastguide.cli"],
    package_dir={"fastguide": "fastguide", "fastguide.kernels": "kernels"},
    package_data={"fastguide": ["weights/*/*"]},  # the small models shipped with fastguide
    install_requires=["torch>=2.1", "numpy", "safetensors", "tqdm", "pillow", "mlxtend", "scipy", "matplotlib"],
    entry_points={"console_scripts": ["fastguide=fastguide.cli:main"]},
    extras_require={
        # guided-diffusion-sdk: openai/guided-diffusion (ADM) itself, the peer the parity tests run beside fastguide;
        # diffusers: the DPM-Solver++(2M/3M) and UniPC schedulers that fastguide.solvers is checked against
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "triton; platform_system == \"Linux\"",
                 "guided-diffusion-sdk", "diffusers"],
    },
    license="MIT",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
