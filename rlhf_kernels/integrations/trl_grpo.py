"""TRL 1.16's `GRPOTrainer._compute_loss` with the loss computed by rk.policy_loss.

`rlhf_kernels.integrations.trl.patch()` installs `compute_loss` below as
`GRPOTrainer._compute_loss` (unpatch() restores TRL's). It keeps TRL's forward
(`self._get_per_token_logps_and_entropies`: the fused LM head, which patch() puts on
rk.linear_logprobs), TRL's mask helpers (`get_high_entropy_mask`, `get_off_policy_mask`,
`get_gamma_weights`, called on the trainer, so a subclass's override still applies;
the two masks otherwise as policy_loss options, below), the
adaptive entropy controller, the auxiliary MoE loss and every logged metric; the
per-token loss, its normaliser, the KL term and the entropy bonus are one rk.policy_loss
call:

    TRL 1.16                                    rk.policy_loss
    grpo, sapo   mean_b(sum_t l m / n_b)        agg seq-mean-token-mean, num_sequences=B
    bnpo         sum l m / sum m                agg token-mean
    dr_grpo      sum l m / (B L_max)            agg seq-mean-token-sum-norm, num_sequences=B, horizon=L_max
    luspo        mean_b sum_t l m               agg seq-mean-token-sum, num_sequences=B
    dapo, cispo, vespo  sum l m / N             agg token-sum, the returned scalar divided by TRL's
                                                num_items_in_batch normaliser N (a tensor: no sync)
    clip family  clip(r, 1 - eps, 1 + eps_high), two-sided `delta`    clip_low, clip_high, delta
    cispo        -sg(min(r, eps_high)) A lp     cispo_clip="upper", clip_high=eps_high
    sapo         temperatures                   sapo_tau_pos, sapo_tau_neg
    importance_sampling_level token / sequence  importance_sampling_level
    beta, use_bias_correction_kl                kl_coef=beta, kl_estimator="k3", kl_is_corrected
    entropy_coef (grpo, sapo, bnpo, dr_grpo,    entropy, entropy_coef, entropy_agg="token-mean"
      luspo; no top-entropy mask)
    / gradient_accumulation_steps               the returned scalar divided (N holds it for
                                                dapo, cispo, vespo)

    off_policy_mask_threshold                   off_policy_mask_threshold, rollout_logprobs =
                                                sampling_per_token_logps (else old)
    top_entropy_quantile (one process, no       top_entropy_quantile, entropy
      entropy bonus)

The off-policy sequence mask, the top-entropy token mask and the vLLM importance-sampling
ratio multiply TRL's policy term before the KL is added, which is what policy_loss's
is_weights (and its correction options, which multiply into them) do; the masks are
0 / 1, so the product is exact. Where the options are not TRL's exactly, this adapter
calls TRL's helpers on the trainer and passes the product as is_weights:
  * the vLLM ratio always: TRL's loss reads inputs["importance_sampling_ratio"], computed
    at generation time (from old_per_token_logps and sampling_per_token_logps, with the
    trainer's vllm_importance_sampling_mode and clip bounds: policy_loss's
    rollout_correction of the same name would recompute the same tensor from
    rollout_logprobs, but a trainer or a data pipeline may store another one);
  * the off-policy mask when get_off_policy_mask is overridden or for vespo (its
    advantage argument below is phi-folded);
  * the top-entropy mask when get_high_entropy_mask is overridden, on several processes
    (TRL's quantile spans every process's tokens, policy_loss's this batch) or with the
    entropy bonus (TRL's bonus and its adaptive controller average over the kept tokens).
Pieces rk.policy_loss has no option for, computed here with plain torch around it:
  * vespo: TRL's gamma weight phi (`get_gamma_weights`, no gradient; one per sequence,
    or per token for [B, T] advantages) is folded into the advantage and policy_loss
    runs loss_type "gpg" (-A lp), i.e. vespo's -phi A lp; the masks are is_weights as
    above, and the vLLM ratio enters phi only, as in TRL. (policy_loss's own "vespo"
    would take is_weights into phi and the advantage's sign from its first column, so
    the masks and [B, T] advantages could not go through it; gpg also runs the
    compiled per-token kernel where vespo runs the reference torch code);
  * the entropy bonus with top_entropy_quantile < 1 (a mean over the masked tokens;
    policy_loss's is over `mask`) and for dapo, cispo, vespo (whose policy term is
    divided by N after policy_loss): TRL's expression, here;
  * the logged metrics (clip_ratio/*, kl, entropy, cispo_clip_ratio, vespo/phi_seq_mean,
    policy_loss): TRL's expressions on detached tensors, so they mean what TRL's mean
    (policy_loss's stats are local token means; TRL's are reduced across processes and,
    at the sequence level, over sequences).

TRL's own `_compute_loss` runs instead (its result, never a different one; the forward
is not repeated when it already ran) when: the loss type or importance-sampling level
is not one TRL 1.16 knows (TRL raises); epsilon, epsilon_high or delta is not a positive
number (policy_loss rejects them); beta or entropy_coef is not a finite number; dr_grpo
has no positive max_completion_length; a tensor _compute_loss needs is missing (TRL
raises); or the tensors are not what TRL's trainer produces: log-probs other than
float32 / float64 or float tensors of mixed dtypes (policy_loss would compute in
float32 where TRL computes in bfloat16), shapes other than [B, T] (advantages and the
vLLM ratio: also [B] / [B, 1]), no entropies. `fallback_reason(trainer)` names the
configuration-level reasons.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

import rlhf_kernels as rk

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# TRL's normaliser of each loss type as rk.policy_loss's agg.
AGG = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "luspo": "seq-mean-token-sum",
    "dapo": "token-sum",
    "cispo": "token-sum",
    "vespo": "token-sum",
}
# Loss types TRL normalises by num_items_in_batch (which holds the accumulation steps).
ITEM_NORMALISED = ("dapo", "cispo", "vespo")
_FLOATS = (torch.float32, torch.float64)

# TRL's GRPOTrainer._compute_loss, set by trl.patch(): the fallback.
TRL_COMPUTE_LOSS = None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x) -> bool:
    return _number(x) and x > 0


def fallback_reason(trainer) -> Optional[str]:
    """Why `trainer`'s configuration runs TRL's own _compute_loss; None when rk.policy_loss computes it."""
    loss_type = trainer.loss_type
    if loss_type not in LOSS_TYPES:
        return f"loss_type {loss_type!r} is not one of TRL 1.16's"
    if trainer.importance_sampling_level not in ("token", "sequence"):
        return f"importance_sampling_level {trainer.importance_sampling_level!r} is not token or sequence"
    if not (_positive(trainer.epsilon_low) and _positive(trainer.epsilon_high)):
        return "epsilon and epsilon_high must be positive numbers for rk.policy_loss"
    delta = getattr(trainer.args, "delta", None)
    if loss_type in CLIP_TYPES and delta is not None and not _positive(delta):
        return "delta must be a positive number for rk.policy_loss"
    if not _number(trainer.beta):
        return "beta is not a finite number"
    if trainer._entropy_bonus_enabled and not _number(trainer.entropy_coef):
        return "entropy_coef is not a finite number"
    if loss_type == "dr_grpo" and not _positive(trainer.max_completion_length):
        return "dr_grpo needs a positive max_completion_length"
    return None


def _tensor_reason(logps, mask, tensors) -> Optional[str]:
    """Why these tensors need TRL's code (None: rk.policy_loss gives TRL's loss on them)."""
    if logps.dim() != 2 or mask.shape != logps.shape:
        return "log-probs and mask are not [B, T]"
    if tensors["entropies"] is None:
        return "the forward gave no entropies"
    if logps.dtype not in _FLOATS or any(x.dtype != logps.dtype for x in tensors.values() if x is not None):
        return "float tensors are not all float32 or all float64"
    B, T = logps.shape
    for name, x in tensors.items():
        allowed = ((B, T), (B, 1)) if name in ("advantages", "importance_sampling_ratio") else ((B, T),)
        if x is not None and x.shape not in allowed:
            return f"{name} has shape {tuple(x.shape)}"
    return None


def _trl_compute_loss():
    if TRL_COMPUTE_LOSS is not None:
        return TRL_COMPUTE_LOSS
    from trl.trainer.grpo_trainer import GRPOTrainer

    return GRPOTrainer._compute_loss


def _trls(trainer, name: str) -> bool:
    """Whether trainer.<name> is GRPOTrainer's own (no override on the instance or a subclass)."""
    if name in vars(trainer):
        return False
    from trl.trainer.grpo_trainer import GRPOTrainer

    return getattr(type(trainer), name, None) is getattr(GRPOTrainer, name)


