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
"""

from __future__ import annotations

from typing import Optional

import torch

import rlhf_kernels as rk

from ._aggregation import global_scale, kernel_agg

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
    the logits; reduction "sum" / "mean" reduces the log-probs (the entropy stays per token)."""
    if dist_process_group is not None:
        raise NotImplementedError("vocabulary-parallel linear_cross_entropy (dist_process_group) is not supported")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"Invalid reduction: {reduction}")
    logprobs, entropy = rk.linear_logprobs(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), temperature=temperature, return_entropy=True
    )
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy
