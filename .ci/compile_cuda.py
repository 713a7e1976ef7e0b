"""Compiles (never links or runs) every csrc/cuda/*.cu with nvcc against torch's headers.

A developer's quick check with a CPU torch (about a minute a file). CI builds and
links the real CUDA extension against the CUDA torch 2.14.1 instead
(.ci/torch_versions.sh), so it no longer runs this. Exit status: nvcc's.
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A CPU torch wheel ships c10/cuda headers but not this one, which its CMake
# generates for CUDA builds (with exactly this content).
CMAKE_MACROS = ("c10/cuda/impl/cuda_cmake_macros.h", "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
# Hopper, the GPU the project measures on; one arch keeps the check fast (~1 min a file).
ARCH = os.environ.get("RLHF_KERNELS_CI_CUDA_ARCH", "sm_90")


def main() -> int:
    nvcc = shutil.which("nvcc")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if nvcc is None:
        print("compile_cuda: nvcc not found, skipping the CUDA compile check")
        return 0
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
    flags = [
        "-std=c++20",
        f"-arch={ARCH}",
        "-O1",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(getattr(__import__('torch')._C, '_GLIBCXX_USE_CXX11_ABI', True))}",
        "--expt-relaxed-constexpr",
        "-Xcompiler",
        "-fPIC",
        f"-I{cuda_include}",
    ] + [f"-I{path}" for path in includes]
    failed = 0
    with tempfile.TemporaryDirectory() as out:
        shim = os.path.join(out, "include")
        if not any(os.path.exists(os.path.join(path, CMAKE_MACROS[0])) for path in includes):
            os.makedirs(os.path.join(shim, os.path.dirname(CMAKE_MACROS[0])))
            with open(os.path.join(shim, CMAKE_MACROS[0]), "w") as header:
                header.write(CMAKE_MACROS[1])
            flags.append(f"-I{shim}")
        for source in sources:
            name = os.path.relpath(source, ROOT)
            result = subprocess.run([nvcc, "-c", source, "-o", os.path.join(out, "x.o"), *flags])
            print(f"compile_cuda: {name}: {'ok' if result.returncode == 0 else 'FAILED'}", flush=True)
            failed += result.returncode != 0
    print(f"compile_cuda: {len(sources) - failed} of {len(sources)} .cu files compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
