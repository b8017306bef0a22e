"""Builds gainrl_kernels._C from csrc/: the C++ CPU kernels always, the CUDA kernels only when torch has CUDA and
nvcc is found. Install with `pip install --no-build-isolation -e .` (the build needs the installed torch).

Which csrc/ file goes into which build (by file name):
  * csrc/*.cpp without "_cuda" in the name (e.g. angle_stats_cpu.cpp): g++, every build (CppExtension or
    CUDAExtension); must not need CUDA headers.
  * csrc/*_cuda*.cpp (e.g. angle_stats_cuda_binding.cpp): g++, CUDA build only. The torch-facing host code of the
    CUDA ops: argument checks (TORCH_CHECK), allocation, CUDAGuard, stream, C10_CUDA_CHECK, TORCH_LIBRARY_IMPL(...,
    CUDA, ...). Includes c10/cuda headers and cuda_runtime_api.h.
  * csrc/*.cu: nvcc, CUDA build only. Device code plus plain launchers returning cudaError_t, declared in small
    host-only headers (e.g. csrc/angle_stats_launch.h); nothing in a .cu may throw (no TORCH_CHECK, C10_CUDA_CHECK
    or at:: allocation): a c10::Error thrown from nvcc-compiled host code crashed the process on a GPU. This is the
    flash-attention layout; tests/test_csrc_compile.py checks the rule and compiles the bindings with g++.

Environment: GAINRL_NO_EXT=1 skips the extension; GAINRL_CPU_ARCH (default "native") is passed to -march;
TORCH_CUDA_ARCH_LIST picks CUDA archs (default "8.0+PTX;9.0a": PTX for GPUs newer than sm_90).
"""
from __future__ import annotations

import fnmatch
import glob
import os

from setuptools import find_packages, setup


def extensions():
    if os.environ.get("GAINRL_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    march = os.environ.get("GAINRL_CPU_ARCH", "native")
    cxx = ["-O3", "-fopenmp", f"-march={march}"]
    all_cpp = sorted(glob.glob("csrc/*.cpp"))
    cuda_cpp = [f for f in all_cpp if fnmatch.fnmatch(os.path.basename(f), "*_cuda*.cpp")]  # CUDA-only bindings
    sources = [f for f in all_cpp if f not in cuda_cpp]
    cuda_sources = cuda_cpp + sorted(glob.glob("csrc/*.cu"))
    if torch.version.cuda and CUDA_HOME and cuda_sources:
        # sm_80 and sm_90a machine code, plus compute_80 PTX that newer GPUs (e.g. Blackwell) compile at load time
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-Xptxas=-v"]
        ext = CUDAExtension(
            "gainrl_kernels._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("gainrl_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="gainrl",
    version="0.1.0",
    description="Fast angle-concentration kernels and a GRPO harness for GAIN-RL (arXiv 2506.02281)",
    packages=find_packages(include=["gainrl_kernels*", "gainrl*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "train": [
            "transformers>=4.51",
            "datasets",
            "math-verify",
            "safetensors",
            "matplotlib",
            "tqdm",
            "rich",
            "pyyaml",
            "gguf",
            "accelerate",
            "pandas",
            "pyarrow",
        ],
        "trl": ["trl>=1.10,<2"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.2", "peft"],
    },
    entry_points={"console_scripts": ["gainrl=gainrl.cli:cli"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
