"""Benchmark cases of the kl family: kl_penalty (low_var_kl, forward and backward)
and kl_shaped_rewards (k3), ours (every available backend; ours:reference is the
eager PyTorch reference) against torch.compile of the reference.

Rate: GB/s of the useful traffic, the same for every implementation: kl_penalty
reads two [B, T] tensors and writes one (forward+backward: and the two
gradients); kl_shaped_rewards reads three and writes two.
"""

from __future__ import annotations

from typing import Iterator

import torch

import harness
import rlhf_kernels as rk
from rlhf_kernels import backend, reference

# Log-probs are fp32 in every framework's KL term.
DEFAULT_DTYPE = {"cpu": torch.float32, "cuda": torch.float32}
SHAPES = {
    ("cpu", True): [(64, 1024)],
    ("cpu", False): [(64, 1024), (256, 4096)],
    ("cuda", True): [(256, 8192)],
    ("cuda", False): [(64, 1024), (256, 8192), (512, 16384)],
}


def _penalty_impls(device: str, quick: bool) -> dict:
    impls = {
        f"ours:{name}": (lambda name: lambda lp, ref: rk.kl_penalty(lp, ref, estimator="low_var_kl", backend=name))(
            name
        )
        for name in backend.available("kl_penalty", device)
    }
    if not quick:
        compiled = torch.compile(reference.kl_penalty)
        impls["torch.compile(reference)"] = lambda lp, ref: compiled(lp, ref, estimator="low_var_kl")
    return impls


def _rewards_impls(device: str, quick: bool) -> dict:
    def ours(name):
        return lambda s, lp, ref, m: rk.kl_shaped_rewards(s, lp, ref, m, kl_coef=0.05, estimator="k3", backend=name)[0]

    impls = {f"ours:{name}": ours(name) for name in backend.available("kl_shaped_rewards", device)}
    if not quick:
        compiled = torch.compile(reference.kl_shaped_rewards)
        impls["torch.compile(reference)"] = lambda s, lp, ref, m: compiled(s, lp, ref, m, kl_coef=0.05, estimator="k3")[
            0
        ]
    return impls


def cases(device: str, quick: bool, dtype: torch.dtype) -> Iterator[dict]:
    bytes_per = torch.finfo(dtype).bits // 8
    for B, T in SHAPES[(device, quick)]:

        def make_penalty(B=B, T=T):
            lp = -torch.rand(B, T, device=device, dtype=dtype) * 3
            return (lp, lp + torch.randn_like(lp)), (0, 1)

        def make_rewards(B=B, T=T):
            lp = -torch.rand(B, T, device=device, dtype=dtype) * 3
            mask = harness.right_padded_mask(B, T, device, dtype)
            return (torch.randn(B, device=device, dtype=dtype), lp, lp + torch.randn_like(lp), mask), ()

        n = B * T * bytes_per / 1e9
        yield dict(
            name=f"kl_penalty B={B} T={T} {str(dtype)[6:]}",
            impls=_penalty_impls(device, quick),
            make=make_penalty,
            unit="GB/s",
            work={"forward": 3 * n, "forward+backward": 5 * n},
        )
        yield dict(
            name=f"kl_shaped_rewards B={B} T={T} {str(dtype)[6:]}",
            impls=_rewards_impls(device, quick),
            make=make_rewards,
            unit="GB/s",
            work={"forward": 5 * n},
            modes=("forward",),
        )
