"""bradley_terry_loss and ranking_loss (reward-model losses): validate, pick a backend, run."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _validation as check
from .. import reference
from ..ops import rm as _rm_ops
from ._common import Tensor, _pick


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Optional[Union[Tensor, float]] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Pairwise reward-model loss: mean of -logsigmoid(r_chosen - r_rejected - margin).

    Args: chosen_rewards, rejected_rewards [...] float of one shape; margin a float or a
    tensor of that shape (Llama-2's preference-strength margin), None for 0.
    Returns: [] float32, differentiable w.r.t. both rewards.
    """
    check.tensor("chosen_rewards", chosen_rewards)
    check.tensor("rejected_rewards", rejected_rewards)
    check.same_shape("chosen_rewards", chosen_rewards, rejected_rewards=rejected_rewards)
    if isinstance(margin, torch.Tensor):
        check.same_shape("chosen_rewards", chosen_rewards, margin=margin)
        check.same_device(chosen_rewards=chosen_rewards, margin=margin)
    elif margin is not None:
        check.number("margin", margin)
    check.same_device(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    implementation = _pick(
        "bradley_terry_loss", chosen_rewards.device, backend, reference.bradley_terry_loss, _rm_ops.bradley_terry_loss
    )
    return implementation(
        chosen_rewards,
        rejected_rewards,
        margin=margin,
        dtype=check.result_dtype(chosen_rewards, rejected_rewards),
    )


def ranking_loss(rewards: Tensor, ranks: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """InstructGPT's K-way loss: -logsigmoid(r_i - r_j) over every pair with rank_i < rank_j.

    Rank 0 is the best; equal ranks are ties and skipped. Each prompt's pairs are averaged,
    then prompts with at least one pair are averaged (a batch with none gives 0).
    Args: rewards [B, K] float, ranks [B, K] int or float, K >= 2.
    Returns: [] float32, differentiable w.r.t. rewards.
    """
    check.tensor("rewards", rewards, ndim=2, shape_doc="[B, K]")
    if rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [B, K] with K >= 2 responses, got {tuple(rewards.shape)}")
    check.tensor("ranks", ranks, dtypes=check.MASK_DTYPES, ndim=2, shape_doc="[B, K]")
    check.same_shape("rewards", rewards, ranks=ranks)
    check.same_device(rewards=rewards, ranks=ranks)
    implementation = _pick("ranking_loss", rewards.device, backend, reference.ranking_loss, _rm_ops.ranking_loss)
    return implementation(rewards, ranks, dtype=check.result_dtype(rewards))
