"""torch.ops.rlhf_kernels.gae: fake kernel and the typed call used by functional.gae.

The op is not differentiable (advantages are constants to the PPO losses), so it
has no autograd registration: inputs are detached before the call.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension

if _extension.LOADED:

    @torch.library.register_fake("rlhf_kernels::gae")
    def _gae_fake(rewards, values, mask, gamma, lam, mask_mode):
        return torch.empty_like(rewards), torch.empty_like(rewards)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor], *, gamma: float,
    lam: float, mask_mode: str, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the compiled kernel of the tensors' device on float32/float64 contiguous copies."""
    rewards = rewards.detach().to(dtype).contiguous()
    values = values.detach().to(dtype).contiguous()
    if mask is not None:
        mask = mask.detach().to(dtype).contiguous()
    return torch.ops.rlhf_kernels.gae(rewards, values, mask, float(gamma), float(lam), mask_mode)
