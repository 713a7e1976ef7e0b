"""The public API: typed functions that validate, pick a backend and run it.

Every function takes ``backend=None`` last (see rlhf_kernels.backend for how
None resolves). Outputs are float32, or float64 when an input is float64;
internal accumulation is float32 (float64 for float64 inputs) whatever the
input dtype. Shapes: B sequences, T positions, V vocabulary, H hidden size.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Union

import torch

from . import _batch_invariance
from . import _validation as check
from . import backend as _backend
from . import reference
from . import vocab_parallel as _vocab_parallel
from .ops import dpo as _dpo_ops
from .ops import gae as _gae_ops
from .ops import kl as _kl_ops
from .ops import logprobs as _logprobs_ops
from .ops import masked as _masked_ops
from .ops import ppo as _ppo_ops
from .ops import rm as _rm_ops
from .reference.dpo import LOSS_TYPES
from .reference.gae import MASK_MODES
from .reference.kl import ESTIMATORS
from .reference.ppo import AGG_MODES

Tensor = torch.Tensor


def _logit_options(temperature, ignore_index, return_entropy, softcap, logit_scale) -> None:
    check.positive("temperature", temperature)
    check.optional_positive("softcap", softcap)
    check.number("logit_scale", logit_scale)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {return_entropy!r}")


def _pick(op: str, device: torch.device, backend: Optional[str], reference_fn, compiled_fn):
    """The implementation `backend` resolves to: reference_fn, or compiled_fn bound to the
    kernel ("cpu" / "triton") that runs it."""
    resolved = _backend.resolve(op, device, backend)
    return reference_fn if resolved == "reference" else partial(compiled_fn, kernel=resolved)


def _check_token_grid(mask: Optional[Tensor], **tensors: Tensor) -> None:
    """Float [B, T] tensors of one shape and device, and a [B, T] mask (None allowed)."""
    for name, x in tensors.items():
        check.tensor(name, x, ndim=2, shape_doc="[B, T]")
    check.optional_tensor("mask", mask, dtypes=check.MASK_DTYPES, ndim=2, shape_doc="[B, T]")
    (first_name, first), *_ = tensors.items()
    check.same_shape(first_name, first, mask=mask, **tensors)
    check.same_device(**tensors, mask=mask)


# ----------------------------------------------------------------- logprobs --


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
    check.labels_in_range(labels, logits.shape[-1], ignore_index)
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
    whatever batch, position or padding it comes with, on the cpu and triton backends
    and the reference (docs/DESIGN.md, "Batch invariance"; its cost is in bench/).
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
    check.labels_in_range(labels, weight.shape[0], ignore_index)
    implementation = _pick(
        "linear_logprobs", hidden.device, backend, reference.linear_logprobs, _logprobs_ops.linear_logprobs
    )
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


def _linear_logprobs_on(backend_name: str):
    """linear_logprobs bound to a resolved backend, for the sequence-level ops."""
    return lambda *args, **kwargs: linear_logprobs(*args, **kwargs, backend=backend_name)


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
    process_group=None,
    vocab_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Per-sequence sum (average=True: mean) of log p(label) over positions with mask != 0.

    Args: hidden [B, T, H], weight [V, H], labels [B, T] int, mask [B, T] (bool/int/float).
    Labels at mask-0 positions are not read (any value is fine there).
    Returns: [B] float32. A sequence with no valid position gives 0.
    Never materializes the [B, T, V] logits (it runs on linear_logprobs).
    process_group / vocab_size: weight is this rank's vocabulary shard, as linear_logprobs.
    """
    if process_group is not None or vocab_size is not None:
        return _vocab_parallel.sequence_logprobs(
            hidden, weight, labels, mask, average=average, temperature=temperature,
            process_group=process_group, vocab_size=vocab_size, backend=backend,
        )  # fmt: skip
    _check_sequences(hidden, weight, labels, mask)
    check.positive("temperature", temperature)
    check.labels_in_range(labels, weight.shape[0], ignore_index=-100, mask=mask)
    resolved = _backend.resolve("sequence_logprobs", hidden.device, backend)
    return reference.sequence_logprobs(
        hidden,
        weight,
        labels,
        mask,
        average=average,
        temperature=temperature,
        linear_logprobs=_linear_logprobs_on(resolved),
    )


# ----------------------------------------------------------------------- kl --


