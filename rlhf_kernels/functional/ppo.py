"""ppo_policy_loss and ppo_value_loss: validate, pick a backend, run."""

from __future__ import annotations

from typing import Optional

from .. import _validation as check
from .. import reference
from ..ops import ppo as _ppo_ops
from ..reference.ppo import AGG_MODES
from ._common import Tensor, _check_token_grid, _pick


def _check_agg(agg: str) -> None:
    check.choice("agg", agg, AGG_MODES)


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    log_ratio_clamp: Optional[float] = None,
    agg: str = "token-mean",
    backend: Optional[str] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss, aggregated over valid tokens, with its statistics.

    ratio = exp(logprobs - old_logprobs) (log-ratio clamped to +-log_ratio_clamp if set);
    l = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high)), clip_high None = clip_low;
    dual_clip c > 1: l = min(l, -A c) where A < 0.
    agg: "token-mean" sum(l m)/sum(m); "seq-mean-token-sum" mean_b sum_t l m;
    "seq-mean-token-mean" mean over sequences with a valid token of their token mean;
    "seq-mean-token-sum-norm" sum_b sum_t l m / T.

    Args: logprobs, old_logprobs, advantages, mask [B, T].
    Returns: (loss [] float32, stats) with 0-dim detached stats clipfrac (share of valid
    tokens where the clipped term is the larger), dual_clipfrac (share bounded by the dual
    clip) and approx_kl (masked mean of (ratio - 1) - log ratio). Differentiable w.r.t.
    logprobs only (old_logprobs and advantages are constants).
    """
    check.tensor("mask", mask, dtypes=check.MASK_DTYPES, shape_doc="[B, T]")
    _check_token_grid(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    check.positive("clip_low", clip_low)
    check.optional_positive("clip_high", clip_high)
    check.optional_positive("log_ratio_clamp", log_ratio_clamp)
    if dual_clip is not None:
        check.number("dual_clip", dual_clip)
        if not dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip!r}")
    _check_agg(agg)
    implementation = _pick(
        "ppo_policy_loss", logprobs.device, backend, reference.ppo_policy_loss, _ppo_ops.ppo_policy_loss
    )
    return implementation(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        log_ratio_clamp=log_ratio_clamp,
        agg=agg,
        dtype=check.result_dtype(logprobs, old_logprobs, advantages),
    )


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: Optional[float] = 0.2,
    agg: str = "token-mean",
    backend: Optional[str] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5 max((v - R)^2, (old + clip(v - old, -clip, clip) - R)^2).

    clip=None: the unclipped 0.5 (v - R)^2. agg as ppo_policy_loss.
    Args: values, old_values, returns, mask [B, T].
    Returns: (loss [] float32, {"vf_clipfrac": share of valid tokens where the clipped
    term is the larger}). Differentiable w.r.t. values only.
    """
    check.tensor("mask", mask, dtypes=check.MASK_DTYPES, shape_doc="[B, T]")
    _check_token_grid(mask, values=values, old_values=old_values, returns=returns)
    check.optional_positive("clip", clip)
    _check_agg(agg)
    implementation = _pick("ppo_value_loss", values.device, backend, reference.ppo_value_loss, _ppo_ops.ppo_value_loss)
    return implementation(
        values,
        old_values,
        returns,
        mask,
        clip=clip,
        agg=agg,
        dtype=check.result_dtype(values, old_values, returns),
    )
