"""gae and discounted_returns (reverse scans): validate, pick a backend, run."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as check
from .. import reference
from ..ops import gae as _gae_ops
from ..reference.gae import MASK_MODES
from ._common import Tensor, _check_token_grid, _pick


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Optional[Tensor] = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    mask_mode: str = "carry",
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation as one reverse scan per row.

    delta_t = r_t + gamma V_{t+1} - V_t (V_T = 0); A_t = delta_t + gamma lam A_{t+1};
    returns = A + V. mask_mode: "ignore" mask unused (TRL); "multiply" r and V
    multiplied by mask first (OpenRLHF; returns use the masked V); "carry" mask-0
    positions pass V_{t+1} and A_{t+1} through unchanged and report the carried A
    (verl, before its whitening). mask=None means all ones.

    Args: rewards, values, mask [B, T] (mask bool/int/float).
    Returns: (advantages [B, T], returns [B, T]) float32 (float64 for float64 input).
        Not differentiable: inputs are treated as constants.
    Precision: the cpu kernel and the reference run the recursion in float64.
    """
    _check_token_grid(mask, rewards=rewards, values=values)
    check.in_unit_interval("gamma", gamma)
    check.in_unit_interval("lam", lam)
    check.choice("mask_mode", mask_mode, MASK_MODES)
    implementation = _pick("gae", rewards.device, backend, reference.gae, _gae_ops.gae)
    return implementation(
        rewards, values, mask, gamma=gamma, lam=lam, mask_mode=mask_mode, dtype=check.result_dtype(rewards, values)
    )


def discounted_returns(
    rewards: Tensor, mask: Optional[Tensor] = None, *, gamma: float = 1.0, backend: Optional[str] = None
) -> Tensor:
    """G_t = r_t + gamma G_{t+1} (G_T = 0); mask-0 positions are skipped and carry G_{t+1}.

    Computed as gae(rewards, 0, mask, gamma=gamma, lam=1, mask_mode="carry").
    Args: rewards, mask [B, T]. Returns: [B, T] float32 (float64 for float64 input).
    """
    _check_token_grid(mask, rewards=rewards)
    check.in_unit_interval("gamma", gamma)
    advantages, _ = gae(
        rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0, mask_mode="carry", backend=backend
    )
    return advantages
