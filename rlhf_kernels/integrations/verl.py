"""verl drop-ins (verl 0.9 signatures and semantics).

    from rlhf_kernels.integrations import verl as rk_verl
    advantages, returns = rk_verl.compute_gae_advantage_return(rewards, values, response_mask, gamma, lam)

Semantics kept: GAE skips mask-0 positions (values and advantages carried through)
and whitens the advantages inside (unbiased, +1e-8, masked positions whitened too);
the KL names of verl (kl/k1, abs, mse/k2, low_var_kl and k3 = the clamped low-variance
estimator, and a "+" suffix for k2's gradient with the named estimator's value); the
log-ratio clamped to +-20 and dual clip c (default 3) always on; pg_clipfrac,
ppo_kl (masked mean of the negative clamped log-ratio) and pg_clipfrac_lower; the value
clip as old +- cliprange; agg_loss's global normalisations (dp_size,
batch_num_tokens, global_batch_size, loss_scale_factor; seq modes count only
sequences with a token). Departures: means over no valid token are 0 (verl: 0 or
0/0); masked_whiten's errors for a mask sum of 0 or 1 are verl's own.

patch() / unpatch() / patched() (verl 0.9.1, SUPPORTED_VERSIONS) run unchanged verl code
on these drop-ins:

    from rlhf_kernels.integrations import verl as rk_verl
    rk_verl.patch()        # algorithm.adv_estimator and actor.policy_loss.loss_mode now pick ours
    ...
    rk_verl.unpatch()      # or: with rk_verl.patched(): ...

patch() swaps the entries of core_algos.ADV_ESTIMATOR_REGISTRY and POLICY_LOSS_REGISTRY
named in ADV_ESTIMATORS and POLICY_LOSSES for adapters with verl's exact signatures
and return values (estimators: (advantages, returns); policy losses: (loss, metrics with
verl's keys)), and every attribute of core_algos and of the loaded verl modules that
holds one of those functions or one of MODULE_FUNCTIONS (agg_loss, kl_penalty,
compute_value_loss, the functional compute_policy_loss), so get_adv_estimator_fn /
get_policy_loss_fn, the trainer's direct calls (core_algos.compute_grpo_outcome_advantage,
compute_gae_advantage_return) and dp_actor's `from core_algos import agg_loss, kl_penalty`
all reach ours. A registry entry that is not verl's own function (a user's
register_adv_est) is left alone. Every verl 0.9.1 policy loss is covered. bypass_mode
keeps verl's rollout_corr_helper for the rollout correction (the IS weights and rejected
mask of sg(log_prob) vs the rollout, and its rollout_corr/* metrics), as verl's trainer
runs it outside bypass mode, and computes the loss with one rk.policy_loss call. clip_cov's random draw is verl's own torch.randperm
call on the global generator: a seed gives verl's tokens.
Like the frameworks' own, verl's actors run in Ray workers: patch() there too (e.g.
runtime_env={"worker_process_setup_hook": "rlhf_kernels.integrations.verl.patch"}).
The adapters compute in fp32 (float64 for float64 input) and return verl's dtypes;
metrics are Python floats as verl's.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

import torch

import rlhf_kernels as rk

from ..reference.grpo import _dppo_valid
from ._aggregation import global_scale, kernel_agg
from ._patching import Patches, loaded_modules, patched_block
from ._version import supported_version

# The verl releases these drop-ins follow; patch() patches nothing on another.
SUPPORTED_VERSIONS = ("0.9.1",)

LOG_RATIO_CLAMP = 20.0
KL_NAMES = {
    "kl": "k1",
    "k1": "k1",
    "abs": "abs",
    "mse": "k2",
    "k2": "k2",
    "low_var_kl": "low_var_kl",
    "k3": "low_var_kl",
}


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """log p(labels): fp32 for fp32 logits, the logits' dtype for 16-bit ones (verl's
    log_softmax path). inplace_backward writes d logits over the logits where verl does:
    on CUDA tensors (its flash-attn cross-entropy path), never on CPU ones (verl's
    log_softmax fallback leaves the caller's logits alone, so an earlier op on the same
    logits, e.g. entropy first, still backpropagates)."""
    inplace = inplace_backward and logits.requires_grad and logits.is_cuda
    logprobs = rk.token_logprobs(logits, labels, inplace_backward=inplace)
    return logprobs if logits.dtype in (torch.float32, torch.float64) else logprobs.to(logits.dtype)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp(z) - sum(softmax(z) z) per row, in the logits' dtype."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = rk.token_logprobs(logits, labels, return_entropy=True)
    return entropy.to(logits.dtype)


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base == "full":
        raise NotImplementedError("kl_penalty='full' needs the full distributions (not supported by verl either)")
    if base not in KL_NAMES:
        raise NotImplementedError(f"kl_penalty {kl_penalty!r} (known: {sorted(KL_NAMES)}, with an optional '+')")
    # Computed in fp32 by the kernel, returned in the input dtype as verl's.
    forward = rk.kl_penalty(logprob, ref_logprob, estimator=KL_NAMES[base])
    if kl_penalty.endswith("+") and base not in ("mse", "k2"):
        # Straight-through: k2's gradient, the named estimator's value.
        backward = rk.kl_penalty(logprob, ref_logprob, estimator="k2")
        forward = backward - backward.detach() + forward.detach()
    return forward.to(logprob.dtype)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis=None) -> torch.Tensor:
    return rk.masked_mean(values, mask, dim=axis)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    count = mask.sum()
    if count == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    if count == 1:
        raise ValueError("The sum of the mask is one, which can cause a division by zero.")
    return rk.masked_whiten(values, mask, shift_mean=shift_mean, unbiased=True, eps=1e-8, fill_masked=False)


def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma, lam
) -> tuple[torch.Tensor, torch.Tensor]:
    """(whitened advantages, returns = raw advantages + values)."""
    advantages, returns = rk.gae(
        token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam), mask_mode="carry"
    )
    return masked_whiten(advantages, response_mask), returns


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    loss_scale_factor: Optional[int] = None,
) -> torch.Tensor:
    """verl's aggregation of a per-token loss [B, T]: masked means by the fused kernel,
    scaled to verl's global normalisation."""
    if dp_size > 1 and loss_agg_mode == "token-mean" and batch_num_tokens is None:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and loss_agg_mode.startswith("seq-mean") and global_batch_size is None:
        raise ValueError("global_batch_size is required when dp_size > 1")
    agg = kernel_agg(loss_agg_mode)
    mask = loss_mask.to(loss_mat.dtype)
    if agg == "token-mean":
        loss = rk.masked_mean(loss_mat, mask)
    else:
        sequence_means = rk.masked_mean(loss_mat, mask, dim=-1)
        counts = mask.sum(-1)
        if agg == "seq-mean-token-mean":
            loss = rk.masked_mean(sequence_means, (counts > 0).to(loss_mat.dtype))
        elif agg == "seq-mean-token-sum":
            loss = (sequence_means * counts).mean()
        elif agg == "seq-mean-token-sum-norm":
            loss = (sequence_means * counts).sum() / loss_mat.shape[-1]
        else:
            raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    scale = global_scale(
        loss_mask, loss_agg_mode, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor,
    )  # fmt: skip
    return (loss * scale.to(loss.dtype)).to(loss_mat.dtype)


