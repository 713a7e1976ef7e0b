"""Builds rlhf_kernels._C: C++ CPU kernels always, CUDA kernels when possible.

Environment:
  RLHF_KERNELS_CPP=0        pure-Python install (every op runs on the reference backend)
  RLHF_KERNELS_CUDA=auto    build csrc/cuda/*.cu when torch is a CUDA build; any CUDA
                            problem (no toolkit, CUDA major of nvcc != torch's, compile
                            or link error) prints one warning and installs the CPU build
                  =1        require the CUDA build (the same problems are errors)
                  =0        never build CUDA sources
  CUDA_HOME / CUDA_PATH     the CUDA toolkit; when unset it is found from nvcc on PATH
                            (through symlinks and wrapper scripts) or /usr/local/cuda
  TORCH_CUDA_ARCH_LIST      architectures; default 8.0;9.0+PTX when no GPU is visible
  MAX_JOBS                  parallel compile jobs (read by torch's ninja build)

Which build was installed, and why, is written to rlhf_kernels/_build_info.py
(generated, not in git) and printed by `rlhf-kernels info`.
"""

import glob
import logging
import os
import pprint
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# A100 and H100/H200 (the GPUs RLHF runs on) as SASS, plus sm_90's PTX so that newer
# GPUs (Blackwell sm_100 / sm_120) JIT-compile the kernels at first use. Used only
# when no GPU is visible to ask.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
# Where a toolkit usually is, after what nvcc on PATH says.
DEFAULT_TOOLKITS = (("/usr/local/cuda", "the default location"), ("/usr/local/cuda-{version}", "torch's CUDA version"))
BUILD_INFO = os.path.join("rlhf_kernels", "_build_info.py")
EXTENSION = "rlhf_kernels._C"
SWITCHES = {
    "auto": "RLHF_KERNELS_CUDA=0 builds the CPU kernels on purpose; RLHF_KERNELS_CUDA=1 makes this an error",
    "1": "RLHF_KERNELS_CUDA=auto (the default) installs the CPU build instead, RLHF_KERNELS_CUDA=0 too",
}


