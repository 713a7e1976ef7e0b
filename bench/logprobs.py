"""Benchmark cases of the logprobs family: token_logprobs from logits and
linear_logprobs from hidden states, ours (every available backend) against the
baselines that are importable.

Rates use the useful work of the op, the same for every implementation:
token_logprobs moves N*V logits once forward, three times forward+backward
(read, re-read, write the gradient); linear_logprobs does 2NHV FLOPs forward and
6NHV forward+backward (the logits, d hidden, d weight).

trl_head cases: what TRL 1.16's trainers run, the fused LM head's
`_ChunkedLogProbFunction.apply` with the outputs each trainer asks for
(TRL_HEAD_OUTPUTS), TRL's own class against the drop-in rk_trl.patch() installs
(rlhf_kernels.integrations.trl.ChunkedLogProbFunction), both with TRL's chunk size;
at the linear shapes, inputs in the run's dtype (a trainer under bf16 autocast
projects in bf16 too). forward+backward backpropagates the log-probs, as the
trainers' losses do (the entropy and the statistics feed metrics and masks).
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterator

import torch

import rlhf_kernels as rk
from rlhf_kernels import backend

# Models run in bf16 on GPUs; the CPU measures fp32, what CPU users run.
DEFAULT_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
SHAPES = {
    # (N, V) for token_logprobs, (N, H, V) for linear_logprobs
    ("cpu", True): {"token": [(1024, 32000)], "linear": [(512, 512, 32000)]},
    ("cpu", False): {"token": [(4096, 32000), (1024, 128256)], "linear": [(2048, 1024, 32000)]},
    ("cuda", True): {"token": [(8192, 128256)], "linear": [(8192, 4096, 128256)]},
    ("cuda", False): {
        "token": [(8192, 128256), (16384, 152064)],
        "linear": [(8192, 4096, 128256), (16384, 3584, 152064)],
    },
}


def _optional(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _naive_token(logits, labels):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _naive_linear(hidden, weight, labels):
    return _naive_token(hidden @ weight.T, labels)


def token_impls(device: str, quick: bool) -> dict[str, Callable]:
    impls = {
        f"ours:{name}": (lambda name: lambda x, y: rk.token_logprobs(x, y, backend=name))(name)
        for name in backend.available("token_logprobs", device)
    }
    impls["naive log_softmax+gather"] = _naive_token
    if not quick:
        impls["torch.compile(naive)"] = torch.compile(_naive_token)
    trl = _optional("trl.trainer.utils", "selective_log_softmax")
    if trl is not None:
        impls["trl selective_log_softmax"] = trl
    return impls


def linear_impls(device: str, quick: bool) -> dict[str, Callable]:
    impls = {
        f"ours:{name}": (lambda name: lambda h, w, y: rk.linear_logprobs(h, w, y, backend=name))(name)
        for name in backend.available("linear_logprobs", device)
    }
    for name in backend.available("linear_logprobs", device):
        if name != "reference":  # the cost of batch invariance (docs/DESIGN.md) on each kernel
            impls[f"ours:{name} batch_invariant"] = (
                lambda name: lambda h, w, y: rk.linear_logprobs(h, w, y, backend=name, batch_invariant=True)
            )(name)
    impls["naive matmul+log_softmax+gather"] = _naive_linear
    if not quick:
        impls["torch.compile(naive)"] = torch.compile(_naive_linear)
    trl_chunked = _optional("trl.kernels", "ChunkedLogProbFunction")
    if trl_chunked is not None:
        # TRL 1.16's fused LM head (what its DPO/GRPO trainers run; our trl.patch() replaces
        # it): 32768-wide vocabulary chunks as TRL's add_fused_lm_head passes them.
        impls["trl ChunkedLogProbFunction"] = lambda h, w, y: trl_chunked.apply(
            h, w, None, y, 1.0, 32768, None, 1.0, ("log_probs",)
        )[0]  # the log-probs only, as ours (its default computes every statistic)
    cce = _optional("cut_cross_entropy", "linear_cross_entropy")
    if cce is not None and device == "cuda":
        impls["cce linear_cross_entropy"] = lambda h, w, y: -cce(h, w, y, reduction="none")
    liger = _optional("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
    if liger is not None and device == "cuda":
        loss = liger(reduction="none")
        impls["liger fused linear CE"] = lambda h, w, y: -loss(w, h, y)
    return impls


# The outputs TRL 1.16's trainers ask of the fused LM head (add_fused_lm_head's
# `outputs`), by case: (outputs, modes).
TRL_HEAD_OUTPUTS = {
    # DPOTrainer's policy (use_weighting adds log_sum_sq_probs)
    "dpo-policy": (("log_probs", "entropy", "mean_logits", "is_top1"), ("forward", "forward+backward")),
    # GRPOTrainer's policy (RLOO's and the async GRPO trainer's too)
    "grpo-policy": (("log_probs", "entropy"), ("forward", "forward+backward")),
    # every trainer's reference model: add_fused_lm_head's default, no gradient
    "reference": (("log_probs",), ("forward",)),
}


def trl_head_impls(outputs: tuple) -> dict[str, Callable]:
    """TRL's own fused-head function and our drop-in, called as TRL's head calls them
    (temperature 1, no bias / softcap / scale); {} without TRL."""
    theirs = _optional("trl.kernels.chunked_logprob", "ChunkedLogProbFunction")
    if theirs is None:
        return {}
    from rlhf_kernels.integrations import trl as rk_trl

    chunk = _optional("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE") or 32768

    def call(cls):
        return lambda h, w, y: cls.apply(h, w, None, y, 1.0, chunk, None, 1.0, outputs)[0]

    return {"ours:trl drop-in": call(rk_trl.ChunkedLogProbFunction), "trl _ChunkedLogProbFunction": call(theirs)}


def cases(device: str, quick: bool, dtype: torch.dtype) -> Iterator[dict]:
    """Each case: name, impls, make_inputs() -> (args, grad_args), rate per mode."""
    shapes = SHAPES[(device, quick)]
    bytes_per = torch.finfo(dtype).bits // 8
    for N, V in shapes["token"]:

        def make(N=N, V=V):
            logits = torch.randn(N, V, device=device, dtype=dtype)
            return (logits, torch.randint(0, V, (N,), device=device)), (0,)

        yield dict(
            name=f"token_logprobs N={N} V={V} {str(dtype)[6:]}",
            impls=token_impls(device, quick),
            make=make,
            unit="GB/s",
            work={"forward": N * V * bytes_per / 1e9, "forward+backward": 3 * N * V * bytes_per / 1e9},
        )
    for N, H, V in shapes["linear"]:

        def make(N=N, H=H, V=V):
            hidden = torch.randn(N, H, device=device, dtype=dtype)
            weight = torch.randn(V, H, device=device, dtype=dtype) / H**0.5
            return (hidden, weight, torch.randint(0, V, (N,), device=device)), (0, 1)

        yield dict(
            name=f"linear_logprobs N={N} H={H} V={V} {str(dtype)[6:]}",
            impls=linear_impls(device, quick),
            make=make,
            unit="TFLOP/s",
            work={"forward": 2 * N * H * V / 1e12, "forward+backward": 6 * N * H * V / 1e12},
        )
    for N, H, V in shapes["linear"]:
        for trainer, (outputs, modes) in TRL_HEAD_OUTPUTS.items():
            impls = trl_head_impls(outputs)
            if not impls:
                break

            def make(N=N, H=H, V=V):
                hidden = torch.randn(N, H, device=device, dtype=dtype)
                weight = torch.randn(V, H, device=device, dtype=dtype) / H**0.5
                return (hidden, weight, torch.randint(0, V, (N,), device=device)), (0, 1)

            yield dict(
                name=f"trl_head {trainer} N={N} H={H} V={V} {str(dtype)[6:]}",
                impls=impls,
                make=make,
                modes=modes,
                unit="TFLOP/s",
                work={"forward": 2 * N * H * V / 1e12, "forward+backward": 6 * N * H * V / 1e12},
            )