def compute_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: Optional[float] = None,
    cliprange_low: Optional[float] = None,
    cliprange_high: Optional[float] = None,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
):
    """Returns (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), as verl's functional
    compute_policy_loss."""
    assert clip_ratio_c > 1.0, (
        "The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0,"
        + f" but get the value: {clip_ratio_c}."
    )
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    agg = kernel_agg(loss_agg_mode)
    loss, stats = rk.ppo_policy_loss(
        log_prob, old_log_prob, advantages, response_mask, clip_low=low, clip_high=high, dual_clip=clip_ratio_c,
        log_ratio_clamp=LOG_RATIO_CLAMP, agg=agg,
    )  # fmt: skip
    loss = loss * global_scale(response_mask, loss_agg_mode).to(loss.dtype)
    negative_kl = (log_prob - old_log_prob).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ppo_kl = rk.masked_mean(-negative_kl, response_mask)
    dtype = log_prob.dtype  # verl computes (and returns) in the input dtype; the kernels in fp32
    return loss.to(dtype), stats["clipfrac"].to(dtype), ppo_kl.to(dtype), stats["dual_clipfrac"].to(dtype)


def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    loss_scale_factor: Optional[int] = None,
):
    """Returns (vf_loss, vf_clipfrac): 0.5 * agg of max((v - R)^2, (clip(v, old +- c) - R)^2)."""
    loss, stats = rk.ppo_value_loss(
        vpreds, values, returns, response_mask, clip=cliprange_value, agg=kernel_agg(loss_agg_mode)
    )
    scale = global_scale(
        response_mask, loss_agg_mode, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor,
    )  # fmt: skip
    dtype = vpreds.dtype  # verl's dtype; the kernels compute in fp32
    return (loss * scale.to(loss.dtype)).to(dtype), stats["vf_clipfrac"].to(dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropy) of the flattened tokens, fp32, from hidden @ weight.T / T without
    the logits; reduction "sum" / "mean" reduces the log-probs (the entropy stays per token).
    dist_process_group: weight is this rank's vocabulary shard (verl's tensor-parallel
    lm_head), labels global; every rank gets the full results (rk.linear_logprobs with
    process_group; uneven shards work too)."""
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"Invalid reduction: {reduction}")
    logprobs, entropy = rk.linear_logprobs(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), temperature=temperature, return_entropy=True,
        process_group=dist_process_group,
    )  # fmt: skip
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


# ------------------------------------------------ advantage estimators (registry) --
# verl 0.9.1's registered estimators, each with verl's signature, returning
# (advantages, returns) [B, T] in verl's dtype. `index` is verl's group labels (the
# "uid" array: strings, ints, any hashable values, or an integer tensor).


def _group_index(index, device) -> torch.Tensor:
    """Dense group ids [B] of verl's labels; equal labels share a group (verl's defaultdict)."""
    if isinstance(index, torch.Tensor) and index.dtype in (torch.int32, torch.int64):
        return index.reshape(-1).to(device)
    labels = index.tolist() if hasattr(index, "tolist") else list(index)
    dense: dict = {}
    return torch.tensor([dense.setdefault(label, len(dense)) for label in labels], dtype=torch.long, device=device)


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for x in tensors[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype if dtype.is_floating_point else torch.float32


def _outcome(estimator: str, token_level_rewards, response_mask, index, **options):
    """A sequence estimator on the summed token rewards, broadcast over the response."""
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        groups = _group_index(index, scores.device)
        advantages = rk.group_advantages(scores, groups, estimator=estimator, **options)
        out = rk.broadcast_advantages(advantages, response_mask).to(_out_dtype(token_level_rewards, response_mask))
    return out, out


def _lengths(response_mask):
    return response_mask.sum(dim=-1).to(torch.float64)


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _outcome("grpo", token_level_rewards, response_mask, index, eps=epsilon, norm_by_std=norm_adv_by_std_in_grpo)


def compute_grpo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _outcome(
        "grpo_vectorized", token_level_rewards, response_mask, index, eps=epsilon, norm_by_std=norm_adv_by_std_in_grpo
    )


def compute_gdpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config=None,
    non_tensor_batch: Optional[dict] = None,
    batch: Optional[dict] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GDPO: each reward component (algorithm.gdpo_reward_keys of non_tensor_batch) GRPO-
    normalised in its group, weighted (gdpo_reward_weights), summed and whitened; with
    no config / non_tensor_batch / batch, the summed token rewards are the one component."""
    weights = None
    with torch.no_grad():
        if config is not None and non_tensor_batch is not None and batch is not None:
            import numpy as np

            keys = config.get("gdpo_reward_keys", None)
            assert keys, (
                "GDPO requires 'algorithm.gdpo_reward_keys' listing the individual reward "
                "component keys returned by compute_score (e.g. ['format_reward', 'accuracy_reward'])."
            )
            columns = []
            for key in keys:
                assert key in non_tensor_batch, (
                    f"GDPO reward key '{key}' not found in non_tensor_batch. "
                    f"Available keys: {list(non_tensor_batch.keys())}. "
                    f"Make sure your compute_score returns a dict containing '{key}'."
                )
                component = np.asarray(non_tensor_batch[key], dtype=np.float32)
                columns.append(torch.tensor(component, device=token_level_rewards.device))
            scores = torch.stack(columns, dim=-1)  # verl places each at the last response token and sums
            if config.get("gdpo_reward_weights", None) is not None:
                weights = [float(w) for w in config.get("gdpo_reward_weights")]
        else:
            scores = token_level_rewards.sum(dim=-1, keepdim=True)
        advantages = rk.group_advantages(
            scores, _group_index(index, scores.device), estimator="gdpo", eps=epsilon,
            norm_by_std=norm_adv_by_std_in_grpo, lengths=_lengths(response_mask), reward_weights=weights,
        )  # fmt: skip
        out = rk.broadcast_advantages(advantages, response_mask).to(_out_dtype(scores, response_mask))
    return out, out


