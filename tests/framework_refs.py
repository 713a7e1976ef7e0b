"""The frameworks' own code for the drop-in parity tests, transcribed from their
sources where the package cannot be imported here: OpenRLHF 0.11.0 (the legacy
drop-ins PolicyLossV0110 / compute_approx_kl_v0110 that patch() installs for 0.11.0 and
0.11.1; openrlhf/models/utils.py, models/loss.py, trainer/ppo_utils/experience_maker.py.
OpenRLHF 0.11.2 is compared against its own files in test_openrlhf.py) and verl 0.9 (verl/utils/torch_functional.py,
verl/trainer/ppo/core_algos.py: they import ray). TRL 1.16 is tested against the
installed package; its PPO-era masked statistics (trl.core up to 0.11) are here.
Only what the tests call is kept; the logic is unchanged.
"""

import torch
import torch.nn.functional as F

# --------------------------------------------------------------- TRL <= 0.11 core --


def trl_masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask, unbiased=True):
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("The sum of the mask is zero")
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


# ---------------------------------------------------------------- OpenRLHF 0.11.0 --


def openrlhf_compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1"):
    log_ratio = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k1":
        pass
    elif kl_estimator == "k2":
        log_ratio = log_ratio**2 / 2.0
    elif kl_estimator == "k3":
        log_ratio = (-log_ratio).exp() - 1 + log_ratio
    return log_ratio.clamp(min=-10, max=10)


def openrlhf_compute_reward(r, kl_coef, kl, action_mask=None, reward_clip_range=None):
    if kl_coef <= 0.0:
        kl_coef = 0.0
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    kl_reward = -kl_coef * kl
    eos_indices = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    last_reward = torch.zeros_like(kl).scatter_(dim=1, index=eos_indices, src=r.unsqueeze(1).to(kl.dtype))
    return last_reward + kl_reward


def openrlhf_log_probs_from_logits(logits, labels, temperature=1.0):
    if temperature != 1.0:
        logits.div_(temperature)
    if logits.dtype in [torch.float32, torch.float64]:
        logits_labels = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
        lse = torch.logsumexp(logits, dim=-1)
        return logits_labels - lse
    rows = [F.log_softmax(r, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1) for r, y in zip(logits, labels)]
    return torch.stack(rows)


def openrlhf_masked_mean(tensor, mask, dim=None):
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def openrlhf_aggregate_loss(loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None,
                            global_batch_size=None):  # fmt: skip
    if token_level_loss:
        if batch_num_tokens is None:
            return openrlhf_masked_mean(loss, loss_mask, dim=None)
        return (loss * loss_mask).sum() / batch_num_tokens * dp_size
    token_counts = loss_mask.sum(dim=-1)
    seq_loss = (loss * loss_mask).sum(dim=-1) / (token_counts + 1e-8)
    seq_mask = (token_counts > 0).float()
    if global_batch_size is None:
        return openrlhf_masked_mean(seq_loss, seq_mask, dim=None)
    return (seq_loss * seq_mask).sum() / global_batch_size * dp_size


def openrlhf_policy_loss(log_probs, old_log_probs, advantages, action_mask, clip_eps_low=0.2, clip_eps_high=0.2,
                         dual_clip=None, token_level_loss=True, policy_loss_type="ppo", enable_vllm_is_correction=False,
                         vllm_is_truncated_threshold=None, vllm_is_correction_type="tis", rollout_log_probs=None,
                         **agg):  # fmt: skip
    """PolicyLoss(...)(log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, **agg) of 0.11.0."""
    if policy_loss_type == "gspo":
        token_level_loss = False
    raw = log_probs - old_log_probs
    if policy_loss_type == "ppo":
        ratio = raw.clamp(min=-20.0, max=20.0).exp()
    else:
        log_ratio = log_probs - rollout_log_probs if enable_vllm_is_correction else raw
        ratio = (log_ratio * action_mask).sum(dim=-1) / action_mask.sum(dim=-1).clamp(min=1)
        ratio = ratio.exp().unsqueeze(-1) * action_mask
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * advantages
    if dual_clip is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        clip2 = torch.max(clip1, dual_clip * advantages)
        loss = -torch.where(advantages < 0, clip2, clip1)
    vllm_kl = None
    if enable_vllm_is_correction and policy_loss_type == "ppo":
        low_threshold, high_threshold = vllm_is_truncated_threshold
        rollout_log_ratio = old_log_probs - rollout_log_probs
        if vllm_is_correction_type == "icepop":
            vllm_is = torch.exp(rollout_log_ratio).detach()
            mask = (vllm_is >= low_threshold) & (vllm_is <= high_threshold)
            vllm_is = vllm_is * mask
            loss = vllm_is * loss
        elif vllm_is_correction_type == "seq-mask-tis":
            seq_log_ratio = openrlhf_masked_mean(rollout_log_ratio, action_mask, dim=-1)
            seq_is = torch.exp(seq_log_ratio)
            seq_mask = (seq_is >= low_threshold) & (seq_is <= high_threshold)
            vllm_is = torch.exp(rollout_log_ratio).detach()
            loss = seq_mask.unsqueeze(-1) * vllm_is * loss
        else:
            vllm_is = torch.exp(rollout_log_ratio).clamp(min=low_threshold, max=high_threshold).detach()
            loss = vllm_is * loss
        vllm_kl = openrlhf_masked_mean(rollout_log_probs - old_log_probs, action_mask, dim=None)
    loss = openrlhf_aggregate_loss(loss, action_mask, token_level_loss, **agg)
    clip_ratio = openrlhf_masked_mean(torch.lt(surr2, surr1).float(), action_mask, dim=None)
    ppo_kl = openrlhf_masked_mean(-raw.detach(), action_mask, dim=None)
    return loss, clip_ratio, ppo_kl, vllm_kl


