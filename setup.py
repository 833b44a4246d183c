"""Build script for fastguide.

Install where torch is already present, without build isolation (an isolated build would pull a
CUDA torch):

    pip install torch==2.13.0            # CPU build on CPU-only machines
    pip install --no-build-isolation -e ".[test]"
"""

from setuptools import setup

setup(
    name="fastguide",
    version="0.1.0",
    description="Classifier-guided diffusion sampling with entropy-driven guidance (EDS) and ECT training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastguide", "fastguide.adm", "fastguide.kernels", "fastguide.train"],
    package_dir={"fastguide": "fastguide", "fastguide.kernels": "kernels"},
    install_requires=["torch>=2.1", "numpy", "safetensors", "tqdm", "pillow", "mlxtend"],
    entry_points={"console_scripts": ["fastguide=fastguide.cli:main"]},
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    license="MIT",
)
