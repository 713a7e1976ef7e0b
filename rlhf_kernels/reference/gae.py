"""Reference GAE and discounted returns: the sequential reverse recursion, in float64.

For t = T-1 .. 0, with V_T = 0 and A_T = 0:
    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    returns_t = A_t + V_t
mask_mode:
    "ignore"   mask unused (TRL)
    "multiply" r and V multiplied by mask first (OpenRLHF)
    "carry"    a mask-0 position passes V_{t+1} and A_{t+1} through unchanged,
               and reports the carried advantage (verl, before its whitening)
The mask enters by selects: in "multiply" and "carry" mode a mask-0 position's reward
and value never reach another position (NaN / inf there stays out; 0 * inf is NaN).
"""

from __future__ import annotations

from typing import Optional

import torch

MASK_MODES = ("ignore", "multiply", "carry")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    mask_mode: str = "carry",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    # float64 whatever the inputs: the oracle must beat the kernels' rounding.
    r = rewards.detach().double()
    v = values.detach().double()
    m = torch.ones_like(r) if mask is None else mask.detach().double()
    live = m != 0
    zero = torch.zeros_like(r)
    if mask_mode == "multiply":
        r, v = torch.where(live, r * m, zero), torch.where(live, v * m, zero)
    # What the recursion reads in carry mode: mask-0 positions are passed over unread.
    r_read, v_read = (torch.where(live, r, zero), torch.where(live, v, zero)) if mask_mode == "carry" else (r, v)
    B, T = r.shape
    advantages = torch.empty_like(r)
    next_value = torch.zeros(B, dtype=r.dtype, device=r.device)
    running = torch.zeros_like(next_value)
    for t in range(T - 1, -1, -1):
        delta = r_read[:, t] + gamma * next_value - v_read[:, t]
        advantage = delta + gamma * lam * running
        if mask_mode == "carry":
            keep = live[:, t]
            next_value = torch.where(keep, m[:, t] * v_read[:, t] + (1 - m[:, t]) * next_value, next_value)
            running = torch.where(keep, m[:, t] * advantage + (1 - m[:, t]) * running, running)
        else:
            next_value, running = v[:, t], advantage
        advantages[:, t] = running
    return advantages.to(dtype), (advantages + v).to(dtype)


def discounted_returns(
    rewards: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    gamma: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1}; mask-0 positions are skipped and carry G_{t+1}.

    It is gae with V = 0 and lam = 1 in "carry" mode, which is how it is computed.
    """
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0, mask_mode="carry", dtype=dtype)
    return advantages
