"""masked_mean and masked_whiten: validate, pick a backend, run."""

from __future__ import annotations

from typing import Optional, Union

from .. import _validation as check
from .. import reference
from ..ops import masked as _masked_ops
from ._common import Tensor, _pick


def masked_mean(
    x: Tensor, mask: Tensor, dim: Optional[Union[int, tuple[int, ...]]] = None, *, backend: Optional[str] = None
) -> Tensor:
    """sum(x * mask) / sum(mask), over all elements (dim=None) or along dim.

    Args: x float [...], mask of x's shape (bool/int/float weights).
    Returns: x's dtype; 0 where no element is valid (never NaN). Differentiable w.r.t. x.
    Precision: the cpu kernel sums in float64, triton in fp32 per 16k-element split
    and float64 across splits; 16-bit x is summed as fp32 and the mean rounded to x's dtype.
    """
    check.tensor("x", x)
    check.tensor("mask", mask, dtypes=check.MASK_DTYPES)
    check.same_shape("x", x, mask=mask)
    check.same_device(x=x, mask=mask)
    check.dims("dim", dim, x.dim())
    return _pick("masked_mean", x.device, backend, reference.masked_mean, _masked_ops.masked_mean)(x, mask, dim)


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    fill_masked: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the positions with mask != 0 (one global mean and var).

    var = sum(mask (x - mean)^2) / (count - 1) (unbiased) or / count; a denominator
    <= 0 is replaced by 1, so a single valid element whitens to 0 and an all-masked
    input gives all zeros (never NaN). shift_mean=False adds the mean back.
    Positions with mask 0 are set to 0 (fill_masked=False: whitened like the others,
    as TRL's and verl's masked_whiten return them; an argument beyond the contract).
    Args: x float [...], mask of x's shape. Returns: x's dtype, differentiable w.r.t. x.
    Precision: mean and variance accumulate in float64 (cpu kernel; triton per split
    in fp32, then float64), the elementwise write in fp32 (float64 for float64 x).
    """
    check.tensor("x", x)
    check.tensor("mask", mask, dtypes=check.MASK_DTYPES)
    check.same_shape("x", x, mask=mask)
    check.same_device(x=x, mask=mask)
    check.positive("eps", eps)
    if not isinstance(fill_masked, bool):
        raise TypeError(f"fill_masked must be a bool, got {fill_masked!r}")
    implementation = _pick("masked_whiten", x.device, backend, reference.masked_whiten, _masked_ops.masked_whiten)
    return implementation(x, mask, shift_mean=shift_mean, unbiased=unbiased, eps=eps, fill_masked=fill_masked)
