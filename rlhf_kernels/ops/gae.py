"""torch.ops.rlhf_kernels.gae (C++) and gae_triton: fakes and the typed call used by functional.gae.

The op is not differentiable (advantages are constants to the PPO losses), so it
has no autograd registration: inputs are detached before the call.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _extension

if _extension.LOADED:

    @torch.library.register_fake("rlhf_kernels::gae")
    def _gae_fake(rewards, values, mask, gamma, lam, mask_mode):
        return torch.empty_like(rewards), torch.empty_like(rewards)


@torch.library.custom_op("rlhf_kernels::gae_triton", mutates_args=())
def _gae_triton(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: Optional[torch.Tensor],
    gamma: float,
    lam: float,
    mask_mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return importlib.import_module("rlhf_kernels.triton.gae").gae(rewards, values, mask, gamma, lam, mask_mode)


@_gae_triton.register_fake
def _(rewards, *args):
    return torch.empty_like(rewards), torch.empty_like(rewards)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: Optional[torch.Tensor],
    *,
    gamma: float,
    lam: float,
    mask_mode: str,
    dtype: torch.dtype,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs `kernel` ("cpu"/"cuda": the C++ op of the tensors' device; "triton") on
    float32/float64 contiguous copies."""
    rewards = rewards.detach().to(dtype).contiguous()
    values = values.detach().to(dtype).contiguous()
    if mask is not None:
        mask = mask.detach().to(dtype).contiguous()
    op = _gae_triton if kernel == "triton" else torch.ops.rlhf_kernels.gae
    return op(rewards, values, mask, float(gamma), float(lam), mask_mode)