class CudaProblem(Exception):
    """Why the CUDA kernels cannot be built, and what would fix it."""

    def __init__(self, cause: str, fix: str):
        super().__init__(cause)
        self.cause, self.fix = cause, fix


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_mode() -> str:
    mode = os.environ.get("RLHF_KERNELS_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"RLHF_KERNELS_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _output(command) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout + result.stderr


def _toolkit_gap(home: str):
    """What `home` lacks to be a CUDA toolkit torch can build and link with; None if nothing."""
    need = {
        "bin/nvcc": [os.path.join(home, "bin", "nvcc")],
        "include/cuda_runtime.h": [os.path.join(home, "include", "cuda_runtime.h")],
        # torch links with -L<home>/lib64 (or lib) -lcudart
        "lib64/libcudart.so": [os.path.join(home, d, "libcudart.so") for d in ("lib64", "lib")],
    }
    missing = [name for name, paths in need.items() if not any(os.path.exists(p) for p in paths)]
    return ", ".join(missing) or None


def _nvcc_top(nvcc: str):
    """The toolkit folder the real nvcc runs from. nvcc on PATH may be a symlink or a
    wrapper script (exec /opt/cuda-X/bin/nvcc "$@"): a dry run makes the real one say."""
    listing = _output([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull])
    match = re.search(r"^#\$ TOP=(.+?)\s*$", listing, re.MULTILINE)
    return os.path.realpath(match.group(1)) if match else None


def find_cuda_toolkit(torch_cuda: str):
    """(toolkit folder, how it was found), or raises CudaProblem."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            gap = _toolkit_gap(home)
            if gap:
                raise CudaProblem(
                    f"{var}={home} is not a CUDA toolkit (no {gap})",
                    f"point {var} at the toolkit folder (the one with bin/nvcc, include/cuda_runtime.h and "
                    "lib64/libcudart.so), or unset it to let setup.py find the toolkit",
                )
            return home, f"${var}"
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates += [
            (_nvcc_top(nvcc), f"where {nvcc} runs nvcc from"),
            (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"{nvcc} resolved through symlinks"),
            (os.path.dirname(os.path.dirname(nvcc)), f"next to {nvcc}"),
        ]
    candidates += [(path.format(version=torch_cuda), how) for path, how in DEFAULT_TOOLKITS]
    looked = []
    for home, how in candidates:
        if home is None or home in looked:
            continue
        looked.append(home)
        if os.path.isdir(home) and _toolkit_gap(home) is None:
            return home, how
    if nvcc is None and not any(os.path.isdir(home) for home in looked):
        raise CudaProblem(
            "no CUDA toolkit found (no nvcc on PATH, no /usr/local/cuda)",
            f"install the CUDA {torch_cuda.split('.')[0]}.x toolkit and set CUDA_HOME to it",
        )
    raise CudaProblem(
        "no complete CUDA toolkit (bin/nvcc, include/cuda_runtime.h, lib64/libcudart.so) found; looked at "
        + ", ".join(looked),
        "set CUDA_HOME to the toolkit folder (e.g. CUDA_HOME=/usr/local/cuda-X.Y)",
    )


def nvcc_release(home: str):
    match = re.search(r"release (\d+)\.(\d+)", _output([os.path.join(home, "bin", "nvcc"), "--version"]))
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _visible_arch_list(torch) -> str:
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in capabilities) + "+PTX"


def plan_cuda(torch) -> dict:
    """Decides whether to build the CUDA kernels; the build info with the reason.

    RLHF_KERNELS_CUDA=1 turns every problem into SystemExit; auto warns and plans the CPU build."""
    mode = _cuda_mode()
    info = {"kernels": "cpu", "mode": mode, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if mode == "0":
        return {**info, "reason": "RLHF_KERNELS_CUDA=0", "fix": ""}
    try:
        if torch.version.cuda is None:
            raise CudaProblem(
                f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)",
                "install a CUDA build of torch (e.g. pip install torch from PyPI) before this package",
            )
        home, how = find_cuda_toolkit(torch.version.cuda)
        release = nvcc_release(home)
        if release is None:
            raise CudaProblem(f"`{home}/bin/nvcc --version` gives no CUDA release", "set CUDA_HOME to a working toolkit")
        info.update(cuda_home=home, cuda_home_found_by=how, nvcc=release)
        if release.split(".")[0] != torch.version.cuda.split(".")[0]:
            raise CudaProblem(
                f"nvcc in {home} is CUDA {release} but torch {torch.__version__} is built with CUDA "
                f"{torch.version.cuda} (the major versions must match)",
                f"set CUDA_HOME to a CUDA {torch.version.cuda.split('.')[0]}.x toolkit, or install the torch "
                f"built for CUDA {release.split('.')[0]}",
            )
    except CudaProblem as problem:
        if mode == "1" or torch.version.cuda is not None:
            _problem(problem, mode)  # exits when mode is 1
        return {**info, "reason": problem.cause, "fix": problem.fix if torch.version.cuda is not None else ""}
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    elif torch.cuda.is_available():
        arch_list = _visible_arch_list(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    else:
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    return {**info, "kernels": "cuda", "arch_list": arch_list, "reason": f"CUDA toolkit {home} ({how})", "fix": ""}


def _error_summary(error: Exception) -> str:
    """A build error in a line: the failed command's program, not its hundred arguments."""
    text = " ".join(str(error).split())
    command = re.match(r"Command '\[\'?([^', \]]+).*?\]' (.*)", text)
    if command:
        text = f"{os.path.basename(command.group(1))} {command.group(2)}"
    return f"{type(error).__name__}: {text[:200]}"


def _problem(problem: CudaProblem, mode: str):
    """Stops the build (RLHF_KERNELS_CUDA=1) or prints the one warning of a fallback."""
    lines = [f"cause: {problem.cause}", f"fix:   {problem.fix}; {SWITCHES[mode]}"]
    if mode == "1":
        raise SystemExit("rlhf-kernels: RLHF_KERNELS_CUDA=1 but the CUDA kernels cannot be built\n  " + "\n  ".join(lines))
    bar = "=" * 78
    print(
        f"\n{bar}\nWARNING rlhf-kernels: installing WITHOUT the CUDA kernels (the CPU build)\n  "
        + "\n  ".join(lines)
        + f"\n  `rlhf-kernels info` shows which build is installed and why.\n{bar}\n",
        file=sys.stderr,
        flush=True,
    )


def write_build_info(info: dict, folders):
    text = (
        '"""Which rlhf_kernels._C build was installed, and why. Written by setup.py; not in git."""\n\n'
        f"BUILD = {pprint.pformat(info, sort_dicts=False)}\n"
    )
    for folder in folders:
        if os.path.isdir(folder):
            with open(os.path.join(folder, os.path.basename(BUILD_INFO)), "w") as file:
                file.write(text)


def _build_ext_class(BuildExtension, cpu_extension, info):
    class BuildExt(BuildExtension):
        """torch's BuildExtension that, in auto mode, falls back to the CPU extension when the
        CUDA one fails to build (torch's pre-build checks, a compile error, a link error)."""

        def build_extensions(self):
            self._rlhf_building = False
            try:
                super().build_extensions()
            except Exception as error:  # raised by torch's checks before anything was compiled
                if self._rlhf_building or not self._can_fall_back():
                    raise
                self._fall_back(self.extensions, error)
                super().build_extensions()

        def build_extension(self, ext):
            self._rlhf_building = True
            if ext.name != EXTENSION or not self._can_fall_back():
                return super().build_extension(ext)
            try:
                super().build_extension(ext)
            except Exception as error:  # CompileError, LinkError, ninja's RuntimeError
                self._fall_back([ext], error)
                super().build_extension(ext)

        def _can_fall_back(self):
            return info["kernels"] == "cuda" and info["mode"] == "auto"

        def _fall_back(self, extensions, error):
            stage = "linking" if type(error).__name__ == "LinkError" else "compiling"
            detail = _error_summary(error)
            problem = CudaProblem(
                f"{stage} the CUDA kernels failed with nvcc {info.get('nvcc')} from {info.get('cuda_home')} "
                f"({detail})",
                "reinstall with pip -v to see the compiler's error; CUDA_HOME=<toolkit> selects another "
                "toolkit",
            )
            _problem(problem, info["mode"])
            info.update(kernels="cpu", reason=problem.cause, fix=problem.fix)
            for ext in extensions:
                if ext.name == EXTENSION:
                    # include dirs and compile flags stay, so ninja reuses the C++ objects
                    ext.sources = list(cpu_extension.sources)
                    ext.libraries = list(cpu_extension.libraries)
                    ext.library_dirs = list(cpu_extension.library_dirs)

        def run(self):
            super().run()
            folders = [os.path.join(self.build_lib, "rlhf_kernels")]
            if self.inplace or getattr(self, "editable_mode", False):
                folders.append(os.path.join(ROOT, "rlhf_kernels"))
            write_build_info(info, folders)

    return BuildExt


def _extensions():
    if os.environ.get("RLHF_KERNELS_CPP", "1") == "0":
        write_build_info(
            {"kernels": "none", "reason": "RLHF_KERNELS_CPP=0 (pure-Python install)", "fix": ""},
            [os.path.join(ROOT, "rlhf_kernels")],
        )
        return [], {}
    import torch

    info = plan_cuda(torch)
    if info["kernels"] == "cuda":
        # Before torch.utils.cpp_extension reads it (and in case it already has): torch's
        # own guess is the folder above nvcc on PATH, wrong for a wrapper or a symlink.
        os.environ["CUDA_HOME"] = info["cuda_home"]
    # torch logs its own CUDA_HOME guess on import ("No CUDA runtime is found, using
    # CUDA_HOME='/usr/local'"): misleading next to the decision above.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    finally:
        logger.setLevel(level)

    if info["kernels"] == "cuda":
        cpp_extension.CUDA_HOME = info["cuda_home"]

    sources = _sources("csrc/registration.cpp") + _sources("csrc/cpu/*.cpp")
    # No -std flag: torch.utils.cpp_extension passes the standard its headers need.
    # -fopenmp: at::parallel_for is header code that is serial without it.
    # -fno-trapping-math: lets GCC turn the float clamps of csrc/cpu/vector_math.h
    # into blends and vectorise the row loops (no result changes; nothing here
    # reads floating-point exception flags). 2x on token_logprobs' forward.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    cpu_extension = CppExtension(
        EXTENSION, sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
    )
    extension = cpu_extension
    if info["kernels"] == "cuda":
        extension = CUDAExtension(
            EXTENSION,
            sources + _sources("csrc/cuda/*.cu"),
            extra_compile_args={"cxx": list(cxx_flags), "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    return [extension], {"build_ext": _build_ext_class(BuildExtension, cpu_extension, info)}


def _check_setuptools():
    import setuptools

    major = int(re.match(r"\d+", setuptools.__version__).group())
    if major < 77:  # pip --no-build-isolation does not install build-system.requires
        raise SystemExit(
            f"rlhf-kernels: setuptools {setuptools.__version__} cannot read pyproject.toml's license "
            "string (PEP 639); pip install 'setuptools>=77' first (torch < 2.13 does not bring it)"
        )


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import it
    _check_setuptools()
    ext_modules, cmdclass = _extensions()
    setup(
        packages=find_packages(include=["rlhf_kernels", "rlhf_kernels.*"]) + ["rlhf_trainer"],
        package_dir={"rlhf_trainer": "python/rlhf_trainer"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
