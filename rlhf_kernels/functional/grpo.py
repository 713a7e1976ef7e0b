"""group_advantages, broadcast_advantages, policy_loss and linear_policy_loss: validate, pick a backend, run.

Formulas and framework differences: rlhf_kernels/reference/grpo_advantages.py and
rlhf_kernels/reference/grpo.py (the module docstrings are the spec).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _batch_invariance
from .. import _validation as check
from .. import backend as _backend
from ..ops import grpo as _grpo_ops
from ..ops import linear_policy as _linear_policy_ops
from ..reference import grpo as _grpo_reference
from ..reference import grpo_advantages as _grpo_advantages
from ..reference import grpo_correction as _grpo_correction
from ._common import Tensor, _check_token_grid, _pick
from .logprobs import _check_linear, _check_sequences, linear_logprobs


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
    Masks are selects: NaN / inf at a mask-0 position reaches no valid output; a NaN score
    or reward at a valid position makes what reads it NaN (grpo_passk: its whole group).
    An empty batch (B = 0, or T = 0) gives an empty result; meta inputs a meta result.
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
            check.same_device(token_rewards=token_rewards, reward_baselines=reward_baselines)
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
        shape, device = token_rewards.shape, token_rewards.device
    else:
        check.tensor("scores", scores, min_ndim=1, shape_doc="[B] ([B, K] for gdpo)")
        if scores.dim() != 1 and not (estimator == "gdpo" and scores.dim() == 2):
            raise ValueError(f"scores must be [B] ([B, K] for gdpo), got shape {tuple(scores.shape)}")
        B = scores.shape[0]
        _check_groups(B, group_index, group_size)
        if estimator in ("opo", "reinforce_plus_plus_baseline", "gdpo"):
            check.tensor("lengths", lengths, dtypes=check.FLOAT_DTYPES + check.INDEX_DTYPES, ndim=1, shape_doc="[B]")
            check.shape("lengths", lengths, (B,), "[B]")
        check.same_device(scores=scores, group_index=group_index, lengths=lengths)
        dtype = check.result_dtype(scores)
        shape, device = (B,), scores.device
    _reference_only("group_advantages", backend)
    if device.type == "meta":  # shape inference: the result's shape never depends on the values
        return torch.empty(shape, dtype=dtype, device=device)
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
    Returns: [B, T] in advantages' float dtype: A_b (times the mask value) where mask != 0,
    exactly 0 elsewhere, even for a NaN / inf A_b (a select, not verl's product).
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
    rollout_correction_from: str = "old",
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
    seq_mean_k3, ...; rejected tokens leave the mask); rollout_correction_from "old" |
    "current": the weights, the rejection and rollout_kl compare rollout_logprobs with
    old_logprobs (default) or with sg(logprobs) (verl's bypass mode, where old_logprobs =
    rollout_logprobs: its ppo_clip with rollout_rs is loss_type="vanilla" on old_logprobs
    = rollout_logprobs with rollout_rejection and "current"); off_policy_mask_threshold
    (TRL's DeepSeek-V3.2 off-policy sequence mask, from rollout_logprobs or else old_logprobs);
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
        rollout_correction_from, off_policy_mask_threshold, top_entropy_quantile, entropy,
    )  # fmt: skip
    correction = None
    if correcting:
        correction = _grpo_correction.correction(
            logprobs, old_logprobs, advantages, mask, rollout_logprobs=rollout_logprobs,
            rollout_correction=rollout_correction, rollout_gate=rollout_gate, rollout_clip_min=rollout_clip_min,
            rollout_clip_max=rollout_clip_max, rollout_log_ratio_clamp=rollout_log_ratio_clamp,
            rollout_batch_normalize=rollout_batch_normalize, rollout_rejection=rollout_rejection,
            rollout_rejection_threshold=rollout_rejection_threshold, rollout_correction_from=rollout_correction_from,
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
    implementation = _pick("policy_loss", logprobs.device, backend, _grpo_reference.policy_loss, _grpo_ops.policy_loss)
    loss, stats = implementation(logprobs, old_logprobs, advantages, mask, **options)
    if correction is not None:
        stats = {**stats, **correction.stats}
    return loss, stats


def _check_rollout_correction(
    loss_type, rollout_logprobs, mode, gate, clip_min, clip_max, log_ratio_clamp, batch_normalize, rejection,
    rejection_threshold, correction_from, off_policy_mask_threshold, top_entropy_quantile, entropy,
) -> bool:  # fmt: skip
    """Validates policy_loss's correction keywords; True when any of them asks for something."""
    check.choice("rollout_correction_from", correction_from, _grpo_correction.CORRECTION_FROM)
    if correction_from != "old" and rollout_logprobs is None:
        raise ValueError(f"rollout_correction_from={correction_from!r} needs rollout_logprobs")
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
        check.labels_in_range(
            labels,
            weight.shape[0] if vocab_size is None else vocab_size,
            ignore_index=-100,
            mask=mask,
            op="linear_policy_loss",
        )
    B, T, H = hidden.shape
    resolved = _backend.resolve("linear_policy_loss", hidden.device, backend)
    tokens = torch.where(mask != 0, labels, torch.full_like(labels, -100))
    # A select, not a skip: a mask-0 row still enters d weight = d logits^T hidden, where
    # its zero d logits times a NaN / inf hidden (padding) would be NaN.
    hidden = hidden.masked_fill((mask == 0).unsqueeze(-1), 0)
    inputs = dict(
        old_logprobs=old_logprobs, advantages=advantages, mask=mask, ref_logprobs=ref_logprobs, loss_type=loss_type,
        entropy_coef=entropy_coef, **policy_options,
    )  # fmt: skip

    def unfused(hidden, weight):
        logprobs, entropy = linear_logprobs(
            hidden.reshape(B * T, H), weight, tokens.reshape(B * T), bias=bias, temperature=temperature,
            return_entropy=True, batch_invariant=batch_invariant, process_group=process_group, vocab_size=vocab_size,
            backend=resolved if process_group is None else backend,
        )  # fmt: skip
        entropy = entropy.reshape(B, T)
        return policy_loss(
            logprobs.reshape(B, T), entropy=entropy if entropy_coef != 0.0 else entropy.detach(), backend=resolved,
            **inputs,
        )  # fmt: skip

    if (
        resolved == "cpu"
        and process_group is None
        and _linear_policy_ops.applies(hidden, weight, bias, loss_type, entropy_coef, policy_options)
    ):
        return _linear_policy_ops.linear_policy_loss(
            hidden, weight, tokens, kernel=resolved, temperature=temperature,
            batch_invariant=_batch_invariance.enabled(batch_invariant),
            policy_loss=lambda logprobs, **kw: policy_loss(logprobs, backend=resolved, **kw),
            recompute=lambda hidden, weight: unfused(hidden, weight)[0], **inputs,
        )  # fmt: skip
    return unfused(hidden, weight)