def compute_grpo_passk_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass@k: norm_adv_by_std_in_grpo is read from config (verl ignores the argument)."""
    assert config is not None
    norm = config.get("norm_adv_by_std_in_grpo", True)
    return _outcome("grpo_passk", token_level_rewards, response_mask, index, eps=epsilon, norm_by_std=norm)


def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _outcome(
        "reinforce_plus_plus_baseline", token_level_rewards, response_mask, index, lengths=_lengths(response_mask)
    )


def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _outcome("rloo", token_level_rewards, response_mask, index)


def compute_opo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _outcome("opo", token_level_rewards, response_mask, index, lengths=_lengths(response_mask))


def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config=None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Discounted returns over valid tokens (mask-0 positions carry the running return,
    their own return is 0), whitened: (advantages, returns)."""
    assert config is not None
    with torch.no_grad():
        dtype = _out_dtype(token_level_rewards, response_mask)
        mask = response_mask.to(dtype)
        returns = rk.discounted_returns(token_level_rewards, response_mask, gamma=float(config.gamma)) * mask
        advantages = masked_whiten(returns, mask) * mask
    return advantages.to(dtype), returns.to(dtype)


def compute_remax_outcome_advantage(
    token_level_rewards: torch.Tensor,
    reward_baselines: torch.Tensor,
    response_mask: torch.Tensor,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """returns_t = sum_{u >= t} r_u m_u; advantages = returns - baseline m."""
    with torch.no_grad():
        dtype = _out_dtype(token_level_rewards, response_mask)
        returns = rk.discounted_returns(token_level_rewards, response_mask).to(dtype)
        advantages = returns - reward_baselines.unsqueeze(-1) * response_mask
    return advantages.to(dtype), returns


def compute_gpg_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    f_norm: float = 1.0,
    alpha: float = 1.0,
    config=None,
    **kwargs,
):
    """alpha is B / #(scores != 0), as verl computes it (the argument is unused there too)."""
    return _outcome("gpg", token_level_rewards, response_mask, index, f_norm=f_norm)


