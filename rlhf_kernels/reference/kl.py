"""Reference per-token KL estimators and KL-shaped rewards.

With d = logprobs - ref_logprobs:
    k1 = d                              abs = |d|
    k2 = d^2 / 2                        k3 = exp(-d) + d - 1
    low_var_kl = clamp(exp(c) - c - 1, -10, 10), c = clamp(-d, -20, 20)   (verl)
then clamp=c clamps the estimate to [-c, c]. Each clamp passes the gradient on its
closed interval, bounds included (reference/bounds.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from .bounds import clamp as _clamp

ESTIMATORS = ("k1", "k2", "k3", "abs", "low_var_kl")
# verl's low_var_kl bounds: exp(20) ~ 4.9e8 keeps the ratio finite in fp32, and
# the estimate is clamped to +-10 before any user clamp.
LOW_VAR_KL_INNER_CLAMP = 20.0
LOW_VAR_KL_OUTER_CLAMP = 10.0


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    estimator: str = "k1",
    clamp: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    diff = logprobs.to(dtype) - ref_logprobs.to(dtype)
    if estimator == "k1":
        kl = diff
    elif estimator == "k2":
        kl = 0.5 * diff.square()
    elif estimator == "k3":
        kl = torch.exp(-diff) + diff - 1
    elif estimator == "abs":
        kl = diff.abs()
    elif estimator == "low_var_kl":
        log_ratio = _clamp(-diff, -LOW_VAR_KL_INNER_CLAMP, LOW_VAR_KL_INNER_CLAMP)
        kl = _clamp(torch.exp(log_ratio) - log_ratio - 1, -LOW_VAR_KL_OUTER_CLAMP, LOW_VAR_KL_OUTER_CLAMP)
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if clamp is not None:
        kl = _clamp(kl, -clamp, clamp)
    return kl


def last_valid_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the last mask != 0 position per row [B], whether the row has one [B])."""
    valid = mask != 0
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand_as(valid)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(-1)
    has_valid = last >= 0
    return last.clamp(min=0), has_valid


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
    clamp: Optional[float] = None,
    score_index: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    weights = mask.to(dtype)
    kl = kl_penalty(logprobs, ref_logprobs, estimator=estimator, clamp=clamp, dtype=dtype) * weights
    rewards = -kl_coef * kl
    if score_index is None:
        index, has_score = last_valid_index(mask)
    else:
        index, has_score = score_index.long(), torch.ones_like(score_index, dtype=torch.bool)
    placed = torch.where(has_score, scores.to(dtype), torch.zeros_like(scores, dtype=dtype))
    rewards = rewards.scatter_add(-1, index.unsqueeze(-1), placed.unsqueeze(-1))
    return rewards, kl
