"""Benchmark cases of the gae family: GAE as one reverse scan (ours, every available
backend) against the Python loops over T that TRL, OpenRLHF and verl run, and
masked_whiten against the eager reference and its torch.compile.

Rate: GB/s of the useful traffic, the same for every implementation. GAE reads
rewards, values, mask and writes advantages and returns, 5 B T floats, forward only
(rollout data, not differentiated). masked_whiten reads x and mask and writes the
result (3 B T floats); its backward reads the gradient, x and mask and writes one.
"""

from __future__ import annotations

from typing import Iterator

import torch

import harness
import rlhf_kernels as rk
from rlhf_kernels import backend, reference

# Rewards and values are fp32 in every framework.
DEFAULT_DTYPE = {"cpu": torch.float32, "cuda": torch.float32}
SHAPES = {
    ("cpu", True): [(64, 1024)],
    ("cpu", False): [(64, 1024), (256, 4096), (512, 16384)],
    ("cuda", True): [(256, 8192)],
    ("cuda", False): [(64, 1024), (256, 8192), (512, 16384)],
}
GAMMA, LAM = 1.0, 0.95


def trl_loop(rewards, values, mask):
    """TRL's PPO trainer: every position, mask unused."""
    last_gae = 0
    advantages_reversed = []
    T = rewards.shape[-1]
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + GAMMA * next_values - values[:, t]
        last_gae = delta + GAMMA * LAM * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def openrlhf_loop(rewards, values, mask):
    """OpenRLHF's get_advantages_and_returns: rewards and values multiplied by the mask."""
    values, rewards = values * mask, rewards * mask
    return trl_loop(rewards, values, mask)


def verl_loop(rewards, values, mask):
    """verl's compute_gae_advantage_return: mask-0 positions carry the next value and advantage."""
    next_values = 0
    last_gae = 0
    advantages_reversed = []
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + GAMMA * next_values - values[:, t]
        last_gae_ = delta + GAMMA * LAM * last_gae
        next_values = values[:, t] * mask[:, t] + (1 - mask[:, t]) * next_values
        last_gae = last_gae_ * mask[:, t] + (1 - mask[:, t]) * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def impls(device: str) -> dict:
    ours = {
        f"ours:{name}": (lambda name: lambda r, v, m: rk.gae(r, v, m, gamma=GAMMA, lam=LAM, backend=name))(name)
        for name in backend.available("gae", device)
    }
    return {**ours, "trl loop": trl_loop, "openrlhf loop": openrlhf_loop, "verl loop": verl_loop}


def whiten_impls(device: str, quick: bool) -> dict:
    impls = {
        f"ours:{name}": (lambda name: lambda x, m: rk.masked_whiten(x, m, backend=name))(name)
        for name in backend.available("masked_whiten", device)
    }
    if not quick:
        impls["torch.compile(reference)"] = torch.compile(reference.masked_whiten)
    return impls


def cases(device: str, quick: bool, dtype: torch.dtype) -> Iterator[dict]:
    bytes_per = torch.finfo(dtype).bits // 8
    for B, T in SHAPES[(device, quick)]:

        def make(B=B, T=T):
            mask = harness.right_padded_mask(B, T, device, dtype)
            return (
                torch.randn(B, T, device=device, dtype=dtype),
                torch.randn(B, T, device=device, dtype=dtype),
                mask,
            ), ()

        yield dict(
            name=f"gae B={B} T={T} {str(dtype)[6:]}",
            impls=impls(device),
            make=make,
            unit="GB/s",
            work={"forward": 5 * B * T * torch.finfo(dtype).bits / 8 / 1e9},
            modes=("forward",),
        )

        def make_whiten(B=B, T=T):
            return (torch.randn(B, T, device=device, dtype=dtype), harness.right_padded_mask(B, T, device, dtype)), (0,)

        n = B * T * bytes_per / 1e9
        yield dict(
            name=f"masked_whiten B={B} T={T} {str(dtype)[6:]}",
            impls=whiten_impls(device, quick),
            make=make_whiten,
            unit="GB/s",
            work={"forward": 3 * n, "forward+backward": 7 * n},
        )
