"""kl_penalty and kl_shaped_rewards: validate, pick a backend, run."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as check
from .. import reference
from ..ops import kl as _kl_ops
from ..reference.kl import ESTIMATORS
from ._common import Tensor, _check_token_grid, _pick


def kl_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    *,
    estimator: str = "k1",
    clamp: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Per-token KL estimate from the policy and reference log-probs of the sampled tokens.

    With d = logprobs - ref_logprobs: k1 = d; k2 = d^2 / 2; k3 = exp(-d) + d - 1;
    abs = |d|; low_var_kl (verl) = clamp(exp(c) - c - 1, -10, 10) with c = clamp(-d, -20, 20).
    clamp=c then clamps the estimate to [-c, c].

    Args: logprobs and ref_logprobs of one shape [...], float dtypes.
    Returns: [...] float32 (float64 for float64 input), differentiable w.r.t. both inputs.
    """
    check.tensor("logprobs", logprobs)
    check.tensor("ref_logprobs", ref_logprobs)
    check.same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    check.same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    check.choice("estimator", estimator, ESTIMATORS)
    check.optional_positive("clamp", clamp)
    implementation = _pick("kl_penalty", logprobs.device, backend, reference.kl_penalty, _kl_ops.kl_penalty)
    return implementation(
        logprobs,
        ref_logprobs,
        estimator=estimator,
        clamp=clamp,
        dtype=check.result_dtype(logprobs, ref_logprobs),
    )


def kl_shaped_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
    clamp: Optional[float] = None,
    score_index: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards of RLHF-PPO: the KL penalty everywhere, the score at one position.

    kl = kl_penalty(logprobs, ref_logprobs, estimator, clamp) * mask
    rewards = -kl_coef * kl, plus scores[b] added at score_index[b] (default: the
    last position with mask != 0; a row with none gets no score).

    Args: scores [B]; logprobs, ref_logprobs, mask [B, T]; score_index [B] int in [0, T).
    Returns: (rewards [B, T], kl [B, T]), float32; not differentiable (rollout data).
    """
    check.tensor("mask", mask, dtypes=check.MASK_DTYPES, shape_doc="[B, T]")
    _check_token_grid(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    if logprobs.shape[1] == 0:
        raise ValueError(f"logprobs must be [B, T] with T >= 1 (a score needs a position), got {tuple(logprobs.shape)}")
    check.tensor("scores", scores, ndim=1, shape_doc="[B]")
    check.shape("scores", scores, logprobs.shape[:1], "[B]")
    check.optional_tensor("score_index", score_index, dtypes=check.INDEX_DTYPES, ndim=1, shape_doc="[B]")
    if score_index is not None:
        check.shape("score_index", score_index, logprobs.shape[:1], "[B]")
        check.indices_in_range("score_index", score_index, logprobs.shape[1], op="kl_shaped_rewards")
    check.same_device(logprobs=logprobs, scores=scores, score_index=score_index)
    check.number("kl_coef", kl_coef)
    check.choice("estimator", estimator, ESTIMATORS)
    check.optional_positive("clamp", clamp)
    implementation = _pick(
        "kl_shaped_rewards", logprobs.device, backend, reference.kl_shaped_rewards, _kl_ops.kl_shaped_rewards
    )
    with torch.no_grad():
        return implementation(
            scores,
            logprobs,
            ref_logprobs,
            mask,
            kl_coef=kl_coef,
            estimator=estimator,
            clamp=clamp,
            score_index=score_index,
            dtype=check.result_dtype(scores, logprobs, ref_logprobs),
        )