def compute_rloo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _outcome("rloo_vectorized", token_level_rewards, response_mask, index)


def _optimal_token_baseline(
    estimator, token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights,
    handle_zero_tail, epsilon,
):  # fmt: skip
    with torch.no_grad():
        dtype = _out_dtype(token_level_rewards, response_mask)
        advantages = rk.group_advantages(
            None, _group_index(index, token_level_rewards.device), estimator=estimator,
            token_rewards=token_level_rewards, mask=response_mask, old_logprobs=old_log_probs,
            sum_pi_squared=sum_pi_squared, is_weights=rollout_is_weights, handle_zero_tail=handle_zero_tail,
            eps=epsilon,
        )  # fmt: skip
        returns = rk.discounted_returns(token_level_rewards, response_mask)
    return advantages.to(dtype), returns.to(dtype)


def compute_optimal_token_baseline_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    old_log_probs: torch.Tensor,
    sum_pi_squared: torch.Tensor,
    rollout_is_weights: Optional[torch.Tensor] = None,
    handle_zero_tail: bool = True,
    epsilon: float = 1e-8,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal Token Baseline: (advantages, returns to go); see rk.group_advantages."""
    return _optimal_token_baseline(
        "optimal_token_baseline", token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared,
        rollout_is_weights, handle_zero_tail, epsilon,
    )  # fmt: skip


def compute_multi_turn_optimal_token_baseline_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    old_log_probs: torch.Tensor,
    sum_pi_squared: torch.Tensor,
    rollout_is_weights: Optional[torch.Tensor] = None,
    handle_zero_tail: bool = True,
    epsilon: float = 1e-8,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-turn (tir) Optimal Token Baseline: sequences aligned by valid-token ordinal."""
    return _optimal_token_baseline(
        "tir_optimal_token_baseline", token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared,
        rollout_is_weights, handle_zero_tail, epsilon,
    )  # fmt: skip


