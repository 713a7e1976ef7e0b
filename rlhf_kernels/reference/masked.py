"""Reference masked statistics: mean and whitening over positions where mask != 0.

Mask values act as weights (0/1 in practice), applied by select: NaN or inf at a
mask-0 position never reaches a valid output or gradient. 16-bit x accumulates in
float32 and the result is rounded to x's dtype. No NaN from finite input:
  - a mean over no valid position is 0;
  - the variance's denominator (count - 1 unbiased, count biased) is replaced
    by 1 when it is <= 0, so one valid element whitens to 0;
  - whitened positions with mask 0 are set to 0 (fill_masked=True; False leaves
    them whitened like the rest, as TRL's and verl's masked_whiten do).
"""

from __future__ import annotations

from typing import Optional

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; 16-bit x accumulates in float32 (the documented precision:
    4,000 fp16 values of 100 sum past fp16's 65504)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _safe(denominator: torch.Tensor) -> torch.Tensor:
    # torch.where instead of clamp: a fractional total weight below 1 is legal,
    # and the unused branch must not produce inf (0 * inf = NaN in backward).
    return torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def _select(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weights * x where weights != 0, else 0: a mask-0 position never contributes, not
    even NaN or inf (0 * inf is NaN), in the value or the gradient."""
    return torch.where(weights != 0, x, torch.zeros_like(x)) * weights


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) over dim (all when None), with the mask applied by select."""
    product = _select(mask.to(x.dtype), x)
    return product.sum() if dim is None else product.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    dtype = _compute_dtype(x)
    values = x.to(dtype)
    weights = mask.to(dtype)
    total, count = masked_sum(values, weights, dim), (weights.sum() if dim is None else weights.sum(dim))
    return torch.where(count > 0, total / _safe(count), torch.zeros_like(total)).to(x.dtype)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    fill_masked: bool = True,
) -> torch.Tensor:
    dtype = _compute_dtype(x)
    values = x.to(dtype)
    weights = mask.to(dtype)
    live = weights != 0
    count = weights.sum()
    mean = masked_mean(values, weights)
    # Only valid positions enter the statistics (NaN / inf elsewhere stays out, gradient too).
    centered = torch.where(live, values, mean.detach()) - mean
    denominator = count - 1 if unbiased else count
    variance = _select(weights, centered.square()).sum() / _safe(denominator)
    rstd = torch.rsqrt(variance + eps)
    if fill_masked:
        whitened = torch.where(live, centered * rstd, torch.zeros_like(centered))
    else:
        whitened = torch.where(live, centered, values - mean) * rstd
    if not shift_mean:
        whitened = whitened + mean
        if fill_masked:
            whitened = torch.where(live, whitened, torch.zeros_like(whitened))
    return whitened.to(x.dtype)
