"""linear_policy_loss on a compiled token kernel with its gradient finished in the forward.

With the aggregation's divisors fixed for the whole batch (global_tokens: its valid
tokens, num_sequences: its rows with a valid token, horizon: T, the defaults policy_loss
computes), a row's loss term reads only that row, so chunks of whole rows finish their
gradient while their logits are in memory (ops/fused_linear.py): three GEMMs instead of
linear_logprobs' four. The loss and statistics are then policy_loss on the whole batch's
log-probs and entropy (no grad): the unfused route's, bit for bit. Used when autograd
will want the gradient, in eager mode, without a bias, for the options whose terms are
per row: not clip_cov / kl_cov (they rank the whole batch) nor geo_mean (its gradient
differed in chunks of one row: tests/test_linear_policy_fused.py), entropy_coef (its gradient
would need the entropy's), top_entropy_quantile (a batch quantile),
rollout_batch_normalize (a batch mean), rollout_rejection and
rollout_correction_from="current" (they change the mask the divisors count).
"""

from __future__ import annotations

import torch

from ..reference.logprobs import chunk_rows
from .fused_linear import grouped_loss

_BATCH_COUPLED_LOSSES = ("clip_cov", "kl_cov", "geo_mean")
# policy_loss options that make a row's term depend on other rows (or on the mask the
# divisors count), with the value that leaves them off.
_BATCH_COUPLED_OPTIONS = {
    "top_entropy_quantile": None,
    "rollout_batch_normalize": False,
    "rollout_rejection": None,
    "rollout_correction_from": "old",
    "generator": None,
}
# The [B, T] (or [B]) tensors of policy_loss, sliced per chunk of rows.
_ROW_TENSORS = ("old_logprobs", "advantages", "mask", "ref_logprobs", "is_weights", "rollout_logprobs")


def applies(hidden, weight, bias, loss_type: str, entropy_coef: float, options: dict) -> bool:
    """Whether linear_policy_loss takes this route (see the module docstring)."""
    return (
        torch.is_grad_enabled()
        and (hidden.requires_grad or weight.requires_grad)
        and bias is None
        and not torch.compiler.is_compiling()
        and loss_type not in _BATCH_COUPLED_LOSSES
        and entropy_coef == 0.0
        and all(options.get(name, off) == off for name, off in _BATCH_COUPLED_OPTIONS.items())
    )


def linear_policy_loss(
    hidden, weight, tokens, *, kernel, temperature, batch_invariant, policy_loss, recompute, **inputs
):
    """hidden [B, T, H] (0 at mask-0 positions), weight [V, H], tokens [B, T] (-100 at
    mask-0 positions); inputs: policy_loss's tensors (old_logprobs, advantages, mask, ...)
    and options; policy_loss(logprobs, entropy=..., **inputs) is the bound policy_loss of
    the resolved backend; recompute(hidden, weight) the unfused route's loss (double
    backward). Returns (loss, stats) as linear_policy_loss."""
    B, T, _ = hidden.shape
    weights = inputs["mask"].to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    counts = weights.sum(-1)
    divisors = dict(
        global_tokens=float(counts.sum()) if inputs.get("global_tokens") is None else inputs["global_tokens"],
        num_sequences=float((counts > 0).sum()) if inputs.get("num_sequences") is None else inputs["num_sequences"],
    )
    rows_per_chunk = max(1, chunk_rows(B * T, weight.shape[0], hidden.device) // max(T, 1))
    chunks = [torch.arange(start, min(start + rows_per_chunk, B)) for start in range(0, B, rows_per_chunk)]
    logprobs, entropy = [], []

    def chunk_loss(i: int, chunk_logprobs: torch.Tensor, chunk_entropy: torch.Tensor) -> torch.Tensor:
        rows = chunks[i]
        per_row = {k: v[rows] if k in _ROW_TENSORS and v is not None else v for k, v in inputs.items()}
        logprobs.append(chunk_logprobs.detach())
        entropy.append(chunk_entropy)
        return policy_loss(chunk_logprobs, **{**per_row, **divisors})[0]

    stats = {}

    def batch_loss() -> torch.Tensor:
        empty = hidden.new_empty(0, T, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        loss, batch_stats = policy_loss(
            torch.cat(logprobs) if chunks else empty, entropy=torch.cat(entropy) if chunks else empty, **inputs
        )
        stats.update(batch_stats)
        return loss

    loss = grouped_loss(
        hidden, weight, tokens, chunks, chunk_loss, recompute, kernel=kernel, temperature=temperature,
        batch_invariant=batch_invariant, return_entropy=True, batch_loss=batch_loss,
    )  # fmt: skip
    return loss, stats
