"""Loads the compiled extension rlhf_kernels._C, once, without ever failing the import.

Importing _C runs its TORCH_LIBRARY registrations (torch.ops.rlhf_kernels.*).
When it is missing (a RLHF_KERNELS_CPP=0 install, or a broken build) every op
falls back to the reference backend and one warning says so.
"""

from __future__ import annotations

import importlib
import warnings

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


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.rlhf_kernels.<op> has a kernel for dispatch_key ("CPU", "CUDA")."""
    if not LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{LIBRARY}::{op}", dispatch_key)
