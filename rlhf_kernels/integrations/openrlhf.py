"""OpenRLHF drop-ins (OpenRLHF 0.11 signatures and semantics).

    from rlhf_kernels.integrations.openrlhf import PolicyLoss, ValueLoss, DPOLoss, compute_approx_kl, ...

Semantics kept: log-probs in fp32 for fp32 logits (the logits' dtype otherwise) with
logits divided in place by the temperature, as OpenRLHF does; every KL estimator
clamped to +-10; compute_reward places the score at the last action_mask == 1
position (the last position for a row without one) and does not mask the KL term;
GAE multiplies rewards and values by the mask first (returns use the masked values);
cumulative returns discount through mask-0 positions; the log-ratio is clamped to
+-20; ppo_kl = masked mean of old - new log-probs. Departures: a loss over no valid
token is 0 (OpenRLHF: 0/0); policy_loss_type "gspo" and the vLLM importance-sampling
correction raise NotImplementedError.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

import rlhf_kernels as rk

from ._aggregation import global_scale

KL_CLAMP = 10.0
LOG_RATIO_CLAMP = 20.0


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    if temperature != 1.0:
        logits.div_(temperature)  # OpenRLHF's side effect: callers see the scaled logits
    logprobs = rk.token_logprobs(logits, labels)
    return logprobs if logits.dtype in (torch.float32, torch.float64) else logprobs.to(logits.dtype)


def compute_approx_kl(log_probs: torch.Tensor, log_probs_base: torch.Tensor, kl_estimator: str = "k1") -> torch.Tensor:
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    return rk.kl_penalty(log_probs.float(), log_probs_base.float(), estimator=kl_estimator, clamp=KL_CLAMP)


def compute_reward(
    r: Union[torch.Tensor, float],
    kl_coef: float,
    kl: torch.Tensor,
    action_mask: Optional[torch.Tensor] = None,
    reward_clip_range: Optional[tuple[float, float]] = None,
) -> torch.Tensor:
    """-kl_coef * kl everywhere, plus r at each row's last action_mask == 1 position."""
    kl_coef = max(kl_coef, 0.0)
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    r = torch.as_tensor(r, dtype=kl.dtype, device=kl.device).expand(kl.shape[0])
    eos = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1)
    # kl_shaped_rewards with estimator k1 against 0 is kl itself; an all-ones mask keeps
    # OpenRLHF's unmasked KL term.
    rewards, _ = rk.kl_shaped_rewards(
        r, kl, torch.zeros_like(kl), torch.ones_like(kl), kl_coef=kl_coef, estimator="k1", score_index=eos
    )
    return rewards.to(kl.dtype)


def get_advantages_and_returns(
    values: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float, lambd: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The experience maker's method without self: GAE on mask-multiplied rewards and values."""
    return rk.gae(rewards, values, action_mask, gamma=gamma, lam=lambd, mask_mode="multiply")


def get_cumulative_returns(rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t m_t + gamma G_{t+1} over every position (REINFORCE returns)."""
    if action_mask is None:
        action_mask = torch.ones_like(rewards)
    returns, _ = rk.gae(rewards, torch.zeros_like(rewards), action_mask, gamma=gamma, lam=1.0, mask_mode="multiply")
    return returns


def _agg(token_level_loss: bool) -> str:
    return "token-mean" if token_level_loss else "seq-mean-token-mean"


def _to_global(loss: torch.Tensor, mask: torch.Tensor, agg: str, dp_size, batch_num_tokens, global_batch_size):
    """OpenRLHF's aggregate_loss normalisation applied to the kernels' `agg` result."""
    scale = global_scale(
        mask, agg, dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size
    )
    return loss * scale.to(loss.dtype)


class PolicyLoss(nn.Module):
    """PPO clipped policy loss; forward returns (loss, clip_ratio, ppo_kl, vllm_kl=None)."""

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: Optional[float] = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        enable_vllm_is_correction: bool = False,
        vllm_is_truncated_threshold: Optional[list] = None,
        vllm_is_correction_type: str = "tis",
    ) -> None:
        super().__init__()
        if policy_loss_type != "ppo" or enable_vllm_is_correction:
            raise NotImplementedError(
                "rlhf_kernels' PolicyLoss covers policy_loss_type='ppo' without the vLLM IS correction; "
                f"got policy_loss_type={policy_loss_type!r}, enable_vllm_is_correction={enable_vllm_is_correction}"
            )
        if dual_clip is not None:
            assert dual_clip > 1.0, f"dual_clip must be > 1.0, got {dual_clip}"
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.token_level_loss = token_level_loss
        self.policy_loss_type = policy_loss_type

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: Optional[torch.Tensor] = None,
        rollout_log_probs: Optional[torch.Tensor] = None,
        dp_size: int = 1,
        batch_num_tokens: Optional[float] = None,
        global_batch_size: Optional[float] = None,
    ):
        mask = torch.ones_like(log_probs) if action_mask is None else action_mask
        agg = _agg(self.token_level_loss)
        loss, stats = rk.ppo_policy_loss(
            log_probs, old_log_probs, advantages, mask, clip_low=self.clip_eps_low, clip_high=self.clip_eps_high,
            dual_clip=self.dual_clip, log_ratio_clamp=LOG_RATIO_CLAMP, agg=agg,
        )  # fmt: skip
        ppo_kl = rk.masked_mean((old_log_probs - log_probs).detach(), mask)
        loss = _to_global(loss, mask, agg, dp_size, batch_num_tokens, global_batch_size)
        return loss, stats["clipfrac"], ppo_kl, None


class ValueLoss(nn.Module):
    """0.5 * aggregated max((v - R)^2, (old + clamp(v - old, +-clip_eps) - R)^2); clip_eps None: unclipped."""

    def __init__(self, clip_eps: Optional[float] = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(
        self,
        values: torch.Tensor,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        action_mask: Optional[torch.Tensor] = None,
        dp_size: int = 1,
        batch_num_tokens: Optional[float] = None,
        global_batch_size: Optional[float] = None,
    ) -> torch.Tensor:
        mask = torch.ones_like(values) if action_mask is None else action_mask
        agg = _agg(self.token_level_loss)
        loss, _ = rk.ppo_value_loss(values, old_values, returns, mask, clip=self.clip_eps, agg=agg)
        return _to_global(loss, mask, agg, dp_size, batch_num_tokens, global_batch_size)


class DPOLoss(nn.Module):
    """cDPO (label_smoothing) or IPO (ipo=True, on the log-probs given: not length-normalised)."""

    def __init__(self, beta: float, label_smoothing: float = 0.0, ipo: bool = False) -> None:
        super().__init__()
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.ipo = ipo

    def forward(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        losses, chosen_rewards, rejected_rewards = rk.dpo_loss(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            beta=self.beta, loss_type="ipo" if self.ipo else "sigmoid",
            label_smoothing=0.0 if self.ipo else self.label_smoothing,
        )  # fmt: skip
        return losses.mean(), chosen_rewards, rejected_rewards