# ------------------------------------------------------ policy losses (registry) --
# verl 0.9.1's registered policy losses: (old_log_prob, log_prob, advantages,
# response_mask, loss_agg_mode, config: ActorConfig, rollout_is_weights) -> (loss,
# metrics), the loss by rk.policy_loss, aggregated as verl's agg_loss with
# config.global_batch_info (dp_size, batch_num_tokens, global_batch_size,
# loss_scale_factor).

_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _clip_range(config) -> tuple[float, float]:
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    return low, high


def _number(x):
    return float(x.item()) if isinstance(x, torch.Tensor) else x


def _policy_loss(loss_type, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, is_weights,
                 **options):  # fmt: skip
    """rk.policy_loss with verl's agg_loss normalisation: (loss in verl's dtype, stats)."""
    info = dict(getattr(config, "global_batch_info", None) or {})
    dp_size = info.pop("dp_size", 1)
    batch_num_tokens = _number(info.pop("batch_num_tokens", None))
    global_batch_size = _number(info.pop("global_batch_size", None))
    loss_scale_factor = _number(info.pop("loss_scale_factor", None))
    if info:
        raise TypeError(f"agg_loss() got unexpected keyword arguments {sorted(info)} (config.global_batch_info)")
    if loss_agg_mode not in _AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    if dp_size > 1 and loss_agg_mode == "token-mean" and batch_num_tokens is None:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and loss_agg_mode.startswith("seq-mean") and global_batch_size is None:
        raise ValueError("global_batch_size is required when dp_size > 1")
    loss, stats = rk.policy_loss(
        log_prob, old_log_prob, advantages, response_mask, loss_type=loss_type, agg=loss_agg_mode,
        is_weights=is_weights, global_tokens=batch_num_tokens if loss_agg_mode == "token-mean" else None,
        num_sequences=global_batch_size if loss_agg_mode.startswith("seq-mean") else None,
        horizon=loss_scale_factor if loss_agg_mode == "seq-mean-token-sum-norm" else None, **options,
    )  # fmt: skip
    if dp_size != 1:
        loss = loss * dp_size
    return loss.to(_out_dtype(log_prob, old_log_prob, advantages)), stats


def _mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return rk.masked_mean(x.to(torch.float32) if x.dtype == torch.bool else x, mask).item()


def _ppo_kl(log_prob, old_log_prob, response_mask, clamp: bool) -> float:
    negative_kl = (log_prob - old_log_prob).detach()
    if clamp:
        negative_kl = negative_kl.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return rk.masked_mean(-negative_kl, response_mask).item()


def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """PPO clip with the dual clip c = clip_ratio_c (3.0) and the +-20 log-ratio clamp."""
    assert config is not None
    low, high = _clip_range(config)
    clip_ratio_c = config.get("clip_ratio_c", 3.0)
    assert clip_ratio_c > 1.0, (
        "The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0,"
        + f" but get the value: {clip_ratio_c}."
    )
    loss, stats = _policy_loss(
        "vanilla", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
        clip_low=low, clip_high=high, dual_clip=clip_ratio_c, log_ratio_clamp=LOG_RATIO_CLAMP,
    )  # fmt: skip
    return loss, {
        "actor/pg_clipfrac": (stats["clipfrac_low"] + stats["clipfrac_high"]).item(),
        "actor/ppo_kl": _ppo_kl(log_prob, old_log_prob, response_mask, clamp=True),
        "actor/pg_clipfrac_lower": stats["dual_clipfrac"].item(),
    }


