"""motus_fast: kernel-optimised, checkpoint-compatible Motus.

`pip install -e .` installs the pure-Python package and the Triton kernels (as `motus_fast.kernels`). The CUDA C++
ops under csrc/ are optional at run time: built here as the extension `motus_fast._cuda_ops` when the build sees a
torch with CUDA and nvcc (`pip install -e . --no-build-isolation` on a GPU machine), skipped otherwise; CMake builds
the same library (see CMakeLists.txt).
"""

import sys

from setuptools import find_packages, setup


def cuda_extension() -> dict:
    """setup() arguments of the optional CUDA C++ extension; empty where torch has no CUDA or nvcc is missing."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("motus_fast: torch not importable at build time: skipping the optional CUDA C++ ops", file=sys.stderr)
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("motus_fast: torch without CUDA or no nvcc: skipping the optional CUDA C++ ops", file=sys.stderr)
        return {}
    gencode = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    ext = CUDAExtension("motus_fast._cuda_ops", ["csrc/ops.cpp", "csrc/adaln.cu", "csrc/euler_step.cu"],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *gencode]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


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
        "backbones": ["transformers>=5.24", "diffusers>=0.42"],   # Qwen3-VL, umT5, Wan VAE (motus-fast init)
        "data": ["pyarrow>=17", "av>=14"],   # LeRobot v3 parquet + mp4 (motus_fast.data); tiny encoders need backbones
        # websocket policy server + client; tests also need openpi-client==0.1.2 installed with --no-deps (its
        # metadata pins numpy<2): see requirements/cpu.txt
        "serve": ["websockets>=13", "msgpack>=1.0"],
        # latent actions from optical flow: DIS flow, DC-AE, mp4 input (motus_fast.latent_action)
        "latent": ["opencv-python-headless>=4.8", "diffusers>=0.42", "av>=14"],
        # Meta-World for the demo and experiments (motus_fast.envs). Pinned exactly: MuJoCo 4.0 changes the
        # simulation, so the demo's and the experiments' success counts are only comparable on these versions.
        "sim": ["mujoco==3.3.0", "metaworld==3.1.1", "gymnasium==1.4.0"],
    },
    entry_points={"console_scripts": ["motus-fast=motus_fast.cli:main"]},
    **cuda_extension(),
)
