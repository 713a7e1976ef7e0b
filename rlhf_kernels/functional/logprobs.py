"""token_logprobs, linear_logprobs (fused lm_head) and sequence_logprobs: validate, pick a backend, run."""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

from .. import _batch_invariance, reference
from .. import _validation as check
from .. import backend as _backend
from .. import vocab_parallel as _vocab_parallel
from ..ops import logprobs as _logprobs_ops
from ._common import Tensor, _pick


def _logit_options(temperature, ignore_index, return_entropy, softcap, logit_scale) -> None:
    check.positive("temperature", temperature)
    check.optional_positive("softcap", softcap)
    check.number("logit_scale", logit_scale)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {return_entropy!r}")


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    inplace_backward: bool = False,
    process_group=None,
    vocab_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Per-token log p(label) (and entropy) under softmax(z), never a [..., V] fp32 copy at once.

    z = softcap * tanh(logit_scale * logits / softcap) / temperature (softcap set),
    else logit_scale * logits / temperature.
    logprobs = z[label] - logsumexp(z); entropy = logsumexp(z) - sum softmax(z) * z.

    Args:
        logits: [..., V] float16/bfloat16/float32/float64.
        labels: [...] int32/int64 in [0, V) or == ignore_index (those positions give 0
            and zero gradient, for entropy too).
        inplace_backward: opt-in; the backward writes d logits over the logits tensor
            (no second [..., V] buffer: half the backward's memory at V = 128k). The
            logits are garbage afterwards; meant for logits a model produced (not a
            leaf you keep), contiguous (otherwise a copy is what gets overwritten).
        process_group: a torch.distributed group over which the vocabulary is sharded:
            logits is this rank's contiguous shard [..., V_r] (rank order, sizes may
            differ), labels are global indices, the same on every rank. Results equal
            the unsharded op; d logits is this rank's shard. rlhf_kernels/vocab_parallel.py
            (the contract and the collectives: 2 all_gathers forward, none backward).
        vocab_size: the true global V when the (last) shards are padded: padded columns
            never enter the softmax and get gradient 0. Also without a group.
    Returns:
        logprobs [...] float32 (float64 for float64 logits), and entropy [...] when
        return_entropy. Differentiable w.r.t. logits (gradient in the logits dtype).
    Precision: fp32 accumulation; the label logit is read exactly.
    Batch invariance: always, no mode needed: each row is its own reduction on every
    backend, so a row's log-prob, entropy and d logits are bitwise the same whatever
    batch, position, padding rows or packing ([N, V] packed rows) it comes with, in
    every dtype (docs/DESIGN.md, "Batch invariance").
    """
    if process_group is not None or vocab_size is not None:
        return _vocab_parallel.token_logprobs(
            logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
            softcap=softcap, logit_scale=logit_scale, inplace_backward=inplace_backward,
            process_group=process_group, vocab_size=vocab_size, backend=backend,
        )  # fmt: skip
    check.tensor("logits", logits, min_ndim=1, shape_doc="[..., V]")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V >= 1, got {tuple(logits.shape)}")
    check.tensor("labels", labels, dtypes=check.INDEX_DTYPES, shape_doc="[...]")
    check.shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    check.same_device(logits=logits, labels=labels)
    _logit_options(temperature, ignore_index, return_entropy, softcap, logit_scale)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    check.labels_in_range(labels, logits.shape[-1], ignore_index, op="token_logprobs")
    implementation = _pick(
        "token_logprobs", logits.device, backend, reference.token_logprobs, _logprobs_ops.token_logprobs
    )
    return implementation(
        logits,
        labels,
        temperature=temperature,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        softcap=softcap,
        logit_scale=logit_scale,
        inplace_backward=inplace_backward,
    )


def _check_linear(hidden, weight, bias) -> None:
    check.tensor("hidden", hidden, min_ndim=1, shape_doc="[..., H]")
    check.tensor("weight", weight, ndim=2, shape_doc="[V, H]")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with V >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None:
        check.tensor("bias", bias, dtypes=(hidden.dtype,), ndim=1, shape_doc="[V]")
        check.shape("bias", bias, weight.shape[:1], "[V]")


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    batch_invariant: Optional[bool] = None,
    process_group=None,
    vocab_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """token_logprobs(hidden @ weight.T + bias, labels, ...) without materializing the logits.

    Args:
        hidden: [..., H] float16/bfloat16/float32/float64.
        weight: [V, H] (lm_head.weight), hidden's dtype.  bias: [V] or None.
        labels: [...] = hidden.shape[:-1], int32/int64.
    Returns:
        logprobs [...] (and entropy [...]) as token_logprobs. Differentiable w.r.t.
        hidden, weight and bias for any upstream gradient: the backward recomputes
        the logits tile by tile; d weight and d bias accumulate in fp32.
    Precision: logits computed in the input dtype (as the unfused model does), then
    everything in fp32.
    Batch invariance: with batch_invariant=True (None: the rlhf_kernels.batch_invariant()
    setting, off by default) a row's log-prob, entropy and d hidden are bitwise the same
    whatever batch, position, padding rows or packing it comes with (1 row alone or in a
    batch of any N), on the cpu and triton backends and the reference, in every dtype;
    d weight and d bias are sums over the batch and are not. Without the mode the GEMM's
    blocking follows N (about 1e-6 apart). docs/DESIGN.md, "Batch invariance"; its cost
    is in bench/.
    Vocab parallel: with process_group, weight [V_r, H] and bias [V_r] are this rank's
    contiguous vocabulary shard (a column-parallel lm_head), hidden and labels (global
    indices) the same on every rank; d weight / d bias are the shard's, d hidden is
    summed over the ranks. vocab_size: the true V when the shards are padded (as
    token_logprobs). rlhf_kernels/vocab_parallel.py: 2 all_gathers forward, 1 all_reduce
    (d hidden) backward.
    """
    if process_group is not None or vocab_size is not None:
        return _vocab_parallel.linear_logprobs(
            hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, softcap=softcap, logit_scale=logit_scale,
            batch_invariant=batch_invariant, process_group=process_group, vocab_size=vocab_size, backend=backend,
        )  # fmt: skip
    _check_linear(hidden, weight, bias)
    check.tensor("labels", labels, dtypes=check.INDEX_DTYPES, shape_doc="[...]")
    check.shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")
    check.same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    _logit_options(temperature, ignore_index, return_entropy, softcap, logit_scale)
    check.labels_in_range(labels, weight.shape[0], ignore_index, op="linear_logprobs")
    implementation = _pick(
        "linear_logprobs", hidden.device, backend, reference.linear_logprobs, _logprobs_ops.linear_logprobs, gemm=True
    )
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        # A select, not a skip: an ignored row still enters d weight = d logits^T hidden,
        # where its zero d logits times a NaN / inf hidden (padding) would be NaN.
        hidden = hidden.masked_fill((labels == ignore_index).unsqueeze(-1), 0)
    return implementation(
        hidden,
        weight,
        labels,
        bias=bias,
        temperature=temperature,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        softcap=softcap,
        logit_scale=logit_scale,
        batch_invariant=_batch_invariance.enabled(batch_invariant),
    )


def _linear_logprobs_on(backend_name: str, batch_invariant: Optional[bool] = None):
    """linear_logprobs bound to a resolved backend and a batch_invariant argument, for
    the sequence-level ops."""
    return lambda *args, **kwargs: linear_logprobs(
        *args, **kwargs, batch_invariant=batch_invariant, backend=backend_name
    )


def _in_mode(batch_invariant: Optional[bool]):
    """The batch-invariant setting for a call that takes no batch_invariant= itself (the
    vocab-parallel routes): an explicit argument becomes the setting inside the block."""
    if batch_invariant is None:
        return contextlib.nullcontext()
    return _batch_invariance.batch_invariant(batch_invariant)


def _check_sequences(hidden, weight, labels, mask) -> None:
    check.tensor("hidden", hidden, ndim=3, shape_doc="[B, T, H]")
    _check_linear(hidden, weight, None)
    check.tensor("labels", labels, dtypes=check.INDEX_DTYPES, ndim=2, shape_doc="[B, T]")
    check.shape("labels", labels, hidden.shape[:2], "[B, T]")
    check.tensor("mask", mask, dtypes=check.MASK_DTYPES, shape_doc="[B, T]")
    check.same_shape("labels", labels, mask=mask)
    check.same_device(hidden=hidden, weight=weight, labels=labels, mask=mask)


def sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    mask: Tensor,
    *,
    average: bool = False,
    temperature: float = 1.0,
    batch_invariant: Optional[bool] = None,
    process_group=None,
    vocab_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Per-sequence sum (average=True: mean) of log p(label) over positions with mask != 0.

    Args: hidden [B, T, H], weight [V, H], labels [B, T] int, mask [B, T] (bool/int/float).
    Labels at mask-0 positions are not read (any value is fine there).
    Returns: [B] float32. A sequence with no valid position gives 0.
    Never materializes the [B, T, V] logits (it runs on linear_logprobs).
    Batch invariance: batch_invariant as linear_logprobs (None: the
    rlhf_kernels.batch_invariant() setting). In the mode a sequence's sum (or mean) and
    its d hidden are bitwise the same alone, among any other sequences, in any order or
    next to all-masked padding sequences (which give exactly 0), on every backend and
    dtype; a longer T of masked positions keeps each token bitwise but regroups the sum
    over T (within (T + pad) ulps). docs/DESIGN.md, "Batch invariance".
    process_group / vocab_size: weight is this rank's vocabulary shard, as linear_logprobs.
    """
    if process_group is not None or vocab_size is not None:
        with _in_mode(batch_invariant):
            return _vocab_parallel.sequence_logprobs(
                hidden, weight, labels, mask, average=average, temperature=temperature,
                process_group=process_group, vocab_size=vocab_size, backend=backend,
            )  # fmt: skip
    _check_sequences(hidden, weight, labels, mask)
    check.positive("temperature", temperature)
    check.labels_in_range(labels, weight.shape[0], ignore_index=-100, mask=mask, op="sequence_logprobs")
    resolved = _backend.resolve("sequence_logprobs", hidden.device, backend)
    return reference.sequence_logprobs(
        hidden,
        weight,
        labels,
        mask,
        average=average,
        temperature=temperature,
        linear_logprobs=_linear_logprobs_on(resolved, batch_invariant),
    )
