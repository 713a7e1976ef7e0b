"""TRL drop-ins (TRL 1.16 signatures and semantics) and patch() for unchanged TRL code.

    from rlhf_kernels.integrations import trl as rk_trl
    rk_trl.patch()            # every trl module that imported these names now calls ours
    ...                       # an unchanged TRL trainer / loss
    rk_trl.unpatch()          # or: with rk_trl.patched(): ...

selective_log_softmax and entropy_from_logits are TRL 1.16's (trl.trainer.utils).
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
from typing import Optional

import torch

import rlhf_kernels as rk


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


def patch() -> int:
    """Replaces TRL's functions of DROP_INS's names in every loaded trl module that holds
    them (the defining module and every `from ... import name`); returns how many
    attributes were replaced. Modules imported later see the patched trl.trainer.utils."""
    if _patched:
        return 0
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