def kl_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    *,
    estimator: str = "k1",
    clamp: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Per-token KL estimate from the policy and reference log-probs of the sampled tokens.

    With d = logprobs - ref_logprobs: k1 = d; k2 = d^2 / 2; k3 = exp(-d) + d - 1;
    abs = |d|; low_var_kl (verl) = clamp(exp(c) - c - 1, -10, 10) with c = clamp(-d, -20, 20).
    clamp=c then clamps the estimate to [-c, c].

    Args: logprobs and ref_logprobs of one shape [...], float dtypes.
    Returns: [...] float32 (float64 for float64 input), differentiable w.r.t. both inputs.
    """
    check.tensor("logprobs", logprobs)
    check.tensor("ref_logprobs", ref_logprobs)
    check.same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    check.same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    check.choice("estimator", estimator, ESTIMATORS)
    check.optional_positive("clamp", clamp)
    implementation = _pick("kl_penalty", logprobs.device, backend, reference.kl_penalty, _kl_ops.kl_penalty)
    return implementation(
        logprobs,
        ref_logprobs,
        estimator=estimator,
        clamp=clamp,
        dtype=check.result_dtype(logprobs, ref_logprobs),
    )


def kl_shaped_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
    clamp: Optional[float] = None,
    score_index: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards of RLHF-PPO: the KL penalty everywhere, the score at one position.

    kl = kl_penalty(logprobs, ref_logprobs, estimator, clamp) * mask
    rewards = -kl_coef * kl, plus scores[b] added at score_index[b] (default: the
    last position with mask != 0; a row with none gets no score).

    Args: scores [B]; logprobs, ref_logprobs, mask [B, T]; score_index [B] int in [0, T).
    Returns: (rewards [B, T], kl [B, T]), float32; not differentiable (rollout data).
    """
    check.tensor("mask", mask, dtypes=check.MASK_DTYPES, shape_doc="[B, T]")
    _check_token_grid(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    if logprobs.shape[1] == 0:
        raise ValueError(f"logprobs must be [B, T] with T >= 1 (a score needs a position), got {tuple(logprobs.shape)}")
    check.tensor("scores", scores, ndim=1, shape_doc="[B]")
    check.shape("scores", scores, logprobs.shape[:1], "[B]")
    check.optional_tensor("score_index", score_index, dtypes=check.INDEX_DTYPES, ndim=1, shape_doc="[B]")
    if score_index is not None:
        check.shape("score_index", score_index, logprobs.shape[:1], "[B]")
        check.indices_in_range("score_index", score_index, logprobs.shape[1])
    check.same_device(logprobs=logprobs, scores=scores, score_index=score_index)
    check.number("kl_coef", kl_coef)
    check.choice("estimator", estimator, ESTIMATORS)
    check.optional_positive("clamp", clamp)
    implementation = _pick(
        "kl_shaped_rewards", logprobs.device, backend, reference.kl_shaped_rewards, _kl_ops.kl_shaped_rewards
    )
    with torch.no_grad():
        return implementation(
            scores,
            logprobs,
            ref_logprobs,
            mask,
            kl_coef=kl_coef,
            estimator=estimator,
            clamp=clamp,
            score_index=score_index,
            dtype=check.result_dtype(scores, logprobs, ref_logprobs),
        )


# ---------------------------------------------------------------------- gae --


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Optional[Tensor] = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    mask_mode: str = "carry",
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation as one reverse scan per row.

    delta_t = r_t + gamma V_{t+1} - V_t (V_T = 0); A_t = delta_t + gamma lam A_{t+1};
    returns = A + V. mask_mode: "ignore" mask unused (TRL); "multiply" r and V
    multiplied by mask first (OpenRLHF; returns use the masked V); "carry" mask-0
    positions pass V_{t+1} and A_{t+1} through unchanged and report the carried A
    (verl, before its whitening). mask=None means all ones.

    Args: rewards, values, mask [B, T] (mask bool/int/float).
    Returns: (advantages [B, T], returns [B, T]) float32 (float64 for float64 input).
        Not differentiable: inputs are treated as constants.
    Precision: the cpu kernel and the reference run the recursion in float64.
    """
    _check_token_grid(mask, rewards=rewards, values=values)
    check.in_unit_interval("gamma", gamma)
    check.in_unit_interval("lam", lam)
    check.choice("mask_mode", mask_mode, MASK_MODES)
    implementation = _pick("gae", rewards.device, backend, reference.gae, _gae_ops.gae)
    return implementation(
        rewards, values, mask, gamma=gamma, lam=lam, mask_mode=mask_mode, dtype=check.result_dtype(rewards, values)
    )


def discounted_returns(
    rewards: Tensor, mask: Optional[Tensor] = None, *, gamma: float = 1.0, backend: Optional[str] = None
) -> Tensor:
    """G_t = r_t + gamma G_{t+1} (G_T = 0); mask-0 positions are skipped and carry G_{t+1}.

    Computed as gae(rewards, 0, mask, gamma=gamma, lam=1, mask_mode="carry").
    Args: rewards, mask [B, T]. Returns: [B, T] float32 (float64 for float64 input).
    """
    _check_token_grid(mask, rewards=rewards)
    check.in_unit_interval("gamma", gamma)
    advantages, _ = gae(
        rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0, mask_mode="carry", backend=backend
    )
    return advantages


def masked_mean(
    x: Tensor, mask: Tensor, dim: Optional[Union[int, tuple[int, ...]]] = None, *, backend: Optional[str] = None
) -> Tensor:
    """sum(x * mask) / sum(mask), over all elements (dim=None) or along dim.

    Args: x float [...], mask of x's shape (bool/int/float weights).
    Returns: x's dtype; 0 where no element is valid (never NaN). Differentiable w.r.t. x.
    Precision: the cpu kernel sums in float64, triton in fp32 per 16k-element split
    and float64 across splits; 16-bit x is summed as fp32 and the mean rounded to x's dtype.
    """
    check.tensor("x", x)
    check.tensor("mask", mask, dtypes=check.MASK_DTYPES)
    check.same_shape("x", x, mask=mask)
    check.same_device(x=x, mask=mask)
    check.dims("dim", dim, x.dim())
    return _pick("masked_mean", x.device, backend, reference.masked_mean, _masked_ops.masked_mean)(x, mask, dim)


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    fill_masked: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the positions with mask != 0 (one global mean and var).

    var = sum(mask (x - mean)^2) / (count - 1) (unbiased) or / count; a denominator
    <= 0 is replaced by 1, so a single valid element whitens to 0 and an all-masked
    input gives all zeros (never NaN). shift_mean=False adds the mean back.
    Positions with mask 0 are set to 0 (fill_masked=False: whitened like the others,
    as TRL's and verl's masked_whiten return them; an argument beyond the contract).
    Args: x float [...], mask of x's shape. Returns: x's dtype, differentiable w.r.t. x.
    Precision: mean and variance accumulate in float64 (cpu kernel; triton per split
    in fp32, then float64), the elementwise write in fp32 (float64 for float64 x).
    """
    check.tensor("x", x)
    check.tensor("mask", mask, dtypes=check.MASK_DTYPES)
    check.same_shape("x", x, mask=mask)
    check.same_device(x=x, mask=mask)
    check.positive("eps", eps)
    if not isinstance(fill_masked, bool):
        raise TypeError(f"fill_masked must be a bool, got {fill_masked!r}")
    implementation = _pick("masked_whiten", x.device, backend, reference.masked_whiten, _masked_ops.masked_whiten)
    return implementation(x, mask, shift_mean=shift_mean, unbiased=unbiased, eps=eps, fill_masked=fill_masked)


# ---------------------------------------------------------------------- ppo --


def _check_agg(agg: str) -> None:
    check.choice("agg", agg, AGG_MODES)


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    log_ratio_clamp: Optional[float] = None,
    agg: str = "token-mean",
    backend: Optional[str] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss, aggregated over valid tokens, with its statistics.

    ratio = exp(logprobs - old_logprobs) (log-ratio clamped to +-log_ratio_clamp if set);
    l = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high)), clip_high None = clip_low;
    dual_clip c > 1: l = min(l, -A c) where A < 0.
    agg: "token-mean" sum(l m)/sum(m); "seq-mean-token-sum" mean_b sum_t l m;
    "seq-mean-token-mean" mean over sequences with a valid token of their token mean;
    "seq-mean-token-sum-norm" sum_b sum_t l m / T.

    Args: logprobs, old_logprobs, advantages, mask [B, T].
    Returns: (loss [] float32, stats) with 0-dim detached stats clipfrac (share of valid
    tokens where the clipped term is the larger), dual_clipfrac (share bounded by the dual
    clip) and approx_kl (masked mean of (ratio - 1) - log ratio). Differentiable w.r.t.
    logprobs only (old_logprobs and advantages are constants).
    """
    check.tensor("mask", mask, dtypes=check.MASK_DTYPES, shape_doc="[B, T]")
    _check_token_grid(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    check.positive("clip_low", clip_low)
    check.optional_positive("clip_high", clip_high)
    check.optional_positive("log_ratio_clamp", log_ratio_clamp)
    if dual_clip is not None:
        check.number("dual_clip", dual_clip)
        if not dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip!r}")
    _check_agg(agg)
    implementation = _pick(
        "ppo_policy_loss", logprobs.device, backend, reference.ppo_policy_loss, _ppo_ops.ppo_policy_loss
    )
    return implementation(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        log_ratio_clamp=log_ratio_clamp,
        agg=agg,
        dtype=check.result_dtype(logprobs, old_logprobs, advantages),
    )


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: Optional[float] = 0.2,
    agg: str = "token-mean",
    backend: Optional[str] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5 max((v - R)^2, (old + clip(v - old, -clip, clip) - R)^2).

    clip=None: the unclipped 0.5 (v - R)^2. agg as ppo_policy_loss.
    Args: values, old_values, returns, mask [B, T].
    Returns: (loss [] float32, {"vf_clipfrac": share of valid tokens where the clipped
    term is the larger}). Differentiable w.r.t. values only.
    """
    check.tensor("mask", mask, dtypes=check.MASK_DTYPES, shape_doc="[B, T]")
    _check_token_grid(mask, values=values, old_values=old_values, returns=returns)
    check.optional_positive("clip", clip)
    _check_agg(agg)
    implementation = _pick("ppo_value_loss", values.device, backend, reference.ppo_value_loss, _ppo_ops.ppo_value_loss)
    return implementation(
        values,
        old_values,
        returns,
        mask,
        clip=clip,
        agg=agg,
        dtype=check.result_dtype(values, old_values, returns),
    )


# ---------------------------------------------------------------------- dpo --

_DPO = reference.dpo
_LENGTH_DTYPES = check.INDEX_DTYPES + check.FLOAT_DTYPES
_TAIL_NAMES = ("policy_chosen_tail_logps", "policy_rejected_tail_logps", "ref_chosen_tail_logps",
               "ref_rejected_tail_logps")  # fmt: skip


def _check_dpo_options(
    beta, loss_type, label_smoothing, reference_free, cdpo, loss_weights, f_divergence_type, f_alpha_divergence_coef,
    discopop_tau, weights,
) -> list:  # fmt: skip
    """Checks the options of dpo_loss / linear_dpo_loss; returns the loss types as a list."""
    check.positive("beta", beta)
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(types, (list, tuple)) or not types:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} or a non-empty list of them, got {loss_type!r}")
    for name in types:
        check.choice("loss_type", name, LOSS_TYPES)
    if loss_weights is not None:
        if not isinstance(loss_weights, (list, tuple)) or len(loss_weights) != len(types):
            raise ValueError(
                f"loss_weights must be a list of one number per loss_type {list(types)}, got {loss_weights!r}"
            )
        for factor in loss_weights:
            check.number("loss_weights", factor)
    check.number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if "exo_pair" in types and label_smoothing == 0.0:  # log(0): TRL's DPOTrainer raises too
        raise ValueError("label_smoothing must be > 0 for loss_type 'exo_pair' (the EXO paper recommends 1e-3)")
    for name, flag in (("reference_free", reference_free), ("cdpo", cdpo)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if cdpo and "sigmoid" not in types:
        raise ValueError(f"cdpo (cDPO label smoothing) applies to loss_type 'sigmoid', got loss_type {list(types)}")
    check.choice("f_divergence_type", f_divergence_type, _DPO.F_DIVERGENCES)
    if f_divergence_type != "reverse_kl" and not set(types) <= set(_DPO.F_DIVERGENCE_LOSS_TYPES):
        raise ValueError(
            f"f_divergence_type {f_divergence_type!r} applies only to loss types {_DPO.F_DIVERGENCE_LOSS_TYPES} "
            f"(TRL's rule), got loss_type {list(types)}"
        )
    check.number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    check.positive("discopop_tau", discopop_tau)
    if weights is not None and {"aot", "aot_unpaired"} & set(types):
        raise ValueError("weights (WPO) cannot be used with loss_type 'aot' or 'aot_unpaired': they sort the pairs")
    return list(types)


def _dpo_dtypes(types, logps, chosen_lengths):
    """The dtypes TRL 1.16 returns: losses and rewards in the log-probs' promoted dtype,
    except that ipo (with lengths) and sigmoid_norm divide by lengths.clamp(min=1.0),
    which is float32 (torch's default dtype) for integer lengths."""
    dtype = logps[0].dtype
    for x in logps[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    loss_dtype = dtype
    if chosen_lengths is not None and set(types) & set(_DPO.NORMALISED):
        lengths = chosen_lengths.dtype if chosen_lengths.is_floating_point() else torch.get_default_dtype()
        loss_dtype = torch.promote_types(dtype, lengths)
    return loss_dtype, dtype


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: Union[str, list[str]] = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    cdpo: bool = False,
    loss_weights: Optional[list[float]] = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    ld_alpha: Optional[float] = None,
    policy_chosen_tail_logps: Optional[Tensor] = None,
    policy_rejected_tail_logps: Optional[Tensor] = None,
    ref_chosen_tail_logps: Optional[Tensor] = None,
    ref_rejected_tail_logps: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    discopop_tau: float = 0.05,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The DPO loss family on sequence log-probs: TRL 1.16 DPOTrainer's formulas.

    With rho = pi - ref and z = beta (s_c - s_r) on the f-divergence scores s of rho:
    sigmoid -logsigmoid(z) (cdpo=True: cDPO's -(1 - ls) logsigmoid(z) - ls logsigmoid(-z));
    hinge; ipo (s_c / n_c - s_r / n_r - 1/(2 beta))^2, per token when lengths are given
    (TRL), on the scores as given otherwise; exo_pair; robust; discopop; sigmoid_norm;
    nca_pair; bco_pair; sppo_hard; apo_zero; apo_down; aot and aot_unpaired (sorted across
    the batch); sft (the chosen tokens' mean NLL). Every formula: rlhf_kernels/reference/dpo.py.

    Args: four [B] float tensors of sequence log-probs summed over the completion tokens.
      loss_type: a name or a list of names summed with loss_weights (default 1 each), TRL's
        multi-loss (MPO); the mean of the result is TRL's loss.
      label_smoothing: robust's flip rate, exo_pair's epsilon (> 0), aot's; sigmoid's only
        with cdpo=True (TRL 1.16 has no smoothing there).
      f_divergence_type / f_alpha_divergence_coef: TRL's f-DPO scores (reverse_kl,
        forward_kl, js_divergence, alpha_divergence), for the loss types TRL allows.
      chosen_lengths, rejected_lengths [B] int or float: completion token counts (TRL:
        completion_mask.sum(1)); used by ipo (optional), sigmoid_norm and sft (required).
      ld_alpha with the four *_tail_logps [B]: LD-DPO. TRL splits each response's tokens at
        the shorter response's length; the tails are the sums past it (the main log-probs
        stay full sums) and each log-prob becomes full - (1 - ld_alpha) tail.
      weights [B]: WPO's per-pair weights (TRL use_weighting: exp(mean over the chosen tokens
        of logp - log sum p^2) times the same for the rejected one), detached.
      reference_free: ref dropped from the scores (nca_pair, bco_pair, sppo_hard, aot keep it).
    Per-pair formulas run in one kernel pass on the cpu / triton backends; aot, aot_unpaired
    and sft couple the pairs and run as torch code on every backend.
    Returns: (losses [B], chosen_rewards [B], rejected_rewards [B]) in the dtype TRL returns
    for these inputs (the log-probs' promoted float dtype; float32 at least for ipo and
    sigmoid_norm with integer lengths), computed in float32 (float64 for float64); rewards
    beta rho, detached. Differentiable w.r.t. the policy log-probs (and policy tails).
    """
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    for name, x in zip(names, tensors):
        check.tensor(name, x, ndim=1, shape_doc="[B]")
    if ld_alpha is not None:
        check.in_unit_interval("ld_alpha", ld_alpha)
    tails = (policy_chosen_tail_logps, policy_rejected_tail_logps, ref_chosen_tail_logps, ref_rejected_tail_logps)
    for name, x in zip(_TAIL_NAMES, tails):
        check.optional_tensor(name, x, ndim=1, shape_doc="[B]")
        if ld_alpha is None and x is not None:
            raise ValueError(f"{name} is only used with ld_alpha (LD-DPO), which is None")
        if ld_alpha is not None and x is None:
            raise ValueError(f"ld_alpha (LD-DPO) needs {name}: the sum past the shared length")
    for name, x in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        check.optional_tensor(name, x, dtypes=_LENGTH_DTYPES, ndim=1, shape_doc="[B]")
    check.optional_tensor("weights", weights, ndim=1, shape_doc="[B]")
    extras = dict(zip(_TAIL_NAMES, tails), chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    check.same_shape(names[0], tensors[0], **dict(zip(names[1:], tensors[1:])), **extras, weights=weights)
    check.same_device(**dict(zip(names, tensors)), **extras, weights=weights)
    types = _check_dpo_options(
        beta, loss_type, label_smoothing, reference_free, cdpo, loss_weights, f_divergence_type,
        f_alpha_divergence_coef, discopop_tau, weights,
    )  # fmt: skip
    for name, x, needed_by in (
        ("chosen_lengths", chosen_lengths, _DPO.NEEDS_CHOSEN_LENGTHS),
        ("rejected_lengths", rejected_lengths, _DPO.NEEDS_REJECTED_LENGTHS),
    ):
        if x is None and set(types) & set(needed_by):
            raise ValueError(f"loss_type {sorted(set(types) & set(needed_by))} needs {name} (completion token counts)")
    if "ipo" in types and (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("chosen_lengths and rejected_lengths must be given together for ipo")
    present = tensors + (tails if ld_alpha is not None else ())
    loss_dtype, reward_dtype = _dpo_dtypes(types, present, chosen_lengths)
    implementation = _pick("dpo_loss", policy_chosen_logps.device, backend, reference.dpo_loss, _dpo_ops.dpo_loss)
    losses, chosen_rewards, rejected_rewards = implementation(
        *tensors,
        beta=beta,
        loss_type=types,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        cdpo=cdpo,
        loss_weights=loss_weights,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        ld_alpha=ld_alpha,
        tail_logps=tails if ld_alpha is not None else None,
        weights=weights,
        discopop_tau=discopop_tau,
        dtype=check.result_dtype(*present),
    )
    return losses.to(loss_dtype), chosen_rewards.to(reward_dtype), rejected_rewards.to(reward_dtype)


def linear_dpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    mask: Tensor,
    *,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    ref_hidden: Optional[Tensor] = None,
    ref_weight: Optional[Tensor] = None,
    beta: float = 0.1,
    loss_type: Union[str, list[str]] = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    average: Optional[bool] = None,
    temperature: float = 1.0,
    cdpo: bool = False,
    loss_weights: Optional[list[float]] = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    weights: Optional[Tensor] = None,
    discopop_tau: float = 0.05,
    process_group=None,
    vocab_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO from final hidden states, never materializing the [2B, T, V] logits.

    Rows [:B] of hidden/labels/mask are the chosen responses, rows [B:] the rejected
    ones (TRL's and Liger's layout). Sequence log-probs come from sequence_logprobs.
    average=False: sums over the mask, with the mask's row sums as the completion lengths
    of dpo_loss (TRL 1.16 exactly, ipo and sigmoid_norm length-normalised in the loss);
    average=True: per-token means, no lengths (not for sigmoid_norm or sft). average=None
    is True for loss_type "ipo" alone (the same ipo loss as TRL's, with per-token rewards)
    and False otherwise. The reference log-probs are given (ref_chosen_logps,
    ref_rejected_logps [B], summed or averaged like the policy's) or computed without grad
    from ref_hidden [2B, T, H] and ref_weight (default: weight), or omitted with
    reference_free=True. The loss options are dpo_loss's (ld_alpha is not offered here).

    Returns: (mean loss [] float32, metrics) with detached 0-dim chosen_rewards,
    rejected_rewards, reward_margin, reward_accuracy, chosen_logps, rejected_logps
    (batch means). Differentiable w.r.t. hidden and weight.
    process_group / vocab_size: weight (and ref_weight) is this rank's vocabulary shard, as
    linear_logprobs; the loss and metrics are the same on every rank.
    """
    options = dict(
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, ref_hidden=ref_hidden,
        ref_weight=ref_weight, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        reference_free=reference_free, average=average, temperature=temperature, cdpo=cdpo,
        loss_weights=loss_weights, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, weights=weights, discopop_tau=discopop_tau,
    )  # fmt: skip
    if process_group is not None or vocab_size is not None:
        return _vocab_parallel.linear_dpo_loss(
            hidden, weight, labels, mask, process_group=process_group, vocab_size=vocab_size, backend=backend, **options
        )
    types, average = _check_linear_dpo(hidden, weight, labels, mask, **options)
    check.labels_in_range(labels, weight.shape[0], ignore_index=-100, mask=mask)
    resolved = _backend.resolve("linear_dpo_loss", hidden.device, backend)
    return reference.linear_dpo_loss(
        hidden,
        weight,
        labels,
        mask,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        average=average,
        temperature=temperature,
        dtype=check.result_dtype(hidden),
        linear_logprobs=_linear_logprobs_on(resolved),
        pair_loss=_pick("dpo_loss", hidden.device, resolved, reference.dpo_loss, _dpo_ops.dpo_loss),
        beta=beta,
        loss_type=types,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        cdpo=cdpo,
        loss_weights=loss_weights,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        weights=weights,
        discopop_tau=discopop_tau,
    )


