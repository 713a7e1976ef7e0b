"""dpo_loss and linear_dpo_loss (the DPO family from log-probs or hidden states): validate, pick a backend, run."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _batch_invariance
from .. import _validation as check
from .. import backend as _backend
from .. import reference
from .. import vocab_parallel as _vocab_parallel
from ..ops import dpo as _dpo_ops
from ..ops import linear_dpo as _linear_dpo_ops
from ..reference.dpo import LOSS_TYPES
from ._common import Tensor, _pick
from .logprobs import _check_linear, _check_sequences, _in_mode, _linear_logprobs_on

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
    batch_invariant: Optional[bool] = None,
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
    Batch invariance: batch_invariant as linear_logprobs (None: the
    rlhf_kernels.batch_invariant() setting), for the policy and the ref_hidden pass. In
    the mode each pair's sequence log-probs (policy and reference) are bitwise the same
    whatever other pairs share the batch, and reordering the pairs keeps each row's d
    hidden bitwise; the loss and the metrics are means over the pairs, so their rounding
    follows the pairs' order and number (bounds: docs/DESIGN.md, "Batch invariance").
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
        with _in_mode(batch_invariant):
            return _vocab_parallel.linear_dpo_loss(
                hidden, weight, labels, mask, process_group=process_group, vocab_size=vocab_size, backend=backend,
                **options,
            )  # fmt: skip
    types, average = _check_linear_dpo(hidden, weight, labels, mask, **options)
    check.labels_in_range(labels, weight.shape[0], ignore_index=-100, mask=mask, op="linear_dpo_loss")
    resolved = _backend.resolve("linear_dpo_loss", hidden.device, backend)
    # A select, not a skip: a mask-0 position still enters d weight = d logits^T hidden,
    # where its zero d logits times a NaN / inf hidden (padding) would be NaN.
    hidden = hidden.masked_fill((mask == 0).unsqueeze(-1), 0)
    route = reference.linear_dpo_loss
    fused = {}
    if resolved == "cpu" and _linear_dpo_ops.applies(types, hidden, weight):
        route = _linear_dpo_ops.linear_dpo_loss
        fused = dict(kernel=resolved, batch_invariant=_batch_invariance.enabled(batch_invariant))
    return route(
        hidden,
        weight,
        labels,
        mask,
        **fused,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        average=average,
        temperature=temperature,
        dtype=check.result_dtype(hidden),
        linear_logprobs=_linear_logprobs_on(resolved, batch_invariant),
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