def _trl_with_forward(trainer, model, inputs, forward):
    """TRL's _compute_loss on the outputs of the forward that already ran (not run twice)."""
    name = "_get_per_token_logps_and_entropies"
    had, before = name in vars(trainer), vars(trainer).get(name)
    setattr(trainer, name, lambda *args, **kwargs: forward)
    try:
        return _trl_compute_loss()(trainer, model, inputs)
    finally:
        if had:
            setattr(trainer, name, before)
        else:
            delattr(trainer, name)


def compute_loss(self, model, inputs):
    """GRPOTrainer._compute_loss of TRL 1.16 (same arguments, result, state updates and
    metrics), the loss computed by rk.policy_loss."""
    if fallback_reason(self) is not None:
        return _trl_compute_loss()(self, model, inputs)

    # TRL 1.16's forward, unchanged.
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits_to_keep = completion_ids.size(1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    forward = self._get_per_token_logps_and_entropies(
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        compute_entropy=True,
        compute_aux_loss=self.aux_loss_enabled,
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"),
        num_images=inputs.get("num_images"),
        pixel_attention_mask=inputs.get("pixel_attention_mask"),
        spatial_shapes=inputs.get("spatial_shapes"),
        num_tiles=inputs.get("num_tiles"),
        image_sizes=inputs.get("image_sizes"),
        token_type_ids=inputs.get("token_type_ids"),
        mm_token_type_ids=inputs.get("mm_token_type_ids"),
        image_position_ids=inputs.get("image_position_ids"),
    )
    per_token_logps, entropies, aux_loss = forward

    loss_type = self.loss_type
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_per_token_logps = inputs.get("old_per_token_logps")
    old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    use_is_ratio = self.use_vllm and self.vllm_importance_sampling_correction
    # TRL multiplies the policy term by the vLLM ratio (not vespo's), and vespo's phi reads it whenever present.
    is_ratio = inputs.get("importance_sampling_ratio") if use_is_ratio or loss_type == "vespo" else None
    sampling_logps = None
    if self.off_policy_mask_threshold is not None:
        sampling_logps = inputs.get("sampling_per_token_logps", old_per_token_logps)
    ref_logps = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
    tensors = {
        "old_per_token_logps": old_per_token_logps,
        "advantages": advantages,
        "entropies": entropies,
        "ref_per_token_logps": ref_logps,
        "importance_sampling_ratio": is_ratio,
        "sampling_per_token_logps": sampling_logps,
    }
    missing = (use_is_ratio and loss_type != "vespo" and is_ratio is None) or (self.beta != 0.0 and ref_logps is None)
    if missing or _tensor_reason(per_token_logps, mask, tensors) is not None:
        return _trl_with_forward(self, model, inputs, forward)

    B, T = per_token_logps.shape
    mode = "train" if self.model.training else "eval"
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0

    # The off-policy and top-entropy masks as policy_loss options where they are TRL's exactly:
    # TRL's own helpers (not a subclass's override), the off-policy mask on the true advantage
    # (not vespo's phi-folded one), the entropy quantile over one process's tokens (TRL's spans
    # every process) and no entropy bonus (whose mean and controller read the mask itself).
    correction = {}
    api_off_policy = (
        self.off_policy_mask_threshold is not None and loss_type != "vespo" and _trls(self, "get_off_policy_mask")
    )
    if api_off_policy:
        correction.update(off_policy_mask_threshold=self.off_policy_mask_threshold, rollout_logprobs=sampling_logps)
    api_top_entropy = (
        self.top_entropy_quantile < 1.0
        and not self._entropy_bonus_enabled
        and self.accelerator.num_processes == 1
        and _trls(self, "get_high_entropy_mask")
    )
    if api_top_entropy:
        correction.update(top_entropy_quantile=float(self.top_entropy_quantile), entropy=entropies.detach())

    entropy_mask = None
    if self.top_entropy_quantile < 1.0 and not api_top_entropy:
        entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)

    # TRL's factors of the policy term (applied before the KL is added): policy_loss's is_weights.
    factors = []
    if self.off_policy_mask_threshold is not None and not api_off_policy:
        factors.append(
            self.get_off_policy_mask(
                advantages=advantages,
                per_token_logps=per_token_logps,
                sampling_per_token_logps=sampling_logps,
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
        )
    if entropy_mask is not None:
        factors.append(entropy_mask)
    if use_is_ratio and loss_type != "vespo":
        factors.append(is_ratio)
    is_weights = None
    if factors:
        is_weights = factors[0].to(per_token_logps.dtype)
        for factor in factors[1:]:
            is_weights = is_weights * factor
        is_weights = is_weights.expand(B, T)

    with torch.no_grad():  # TRL's importance weights, for the metrics and vespo's phi
        log_ratio = per_token_logps.detach() - old_per_token_logps
        if self.importance_sampling_level == "token":
            coef_1 = torch.exp(log_ratio)
        else:
            coef_1 = torch.exp(((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1))

    options = dict(
        loss_type=loss_type,
        clip_low=float(self.epsilon_low),
        clip_high=float(self.epsilon_high),
        importance_sampling_level=self.importance_sampling_level,
        is_weights=is_weights,
        agg=AGG[loss_type],
        num_sequences=B,
    )
    loss_advantages = advantages
    phi_seq = None
    if loss_type in CLIP_TYPES:
        options["delta"] = self.args.delta
    elif loss_type == "cispo":
        options["cispo_clip"] = "upper"  # TRL's cispo weight: min(r, epsilon_high)
    elif loss_type == "sapo":
        options.update(sapo_tau_pos=self.args.sapo_temperature_pos, sapo_tau_neg=self.args.sapo_temperature_neg)
    elif loss_type == "vespo":
        phi_seq = self.get_gamma_weights(
            advantages=advantages,
            log_ratio_per_token=log_ratio,
            mask=mask,
            importance_sampling_ratio=is_ratio,
            k_pos=self.args.vespo_k_pos,
            lambda_pos=self.args.vespo_lambda_pos,
            k_neg=self.args.vespo_k_neg,
            lambda_neg=self.args.vespo_lambda_neg,
        )
        loss_advantages = phi_seq * advantages
        options["loss_type"] = "gpg"  # -A' lp with A' = phi A: vespo's -phi A lp
    if loss_type == "dr_grpo":
        options["horizon"] = self.max_completion_length
    if loss_type in ITEM_NORMALISED:
        # TRL's normaliser: num_items_in_batch spans the generation batch, rescaled to one accumulation window.
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
    else:
        normalizer = accumulation
    if self.beta != 0.0:
        options.update(
            ref_logprobs=ref_logps,
            kl_coef=float(self.beta),
            kl_estimator="k3",  # TRL's exp(ref - lp) - (ref - lp) - 1
            kl_is_corrected=bool(self.args.use_bias_correction_kl),
        )

    # TRL's bonus: apply_coef * (mean entropy over the effective mask) / accumulation steps,
    # with the coefficient of the previous optimizer step (adaptive mode).
    apply_coef = 0.0
    if self._entropy_bonus_enabled:
        if self.use_adaptive_entropy:
            apply_coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        else:
            apply_coef = self.entropy_coef
    # policy_loss's entropy term where it is TRL's: a token mean over `mask`, the loss then divided
    # by the accumulation steps (for the num_items types, by N: their bonus is computed below).
    bonus_in_policy_loss = apply_coef != 0.0 and entropy_mask is None and loss_type not in ITEM_NORMALISED
    if bonus_in_policy_loss:
        options.update(entropy=entropies, entropy_coef=float(apply_coef), entropy_agg="token-mean")
    options.update(correction)

    advantage_arg = loss_advantages[:, 0] if loss_advantages.shape[1] == 1 else loss_advantages
    total, _ = rk.policy_loss(per_token_logps, old_per_token_logps, advantage_arg, mask, **options)

    loss = total / normalizer
    # TRL's logged policy_loss: the policy term alone, before the accumulation division.
    policy_loss = (loss if loss_type in ITEM_NORMALISED else total).detach()
    if bonus_in_policy_loss:
        with torch.no_grad():
            policy_loss = policy_loss + apply_coef * (entropies * mask).sum() / mask.sum().clamp(min=1.0)

    if self._entropy_bonus_enabled:
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        if apply_coef != 0.0 and not bonus_in_policy_loss:
            # TRL's expression: over the top-entropy tokens when masked (policy_loss's term averages
            # over `mask`), and for the num_items types (see above).
            entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation
            loss = loss - apply_coef * entropy_loss
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        # TRL 1.16's adaptive entropy controller, unchanged.
        if self.use_adaptive_entropy and mode == "train":
            stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
            if self._entropy_window_stats is None:
                self._entropy_window_stats = stats
            else:
                self._entropy_window_stats = self._entropy_window_stats + stats
            if self.accelerator.sync_gradients:
                window_stats = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (window_stats[0] / window_stats[1].clamp(min=1.0)).item()
                args = self.args
                if world_entropy <= args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    if self.aux_loss_enabled:
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

    _log_metrics(self, mode, mask, advantages, coef_1, per_token_logps, entropies, ref_logps, phi_seq)
    return loss


@torch.no_grad()
def _log_metrics(self, mode, mask, advantages, coef_1, per_token_logps, entropies, ref_logps, phi_seq):
    """TRL 1.16's metrics of _compute_loss: its expressions, on detached tensors."""
    from trl.trainer.utils import nanmax, nanmin

    def masked_seq_mean(x):
        if x.shape[1] == 1:  # sequence level: one value per sequence
            return x.squeeze(1)
        return (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            local_sum, local_count = (x * mask).sum(), mask.sum().float()
        totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    metrics = self._metrics[mode]
    if self.beta != 0.0:
        lp = per_token_logps.detach()
        per_token_kl = torch.exp(ref_logps - lp) - (ref_logps - lp) - 1
        if self.args.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
        metrics["kl"].append(global_masked_mean(per_token_kl))
    metrics["entropy"].append(global_masked_mean(entropies.detach()))

    if self.loss_type in CLIP_TYPES:
        if self.args.delta is not None:  # TRL's clip ratios are of its delta-clamped coef_1
            coef_1 = torch.clamp(coef_1, max=self.args.delta)
        is_low_clipped = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)
        is_high_clipped = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)
        is_region_clipped = is_low_clipped | is_high_clipped
        metrics["clip_ratio/low_mean"].append(global_masked_mean(is_low_clipped.float()))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(is_high_clipped.float()))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(is_region_clipped.float()))
        gathered_low_clip = self.accelerator.gather(masked_seq_mean(is_low_clipped.float()))
        metrics["clip_ratio/low_min"].append(nanmin(gathered_low_clip).item())
        gathered_high_clip = self.accelerator.gather(masked_seq_mean(is_high_clipped.float()))
        metrics["clip_ratio/high_max"].append(nanmax(gathered_high_clip).item())
    elif self.loss_type == "cispo":
        is_cispo_clipped = (coef_1 > self.epsilon_high) & (advantages > 0)
        metrics["cispo_clip_ratio"].append(global_masked_mean(is_cispo_clipped.float()))
    elif self.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"].append(global_masked_mean(phi_seq))
