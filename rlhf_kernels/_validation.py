"""Input checks shared by every backend, run before dispatch.

Each error names the argument and what was expected: TypeError for a wrong
type or dtype, ValueError for a wrong shape, value, device or option.
Data-dependent checks (label ranges) read tensor values: they run on CPU tensors,
and on GPU tensors only with RLHF_KERNELS_DEBUG=1 (values_checked); elsewhere on a GPU
they become device flags that check_index_errors() reads (_index_errors.py). The
kernels themselves stay memory-safe without them.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

from . import _index_errors

# Set to 1 to run the data-dependent input checks on GPU tensors too (values_checked).
DEBUG_ENV = "RLHF_KERNELS_DEBUG"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64) + FLOAT_DTYPES


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(
    name: str,
    x: object,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    ndim: Optional[int] = None,
    min_ndim: int = 0,
    shape_doc: str = "",
) -> torch.Tensor:
    """Checks that `x` is a tensor of one of `dtypes` with `ndim` (or >= min_ndim) dims."""
    doc = f" {shape_doc}" if shape_doc else ""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{doc}, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims{doc}, got shape {tuple(x.shape)}")
    if x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims{doc}, got shape {tuple(x.shape)}")
    return x


def optional_tensor(name: str, x: object, **kwargs) -> Optional[torch.Tensor]:
    return None if x is None else tensor(name, x, **kwargs)


def same_shape(reference_name: str, reference: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """Every tensor in `others` has the shape of `reference`."""
    for name, x in others.items():
        if x is not None and x.shape != reference.shape:
            raise ValueError(
                f"{name} must have the shape of {reference_name} {tuple(reference.shape)}, got {tuple(x.shape)}"
            )


def shape(name: str, x: torch.Tensor, expected: Sequence[int], shape_doc: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {shape_doc} = {tuple(expected)}, got {tuple(x.shape)}")


def same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """All given tensors live on one device; returns it."""
    present = {name: x for name, x in tensors.items() if x is not None}
    first_name, first = next(iter(present.items()))
    for name, x in present.items():
        if x.device != first.device:
            raise ValueError(f"{name} must be on {first_name}'s device {first.device}, got {x.device}")
    return first.device


def choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def optional_positive(name: str, value: Optional[float]) -> None:
    if value is not None:
        positive(name, value)


def number(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def in_unit_interval(name: str, value: float) -> None:
    number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def dims(name: str, dim: object, ndim: int) -> None:
    """dim is None, an int or a tuple of distinct ints in [-ndim, ndim) (torch's IndexError
    otherwise, on every backend: the kernels' layout would silently wrap it)."""
    if dim is None:
        return
    entries = (dim,) if isinstance(dim, int) else dim
    if not isinstance(entries, (tuple, list)) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in entries
    ):
        raise TypeError(f"{name} must be None, an int or a tuple of ints, got {dim!r}")
    low, high = -max(ndim, 1), max(ndim, 1) - 1
    for d in entries:
        if not low <= d <= high:
            raise IndexError(f"{name} out of range: expected in [{low}, {high}] for a {ndim}-dim x, got {d}")
    if len({d % max(ndim, 1) for d in entries}) != len(entries):
        raise ValueError(f"{name} must not repeat a dimension, got {dim!r}")


def values_checked(x: torch.Tensor) -> bool:
    """Whether data-dependent checks (which read tensor values) run for `x`. They are
    free on CPU tensors, but on a GPU each is a host sync that stalls the stream and
    breaks CUDA-graph capture, so there they run only with RLHF_KERNELS_DEBUG=1; the
    kernels stay memory-safe without them (an out-of-range label gives a NaN log-prob,
    never an out-of-bounds read). Never while torch.compile traces, nor on meta or
    fake tensors (no values)."""
    if torch.compiler.is_compiling() or x.numel() == 0 or x.device.type == "meta":
        return False
    return x.device.type == "cpu" or os.environ.get(DEBUG_ENV, "0") == "1"


def labels_in_range(
    labels: torch.Tensor, vocab_size: int, ignore_index: int, mask: Optional[torch.Tensor] = None, *, op: str
) -> None:
    """Every label (where mask != 0, if given) is in [0, vocab_size) or equals ignore_index;
    on a GPU without RLHF_KERNELS_DEBUG=1, a flag for check_index_errors() (_index_errors)."""
    checked = values_checked(labels)
    if not (checked or _index_errors.deferred(labels)):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if mask is not None:
        bad &= mask != 0
    if not checked:
        _index_errors.record(op, "labels", bad)
        return
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {int(bad.sum())} out of range, e.g. {first}"
        )


def indices_in_range(name: str, index: torch.Tensor, size: int, *, op: str) -> None:
    """Every entry of `index` is in [0, size); on a GPU without RLHF_KERNELS_DEBUG=1, a
    flag for check_index_errors() (_index_errors)."""
    checked = values_checked(index)
    if not (checked or _index_errors.deferred(index)):
        return
    bad = (index < 0) | (index >= size)
    if not checked:
        _index_errors.record(op, name, bad)
        return
    if bool(bad.any()):
        raise ValueError(f"{name} must be in [0, {size}), got e.g. {index[bad].flatten()[0].item()}")


def result_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64 (gradcheck, exact tests), else float32."""
    if any(x is not None and x.dtype == torch.float64 for x in tensors):
        return torch.float64
    return torch.float32
