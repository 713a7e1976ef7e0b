"""Reference PPO clipped policy loss and clipped value loss, with their aggregations.

Policy, per token (old_logprobs and advantages are constants):
    log_ratio = lp - old   (clamped to +-log_ratio_clamp when set), ratio = exp(log_ratio)
    l = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))
    dual clip c (A < 0 only): l = min(l, -A c)
Value, per token: 0.5 max((v - R)^2, (clamp(v, old - clip, old + clip) - R)^2)
    (TRL's and verl's clip_by_value; OpenRLHF's old + clamp(v - old) differs only
    in rounding).
Every clamp and clip here passes the gradient on its closed interval, bounds
included (reference/bounds.py: written out, not torch.clamp's, whose rule at the
bound changed in torch 2.14); max/min split it in half on a tie (torch.maximum).
Aggregations over [B, T] with mask (verl's agg_loss; a sequence with no valid
token is left out of seq-mean-token-mean):
    token-mean               sum(l m) / sum(m)
    seq-mean-token-sum       mean_b sum_t l m
    seq-mean-token-mean      mean_b [sum_t l m / sum_t m]
    seq-mean-token-sum-norm  sum_b sum_t l m / T     (Dr. GRPO)
The mask enters by select (where m != 0), so NaN / inf at a mask-0 position never
reaches the loss; a NaN at a valid position makes it NaN (torch.maximum, torch.minimum
and the clamps keep NaN). An empty batch (B = 0 or T = 0) gives 0 in every mode.
"""

from __future__ import annotations

from typing import Optional

import torch

from .bounds import clamp
from .kl import exp_minus_one_minus_x
from .masked import masked_mean, masked_sum

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Reduces a per-token loss [B, T] to a scalar by `agg`."""
    weights = mask.to(loss.dtype)
    if agg == "token-mean":
        return masked_mean(loss, weights)
    sequence_sums = masked_sum(loss, weights, dim=-1)
    if agg == "seq-mean-token-sum":
        return sequence_sums.mean() if sequence_sums.numel() else sequence_sums.sum()
    if agg == "seq-mean-token-mean":
        sequence_means = masked_mean(loss, weights, dim=-1)
        return masked_mean(sequence_means, weights.sum(-1) > 0)
    if agg == "seq-mean-token-sum-norm":
        return sequence_sums.sum() / max(loss.shape[-1], 1)
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def valid_only(mask: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The inputs with their mask-0 positions set to 0, before any arithmetic: the loss
    there is masked out anyway, and a NaN / inf left in would come back as 0 * NaN in the
    gradient (autograd multiplies the masked-out zero by the local derivative)."""
    live = mask != 0
    return [torch.where(live, x, torch.zeros_like(x)) for x in tensors]


def policy_token_loss(lp, old, adv, *, clip_low, clip_high=None, dual_clip=None, log_ratio_clamp=None):
    """Per-token policy loss [B, T] and (clipped_more, dual_clipped, log_ratio) for the
    statistics; old and adv are constants."""
    clip_high = clip_low if clip_high is None else clip_high
    log_ratio = lp - old
    if log_ratio_clamp is not None:
        log_ratio = clamp(log_ratio, -log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual_clipped = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        lower_bound = -adv * dual_clip
        dual_clipped = (adv < 0) & (loss > lower_bound)
        loss = torch.where(adv < 0, torch.minimum(loss, lower_bound), loss)
    return loss, (clipped > unclipped, dual_clipped, log_ratio)


def value_token_loss(v, old, target, *, clip):
    """Per-token value loss [B, T] and where the clipped term is the larger."""
    unclipped = (v - target).square()
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped = (clamp(v, old - clip, old + clip) - target).square()
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    log_ratio_clamp: Optional[float] = None,
    agg: str = "token-mean",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    lp, old, adv = valid_only(mask, logprobs.to(dtype), old_logprobs.detach().to(dtype), advantages.detach().to(dtype))
    loss, (clipped_more, dual_clipped, log_ratio) = policy_token_loss(
        lp, old, adv, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp
    )
    with torch.no_grad():
        weights = mask.to(dtype)
        stats = {
            "clipfrac": masked_mean(clipped_more.to(dtype), weights),
            "dual_clipfrac": masked_mean(dual_clipped.to(dtype), weights),
            # Schulman's k3 estimate of KL(old || new): (ratio - 1) - log ratio.
            "approx_kl": masked_mean(exp_minus_one_minus_x(log_ratio), weights),
        }
    return aggregate(loss, mask, agg), stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: Optional[float] = 0.2,
    agg: str = "token-mean",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    v, old, target = valid_only(mask, values.to(dtype), old_values.detach().to(dtype), returns.detach().to(dtype))
    loss, clipped_more = value_token_loss(v, old, target, clip=clip)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean(clipped_more.to(dtype), mask.to(dtype))}
    return aggregate(loss, mask, agg), stats
