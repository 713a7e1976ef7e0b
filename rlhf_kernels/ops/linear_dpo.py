"""linear_dpo_loss on a compiled token kernel with its gradient finished in the forward.

A pair's loss term reads only its own two sequences, so chunks of whole pairs finish
their gradient while their logits are in memory (ops/fused_linear.py): three GEMMs per
chunk instead of linear_logprobs' four. Used when autograd will want the gradient, in
eager mode, for the loss types that are per pair (reference.dpo.PAIR_LOSS_TYPES); the
batch-coupled ones (aot, aot_unpaired, sft) take the unfused route. Same results as
reference.linear_dpo_loss on the same kernel, up to the order of the sum over pairs.
"""

from __future__ import annotations

import torch

from ..reference import dpo as _reference
from ..reference.logprobs import chunk_rows, compute_dtype
from .fused_linear import grouped_loss, pair_chunks


def applies(loss_types, hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear_dpo_loss takes this route: a backward will follow, in eager mode,
    and every loss type is per pair."""
    return (
        torch.is_grad_enabled()
        and (hidden.requires_grad or weight.requires_grad)
        and not torch.compiler.is_compiling()
        and not set(loss_types) & set(_reference.BATCH_LOSS_TYPES)
    )


def linear_dpo_loss(
    hidden, weight, labels, mask, *, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, average,
    temperature, dtype, kernel, batch_invariant, linear_logprobs, pair_loss, **loss_options,
):  # fmt: skip
    """reference.linear_dpo_loss's arguments and results; `kernel` is the token kernel
    ("cpu" or "triton"), linear_logprobs the no-grad reference pass's implementation."""
    n_pairs, T = hidden.shape[0] // 2, hidden.shape[1]
    ignore_index = -100
    keep = mask != 0
    ref_chosen_logps, ref_rejected_logps = _reference.reference_logps(
        ref_chosen_logps, ref_rejected_logps, ref_hidden, weight if ref_weight is None else ref_weight, labels, mask,
        like=hidden.new_empty(2 * n_pairs, dtype=compute_dtype(hidden.dtype)), average=average,
        temperature=temperature, linear_logprobs=linear_logprobs,
    )  # fmt: skip
    if not average:
        loss_options.update(_reference.completion_lengths(mask))
    counts = keep.sum(-1).to(compute_dtype(hidden.dtype)).clamp(min=1)
    pairs_per_chunk = max(1, chunk_rows(2 * n_pairs * T, weight.shape[0], hidden.device) // max(2 * T, 1))
    outputs = []  # per chunk: chosen and rejected sequence log-probs, chosen and rejected rewards [n]

    def chunk_loss(i: int, logprobs: torch.Tensor, _entropy) -> torch.Tensor:
        n = logprobs.shape[0] // 2
        pairs = slice(i * pairs_per_chunk, i * pairs_per_chunk + n)
        sequence = logprobs.sum(-1)
        if average:
            sequence = sequence / torch.cat([counts[pairs], counts[n_pairs:][pairs]])
        per_pair = {k: v[pairs] if isinstance(v, torch.Tensor) else v for k, v in loss_options.items()}
        losses, chosen_rewards, rejected_rewards = pair_loss(
            sequence[:n], sequence[n:], ref_chosen_logps[pairs], ref_rejected_logps[pairs], dtype=dtype, **per_pair
        )
        outputs.append((sequence[:n], sequence[n:], chosen_rewards, rejected_rewards))
        return losses.sum() / n_pairs

    def recompute(hidden, weight):  # the unfused route, for a double backward
        return _reference.linear_dpo_loss(
            hidden, weight, labels, mask, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
            average=average, temperature=temperature, dtype=dtype, linear_logprobs=linear_logprobs,
            pair_loss=pair_loss, **{k: v for k, v in loss_options.items() if not k.endswith("_lengths")},
        )[0]  # fmt: skip

    chunks = pair_chunks(n_pairs, pairs_per_chunk, hidden.device)
    loss = grouped_loss(
        hidden, weight, torch.where(keep, labels, ignore_index), chunks, chunk_loss, recompute, kernel=kernel,
        temperature=temperature, ignore_index=ignore_index, batch_invariant=batch_invariant,
    )  # fmt: skip
    if not outputs:  # no pairs
        empty = hidden.new_empty(0, dtype=dtype)
        return loss.to(dtype), _reference.pair_metrics(empty, empty, empty, empty, dtype)
    chosen_logps, rejected_logps, chosen_rewards, rejected_rewards = (
        torch.cat(parts).detach() for parts in zip(*outputs)
    )
    return loss.to(dtype), _reference.pair_metrics(
        chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, dtype
    )
