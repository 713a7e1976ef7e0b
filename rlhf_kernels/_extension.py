"""Loads the compiled extension rlhf_kernels._C, once, without ever failing the import.

Importing _C runs its TORCH_LIBRARY registrations (torch.ops.rlhf_kernels.*).
When it is missing (a RLHF_KERNELS_CPP=0 install, or a broken build) every op
falls back to the reference backend and one warning says so.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch

LIBRARY = "rlhf_kernels"


def _load() -> tuple[bool, str]:
    try:
        importlib.import_module("rlhf_kernels._C")
    except ImportError as error:  # the only failure a missing or stale .so produces
        warnings.warn(
            f"rlhf_kernels: compiled extension rlhf_kernels._C is unavailable ({error}); "
            "every op runs on the reference backend. Reinstall with "
            "`pip install --no-build-isolation -e .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False, str(error)
    return True, ""


LOADED, LOAD_ERROR = _load()


def _build_info() -> Optional[dict]:
    """What setup.py built and why (rlhf_kernels/_build_info.py, written at install)."""
    try:
        module = importlib.import_module("rlhf_kernels._build_info")
    except ImportError:
        return None
    return dict(getattr(module, "BUILD", {}))


BUILD_INFO = _build_info()


def build_summary() -> str:
    """One line for `rlhf-kernels info`: which build was installed, and why."""
    info = BUILD_INFO
    if not info:
        return "unknown (no rlhf_kernels/_build_info.py: installed by an older setup.py, or not installed)"
    kernels = info.get("kernels")
    if kernels == "cuda":
        line = (
            f"C++ CPU + CUDA kernels (nvcc {info.get('nvcc')} in {info.get('cuda_home')}, "
            f"archs {info.get('arch_list')})"
        )
    elif kernels == "cpu":
        line = f"C++ CPU kernels only, no CUDA kernels: {info.get('reason')}"
        if info.get("fix"):
            line += f". Fix: {info['fix']}, then reinstall"
    else:
        line = f"no compiled kernels: {info.get('reason')}"
    built_with = info.get("torch")
    if built_with and built_with != torch.__version__:
        line += f". Built against torch {built_with}, running {torch.__version__}: reinstall to rebuild"
    return line


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.rlhf_kernels.<op> has a kernel for dispatch_key ("CPU", "CUDA")."""
    if not LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{LIBRARY}::{op}", dispatch_key)
