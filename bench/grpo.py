"""Benchmark cases of the grpo family: policy_loss forward (+backward) on every
available backend against the frameworks' own eager code for the same loss type,
side by side: TRL 1.16's GRPOTrainer._compute_loss (tests/trl_grpo.py) and verl
0.9.1's registered policy losses (vendored, tests/verl_ref.py), where importable.
linear_policy_loss (from hidden states x lm_head weight) against the unfused path
(the [B, T, V] logits, log_softmax, then policy_loss) and Liger's
LigerFusedLinearGRPOLoss (chunked torch; torch.compile'd chunks on a GPU), where
importable.

Rate: GB/s of the useful traffic for policy_loss, the same for every
implementation: forward reads the four [B, T] inputs (five with ref_logprobs);
forward+backward also writes the [B, T] gradient. TFLOP/s for linear_policy_loss:
2 B T H V forward, 6 B T H V forward+backward (the logits GEMM and its two
gradient GEMMs; recomputing the logits in backward is not counted as work).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import harness
import torch

import rlhf_kernels as rk
from rlhf_kernels import backend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the framework oracles

DEFAULT_DTYPE = {"cpu": torch.float32, "cuda": torch.float32}
# {"policy": [(B, T)] for policy_loss, "linear": [(B, T, H, V)] for linear_policy_loss}.
# linear: G = 8 completions of 2 prompts, Qwen2.5-0.5B's H = 896 and V = 151936 on a GPU,
# a 32000 vocabulary on CPU.
SHAPES = {
    ("cpu", True): {"policy": [(64, 1024)], "linear": [(4, 128, 512, 32000)]},
    ("cpu", False): {"policy": [(256, 4096)], "linear": [(16, 256, 1024, 32000)]},  # N = 4096, issue 17
    ("cuda", True): {"policy": [(256, 4096)], "linear": [(16, 512, 896, 151936)]},
    ("cuda", False): {
        "policy": [(256, 4096), (512, 16384)],
        "linear": [(16, 1024, 896, 151936), (8, 2048, 3584, 152064)],
    },
}
# (case, our options, framework, framework options)
CASES = [
    ("trl grpo", dict(loss_type="grpo", clip_high=0.28), "trl", dict(loss_type="grpo", epsilon_high=0.28)),
    (
        "trl dapo + k3 kl",
        dict(loss_type="dapo", clip_high=0.28, kl_coef=0.04, kl_estimator="k3", ref=True),
        "trl",
        dict(loss_type="dapo", epsilon_high=0.28, beta=0.04, ref=True),
    ),
    (
        "trl grpo + k3 kl corrected",  # TRL 1.16's beta > 0 default: use_bias_correction_kl
        dict(loss_type="grpo", clip_high=0.28, kl_coef=0.04, kl_estimator="k3", kl_is_corrected=True, ref=True),
        "trl",
        dict(loss_type="grpo", epsilon_high=0.28, beta=0.04, use_bias_correction_kl=True, ref=True),
    ),
    ("verl vanilla", dict(loss_type="vanilla", dual_clip=3.0, log_ratio_clamp=20.0, agg="token-mean"), "verl", dict(name="vanilla")),
    ("verl cispo", dict(loss_type="cispo", log_ratio_clamp=20.0, agg="token-mean"), "verl", dict(name="cispo")),
]  # fmt: skip


def _framework(kind: str, options: dict):
    options = dict(options)
    use_ref = options.pop("ref", False)
    try:
        if kind == "trl":
            from trl_grpo import trl_grpo_loss

            return lambda lp, old, adv, m, ref: trl_grpo_loss(
                lp, old, adv[:, 0], m, ref_logprobs=ref if use_ref else None, **options
            )[0]
        from verl_ref import actor_config, core_algos

        fn, config = core_algos.get_policy_loss_fn(options["name"]), actor_config()
        return lambda lp, old, adv, m, ref: fn(old, lp, adv, m, loss_agg_mode="token-mean", config=config)[0]
    except Exception:  # noqa: BLE001  (framework not importable: no baseline row)
        return None


def _impls(device: str, ours: dict, kind: str, theirs: dict) -> dict:
    ours = dict(ours)
    use_ref = ours.pop("ref", False)
    impls = {
        f"ours:{name}": (
            lambda name: (
                lambda lp, old, adv, m, ref: rk.policy_loss(
                    lp, old, adv, m, ref_logprobs=ref if use_ref else None, backend=name, **ours
                )[0]
            )
        )(name)
        for name in backend.available("policy_loss", device)
    }
    framework = _framework(kind, theirs)
    if framework is not None:
        impls[f"{kind} (eager)"] = framework
    return impls


def cases(device: str, quick: bool, dtype: torch.dtype) -> Iterator[dict]:
    bytes_per = torch.finfo(dtype).bits // 8
    for B, T in SHAPES[(device, quick)]["policy"]:

        def make(B=B, T=T):
            lp = -torch.rand(B, T, device=device, dtype=dtype) * 3
            mask = harness.right_padded_mask(B, T, device, dtype)
            adv = torch.randn(B, 1, device=device, dtype=dtype).expand(B, T).contiguous()
            return (lp, lp + 0.3 * torch.randn_like(lp), adv, mask, lp + 0.1 * torch.randn_like(lp)), (0,)

        for label, ours, kind, theirs in CASES:
            reads = 5 if ours.get("ref") else 4
            yield dict(
                name=f"policy_loss {label} B={B} T={T} {str(dtype)[6:]}",
                impls=_impls(device, ours, kind, theirs),
                make=make,
                unit="GB/s",
                work={
                    "forward": reads * B * T * bytes_per / 1e9,
                    "forward+backward": (reads + 1) * B * T * bytes_per / 1e9,
                },
            )
    yield from linear_cases(device, quick, dtype)


def _unfused_linear(hidden, weight, labels, mask, old, adv):
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    logprobs = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return rk.policy_loss(logprobs, old, adv, mask, loss_type="dapo", clip_high=0.28, backend="reference")[0]


def linear_impls(device: str) -> dict:
    impls = {
        f"ours:{name}": (
            lambda name: lambda h, w, y, m, old, adv: rk.linear_policy_loss(
                h, w, y, m, old_logprobs=old, advantages=adv, loss_type="dapo", clip_high=0.28, backend=name
            )[0]
        )(name)
        for name in backend.available("linear_policy_loss", device)
    }
    impls["unfused logits+log_softmax+policy_loss"] = _unfused_linear
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception:  # noqa: BLE001  (not installed or not importable: no Liger row)
        return impls
    liger = LigerFusedLinearGRPOLoss(
        beta=0.0, compiled=device == "cuda", use_ref_model=False, epsilon_high=0.28, loss_type="dapo"
    )
    impls["liger LigerFusedLinearGRPOLoss"] = lambda h, w, y, m, old, adv: liger(
        h, w, y, m, adv, old_per_token_logps=old
    )[0]
    return impls


def linear_cases(device: str, quick: bool, dtype: torch.dtype) -> Iterator[dict]:
    for B, T, H, V in SHAPES[(device, quick)]["linear"]:

        def make(B=B, T=T, H=H, V=V):
            hidden = torch.randn(B, T, H, device=device, dtype=dtype)
            weight = torch.randn(V, H, device=device, dtype=dtype) / H**0.5
            labels = torch.randint(0, V, (B, T), device=device)
            mask = harness.right_padded_mask(B, T, device, torch.float32)
            old = -3 * torch.rand(B, T, device=device)
            return (hidden, weight, labels, mask, old, torch.randn(B, device=device)), (0, 1)

        yield dict(
            name=f"linear_policy_loss dapo B={B} T={T} H={H} V={V} {str(dtype)[6:]}",
            impls=linear_impls(device),
            make=make,
            unit="TFLOP/s",
            work={"forward": 2 * B * T * H * V / 1e12, "forward+backward": 6 * B * T * H * V / 1e12},
        )
