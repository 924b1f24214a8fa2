"""motus_fast: kernel-optimised, checkpoint-compatible Motus.

`pip install -e .` installs the pure-Python package and the Triton kernels (as `motus_fast.kernels`). The CUDA C++
ops under csrc/ are built with CMake (see CMakeLists.txt) and are optional at run time.
"""

from setuptools import find_packages, setup

setup(
    name="motus_fast",
    version="0.1.0",
    description="Kernel-optimised, checkpoint-compatible Motus (latent-action world model for robots)",
    python_requires=">=3.10",
    packages=find_packages(include=["motus_fast", "motus_fast.*"]) + ["motus_fast.kernels"],
    package_dir={"motus_fast.kernels": "kernels"},
    # torch is not pinned here: GPU machines bring their CUDA build; CPU machines install requirements/cpu.txt first
    install_requires=["torch>=2.6", "numpy", "safetensors", "tqdm"],
    extras_require={
        "triton": ["triton>=3.3"],
        "test": ["pytest>=8"],
        "gpu": ["flash-attn"],          # optional comparison baseline in bench/; never needed at run time
    },
    entry_points={"console_scripts": ["motus-fast=motus_fast.cli:main"]},
)
