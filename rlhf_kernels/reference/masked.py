"""Reference masked statistics: mean and whitening over positions where mask != 0.

Mask values act as weights (0/1 in practice). No NaN from finite input:
  - a mean over no valid position is 0;
  - the variance's denominator (count - 1 unbiased, count biased) is replaced
    by 1 when it is <= 0, so one valid element whitens to 0;
  - whitened positions with mask 0 are set to 0 (fill_masked=True; False leaves
    them whitened like the rest, as TRL's and verl's masked_whiten do).
"""

from __future__ import annotations

from typing import Optional

import torch


def _as_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return mask.to(dtype)


def _safe(denominator: torch.Tensor) -> torch.Tensor:
    # torch.where instead of clamp: a fractional total weight below 1 is legal,
    # and the unused branch must not produce inf (0 * inf = NaN in backward).
    return torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    weights = _as_weights(mask, x.dtype)
    if dim is None:
        total, count = (x * weights).sum(), weights.sum()
    else:
        total, count = (x * weights).sum(dim), weights.sum(dim)
    return torch.where(count > 0, total / _safe(count), torch.zeros_like(total))


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    fill_masked: bool = True,
) -> torch.Tensor:
    weights = _as_weights(mask, x.dtype)
    count = weights.sum()
    mean = masked_mean(x, weights)
    centered = x - mean
    denominator = count - 1 if unbiased else count
    variance = (centered.square() * weights).sum() / _safe(denominator)
    whitened = centered * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    if not fill_masked:
        return whitened
    return torch.where(weights != 0, whitened, torch.zeros_like(whitened))
