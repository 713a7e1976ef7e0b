"""TRL drop-ins (TRL 1.16 signatures and semantics) and patch() for unchanged TRL code.

    from rlhf_kernels.integrations import trl as rk_trl
    rk_trl.patch()            # every trl module that imported these names now calls ours
    ...                       # an unchanged TRL trainer / loss
    rk_trl.unpatch()          # or: with rk_trl.patched(): ...

What TRL 1.16's trainers call: DPOTrainer and GRPOTrainer compute every log-prob through
the fused LM head that `add_fused_lm_head` installs, which calls
`trl.trainer.utils._ChunkedLogProbFunction` (trl.kernels.ChunkedLogProbFunction) at
each forward: ChunkedLogProbFunction below is its drop-in, on rk.linear_logprobs (one
fused kernel, no [N, V] logits; entropy with it). selective_log_softmax,
selective_log_softmax_and_entropy and entropy_from_logits are TRL 1.16's
(trl.trainer.utils).
GRPOTrainer's loss: patch() also replaces `GRPOTrainer._compute_loss` by
trl_grpo.compute_loss (TRL's forward, masks and metrics; the per-token loss, its
normaliser, the KL and the entropy bonus by rk.policy_loss; trl_grpo.py has the
mapping and the configurations that keep TRL's own code).
masked_mean, masked_var and masked_whiten are the helpers of TRL's PPO code (trl.core
up to 0.11, later trl.experimental's PPO; TRL 1.16 no longer ships them), with their
semantics: whitening is unbiased with rsqrt(var + 1e-8) and leaves masked positions
whitened (TRL's PPO trainer zeroes the pads afterwards). Departures, all where TRL
would return NaN: a mean over no valid element is 0 (TRL: 0/0), and masked_whiten
over one valid element gives 0 (TRL: NaN from its Bessel correction).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Optional

import torch

import rlhf_kernels as rk

from . import trl_grpo
from ._version import supported_version

# TRL versions whose signatures and semantics these drop-ins follow (patch() refuses others).
SUPPORTED_VERSIONS = ("1.16.*",)
# TRL's ChunkedLogProbFunction outputs besides the log-probabilities (trl.kernels.chunked_logprob).
_CHUNKED_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0, row_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """log_softmax(logits / temperature).gather(-1, index): index of shape (...) or
    (..., K) (top-K); rows where row_mask == 0 give 0. Output in the logits dtype."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    top_k = index.ndim == logits.ndim
    first = index[..., 0] if top_k else index
    logprobs = rk.token_logprobs(logits, first, temperature=temperature)
    if top_k:
        # One kernel pass gives log p(first) = z_first / T - lse; the other K - 1 columns
        # reuse that row's lse: log p(k) = z_k / T - lse.
        scaled = logits.gather(-1, index).float() / temperature
        lse = scaled[..., :1] - logprobs.unsqueeze(-1)
        logprobs = scaled - lse
    if row_mask is not None:
        logprobs = logprobs.masked_fill(row_mask == 0, 0.0)
    return logprobs.to(logits.dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per row, in the logits dtype. chunk_size is
    accepted for TRL's signature; the kernel streams rows and needs no chunking."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = rk.token_logprobs(logits, labels, return_entropy=True)
    return entropy.to(logits.dtype)


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax(logits / T).gather(index), entropy) in one pass over the logits; rows
    where row_mask == 0 give 0 and 0. Outputs in the logits dtype, as TRL's."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    logprobs, entropy = rk.token_logprobs(logits, index, temperature=temperature, return_entropy=True)
    if not entropy_requires_grad:
        entropy = entropy.detach()
    if row_mask is not None:
        logprobs = logprobs.masked_fill(row_mask == 0, 0.0)
        entropy = entropy.masked_fill(row_mask == 0, 0.0)
    return logprobs.to(logits.dtype), entropy.to(logits.dtype)


def _logit_statistics(hidden, weight, bias, targets, temperature, softcap, logit_scale, names) -> dict:
    """TRL's per-token metric statistics (no gradient), in row chunks of the logits:
    mean_logits = mean_v z, is_top1 = (argmax_v z == target, the first maximum wins, as
    TRL's running-max test), log_sum_sq_probs = log sum_v p_v^2 = logsumexp(2 z) - 2 lse,
    with z the transformed fp32 logits."""
    from ..reference.logprobs import LogitTransform, chunk_rows

    transform = LogitTransform(temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    out = {name: [] for name in names}
    step = chunk_rows(hidden.shape[0], weight.shape[0], hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], step):
            z = transform.apply(torch.nn.functional.linear(hidden[start : start + step], weight, bias).float())
            if "mean_logits" in out:
                out["mean_logits"].append(z.mean(-1))
            if "is_top1" in out:
                out["is_top1"].append(z.argmax(-1) == targets[start : start + step])
            if "log_sum_sq_probs" in out:
                out["log_sum_sq_probs"].append(torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))
    return {name: torch.cat(chunks) for name, chunks in out.items()}


