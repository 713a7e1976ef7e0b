"""Benchmark cases of the dpo family: linear_dpo_loss from hidden states (ours, every
available backend) against the naive path (logits -> log_softmax -> gather -> masked
sum -> TRL's sigmoid formula), its torch.compile, and Liger's
LigerFusedLinearDPOLoss when importable on a GPU.

Rate: TFLOP/s of the useful work, the same for every implementation: the policy's
logits of 2B sequences of T tokens, 2 (2BT) H V FLOPs forward and three times that
forward+backward (d hidden, d weight). The reference log-probs are given (computed
once per dataset in a DPO run), so only the policy pass is timed.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import torch

import rlhf_kernels as rk
from rlhf_kernels import backend

# Models run in bf16 on GPUs; the CPU measures fp32.
DEFAULT_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
# (pairs B, tokens T, hidden H, vocabulary V)
SHAPES = {
    ("cpu", True): [(2, 128, 256, 32000)],
    ("cpu", False): [(2, 256, 512, 32000), (4, 512, 512, 32000)],
    ("cuda", True): [(8, 1024, 4096, 128256)],
    ("cuda", False): [(8, 1024, 4096, 128256), (16, 2048, 4096, 128256), (32, 4096, 4096, 128256)],
}
BETA = 0.1


def _naive(hidden, weight, labels, mask, ref_chosen, ref_rejected):
    logits = (hidden @ weight.T).float()
    token = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    logps = (token * mask).sum(-1)
    n = hidden.shape[0] // 2
    h = (logps[:n] - ref_chosen) - (logps[n:] - ref_rejected)
    return -torch.nn.functional.logsigmoid(BETA * h).mean()


def _ours(name):
    def run(hidden, weight, labels, mask, ref_chosen, ref_rejected):
        return rk.linear_dpo_loss(
            hidden, weight, labels, mask, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected, beta=BETA,
            backend=name,
        )[0]  # fmt: skip

    return run


def _liger():
    try:
        loss_cls = importlib.import_module("liger_kernel.chunked_loss").LigerFusedLinearDPOLoss
    except (ImportError, AttributeError):
        return None
    loss = loss_cls(beta=BETA, compute_nll_loss=False)

    def run(hidden, weight, labels, mask, ref_chosen, ref_rejected):
        target = torch.where(mask.bool(), labels, -100)
        return loss(weight, hidden, target, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)[0]

    return run


def impls(device: str, quick: bool) -> dict:
    out = {f"ours:{name}": _ours(name) for name in backend.available("linear_dpo_loss", device)}
    out["naive logits+log_softmax+gather"] = _naive
    if not quick:
        out["torch.compile(naive)"] = torch.compile(_naive)
    liger = _liger() if device == "cuda" else None
    if liger is not None:
        out["liger LigerFusedLinearDPOLoss"] = liger
    return out


def cases(device: str, quick: bool, dtype: torch.dtype) -> Iterator[dict]:
    for B, T, H, V in SHAPES[(device, quick)]:

        def make(B=B, T=T, H=H, V=V):
            hidden = torch.randn(2 * B, T, H, device=device, dtype=dtype)
            weight = torch.randn(V, H, device=device, dtype=dtype) / H**0.5
            labels = torch.randint(0, V, (2 * B, T), device=device)
            lengths = torch.randint(T // 2, T + 1, (2 * B, 1), device=device)
            mask = (torch.arange(T, device=device) < lengths).to(dtype)
            ref = -torch.rand(2, B, device=device) * T * 10
            return (hidden, weight, labels, mask, ref[0], ref[1]), (0, 1)

        flops = 2 * (2 * B * T) * H * V / 1e12
        yield {
            "name": f"linear_dpo_loss pairs={B} T={T} H={H} V={V} {str(dtype)[6:]}",
            "impls": impls(device, quick),
            "make": make,
            "unit": "TFLOP/s",
            "work": {"forward": flops, "forward+backward": 3 * flops},
        }
