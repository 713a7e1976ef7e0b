"""Benchmark cases of the ppo family: the clipped policy and value losses, ours
(every available backend; ours:reference is the eager PyTorch reference) against
torch.compile of the reference.

Rate: GB/s of the useful traffic, the same for every implementation: forward reads
the four [B, T] inputs; forward+backward also writes the [B, T] gradient.
"""

from __future__ import annotations

from typing import Iterator

import torch

import harness
import rlhf_kernels as rk
from rlhf_kernels import backend, reference

# Log-probs, advantages and values are fp32 in every framework's loss.
DEFAULT_DTYPE = {"cpu": torch.float32, "cuda": torch.float32}
SHAPES = {
    ("cpu", True): [(64, 1024)],
    ("cpu", False): [(64, 1024), (256, 4096)],
    ("cuda", True): [(256, 8192)],
    ("cuda", False): [(64, 1024), (256, 8192), (512, 16384)],
}
POLICY_OPTIONS = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg="token-mean")


def _policy_impls(device: str, quick: bool) -> dict:
    impls = {
        f"ours:{name}": (
            lambda name: lambda lp, old, adv, m: rk.ppo_policy_loss(lp, old, adv, m, backend=name, **POLICY_OPTIONS)[0]
        )(name)
        for name in backend.available("ppo_policy_loss", device)
    }
    if not quick:
        compiled = torch.compile(reference.ppo_policy_loss)
        impls["torch.compile(reference)"] = lambda lp, old, adv, m: compiled(lp, old, adv, m, **POLICY_OPTIONS)[0]
    return impls


def _value_impls(device: str, quick: bool) -> dict:
    impls = {
        f"ours:{name}": (lambda name: lambda v, old, ret, m: rk.ppo_value_loss(v, old, ret, m, backend=name)[0])(name)
        for name in backend.available("ppo_value_loss", device)
    }
    if not quick:
        compiled = torch.compile(reference.ppo_value_loss)
        impls["torch.compile(reference)"] = lambda v, old, ret, m: compiled(v, old, ret, m)[0]
    return impls


def cases(device: str, quick: bool, dtype: torch.dtype) -> Iterator[dict]:
    bytes_per = torch.finfo(dtype).bits // 8
    for B, T in SHAPES[(device, quick)]:

        def make(B=B, T=T):
            lp = -torch.rand(B, T, device=device, dtype=dtype) * 3
            mask = harness.right_padded_mask(B, T, device, dtype)
            return (lp, lp + 0.3 * torch.randn_like(lp), torch.randn_like(lp), mask), (0,)

        work = {"forward": 4 * B * T * bytes_per / 1e9, "forward+backward": 5 * B * T * bytes_per / 1e9}
        yield dict(
            name=f"ppo_policy_loss B={B} T={T} {str(dtype)[6:]}",
            impls=_policy_impls(device, quick),
            make=make,
            unit="GB/s",
            work=work,
        )
        yield dict(
            name=f"ppo_value_loss B={B} T={T} {str(dtype)[6:]}",
            impls=_value_impls(device, quick),
            make=make,
            unit="GB/s",
            work=work,
        )