def openrlhf_value_loss(values, old_values, returns, action_mask, clip_eps=None, token_level_loss=True, **agg):
    if clip_eps is not None:
        values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        loss = torch.max((values_clipped - returns) ** 2, (values - returns) ** 2)
    else:
        loss = (values - returns) ** 2
    return 0.5 * openrlhf_aggregate_loss(loss, action_mask, token_level_loss, **agg)


def openrlhf_dpo_loss(beta, label_smoothing, ipo, pc, pr, rc, rr):
    logits = (pc - pr) - (rc - rr)
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses.mean(), beta * (pc - rc).detach(), beta * (pr - rr).detach()


def openrlhf_get_advantages_and_returns(values, rewards, action_mask, gamma, lambd):
    lastgaelam = 0
    advantages_reversed = []
    response_length = rewards.size(1)
    if action_mask is not None:
        values = action_mask * values
        rewards = action_mask * rewards
    for t in reversed(range(response_length)):
        nextvalues = values[:, t + 1] if t < response_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lambd * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages.detach(), advantages + values


def openrlhf_get_cumulative_returns(rewards, action_mask, gamma):
    returns = torch.zeros_like(rewards)
    cumulative_return = torch.zeros(rewards.size(0), device=rewards.device)
    if action_mask is not None:
        rewards = action_mask * rewards
    for t in reversed(range(rewards.size(1))):
        cumulative_return = rewards[:, t] + gamma * cumulative_return
        returns[:, t] = cumulative_return
    return returns


# ----------------------------------------------------------------------- verl 0.9 --


def verl_masked_sum(values, mask, axis=None):
    valid_values = torch.where(mask.bool(), values, 0.0)
    return (valid_values * mask).sum(axis=axis)


def verl_masked_mean(values, mask, axis=None):
    return verl_masked_sum(values, mask, axis) / (mask.sum(axis=axis) + 1e-8)


def verl_masked_var(values, mask, unbiased=True):
    mean = verl_masked_mean(values, mask)
    variance = verl_masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        variance = variance * mask_sum / (mask_sum - 1)
    return variance


def verl_masked_whiten(values, mask, shift_mean=True):
    mean, var = verl_masked_mean(values, mask), verl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def verl_compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    nextvalues = 0
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(token_level_rewards.shape[-1])):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return verl_masked_whiten(advantages, response_mask), returns


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):  # fmt: skip
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            batch_num_tokens = loss_mask.sum()
        return verl_masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return verl_masked_sum(loss_mat, loss_mask) * dp_size
    if loss_agg_mode in ["seq-mean-token-sum", "seq-mean-token-sum-norm"]:
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        loss = verl_masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss /= loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return loss
    seq_mask = torch.sum(loss_mask, dim=-1)
    seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
    seq_mask = (seq_mask > 0).float()
    if global_batch_size is None:
        global_batch_size = seq_mask.sum()
    return verl_masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size


def verl_compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                             cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean"):  # fmt: skip
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    cliprange_low = cliprange if cliprange_low is None else cliprange_low
    cliprange_high = cliprange if cliprange_high is None else cliprange_high
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
    )
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def verl_compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean",
                            **agg):  # fmt: skip
    vpredclipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * verl_agg_loss(torch.max(vf_losses1, vf_losses2), response_mask, loss_agg_mode, **agg)
    return vf_loss, verl_masked_mean(torch.gt(vf_losses2, vf_losses1).float(), response_mask)


def verl_kl_penalty_forward(logprob, ref_logprob, kl_penalty):
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty == "abs":
        return (logprob - ref_logprob).abs()
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def verl_kl_penalty(logprob, ref_logprob, kl_penalty):
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    forward_score = verl_kl_penalty_forward(logprob, ref_logprob, base)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return forward_score
    backward_score = 0.5 * (logprob - ref_logprob).square()
    return backward_score - backward_score.detach() + forward_score.detach()


def verl_entropy_from_logits(logits):
    pd = torch.nn.functional.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)