def _check_linear_dpo(
    hidden, weight, labels, mask, *, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, beta,
    loss_type, label_smoothing, reference_free, average, temperature, cdpo, loss_weights, f_divergence_type,
    f_alpha_divergence_coef, weights, discopop_tau,
) -> tuple[list[str], bool]:  # fmt: skip
    """linear_dpo_loss's checks (all but the label range); returns (loss types, average)."""
    check.tensor("hidden", hidden, ndim=3, shape_doc="[2B, T, H]")
    if hidden.shape[0] % 2:
        raise ValueError(
            f"hidden must be [2B, T, H] with chosen rows first, then rejected; got an odd "
            f"number of rows {hidden.shape[0]}"
        )
    _check_sequences(hidden, weight, labels, mask)
    n_pairs = hidden.shape[0] // 2
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps must be given together")
    if ref_chosen_logps is not None:
        for name, x in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            check.tensor(name, x, ndim=1, shape_doc="[B]")
            check.shape(name, x, (n_pairs,), "[B] (half of hidden's rows)")
        check.same_device(hidden=hidden, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    elif ref_hidden is not None:
        check.tensor("ref_hidden", ref_hidden, dtypes=(hidden.dtype,), ndim=3, shape_doc="[2B, T, H]")
        check.shape("ref_hidden", ref_hidden, hidden.shape[:2] + (ref_hidden.shape[-1],), "[2B, T, H]")
        _check_linear(ref_hidden, weight if ref_weight is None else ref_weight, None)
        check.same_device(hidden=hidden, ref_hidden=ref_hidden, ref_weight=ref_weight)
    elif not reference_free:
        raise ValueError(
            "linear_dpo_loss needs the reference: ref_chosen_logps and ref_rejected_logps, "
            "or ref_hidden, or reference_free=True"
        )
    if weights is not None:
        check.tensor("weights", weights, ndim=1, shape_doc="[B]")
        check.shape("weights", weights, (n_pairs,), "[B] (half of hidden's rows)")
        check.same_device(hidden=hidden, weights=weights)
    types = _check_dpo_options(
        beta, loss_type, label_smoothing, reference_free, cdpo, loss_weights, f_divergence_type,
        f_alpha_divergence_coef, discopop_tau, weights,
    )  # fmt: skip
    if average is None:
        average = types == ["ipo"]
    elif average and set(types) & {"sigmoid_norm", "sft"}:
        raise ValueError("average=True gives per-token log-probs; sigmoid_norm and sft need sums (average=False)")
    check.positive("temperature", temperature)
    return types, average


# ----------------------------------------------------------------------- rm --


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Optional[Union[Tensor, float]] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Pairwise reward-model loss: mean of -logsigmoid(r_chosen - r_rejected - margin).

    Args: chosen_rewards, rejected_rewards [...] float of one shape; margin a float or a
    tensor of that shape (Llama-2's preference-strength margin), None for 0.
    Returns: [] float32, differentiable w.r.t. both rewards.
    """
    check.tensor("chosen_rewards", chosen_rewards)
    check.tensor("rejected_rewards", rejected_rewards)
    check.same_shape("chosen_rewards", chosen_rewards, rejected_rewards=rejected_rewards)
    if isinstance(margin, torch.Tensor):
        check.same_shape("chosen_rewards", chosen_rewards, margin=margin)
        check.same_device(chosen_rewards=chosen_rewards, margin=margin)
    elif margin is not None:
        check.number("margin", margin)
    check.same_device(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    implementation = _pick(
        "bradley_terry_loss", chosen_rewards.device, backend, reference.bradley_terry_loss, _rm_ops.bradley_terry_loss
    )
    return implementation(
        chosen_rewards,
        rejected_rewards,
        margin=margin,
        dtype=check.result_dtype(chosen_rewards, rejected_rewards),
    )


def ranking_loss(rewards: Tensor, ranks: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """InstructGPT's K-way loss: -logsigmoid(r_i - r_j) over every pair with rank_i < rank_j.

    Rank 0 is the best; equal ranks are ties and skipped. Each prompt's pairs are averaged,
    then prompts with at least one pair are averaged (a batch with none gives 0).
    Args: rewards [B, K] float, ranks [B, K] int or float, K >= 2.
    Returns: [] float32, differentiable w.r.t. rewards.
    """
    check.tensor("rewards", rewards, ndim=2, shape_doc="[B, K]")
    if rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [B, K] with K >= 2 responses, got {tuple(rewards.shape)}")
    check.tensor("ranks", ranks, dtypes=check.MASK_DTYPES, ndim=2, shape_doc="[B, K]")
    check.same_shape("rewards", rewards, ranks=ranks)
    check.same_device(rewards=rewards, ranks=ranks)
    implementation = _pick("ranking_loss", rewards.device, backend, reference.ranking_loss, _rm_ops.ranking_loss)
    return implementation(rewards, ranks, dtype=check.result_dtype(rewards))


# --------------------------------------------------------------------- grpo --
# Formulas and framework differences: rlhf_kernels/reference/grpo_advantages.py and
# rlhf_kernels/reference/grpo.py (the module docstrings are the spec).

from .ops import grpo as _grpo_ops  # noqa: E402  (appended family section)
from .reference import grpo as _grpo_reference  # noqa: E402
from .reference import grpo_advantages as _grpo_advantages  # noqa: E402
from .reference import grpo_correction as _grpo_correction  # noqa: E402


def _reference_only(name: str, backend: Optional[str]) -> None:
    """Group statistics over B scores are too small for a kernel: the reference runs on every device."""
    if backend not in (None, "reference"):
        raise ValueError(f"{name} runs on the reference backend only (backend=None or 'reference'), got {backend!r}")


def _check_groups(B: int, group_index: Optional[Tensor], group_size: Optional[int]) -> None:
    if group_index is not None:
        check.tensor("group_index", group_index, dtypes=check.INDEX_DTYPES, ndim=1, shape_doc="[B]")
        check.shape("group_index", group_index, (B,), "[B]")
    if group_size is not None:
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1 or B % group_size:
            raise ValueError(f"group_size must be an int >= 1 dividing B = {B}, got {group_size!r}")
        if group_index is not None:
            raise ValueError("pass group_index or group_size, not both")


def group_advantages(
    scores: Optional[Tensor],
    group_index: Optional[Tensor] = None,
    *,
    group_size: Optional[int] = None,
    estimator: str = "grpo",
    eps: Optional[float] = None,
    norm_by_std: bool = True,
    scale_rewards: str = "group",
    lengths: Optional[Tensor] = None,
    f_norm: float = 1.0,
    reward_weights=None,
    token_rewards: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    reward_baselines: Optional[Tensor] = None,
    gamma: float = 1.0,
    old_logprobs: Optional[Tensor] = None,
    sum_pi_squared: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    handle_zero_tail: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """Group-relative advantages of verl 0.9.1's estimators and TRL 1.16's GRPO.

    Sequence estimators (grpo, grpo_vectorized, grpo_passk, rloo, rloo_vectorized, opo, gpg,
    reinforce_plus_plus_baseline, gdpo, trl) take scores [B] ([B, K] for gdpo) and return
    advantages [B]; groups are `group_index` [B] (any integer labels, groups of any size)
    or contiguous runs of `group_size` (TRL's layout; default: one group). opo,
    reinforce_plus_plus_baseline and gdpo need `lengths` [B] (valid tokens per sequence).
    "trl" is TRL's GRPO: scale_rewards "group" / "batch" / "none" (Dr. GRPO), TRL's eps is 1e-4.
    Token estimators (remax, reinforce_plus_plus, optimal_token_baseline,
    tir_optimal_token_baseline) take token_rewards and mask [B, T] (0/1, any mask dtype)
    and return [B, T]; scores is then unused (None). remax needs reward_baselines [B].
    The optimal-token-baseline estimators (verl's OTB and its multi-turn variant) need
    old_logprobs [B, T] (the rollout policy's log-probs of the sampled tokens) and
    sum_pi_squared [B, T] (sum over the vocabulary of pi^2 at each position), take the
    rollout IS weights as is_weights [B, T] (optional: W is scaled by is_weights^2) and
    handle_zero_tail (verl's default True), and group by group_index / group_size.
    eps None is verl's default of the estimator: 1e-6, and 1e-8 for the two OTB estimators.
    Singleton groups follow verl (see reference/grpo_advantages.py). Not differentiable.
    Returns: advantages [B] or [B, T], float32 (float64 for float64 input).
    """
    check.choice("estimator", estimator, _grpo_advantages.ESTIMATORS)
    check.choice("scale_rewards", scale_rewards, _grpo_advantages.SCALE_REWARDS)
    eps = _grpo_advantages.default_eps(estimator) if eps is None else eps
    check.number("eps", eps)
    if estimator in _grpo_advantages.TOKEN_ESTIMATORS:
        _check_token_grid(mask, token_rewards=token_rewards)
        check.tensor("mask", mask, dtypes=check.MASK_DTYPES, shape_doc="[B, T]")
        if estimator == "remax":
            check.tensor("reward_baselines", reward_baselines, ndim=1, shape_doc="[B]")
            check.shape("reward_baselines", reward_baselines, token_rewards.shape[:1], "[B]")
        if estimator in _grpo_advantages.OTB_ESTIMATORS:
            check.tensor("old_logprobs", old_logprobs, ndim=2, shape_doc="[B, T]")
            check.tensor("sum_pi_squared", sum_pi_squared, ndim=2, shape_doc="[B, T]")
            check.optional_tensor("is_weights", is_weights, ndim=2, shape_doc="[B, T]")
            check.same_shape(
                "token_rewards", token_rewards, old_logprobs=old_logprobs, sum_pi_squared=sum_pi_squared,
                is_weights=is_weights,
            )  # fmt: skip
            _check_groups(token_rewards.shape[0], group_index, group_size)
            check.same_device(
                token_rewards=token_rewards, group_index=group_index, old_logprobs=old_logprobs,
                sum_pi_squared=sum_pi_squared, is_weights=is_weights,
            )  # fmt: skip
            if not isinstance(handle_zero_tail, bool):
                raise TypeError(f"handle_zero_tail must be a bool, got {type(handle_zero_tail).__name__}")
        dtype = check.result_dtype(token_rewards)
    else:
        check.tensor("scores", scores, min_ndim=1, shape_doc="[B] ([B, K] for gdpo)")
        if scores.dim() != 1 and not (estimator == "gdpo" and scores.dim() == 2):
            raise ValueError(f"scores must be [B] ([B, K] for gdpo), got shape {tuple(scores.shape)}")
        B = scores.shape[0]
        if B == 0:
            raise ValueError("scores must hold at least one sequence")
        _check_groups(B, group_index, group_size)
        if estimator in ("opo", "reinforce_plus_plus_baseline", "gdpo"):
            check.tensor("lengths", lengths, dtypes=check.FLOAT_DTYPES + check.INDEX_DTYPES, ndim=1, shape_doc="[B]")
            check.shape("lengths", lengths, (B,), "[B]")
        check.same_device(scores=scores, group_index=group_index, lengths=lengths)
        dtype = check.result_dtype(scores)
    _reference_only("group_advantages", backend)
    return _grpo_advantages.group_advantages(
        scores,
        group_index,
        group_size=group_size,
        estimator=estimator,
        eps=eps,
        norm_by_std=norm_by_std,
        scale_rewards=scale_rewards,
        lengths=lengths,
        f_norm=f_norm,
        reward_weights=reward_weights,
        token_rewards=token_rewards,
        mask=mask,
        reward_baselines=reward_baselines,
        gamma=gamma,
        old_logprobs=old_logprobs,
        sum_pi_squared=sum_pi_squared,
        is_weights=is_weights,
        handle_zero_tail=handle_zero_tail,
        dtype=dtype,
    )


def broadcast_advantages(advantages: Tensor, mask: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Sequence advantages to tokens (verl's scores.unsqueeze(-1) * response_mask).

    Args: advantages [B], mask [B, T].
    Returns: [B, T] in advantages' float dtype: A_b where mask, 0 elsewhere.
    """
    check.tensor("advantages", advantages, ndim=1, shape_doc="[B]")
    check.tensor("mask", mask, dtypes=check.MASK_DTYPES, ndim=2, shape_doc="[B, T]")
    check.shape("advantages", advantages, mask.shape[:1], "[B]")
    check.same_device(advantages=advantages, mask=mask)
    _reference_only("broadcast_advantages", backend)
    return _grpo_advantages.broadcast_to_tokens(advantages, mask)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "grpo",
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    delta: Optional[float] = None,
    log_ratio_clamp: Optional[float] = None,
    importance_sampling_level: str = "token",
    cispo_clip: str = "band",
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    dro_beta: float = 1.0,
    dppo_ratio_cap: float = 20.0,
    vespo: tuple = (2.0, 3.0, 3.0, 2.0),
    clip_cov: tuple = (2e-4, 1.0, 5.0),
    kl_cov: tuple = (2e-4, 1.0),
    generator: Optional[torch.Generator] = None,
    is_weights: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_is_corrected: bool = False,
    entropy: Optional[Tensor] = None,
    entropy_coef: float = 0.0,
    entropy_agg: Optional[str] = None,
    agg: Optional[str] = None,
    global_tokens: Optional[float] = None,
    num_sequences: Optional[float] = None,
    horizon: Optional[float] = None,
    rollout_logprobs: Optional[Tensor] = None,
    rollout_correction: Optional[str] = None,
    rollout_gate: str = "ratio",
    rollout_clip_min: Optional[float] = None,
    rollout_clip_max: Optional[float] = None,
    rollout_log_ratio_clamp: Optional[float] = None,
    rollout_batch_normalize: bool = False,
    rollout_rejection=None,
    rollout_rejection_threshold=None,
    off_policy_mask_threshold: Optional[float] = None,
    top_entropy_quantile: Optional[float] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Critic-free policy loss of verl 0.9.1 / TRL 1.16 / OpenRLHF 0.11 (formulas: reference/grpo.py).

    logprobs, old_logprobs, mask [B, T]; advantages [B] or [B, T]; is_weights, ref_logprobs,
    entropy [B, T]. loss_type: ppo, vanilla, grpo, bnpo, dr_grpo, dapo, luspo (clipped
    surrogate), gspo, cispo, sapo, gpg, dro, dppo_tv, dppo_kl, vespo, geo_mean, clip_cov,
    kl_cov (verl's; clip_cov=(clip_cov_ratio, clip_cov_lb, clip_cov_ub), kl_cov=(kl_cov_ratio,
    ppo_kl_coef); clip_cov draws torch.randperm(n, generator=generator), verl's call). agg None:
    the loss type's TRL normaliser (grpo/sapo/gspo seq-mean-token-mean, bnpo/dapo token-mean,
    dr_grpo seq-mean-token-sum-norm, luspo seq-mean-token-sum), else token-mean.
    global_tokens: token-mean's divisor (DAPO: the global batch's active tokens);
    num_sequences: the seq-mean divisor (default: rows with a valid token; TRL uses B);
    horizon: seq-mean-token-sum-norm's length (Dr. GRPO: max_completion_length; default T).
    Rollout / train mismatch correction (formulas and which framework each follows:
    reference/grpo_correction.py; no gradient): rollout_logprobs [B, T], the inference
    engine's log-probs; rollout_correction "token_truncate" | "token_mask" |
    "sequence_truncate" | "sequence_mask" (TRL's vllm_importance_sampling_mode, verl's
    rollout_is TIS / IcePop) | "geometric_mask" (OpenRLHF's seq level) with the bounds
    rollout_clip_min / rollout_clip_max, rollout_gate "ratio" | "binary_kl" | "tv"
    (OpenRLHF's gating), rollout_log_ratio_clamp (verl: 20), rollout_batch_normalize
    (verl); rollout_rejection / rollout_rejection_threshold (verl's rollout_rs: token_k1,
    seq_mean_k3, ...; rejected tokens leave the mask); off_policy_mask_threshold (TRL's
    DeepSeek-V3.2 off-policy sequence mask, from rollout_logprobs or else old_logprobs);
    top_entropy_quantile (TRL's top-entropy token mask; needs entropy). The weights and
    the two masks multiply is_weights, so they scale the policy term only.
    Returns: (loss [] float32 (float64 for float64 input), stats: clipfrac_low, clipfrac_high, dual_clipfrac, ppo_kl, approx_kl,
    ratio_mean, ratio_max, entropy when given; with the correction: rollout_kl,
    rollout_is_mean / _min / _max / _frac_low / _frac_high (/ _batch_norm_factor),
    rollout_rejected_frac, off_policy_masked_frac, top_entropy_masked_frac, each when its
    option is set). Differentiable w.r.t. logprobs and entropy.
    """
    check.tensor("mask", mask, dtypes=check.MASK_DTYPES, shape_doc="[B, T]")
    _check_token_grid(mask, logprobs=logprobs, old_logprobs=old_logprobs)
    check.tensor("advantages", advantages, shape_doc="[B] or [B, T]")
    if advantages.shape not in (logprobs.shape, logprobs.shape[:1]):
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(logprobs.shape)}, got {tuple(advantages.shape)}")
    optional = dict(
        is_weights=is_weights, ref_logprobs=ref_logprobs, entropy=entropy, rollout_logprobs=rollout_logprobs
    )
    for name, x in optional.items():
        check.optional_tensor(name, x, ndim=2, shape_doc="[B, T]")
    check.same_shape("logprobs", logprobs, **optional)
    check.same_device(logprobs=logprobs, advantages=advantages, **optional)
    check.choice("loss_type", loss_type, _grpo_reference.LOSS_TYPES)
    if agg is not None:
        check.choice("agg", agg, _grpo_reference.AGG_MODES)
    if entropy_agg is not None:
        check.choice("entropy_agg", entropy_agg, _grpo_reference.AGG_MODES)
    check.choice("importance_sampling_level", importance_sampling_level, ("token", "sequence"))
    check.choice("cispo_clip", cispo_clip, ("band", "upper"))
    check.choice("kl_estimator", kl_estimator, _grpo_reference.KL_ESTIMATORS)
    check.positive("clip_low", clip_low)
    for name, value in (("clip_high", clip_high), ("delta", delta), ("log_ratio_clamp", log_ratio_clamp)):
        check.optional_positive(name, value)
    for name, value in (("global_tokens", global_tokens), ("num_sequences", num_sequences), ("horizon", horizon)):
        check.optional_positive(name, value)
    for name, value in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef), ("dro_beta", dro_beta)):
        check.number(name, value)
    if dual_clip is not None:
        check.number("dual_clip", dual_clip)
        if not dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip!r}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    dtype = check.result_dtype(logprobs, old_logprobs, advantages)
    correcting = _check_rollout_correction(
        loss_type, rollout_logprobs, rollout_correction, rollout_gate, rollout_clip_min, rollout_clip_max,
        rollout_log_ratio_clamp, rollout_batch_normalize, rollout_rejection, rollout_rejection_threshold,
        off_policy_mask_threshold, top_entropy_quantile, entropy,
    )  # fmt: skip
    correction = None
    if correcting:
        correction = _grpo_correction.correction(
            logprobs, old_logprobs, advantages, mask, rollout_logprobs=rollout_logprobs,
            rollout_correction=rollout_correction, rollout_gate=rollout_gate, rollout_clip_min=rollout_clip_min,
            rollout_clip_max=rollout_clip_max, rollout_log_ratio_clamp=rollout_log_ratio_clamp,
            rollout_batch_normalize=rollout_batch_normalize, rollout_rejection=rollout_rejection,
            rollout_rejection_threshold=rollout_rejection_threshold,
            off_policy_mask_threshold=off_policy_mask_threshold, top_entropy_quantile=top_entropy_quantile,
            entropy=entropy, dtype=dtype,
        )  # fmt: skip
        if correction.weights is not None:
            is_weights = (
                correction.weights if is_weights is None else is_weights.detach().to(dtype) * correction.weights
            )
        if correction.keep is not None:  # verl's rejection replaces the mask
            mask = torch.where(correction.keep, mask, torch.zeros_like(mask))
    options = dict(
        loss_type=loss_type,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        delta=delta,
        log_ratio_clamp=log_ratio_clamp,
        importance_sampling_level=importance_sampling_level,
        cispo_clip=cispo_clip,
        sapo_tau_pos=sapo_tau_pos,
        sapo_tau_neg=sapo_tau_neg,
        dro_beta=dro_beta,
        dppo_ratio_cap=dppo_ratio_cap,
        vespo=tuple(vespo),
        clip_cov=tuple(clip_cov),
        kl_cov=tuple(kl_cov),
        generator=generator,
        is_weights=is_weights,
        ref_logprobs=ref_logprobs,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        kl_is_corrected=kl_is_corrected,
        entropy=entropy,
        entropy_coef=entropy_coef,
        entropy_agg=entropy_agg,
        agg=agg,
        global_tokens=global_tokens,
        num_sequences=num_sequences,
        horizon=horizon,
        dtype=dtype,
    )
    implementation = _pick(
        "policy_loss", logprobs.device, backend, _grpo_reference.policy_loss, _grpo_ops.policy_loss
    )
    loss, stats = implementation(logprobs, old_logprobs, advantages, mask, **options)
    if correction is not None:
        stats = {**stats, **correction.stats}
    return loss, stats


def _check_rollout_correction(
    loss_type, rollout_logprobs, mode, gate, clip_min, clip_max, log_ratio_clamp, batch_normalize, rejection,
    rejection_threshold, off_policy_mask_threshold, top_entropy_quantile, entropy,
) -> bool:  # fmt: skip
    """Validates policy_loss's correction keywords; True when any of them asks for something."""
    if mode is not None:
        check.choice("rollout_correction", mode, _grpo_correction.MODES)
        if rollout_logprobs is None:
            raise ValueError("rollout_correction needs rollout_logprobs")
        if clip_min is None and clip_max is None:
            raise ValueError("rollout_correction needs rollout_clip_min or rollout_clip_max (its band)")
        if loss_type == "vespo" and mode not in ("token_truncate", "token_mask"):
            raise ValueError(
                f"loss_type 'vespo' takes a token-level rollout_correction (token_truncate, token_mask), got {mode!r}"
            )
    check.choice("rollout_gate", gate, _grpo_correction.GATES)
    if gate != "ratio" and mode not in _grpo_correction.GATED_MODES:
        raise ValueError(f"rollout_gate {gate!r} gates rollout_correction 'token_mask' or 'geometric_mask' only")
    for name, value in (("rollout_clip_min", clip_min), ("rollout_clip_max", clip_max)):
        if value is not None:
            check.number(name, value)
            if gate == "ratio" and value < 0:
                raise ValueError(f"{name} bounds a ratio: must be >= 0, got {value!r}")
    if clip_min is not None and clip_max is not None and clip_min > clip_max:
        raise ValueError(f"rollout_clip_min must be <= rollout_clip_max, got {clip_min!r} > {clip_max!r}")
    if gate != "ratio" and clip_min is not None and clip_min > 0:
        raise ValueError(f"rollout_gate {gate!r} bounds a divergence: rollout_clip_min must be <= 0 or None")
    check.optional_positive("rollout_log_ratio_clamp", log_ratio_clamp)
    if not isinstance(batch_normalize, bool):
        raise TypeError(f"rollout_batch_normalize must be a bool, got {type(batch_normalize).__name__}")
    if batch_normalize and mode is None:
        raise ValueError("rollout_batch_normalize needs rollout_correction")
    if rejection is not None:
        if not isinstance(rejection, (str, list, tuple)) or not all(isinstance(o, str) for o in rejection):
            raise TypeError(f"rollout_rejection must be a str or a sequence of str, got {rejection!r}")
        options = _grpo_correction.rejection_options(rejection)
        if not options:
            raise ValueError("rollout_rejection must name at least one option")
        for option in options:
            check.choice("rollout_rejection", option, _grpo_correction.REJECTIONS)
        if rollout_logprobs is None:
            raise ValueError("rollout_rejection needs rollout_logprobs")
        if rejection_threshold is None:
            raise ValueError("rollout_rejection needs rollout_rejection_threshold")
        _grpo_correction.rejection_thresholds(options, rejection_threshold)
    elif rejection_threshold is not None:
        raise ValueError("rollout_rejection_threshold needs rollout_rejection")
    masks = []
    if off_policy_mask_threshold is not None:
        check.number("off_policy_mask_threshold", off_policy_mask_threshold)
        masks.append("off_policy_mask_threshold")
    if top_entropy_quantile is not None:
        check.in_unit_interval("top_entropy_quantile", top_entropy_quantile)
        if entropy is None:
            raise ValueError("top_entropy_quantile needs entropy")
        masks.append("top_entropy_quantile")
    if masks and loss_type in _grpo_correction.WEIGHT_READING_TYPES:
        raise ValueError(
            f"{masks[0]} masks the policy term through is_weights, which loss_type {loss_type!r} reads inside its formula"
        )
    return mode is not None or rejection is not None or bool(masks) or rollout_logprobs is not None


def linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    mask: Tensor,
    *,
    old_logprobs: Tensor,
    advantages: Tensor,
    ref_logprobs: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    loss_type: str = "grpo",
    entropy_coef: float = 0.0,
    batch_invariant: Optional[bool] = None,
    process_group=None,
    vocab_size: Optional[int] = None,
    backend: Optional[str] = None,
    **policy_options,
) -> tuple[Tensor, dict[str, Tensor]]:
    """policy_loss from final hidden states x lm_head weight, never materializing [B, T, V] logits.

    Args: hidden [B, T, H], weight [V, H] (lm_head.weight, hidden's dtype), bias [V] or
    None, labels [B, T] (the sampled tokens; not read where mask is 0), mask [B, T];
    old_logprobs [B, T], advantages [B] or [B, T], ref_logprobs [B, T] or None. hidden is
    selected to 0 where mask is 0: NaN / inf padding reaches no output or gradient.
    loss_type, entropy_coef and every other keyword of policy_loss (clip_low, clip_high,
    kl_coef, kl_estimator, agg, importance_sampling_level, is_weights, ...) mean what they
    mean there. The log-probs and entropy of logits / temperature come from
    linear_logprobs (one fused pass over the vocabulary per row block, logits recomputed
    tile by tile in backward), then policy_loss runs on the [B, T] results on the same
    backend: the [N, V] logits exist only as tiles. Entropy is computed for the stats and
    is differentiated only when entropy_coef != 0.
    Returns: (loss [] float32 (float64 for float64 input), stats as policy_loss's, with
    entropy). Differentiable w.r.t. hidden, weight and bias.
    Precision: logits in the input dtype (as the unfused model), log-probs and the loss
    in fp32; equal to policy_loss(log_softmax(hidden @ weight.T / temperature)...) to fp32
    rounding in fp32 (bf16: the logits' own bf16 rounding, as the unfused model's).
    Batch invariance: batch_invariant as linear_logprobs; the loss is a batch mean.
    Vocab parallel: process_group / vocab_size as linear_logprobs (weight and bias are
    this rank's vocabulary shard; every rank gets the same loss and its shard's gradient).
    """
    _check_sequences(hidden, weight, labels, mask)
    if bias is not None:
        _check_linear(hidden, weight, bias)
        check.same_device(hidden=hidden, bias=bias)
    check.positive("temperature", temperature)
    check.number("entropy_coef", entropy_coef)
    if "entropy" in policy_options or "logprobs" in policy_options:
        raise TypeError("linear_policy_loss computes logprobs and entropy itself from hidden and weight")
    if process_group is None:  # sharded: labels are global, checked across the ranks
        check.labels_in_range(labels, weight.shape[0] if vocab_size is None else vocab_size, ignore_index=-100, mask=mask)
    B, T, H = hidden.shape
    resolved = _backend.resolve("linear_policy_loss", hidden.device, backend)
    tokens = torch.where(mask != 0, labels, torch.full_like(labels, -100))
    # A select, not a skip: a mask-0 row still enters d weight = d logits^T hidden, where
    # its zero d logits times a NaN / inf hidden (padding) would be NaN.
    hidden = hidden.masked_fill((mask == 0).unsqueeze(-1), 0)
    logprobs, entropy = linear_logprobs(
        hidden.reshape(B * T, H),
        weight,
        tokens.reshape(B * T),
        bias=bias,
        temperature=temperature,
        return_entropy=True,
        batch_invariant=batch_invariant,
        process_group=process_group,
        vocab_size=vocab_size,
        backend=resolved if process_group is None else backend,
    )
    entropy = entropy.reshape(B, T)
    return policy_loss(
        logprobs.reshape(B, T),
        old_logprobs,
        advantages,
        mask,
        ref_logprobs=ref_logprobs,
        loss_type=loss_type,
        entropy=entropy if entropy_coef != 0.0 else entropy.detach(),
        entropy_coef=entropy_coef,
        backend=resolved,
        **policy_options,
    )