def _dppo(loss_type, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    assert config is not None
    low, high = _clip_range(config)  # divergence thresholds (TV or binary KL), not ratio clips
    cap = config.get("clip_ratio_c", 20.0)
    loss, _ = _policy_loss(
        loss_type, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
        clip_low=low, clip_high=high, dppo_ratio_cap=cap, log_ratio_clamp=LOG_RATIO_CLAMP,
    )  # fmt: skip
    with torch.no_grad():
        lp, old = log_prob.detach(), old_log_prob.detach()
        valid = _dppo_valid(loss_type, lp, old, advantages.detach(), low, high)
        ratio = torch.exp((lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        metrics = {
            "actor/pg_clipfrac": _mean(1.0 - valid, response_mask),
            "actor/ppo_kl": _ppo_kl(lp, old, response_mask, clamp=True),
            "actor/pg_clipfrac_lower": _mean((ratio > cap).to(valid.dtype) * valid, response_mask),
        }
    return loss, metrics


def compute_policy_loss_dppo_tv(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """DPPO-Binary-TV: clip_ratio(_low/_high) are TV thresholds; the ratio is capped at clip_ratio_c."""
    return _dppo("dppo_tv", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights)  # fmt: skip


def compute_policy_loss_dppo_kl(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """DPPO-Binary-KL: clip_ratio(_low/_high) are binary-KL thresholds."""
    return _dppo("dppo_kl", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights)  # fmt: skip


def compute_policy_loss_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """GSPO: the clipped surrogate on exp(lp - sg(lp) + sg(mean_t(lp - old))), log clamped at 10."""
    assert config is not None
    low, high = _clip_range(config)
    loss, stats = _policy_loss(
        "gspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
        clip_low=low, clip_high=high,
    )  # fmt: skip
    return loss, {
        "actor/pg_clipfrac": (stats["clipfrac_low"] + stats["clipfrac_high"]).item(),
        "actor/ppo_kl": stats["ppo_kl"].item(),
        "actor/pg_clipfrac_lower": 0.0,
    }


def compute_policy_loss_sapo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """SAPO: aggregated seq-mean-token-mean whatever loss_agg_mode says (as verl does)."""
    assert config is not None
    loss, _ = _policy_loss(
        "sapo", old_log_prob, log_prob, advantages, response_mask, "seq-mean-token-mean", config,
        rollout_is_weights, sapo_tau_pos=float(config.tau_pos), sapo_tau_neg=float(config.tau_neg),
        log_ratio_clamp=LOG_RATIO_CLAMP,
    )  # fmt: skip
    return loss, {
        "actor/pg_clipfrac": 0.0,
        "actor/ppo_kl": _ppo_kl(log_prob, old_log_prob, response_mask, clamp=True),
        "actor/pg_clipfrac_lower": 0.0,
    }


def compute_policy_loss_gpg(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """GPG: -A lp, no metrics."""
    assert config is not None
    loss, _ = _policy_loss(
        "gpg", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    return loss, {}


def compute_policy_loss_geo_mean(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """GMPO: a mean over sequences of -mean_t(A) x the geometric mean of the clipped ratios
    (loss_agg_mode and global_batch_info are not used, as in verl)."""
    assert config is not None
    low, high = _clip_range(config)
    loss, stats = rk.policy_loss(
        log_prob, old_log_prob, advantages, response_mask, loss_type="geo_mean", clip_low=low, clip_high=high,
        is_weights=rollout_is_weights,
    )  # fmt: skip
    with torch.no_grad():
        d = (log_prob - old_log_prob).detach()
        clipped = (d < -low) | (d > high)
        metrics = {
            "actor/pg_clipfrac": _mean(clipped & (advantages > 0), response_mask),
            "actor/ppo_kl": stats["ppo_kl"].item(),
            "actor/pg_clipfrac_lower": _mean(clipped & (advantages < 0), response_mask),
        }
    return loss.to(_out_dtype(log_prob, old_log_prob, advantages)), metrics


def compute_policy_loss_dro(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """DRO: -(A lp - beta / 2 (lp - old)^2), beta = policy_loss.dro_beta."""
    assert config is not None
    assert config.policy_loss is not None
    beta = config.policy_loss.dro_beta
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    loss, stats = _policy_loss(
        "dro", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
        dro_beta=float(beta),
    )  # fmt: skip
    return loss, {"actor/ppo_kl": stats["ppo_kl"].item()}


def compute_policy_loss_cispo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """CISPO: -sg(clip(r, 1 - low, 1 + high)) A lp (verl's band clip, +-20 log-ratio clamp)."""
    assert config is not None
    low, high = _clip_range(config)
    loss, _ = _policy_loss(
        "cispo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
        clip_low=low, clip_high=high, cispo_clip="band", log_ratio_clamp=LOG_RATIO_CLAMP,
    )  # fmt: skip
    with torch.no_grad():
        ratio = torch.exp((log_prob - old_log_prob).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        metrics = {
            "actor/pg_clipfrac": _mean((ratio < 1 - low) | (ratio > 1 + high), response_mask),
            "actor/ppo_kl": _ppo_kl(log_prob, old_log_prob, response_mask, clamp=True),
            "actor/pg_clipfrac_lower": 0.0,
        }
    return loss, metrics


def _cov_option(config, name: str, default: float) -> float:
    value = getattr(config.policy_loss, name, None)
    return default if value is None else float(value)


def compute_policy_loss_clip_cov(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Clip-Cov: the clipped surrogate times 0 at tokens drawn at random among those whose
    advantage-log-prob covariance lies in (clip_cov_lb, clip_cov_ub); the draw is verl's
    own torch.randperm on the global generator, so a seed gives verl's tokens."""
    assert config is not None
    assert config.policy_loss is not None
    ratio = _cov_option(config, "clip_cov_ratio", 2e-4)
    assert ratio > 0, "clip_ratio should be larger than 0."
    low, high = _clip_range(config)
    bounds = (ratio, _cov_option(config, "clip_cov_lb", 1.0), _cov_option(config, "clip_cov_ub", 5.0))
    loss, stats = _policy_loss(
        "clip_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
        clip_low=low, clip_high=high, clip_cov=bounds,
    )  # fmt: skip
    return loss, {"actor/pg_clipfrac": stats["cov_fraction"].item(), "actor/ppo_kl": stats["ppo_kl"].item()}


def compute_policy_loss_kl_cov(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """KL-Cov: -A r, plus ppo_kl_coef |lp - old| at the kl_cov_ratio share of valid tokens
    with the largest advantage-log-prob covariance (a batch top-k)."""
    assert config is not None
    assert config.policy_loss is not None
    ratio = _cov_option(config, "kl_cov_ratio", 2e-4)
    assert ratio > 0, "kl_cov_ratio should be larger than 0."
    loss, _ = _policy_loss(
        "kl_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
        kl_cov=(ratio, _cov_option(config, "ppo_kl_coef", 1.0)),
    )  # fmt: skip
    abs_log_ratio = (log_prob - old_log_prob).detach().abs()
    return loss, {"actor/ppo_kl": rk.masked_mean(abs_log_ratio, response_mask).item()}


def compute_policy_loss_bypass_mode(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Bypass mode (old_log_prob = rollout_log_prob), config.policy_loss.rollout_correction's
    loss_type "reinforce" (-w A lp on the rejected mask) or "ppo_clip" (vanilla on the
    rejected mask, no IS weights); rollout_is_weights is ignored, as in verl.

    The correction is verl's own compute_rollout_correction_and_rejection_mask on
    (sg(log_prob), rollout), called as verl calls it, so its rollout_corr/* metrics
    (off-policy KL / PPL / chi2, IS weight spread and ESS, per-option rejection statistics:
    dozens that policy_loss does not compute), its threshold parsing and errors, and its
    torch.distributed batch normalisation are verl's by construction. The weights and
    rejected mask it returns anyway feed one rk.policy_loss call ("gpg" with is_weights, or
    the vanilla adapter) rather than being computed a second time by policy_loss's
    rollout_correction_from="current" (the same values on one process, tested). Every
    rollout_is / rollout_rs configuration runs here: none falls back to verl's function.
    """
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    assert config is not None, "config is required for bypass_mode loss"
    options = config.policy_loss.get("rollout_correction", None) if hasattr(config, "policy_loss") else None
    if options is None:
        raise ValueError(
            "rollout_correction config not found in policy_loss. "
            "When using loss_mode='bypass_mode', ensure rollout_correction config is passed."
        )
    loss_type = options.get("loss_type", "ppo_clip")
    with torch.no_grad():
        weights, mask, rollout_metrics = compute_rollout_correction_and_rejection_mask(
            old_log_prob=log_prob, rollout_log_prob=old_log_prob, response_mask=response_mask,
            rollout_is=options.get("rollout_is", None), rollout_is_threshold=options.get("rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=options.get("rollout_is_batch_normalize", False),
            rollout_rs=options.get("rollout_rs", None), rollout_rs_threshold=options.get("rollout_rs_threshold", None),
        )  # fmt: skip
    if loss_type == "reinforce":
        is_weights = None if weights is None else weights.batch["rollout_is_weights"]
        loss, _ = _policy_loss("gpg", old_log_prob, log_prob, advantages, mask, loss_agg_mode, config, is_weights)
        metrics = {"actor/ppo_kl": _ppo_kl(log_prob, old_log_prob, mask, clamp=False)}
    elif loss_type == "ppo_clip":  # the ratio against the rollout already corrects: no IS weights
        loss, metrics = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, mask, loss_agg_mode, config)
    else:
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    return loss, {**metrics, **rollout_metrics}


# ----------------------------------------------------------------------- patch --

# Registry name -> our adapter, for verl 0.9.1's ADV_ESTIMATOR_REGISTRY and POLICY_LOSS_REGISTRY.
ADV_ESTIMATORS = {
    "gae": compute_gae_advantage_return,
    "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_vectorized_outcome_advantage,
    "gdpo": compute_gdpo_outcome_advantage,
    "grpo_passk": compute_grpo_passk_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "opo": compute_opo_outcome_advantage,
    "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
    "remax": compute_remax_outcome_advantage,
    "gpg": compute_gpg_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "optimal_token_baseline": compute_optimal_token_baseline_advantage,
    "tir_optimal_token_baseline": compute_multi_turn_optimal_token_baseline_advantage,
}
POLICY_LOSSES = {
    "vanilla": compute_policy_loss_vanilla,
    "dppo_tv": compute_policy_loss_dppo_tv,
    "dppo_kl": compute_policy_loss_dppo_kl,
    "gspo": compute_policy_loss_gspo,
    "sapo": compute_policy_loss_sapo,
    "gpg": compute_policy_loss_gpg,
    "geo_mean": compute_policy_loss_geo_mean,
    "dro": compute_policy_loss_dro,
    "cispo": compute_policy_loss_cispo,
    "clip_cov": compute_policy_loss_clip_cov,
    "kl_cov": compute_policy_loss_kl_cov,
    "bypass_mode": compute_policy_loss_bypass_mode,
}
# core_algos functions outside the registries that patch() replaces too.
MODULE_FUNCTIONS = {
    "agg_loss": agg_loss,
    "kl_penalty": kl_penalty,
    "compute_value_loss": compute_value_loss,
    "compute_policy_loss": compute_policy_loss,
}

_patches = Patches()
_patched_module: list = []


def _core_algos():
    return importlib.import_module("verl.trainer.ppo.core_algos")


def _is_verls(fn, module) -> bool:
    """Whether `fn` is verl's own function of `module` (not a user's registration)."""
    return callable(fn) and getattr(fn, "__module__", None) == module.__name__


def patch(module=None) -> int:
    """Swaps verl's registered estimators and policy losses (ADV_ESTIMATORS, POLICY_LOSSES)
    and MODULE_FUNCTIONS for ours in core_algos (`module`, default: imported
    verl.trainer.ppo.core_algos) and in every loaded verl module holding them; returns
    how many entries and attributes were replaced. The installed verl's version is checked
    first (before importing it): one outside SUPPORTED_VERSIONS gets a warning
    (UnsupportedVersionWarning) and nothing is patched (returns 0), as does a second
    patch() before unpatch()."""
    if _patches:
        return 0
    if supported_version("verl", "verl", SUPPORTED_VERSIONS) is None:
        return 0
    module = _core_algos() if module is None else module
    pairs = []
    for registry_name, ours in (("ADV_ESTIMATOR_REGISTRY", ADV_ESTIMATORS), ("POLICY_LOSS_REGISTRY", POLICY_LOSSES)):
        registry = getattr(module, registry_name)
        for name, adapter in ours.items():
            original = registry.get(name)
            if _is_verls(original, module):
                _patches.set_item(registry, name, adapter)
                pairs.append((original, adapter))
    for name, adapter in MODULE_FUNCTIONS.items():
        original = vars(module).get(name)
        if _is_verls(original, module):
            pairs.append((original, adapter))
    _patches.replace_holders([module, *loaded_modules("verl")], pairs)
    if _patches:
        _patched_module.append(module)
    return len(_patches)


def unpatch() -> None:
    """Restores every registry entry and attribute patch() replaced, and verl's function
    wherever a verl module imported ours while patched."""
    _patches.undo([*_patched_module, *loaded_modules("verl")])
    _patched_module.clear()


patched = patched_block(patch, unpatch)
patched.__doc__ = """with patched(module=None): verl runs on rlhf_kernels inside the block."""
