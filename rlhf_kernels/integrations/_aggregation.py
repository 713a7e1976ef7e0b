"""The frameworks' loss aggregations as a scale on rlhf_kernels' own.

rlhf_kernels' agg modes (reference/ppo.py) divide by local counts: token-mean by
the valid tokens, seq-mean-token-sum by B, seq-mean-token-mean by the sequences
with a token, seq-mean-token-sum-norm by T. verl's agg_loss and OpenRLHF's
aggregate_loss divide by global counts when given (batch_num_tokens,
global_batch_size, loss_scale_factor), multiply by dp_size, and count only the
sequences with a token. `global_scale` is the factor between the two, a constant
computed from the mask, so gradients stay those of the kernels.
"""

from __future__ import annotations

from typing import Optional

import torch


def global_scale(
    mask: torch.Tensor,
    agg: str,
    *,
    dp_size: int = 1,
    batch_num_tokens: Optional[float] = None,
    global_batch_size: Optional[float] = None,
    loss_scale_factor: Optional[float] = None,
) -> torch.Tensor:
    """Factor turning rlhf_kernels' `agg` of a [B, T] loss into the framework's."""
    mask = mask.detach()
    weights = mask.float()
    B, T = mask.shape
    tokens = weights.sum()
    sequences = (weights.sum(-1) > 0).float().sum()
    if agg == "token-sum":
        return tokens * dp_size
    if agg == "token-mean":
        return (torch.ones_like(tokens) if batch_num_tokens is None else tokens / batch_num_tokens) * dp_size
    denominator = sequences.clamp(min=1) if global_batch_size is None else torch.as_tensor(float(global_batch_size))
    if agg == "seq-mean-token-sum":
        return B / denominator * dp_size
    if agg == "seq-mean-token-mean":
        return sequences / denominator * dp_size
    if agg == "seq-mean-token-sum-norm":
        return T / (denominator * (T if loss_scale_factor is None else loss_scale_factor)) * dp_size
    raise ValueError(f"loss_agg_mode {agg!r} is not supported")


def kernel_agg(agg: str) -> str:
    """The rlhf_kernels agg mode a framework mode is scaled from."""
    return "token-mean" if agg == "token-sum" else agg
