"""Builds rlhf_kernels._C: C++ CPU kernels always, CUDA kernels when possible.

Environment:
  RLHF_KERNELS_CPP=0        pure-Python install (every op runs on the reference backend)
  RLHF_KERNELS_CUDA=auto    build csrc/cuda/*.cu when torch has CUDA and nvcc is found
                  =1        require the CUDA build (error if it is impossible)
                  =0        never build CUDA sources
  TORCH_CUDA_ARCH_LIST      architectures; default 8.0;9.0 when no GPU is visible
  MAX_JOBS                  parallel compile jobs (read by torch's ninja build)
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# A100 and H100/H200: the GPUs RLHF runs on; used only when no GPU is visible to ask.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda(torch, cuda_home):
    mode = os.environ.get("RLHF_KERNELS_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"RLHF_KERNELS_CUDA must be auto, 0 or 1, got {mode!r}")
    possible = torch.version.cuda is not None and cuda_home is not None
    if mode == "1" and not possible:
        raise RuntimeError(
            "RLHF_KERNELS_CUDA=1 but the CUDA build is impossible: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cuda_home!r}"
        )
    return mode != "0" and possible


def _extensions():
    if os.environ.get("RLHF_KERNELS_CPP", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = _sources("csrc/registration.cpp") + _sources("csrc/cpu/*.cpp")
    # No -std flag: torch.utils.cpp_extension passes the standard its headers need.
    # -fopenmp: at::parallel_for is header code that is serial without it.
    # -fno-trapping-math: lets GCC turn the float clamps of csrc/cpu/vector_math.h
    # into blends and vectorise the row loops (no result changes; nothing here
    # reads floating-point exception flags). 2x on token_logprobs' forward.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if _want_cuda(torch, CUDA_HOME):
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        extension = CUDAExtension(
            "rlhf_kernels._C",
            sources + _sources("csrc/cuda/*.cu"),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = CppExtension(
            "rlhf_kernels._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
        )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["rlhf_kernels", "rlhf_kernels.*"]) + ["rlhf_trainer"],
    package_dir={"rlhf_trainer": "python/rlhf_trainer"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
