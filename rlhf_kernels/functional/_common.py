"""What every family's public function shares: the backend pick and the [B, T] grid check."""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from .. import _validation as check
from .. import backend as _backend
from .._calling_thread import small_calls_serial

Tensor = torch.Tensor


def _pick(op: str, device: torch.device, backend: Optional[str], reference_fn, compiled_fn, *, gemm: bool = False):
    """The implementation `backend` resolves to: reference_fn, or compiled_fn bound to the
    kernel ("cpu" / "triton") that runs it; on "cpu", small calls run on the calling
    thread (rlhf_kernels._calling_thread), unless the op runs GEMMs (gemm=True), whose
    bits depend on the thread count."""
    resolved = _backend.resolve(op, device, backend)
    if resolved == "reference":
        return reference_fn
    compiled = partial(compiled_fn, kernel=resolved)
    return small_calls_serial(compiled) if resolved == "cpu" and not gemm else compiled


def _check_token_grid(mask: Optional[Tensor], **tensors: Tensor) -> None:
    """Float [B, T] tensors of one shape and device, and a [B, T] mask (None allowed)."""
    for name, x in tensors.items():
        check.tensor(name, x, ndim=2, shape_doc="[B, T]")
    check.optional_tensor("mask", mask, dtypes=check.MASK_DTYPES, ndim=2, shape_doc="[B, T]")
    (first_name, first), *_ = tensors.items()
    check.same_shape(first_name, first, mask=mask, **tensors)
    check.same_device(**tensors, mask=mask)
