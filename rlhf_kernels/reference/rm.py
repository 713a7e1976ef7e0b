"""Reference reward-model losses: Bradley-Terry pairs and InstructGPT's K-way rankings.

bradley_terry_loss = mean_b -logsigmoid(r_chosen - r_rejected - margin)
ranking_loss: for each prompt b, the mean of -logsigmoid(r_i - r_j) over every
    pair with ranks[b, i] < ranks[b, j] (rank 0 is the best; equal ranks are
    ties and skipped); then the mean over prompts that have at least one pair
    (so each prompt weighs the same, as InstructGPT's 1 / C(K, 2) normalisation).
    A batch with no ranked pair gives 0, and so does an empty batch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .masked import masked_mean


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: Optional[torch.Tensor | float] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    diff = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)
    if margin is not None:
        diff = diff - (margin.to(dtype) if isinstance(margin, torch.Tensor) else margin)
    losses = -F.logsigmoid(diff)
    return losses.mean() if losses.numel() else losses.sum()  # 0 for no pairs, not NaN


def ranking_row_losses(rewards: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-prompt mean loss [B], whether the prompt has a ranked pair [B]); ranks are
    compared in their own dtype (int64 ranks exactly)."""
    better = ranks.unsqueeze(-1) < ranks.unsqueeze(-2)  # i ranked above j
    diff = rewards.unsqueeze(-1) - rewards.unsqueeze(-2)  # [B, K, K]: r_i - r_j
    # Pairs that are not compared are 0 before logsigmoid: a response in no pair is never
    # read, its NaN / inf reaches no other reward's gradient (no 0 * NaN in backward).
    diff = torch.where(better, diff, torch.zeros_like(diff))
    return masked_mean(-F.logsigmoid(diff), better, dim=(-2, -1)), better.flatten(-2).any(-1)


def ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    per_prompt, has_pair = ranking_row_losses(rewards.to(dtype), ranks)
    return masked_mean(per_prompt, has_pair)
