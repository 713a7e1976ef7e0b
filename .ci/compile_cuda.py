"""Compiles (never links or runs) every csrc/cuda/*.cu with nvcc against torch's headers for
sm_80 and sm_90, reads each kernel's registers, spills and shared memory from ptxas
(-Xptxas -v), writes bench/results/cuda-resources.md, and fails on a compile error or a
spill: the CUDA side of the ahead-of-time gate (tests/triton_aot.py is the Triton side).

Works with a CPU torch (CI's README venv): CI's real CUDA build and link happen in
.ci/torch_versions.sh against the CUDA torch 2.14.1. Exit status: 1 on a failure.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results", "cuda-resources.md")
# A CPU torch wheel ships c10/cuda headers but not this one, which its CMake
# generates for CUDA builds (with exactly this content).
CMAKE_MACROS = ("c10/cuda/impl/cuda_cmake_macros.h", "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
# A100 and H100/H200: the default arch list's SASS targets (setup.py).
ARCHS = os.environ.get("RLHF_KERNELS_CI_CUDA_ARCHS", "sm_80,sm_90").split(",")
# ptxas -v: "Compiling entry function '_Z...' for 'sm_90'" then
# "Used 40 registers, used 1 barriers, 8 bytes smem, 380 bytes cmem[0]" and
# "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads".
ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _demangle(names):
    tool = shutil.which("c++filt")
    if tool is None:
        return {name: name for name in names}
    result = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, result.stdout.splitlines()))


def _flags(nvcc, includes, shim):
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
    abi = int(getattr(__import__("torch")._C, "_GLIBCXX_USE_CXX11_ABI", True))
    flags = ["-std=c++20", "-O3", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
             "-Xptxas", "-v", f"-I{cuda_include}"]  # fmt: skip
    flags += [f"-gencode=arch=compute_{arch[3:]},code={arch}" for arch in ARCHS]
    return flags + [f"-I{path}" for path in includes] + ([f"-I{shim}"] if shim else [])


def _parse(log):
    """[(kernel, arch, registers, shared bytes, stack, spill stores, spill loads)]."""
    rows, current = [], None
    for line in log.splitlines():
        if match := ENTRY.search(line):
            current = [match.group(1), match.group(2), None, 0, 0, 0, 0]
        elif current and (match := SPILL.search(line)):
            current[4:7] = [int(g) for g in match.groups()]
        elif current and (match := USED.search(line)):
            current[2], current[3] = int(match.group(1)), int(match.group(2) or 0)
            rows.append(tuple(current))
            current = None
    return rows


def main() -> int:
    nvcc = shutil.which("nvcc")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if nvcc is None:
        print("compile_cuda: nvcc not found, skipping the CUDA compile check")
        return 0
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    failed, rows = [], []
    with tempfile.TemporaryDirectory() as out:
        shim = None
        if not any(os.path.exists(os.path.join(path, CMAKE_MACROS[0])) for path in includes):
            shim = os.path.join(out, "include")
            os.makedirs(os.path.join(shim, os.path.dirname(CMAKE_MACROS[0])))
            with open(os.path.join(shim, CMAKE_MACROS[0]), "w") as header:
                header.write(CMAKE_MACROS[1])
        for source in sources:
            name = os.path.relpath(source, ROOT)
            command = [nvcc, "-c", source, "-o", os.path.join(out, "x.o"), *_flags(nvcc, includes, shim)]
            result = subprocess.run(command, capture_output=True, text=True)
            print(f"compile_cuda: {name}: {'ok' if result.returncode == 0 else 'FAILED'}", flush=True)
            if result.returncode != 0:
                print(result.stderr[-4000:])
                failed.append(f"{name}: compile error")
            rows += [(name, *row) for row in _parse(result.stdout + result.stderr)]
    names = _demangle(sorted({row[1] for row in rows}))
    lines = [
        "# CUDA kernels: registers, spills and shared memory per architecture",
        "",
        f"Written by `python .ci/compile_cuda.py` (run by .ci/run): nvcc -Xptxas -v for {', '.join(ARCHS)}, "
        "against torch's headers, no GPU. Spill: bytes of spill stores / loads per thread.",
        "",
        "| source | kernel | arch | registers | shared bytes | stack bytes | spill stores / loads |",
        "|---|---|---|---|---|---|---|",
    ]
    for source, kernel, arch, regs, shared, stack, stores, loads in rows:
        lines.append(f"| {source} | `{names[kernel][:90]}` | {arch} | {regs} | {shared} | {stack} | {stores} / {loads} |")
        if stores or loads:
            failed.append(f"{names[kernel]} {arch}: {stores} bytes of spill stores, {loads} of loads")
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as table:
        table.write("\n".join(lines) + "\n")
    print(f"compile_cuda: {len(sources)} .cu files, {len(rows)} kernel x arch entries; table: "
          f"{os.path.relpath(OUT, ROOT)}")  # fmt: skip
    for problem in failed:
        print(f"compile_cuda: FAIL {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