class ChunkedLogProbFunction:
    """TRL 1.16's trl.kernels.ChunkedLogProbFunction, called as TRL's fused LM head calls
    it: apply(hidden [N, H], weight [V, H], bias [V] or None, targets [N], temperature,
    chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=...) ->
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each [N] (float32; is_top1
    bool) or None when not requested. log_probs and entropy come from rk.linear_logprobs,
    differentiable w.r.t. hidden, weight and bias (chunk_size is TRL's tiling knob, not
    needed). The metric statistics DPOTrainer asks for (mean_logits, is_top1,
    log_sum_sq_probs: no gradient) take a second, no-grad pass over row chunks of the
    logits (the kernels do not compute them yet). The projection runs in the autocast
    dtype when autocast is on, as TRL's does."""

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: Optional[float] = None,
        logit_scale: float = 1.0,
        outputs: tuple = _CHUNKED_OUTPUTS,
    ):
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        options = {"temperature": temperature, "softcap": final_logit_softcapping, "logit_scale": logit_scale}
        with torch.autocast(device_type, enabled=False):
            logprobs, entropy = rk.linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, **options)
            extra = [name for name in ("log_sum_sq_probs", "mean_logits", "is_top1") if name in outputs]
            stats = _logit_statistics(
                hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale, extra
            )
        return (
            logprobs,
            entropy if "entropy" in outputs else None,
            stats.get("log_sum_sq_probs"),
            stats.get("mean_logits"),
            stats.get("is_top1"),
        )


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: Optional[int] = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask), over all elements or along axis."""
    return rk.masked_mean(values, mask, dim=axis)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Masked variance around the masked mean; Bessel-corrected when unbiased."""
    if unbiased and mask.sum() == 0:
        raise ValueError(
            "The sum of the mask is zero, which can happen when `mini_batch_size=1`;"
            "try increase the `mini_batch_size` or `gradient_accumulation_steps`"
        )
    centered = values - rk.masked_mean(values, mask)
    variance = rk.masked_mean(centered.square(), mask)
    if unbiased:
        count = mask.sum()
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) * rsqrt(unbiased var + 1e-8) (+ mean when not shift_mean), over mask."""
    return rk.masked_whiten(values, mask, shift_mean=shift_mean, unbiased=True, eps=1e-8, fill_masked=False)


DROP_INS = {
    # the fused LM head of DPOTrainer / GRPOTrainer (trl.trainer.utils imports it under this name)
    "_ChunkedLogProbFunction": ChunkedLogProbFunction,
    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
    "selective_log_softmax": selective_log_softmax,
    "entropy_from_logits": entropy_from_logits,
    "masked_mean": masked_mean,
    "masked_var": masked_var,
    "masked_whiten": masked_whiten,
}
_patched: list[tuple[object, str, object]] = []


def _trl_modules():
    import importlib

    importlib.import_module("trl.trainer.utils")  # the home of the log-prob helpers
    return [
        module for name, module in list(sys.modules.items()) if module and (name == "trl" or name.startswith("trl."))
    ]


def _supported() -> bool:
    """Whether the installed TRL is one these drop-ins follow; warns if not."""
    return supported_version("trl", "trl", SUPPORTED_VERSIONS) is not None


def _patch_grpo_loss() -> None:
    """GRPOTrainer._compute_loss -> trl_grpo.compute_loss (a subclass that overrides it,
    such as trl.experimental's GMPOTrainer, keeps its own)."""
    try:
        from trl.trainer.grpo_trainer import GRPOTrainer
    except ImportError as error:  # a dependency of GRPOTrainer is missing: nothing to patch
        warnings.warn(f"rlhf_kernels.integrations.trl.patch(): GRPOTrainer not patched ({error})", stacklevel=3)
        return
    theirs = GRPOTrainer.__dict__.get("_compute_loss")
    if getattr(theirs, "__module__", None) != "trl.trainer.grpo_trainer":
        return  # already replaced by someone else: leave it
    trl_grpo.TRL_COMPUTE_LOSS = theirs
    GRPOTrainer._compute_loss = trl_grpo.compute_loss
    _patched.append((GRPOTrainer, "_compute_loss", theirs))


def patch() -> int:
    """Replaces TRL's functions of DROP_INS's names in every loaded trl module that holds
    them (the defining module and every `from ... import name`) and GRPOTrainer's
    _compute_loss (by trl_grpo.compute_loss); returns how many attributes were replaced.
    Modules imported later see the patched trl.trainer.utils. With a TRL version other
    than SUPPORTED_VERSIONS it warns and patches nothing."""
    if _patched or not _supported():
        return 0
    _patch_grpo_loss()
    for module in _trl_modules():
        for name, ours in DROP_INS.items():
            theirs = getattr(module, name, None)
            if callable(theirs) and getattr(theirs, "__module__", "").startswith("trl"):
                setattr(module, name, ours)
                _patched.append((module, name, theirs))
    return len(_patched)


def unpatch() -> None:
    """Restores every attribute patch() replaced, and TRL's function wherever a trl
    module imported ours while patched."""
    originals = {}
    while _patched:
        module, name, theirs = _patched.pop()
        setattr(module, name, theirs)
        originals[name] = theirs
    for module in _trl_modules():
        for name, ours in DROP_INS.items():
            if getattr(module, name, None) is ours and name in originals:
                setattr(module, name, originals[name])


@contextlib.contextmanager
def patched():
    """with patched(): TRL runs on rlhf_kernels inside the block."""
    patch()
    try:
        yield
    finally:
        unpatch()
