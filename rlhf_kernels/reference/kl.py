"""Reference per-token KL estimators and KL-shaped rewards.

With d = logprobs - ref_logprobs:
    k1 = d                              abs = |d|
    k2 = d^2 / 2                        k3 = exp(-d) + d - 1
    low_var_kl = clamp(exp(c) - c - 1, -10, 10), c = clamp(-d, -20, 20)   (verl)
then clamp=c clamps the estimate to [-c, c]. Each clamp passes the gradient on its
closed interval, bounds included (reference/bounds.py), and keeps NaN.
k3 and low_var_kl evaluate exp(x) - 1 - x without cancellation (exp_minus_one_minus_x):
k3 at d = 1e-4 is 5e-9, not 0, and +inf at d = -inf.
kl_shaped_rewards applies the mask by select: NaN / inf at a mask-0 position stays out.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .bounds import clamp as _clamp

ESTIMATORS = ("k1", "k2", "k3", "abs", "low_var_kl")
# verl's low_var_kl bounds: exp(20) ~ 4.9e8 keeps the ratio finite in fp32, and
# the estimate is clamped to +-10 before any user clamp.
LOW_VAR_KL_INNER_CLAMP = 20.0
LOW_VAR_KL_OUTER_CLAMP = 10.0

_INV_FACTORIALS = tuple(1.0 / math.factorial(k) for k in range(2, 11))  # 1/2! .. 1/10!


def exp_minus_one_minus_x(x: torch.Tensor) -> torch.Tensor:
    """exp(x) - 1 - x, accurate everywhere: the Taylor series to x^10 below |x| = 0.5
    (0.05 in float64; truncation below 1e-10, resp. 1e-19, relative), expm1(x) - x above
    (no cancellation left there); +inf at x = +inf. The kernels use the same split
    (csrc/cpu/vector_math.h, rlhf_kernels/triton/_math.py). Each branch sees only the
    inputs it is selected for, so neither puts an inf into the other's gradient."""
    small = abs(x) < (0.05 if x.dtype == torch.float64 else 0.5)
    xs = torch.where(small, x, torch.zeros_like(x))
    series = torch.zeros_like(xs)
    for coefficient in reversed(_INV_FACTORIALS):
        series = series * xs + coefficient
    series = series * xs * xs
    top = x == float("inf")
    xd = torch.where(small | top, torch.ones_like(x), x)
    value = torch.where(small, series, torch.expm1(xd) - xd)
    return torch.where(top, x.detach(), value)


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
        kl = exp_minus_one_minus_x(-diff)
    elif estimator == "abs":
        kl = diff.abs()
    elif estimator == "low_var_kl":
        log_ratio = _clamp(-diff, -LOW_VAR_KL_INNER_CLAMP, LOW_VAR_KL_INNER_CLAMP)
        kl = _clamp(exp_minus_one_minus_x(log_ratio), -LOW_VAR_KL_OUTER_CLAMP, LOW_VAR_KL_OUTER_CLAMP)
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
    kl = kl_penalty(logprobs, ref_logprobs, estimator=estimator, clamp=clamp, dtype=dtype)
    kl = torch.where(weights != 0, kl * weights, torch.zeros_like(kl))
    rewards = -kl_coef * kl
    out_of_range = None
    if score_index is None:
        index, has_score = last_valid_index(mask)
    else:
        # An index outside [0, T) (possible where the Python check is skipped) is never
        # used to write: that row's rewards are NaN instead.
        T = logprobs.shape[-1]
        out_of_range = (score_index < 0) | (score_index >= T)
        index = torch.where(out_of_range, torch.zeros_like(score_index), score_index).long()
        has_score = ~out_of_range
    placed = torch.where(has_score, scores.to(dtype), torch.zeros_like(scores, dtype=dtype))
    rewards = rewards.scatter_add(-1, index.unsqueeze(-1), placed.unsqueeze(-1))
    if out_of_range is not None:
        rewards = torch.where(out_of_range.unsqueeze(-1), float("nan"), rewards)
    return rewards, kl
