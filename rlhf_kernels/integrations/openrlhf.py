"""OpenRLHF drop-ins (OpenRLHF 0.11.2 signatures and semantics; 0.11.0 and 0.11.1 through
patch(), which installs the classes of the version it finds) and patch() for unchanged
OpenRLHF code.

    from rlhf_kernels.integrations import openrlhf as rk_openrlhf
    rk_openrlhf.patch()       # every loaded openrlhf module that held these names now holds ours
    ...                       # OpenRLHF's unchanged actor / experience maker / losses
    rk_openrlhf.unpatch()     # or: with rk_openrlhf.patched(): ...

    # or import them directly, with openrlhf.models' signatures:
    from rlhf_kernels.integrations.openrlhf import PolicyLoss, ValueLoss, compute_approx_kl, ...

patch() checks the installed openrlhf's version first (SUPPORTED_VERSIONS); another
version gets a warning naming both and nothing is patched. OpenRLHF's actors run in Ray
worker processes: patch() there too, e.g. ray.init(runtime_env={"worker_process_setup_hook":
"rlhf_kernels.integrations.openrlhf.patch"}). RemoteExperienceMaker's
get_advantages_and_returns / get_cumulative_returns (methods) are replaced when
openrlhf.trainer.ppo_utils.experience_maker is loaded at patch() time; the functions are
replaced in openrlhf.models, .models.loss and .models.utils, so a module imported later
that takes them from there gets ours.

Semantics kept (0.11.2): log-probs in fp32 for fp32 logits (the logits' dtype otherwise)
with logits divided in place by the temperature, as OpenRLHF does; every KL estimator
clamped to +-10, k3's log-ratio bounded below at -10 before the exp, and
unbiased_gradient's straight-through gradient w * (log p - log p_ref) with
w = min(exp(log p - log p_old), 10) detached (w = 1 without log_probs_old), output fp32;
compute_reward places the score at the last action_mask == 1 position (the last position
for a row without one) and does not mask the KL term; GAE multiplies rewards and values
by the mask first (returns use the masked values); cumulative returns discount through
mask-0 positions; the PPO log-ratio is clamped to +-20; ppo_kl = masked mean of old - new
log-probs; GSPO's one ratio per sequence (exp of the masked mean token log-ratio against
the rollout log-probs when a correction level is set, unclamped, sequence-level loss);
every is_correction level / mode / gating with 0.11.2's validation, gate statistics and
is_filter_ratio (a sequence without a token counts as filtered at seq level, as
OpenRLHF's 0/0 gate makes it); every output in the dtype OpenRLHF returns for the same
inputs; no write into a caller's tensor except log_probs_from_logits' in-place
temperature division (OpenRLHF's own).

How, on the kernels: token log-probs in rk.token_logprobs; the PPO surrogate, its
clipping, dual clip and aggregation in rk.ppo_policy_loss, the value loss in
rk.ppo_value_loss; the IS coefficient (detached) enters as a per-token weight of the
policy kernel's mask, with the aggregation normalised so that sum(w l) / N is OpenRLHF's
(clip_ratio then comes from a second, forward-only kernel pass over the plain mask);
GSPO feeds the kernel the per-sequence log-ratio (rk.masked_mean) broadcast over the
tokens; global normalisation (dp_size, batch_num_tokens, global_batch_size) is a
constant factor (_aggregation.global_scale); k1 / k2 in rk.kl_penalty, as is
unbiased_gradient's surrogate (k2); compute_reward in rk.kl_shaped_rewards; GAE and
returns in rk.gae; masked means in rk.masked_mean. In torch, as OpenRLHF writes them:
the IS gate statistics (ratio, binary KL, TV: elementwise), and k3's value, because
rk.kl_penalty's k3 sums exp(-d) + d - 1 where OpenRLHF sums exp(-d) - 1 + d, up to ~2e-5
relative apart near d = 0, which OpenRLHF's own test (rtol 1e-5) rejects.

Departures, all where OpenRLHF returns NaN: a loss or mean over no valid token is 0
(OpenRLHF: 0/0). For 0.11.0 / 0.11.1 (PolicyLossV0110, compute_approx_kl_v0110): k3 of
a log-ratio below about -88 has gradient 0 (there: NaN from exp's overflow; 0.11.2 fixed
it the same way), and 0.11.0's icepop gives 0, not NaN, for a ratio that overflows
(0.11.1's torch.where). Computation is fp32 (fp64 for fp64 inputs) whatever the input
dtype: 16-bit inputs round once where OpenRLHF rounds each intermediate.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Union

import torch
from torch import nn

import rlhf_kernels as rk

from ._aggregation import global_scale
from ._patching import Patches, loaded_modules, patched_block
from ._version import supported_version

# The OpenRLHF releases these drop-ins follow; patch() patches nothing on another.
SUPPORTED_VERSIONS = ("0.11.0", "0.11.1", "0.11.2")
KL_CLAMP = 10.0
KL_IS_WEIGHT_CLIP = 10.0  # OpenRLHF's bound on the unbiased-gradient importance weight
K3_LOG_RATIO_MIN = -10.0
LOG_RATIO_CLAMP = 20.0
IS_PROB_CLAMP = 1e-6  # the binary_kl / tv gates' clamp of the sampled-token probabilities


# --------------------------------------------------------------------- dtypes --
# OpenRLHF computes in its inputs' dtypes; these give the dtype it returns, so the
# drop-ins (which compute in fp32 / fp64) return the same.


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _sum_dtype(mask: torch.Tensor) -> torch.dtype:
    return mask.dtype if mask.dtype.is_floating_point else torch.int64


def _promote(*dtypes: torch.dtype) -> torch.dtype:
    out = dtypes[0]
    for dtype in dtypes[1:]:
        out = torch.promote_types(out, dtype)
    return out


def _mean_dtype(x_dtype: torch.dtype, mask: torch.Tensor) -> torch.dtype:
    """The dtype of OpenRLHF's masked_mean(x, mask, dim): (x * mask).sum(dim) / mask.sum(dim)."""
    return _promote(x_dtype, mask.dtype, _sum_dtype(mask))


def _meta(x):
    return torch.empty(x.shape, dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else x


def _aggregate_dtype(loss_dtype, mask, token_level_loss, batch_num_tokens, global_batch_size) -> torch.dtype:
    """The dtype of OpenRLHF's aggregate_loss for a per-token loss of loss_dtype: its
    arithmetic run on meta tensors (a tensor or a number batch_num_tokens promote apart)."""
    loss, m = torch.empty(mask.shape, dtype=loss_dtype, device="meta"), _meta(mask)
    if token_level_loss:
        total = (loss * m).sum()
        return (total / (m.sum() if batch_num_tokens is None else _meta(batch_num_tokens))).dtype
    counts = m.sum(dim=-1)
    seq_loss = (loss * m).sum(dim=-1) / (counts + 1e-8)
    seq_mask = (counts > 0).float()
    total = (seq_loss * seq_mask).sum()
    return (total / (seq_mask.sum() if global_batch_size is None else _meta(global_batch_size))).dtype


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """OpenRLHF's masked_mean on the kernel, in its dtype; 0 where no element is valid (OpenRLHF: NaN)."""
    return rk.masked_mean(x.to(_mean_dtype(x.dtype, mask)), mask, dim)


# ------------------------------------------------------------------ functions --


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    if temperature != 1.0:
        logits.div_(temperature)  # OpenRLHF's side effect: callers see the scaled logits
    logprobs = rk.token_logprobs(logits, labels)
    return logprobs if logits.dtype in (torch.float32, torch.float64) else logprobs.to(logits.dtype)


def compute_approx_kl(
    log_probs: torch.Tensor,
    log_probs_base: torch.Tensor,
    log_probs_old: Optional[torch.Tensor] = None,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
) -> torch.Tensor:
    """k1 / k2 / k3 of log_probs - log_probs_base clamped to +-10, fp32. unbiased_gradient:
    the same value, with the gradient of w * k2 (w = min(pi / pi_old, 10), detached; 1
    without log_probs_old): the importance-weighted reverse-KL gradient w * k1."""
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    log_probs32, base32 = log_probs.float(), log_probs_base.float()
    if kl_estimator == "k3":
        # OpenRLHF's own expression, in its order: rk.kl_penalty's k3 sums exp(-d) + d - 1,
        # which rounds apart from exp(-d) - 1 + d by up to ~2e-5 relative near d = 0, past
        # the rtol 1e-5 of OpenRLHF's test_flag_off_matches_legacy. The log-ratio is bounded
        # below at -10 first (0.11.2: k3 is past the final clamp there; the gradient is 0,
        # never 0 * inf).
        log_ratio = (log_probs32 - base32).clamp(min=K3_LOG_RATIO_MIN)
        value = ((-log_ratio).exp() - 1 + log_ratio).clamp(min=-KL_CLAMP, max=KL_CLAMP)
    else:
        value = rk.kl_penalty(log_probs32, base32, estimator=kl_estimator, clamp=KL_CLAMP)
    if not unbiased_gradient:
        return value
    if log_probs_old is None:
        w = 1.0
    else:
        w = (log_probs32 - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
    grad_surrogate = w * rk.kl_penalty(log_probs32, base32, estimator="k2")
    return value.detach() + grad_surrogate - grad_surrogate.detach()  # OpenRLHF's straight-through


def compute_approx_kl_v0110(
    log_probs: torch.Tensor, log_probs_base: torch.Tensor, kl_estimator: str = "k1"
) -> torch.Tensor:
    """OpenRLHF 0.11.0's signature (kl_estimator third); patch() installs it for 0.11.0."""
    return compute_approx_kl(log_probs, log_probs_base, kl_estimator=kl_estimator)


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
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    if action_mask is not None:
        dtype = _promote(rewards.dtype, values.dtype, action_mask.dtype)
    advantages, returns = rk.gae(rewards, values, action_mask, gamma=gamma, lam=lambd, mask_mode="multiply")
    return advantages.to(dtype), returns.to(dtype)


def get_cumulative_returns(rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t m_t + gamma G_{t+1} over every position (REINFORCE returns)."""
    if action_mask is None:
        action_mask = torch.ones_like(rewards)
    returns, _ = rk.gae(rewards, torch.zeros_like(rewards), action_mask, gamma=gamma, lam=1.0, mask_mode="multiply")
    return returns.to(rewards.dtype)


@torch.no_grad()
def _maker_get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
    return get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)


@torch.no_grad()
def _maker_get_cumulative_returns(self, rewards, action_mask, gamma):
    return get_cumulative_returns(rewards, action_mask, gamma)


# --------------------------------------------------------------------- losses --


def _agg(token_level_loss: bool) -> str:
    return "token-mean" if token_level_loss else "seq-mean-token-mean"


def _to_global(loss: torch.Tensor, mask: torch.Tensor, agg: str, dp_size, batch_num_tokens, global_batch_size):
    """OpenRLHF's aggregate_loss normalisation applied to the kernels' `agg` result: the
    global count of its mode (batch_num_tokens for token-mean, global_batch_size for the
    sequence modes) and then dp_size; without that count, a local mean and no dp_size."""
    count = batch_num_tokens if agg == "token-mean" else global_batch_size
    scale = global_scale(
        mask, agg, dp_size=dp_size if count is not None else 1,
        batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
    )  # fmt: skip
    return loss * scale.to(loss.dtype)


class PolicyLoss(nn.Module):
    """OpenRLHF 0.11.2's PolicyLoss: PPO or GSPO clipped surrogate with dual clip and the
    train / rollout importance-sampling correction; forward returns
    (loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio), the last two None without a
    correction level."""

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: Optional[float] = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: Union[list, tuple] = (0.5, 5.0),
    ) -> None:
        super().__init__()
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.token_level_loss = token_level_loss
        self.dual_clip = dual_clip
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold
        if policy_loss_type == "gspo":
            self.token_level_loss = False  # GSPO is a sequence-level loss
        if dual_clip is not None:
            assert dual_clip > 1.0, f"dual_clip must be > 1.0, got {dual_clip}"
        # OpenRLHF 0.11.2's validation, messages included.
        if is_correction_level not in {"off", "token", "seq"}:
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level}")
        if is_correction_mode not in {"mask", "clip"}:
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
        if is_correction_gating not in {"ratio", "binary_kl", "tv"}:
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError(
                "is_correction_mode=clip requires is_correction_level=token and is_correction_gating=ratio"
            )
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only (a single delta)")

    def _is_coefficient(self, old_log_probs, rollout_log_probs, mask):
        """(per-token IS coefficient [B, T], filtered units [B, T] or [B, 1]), detached."""
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        is_log_ratio = (old_log_probs - rollout_log_probs).detach()  # log(pi_train / pi_rollout)
        token_is = is_log_ratio.exp()
        if self.is_correction_gating == "ratio":
            stat = _masked_mean(is_log_ratio, mask, dim=-1).unsqueeze(-1) if seq_level else is_log_ratio
            stat = stat.exp()
        else:
            p = rollout_log_probs.detach().exp().clamp(IS_PROB_CLAMP, 1 - IS_PROB_CLAMP)
            q = old_log_probs.detach().exp().clamp(IS_PROB_CLAMP, 1 - IS_PROB_CLAMP)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:  # tv
                stat = (p - q).abs()
            if seq_level:
                stat = _masked_mean(stat, mask, dim=-1).unsqueeze(-1)
        if seq_level:
            # OpenRLHF's per-sequence mean of a row without a token is 0/0: the row fails the gate.
            stat = stat.masked_fill(mask.sum(dim=-1, keepdim=True) == 0, float("nan"))
        if self.is_correction_mode == "clip":
            coef = stat.clamp(min=low, max=high)
            filtered = (stat < low) | (stat > high)
        else:  # mask: out-of-band units are dropped, the others keep their per-token IS weight
            keep = (stat >= low) & (stat <= high)
            coef = torch.where(keep, token_is, 0.0)
            filtered = ~keep
        return coef, filtered

    def _token_dtype(self, log_probs, old_log_probs, advantages, mask, rollout_log_probs, correcting):
        """The dtype of OpenRLHF's per-token loss before aggregate_loss."""
        if self.policy_loss_type == "gspo":
            reference = rollout_log_probs if correcting else old_log_probs
            ratio = _promote(log_probs.dtype, reference.dtype, mask.dtype, _sum_dtype(mask))
            return _promote(ratio, mask.dtype, advantages.dtype)
        dtype = _promote(log_probs.dtype, old_log_probs.dtype, advantages.dtype)
        if correcting:
            dtype = _promote(dtype, old_log_probs.dtype, rollout_log_probs.dtype)
        return dtype

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
        if self.policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"Invalid policy loss type: {self.policy_loss_type}")
        correcting = self.is_correction_level != "off"
        if correcting and rollout_log_probs is None:
            raise ValueError(f"is_correction_level={self.is_correction_level!r} needs rollout_log_probs")
        mask = torch.ones_like(log_probs) if action_mask is None else action_mask
        compute = _compute_dtype(log_probs, old_log_probs, advantages, rollout_log_probs)
        options = dict(clip_low=self.clip_eps_low, clip_high=self.clip_eps_high, dual_clip=self.dual_clip)
        if self.policy_loss_type == "ppo":
            lp, old = log_probs, old_log_probs
            options["log_ratio_clamp"] = LOG_RATIO_CLAMP
        else:
            # GSPO: every token of a sequence gets its sequence's ratio exp(mean_t log-ratio)
            # (unclamped): the kernel sees that log-ratio as log_probs against 0.
            reference = rollout_log_probs if correcting else old_log_probs
            sequence_log_ratio = rk.masked_mean((log_probs - reference).to(compute), mask, dim=-1)
            lp = sequence_log_ratio.unsqueeze(-1).expand(log_probs.shape)
            old = torch.zeros(log_probs.shape, dtype=compute, device=log_probs.device)

        coef = vllm_kl = is_filter_ratio = None
        if correcting and self.policy_loss_type == "ppo":
            coef, filtered = self._is_coefficient(old_log_probs, rollout_log_probs, mask)
            if self.is_correction_level == "seq":
                is_filter_ratio = filtered.float().mean()
            else:
                is_filter_ratio = _masked_mean(filtered.float(), mask)
            vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, mask)

        if coef is None:
            agg = _agg(self.token_level_loss)
            loss, stats = rk.ppo_policy_loss(lp, old, advantages, mask, agg=agg, **options)
            loss = _to_global(loss, mask, agg, dp_size, batch_num_tokens, global_batch_size)
        else:
            # The coefficient is a per-token weight of the kernel's mask; "seq-mean-token-sum"
            # (mean_b sum_t w l) with w normalised to OpenRLHF's token-mean / per-sequence
            # token-mean, then its global normalisation.
            weights = mask.to(compute) * coef.to(compute)
            if self.token_level_loss:
                tokens = mask.to(compute).sum()
                weights = weights * (mask.shape[0] / torch.where(tokens > 0, tokens, 1))
                agg = "token-mean"
            else:
                counts = mask.to(compute).sum(dim=-1, keepdim=True)
                weights = weights / torch.where(counts > 0, counts, 1)
                agg = "seq-mean-token-sum"
            loss, _ = rk.ppo_policy_loss(lp, old, advantages, weights, agg="seq-mean-token-sum", **options)
            loss = _to_global(loss, mask, agg, dp_size, batch_num_tokens, global_batch_size)
            with torch.no_grad():  # clip_ratio counts the valid tokens, unweighted
                _, stats = rk.ppo_policy_loss(lp.detach(), old, advantages, mask, **options)

        token_dtype = self._token_dtype(log_probs, old_log_probs, advantages, mask, rollout_log_probs, correcting)
        loss = loss.to(_aggregate_dtype(token_dtype, mask, self.token_level_loss, batch_num_tokens, global_batch_size))
        clip_ratio = stats["clipfrac"].to(_mean_dtype(torch.float32, mask))
        ppo_kl = _masked_mean((old_log_probs - log_probs).detach(), mask)
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


class PolicyLossV0110(PolicyLoss):
    """OpenRLHF 0.11.0 / 0.11.1's PolicyLoss: the vLLM IS correction as
    enable_vllm_is_correction with vllm_is_correction_type tis (token clip), icepop
    (token mask) or seq-mask-tis (seq mask), the same math as 0.11.2's options, and a
    4-value return (no is_filter_ratio). patch() installs it for those versions."""

    _TYPES = {"tis": ("token", "clip"), "icepop": ("token", "mask"), "seq-mask-tis": ("seq", "mask")}

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
        if vllm_is_correction_type not in self._TYPES:
            raise ValueError(
                f"Invalid vllm_is_correction_type: {vllm_is_correction_type}, must be one of tis/icepop/seq-mask-tis"
            )
        level, mode = self._TYPES[vllm_is_correction_type]
        super().__init__(
            clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type,
            is_correction_level=level if enable_vllm_is_correction else "off", is_correction_mode=mode,
            is_correction_threshold=tuple(vllm_is_truncated_threshold) if enable_vllm_is_correction else (0.5, 5.0),
        )  # fmt: skip
        self.enable_vllm_is_correction = enable_vllm_is_correction
        self.vllm_is_truncated_threshold = vllm_is_truncated_threshold
        self.vllm_is_correction_type = vllm_is_correction_type

    def forward(self, *args, **kwargs):
        loss, clip_ratio, ppo_kl, vllm_kl, _ = super().forward(*args, **kwargs)
        return loss, clip_ratio, ppo_kl, vllm_kl


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
        loss = _to_global(loss, mask, agg, dp_size, batch_num_tokens, global_batch_size)
        token_dtype = torch.promote_types(values.dtype, returns.dtype)
        if self.clip_eps is not None:
            token_dtype = torch.promote_types(token_dtype, old_values.dtype)
        return loss.to(_aggregate_dtype(token_dtype, mask, self.token_level_loss, batch_num_tokens, global_batch_size))


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
            label_smoothing=0.0 if self.ipo else self.label_smoothing, cdpo=not self.ipo,  # OpenRLHF's cDPO
        )  # fmt: skip
        return losses.mean(), chosen_rewards, rejected_rewards


# ---------------------------------------------------------------------- patch --

# Where OpenRLHF defines each name patch() replaces.
_HOMES = {
    "PolicyLoss": "openrlhf.models.loss",
    "ValueLoss": "openrlhf.models.loss",
    "DPOLoss": "openrlhf.models.loss",
    "compute_approx_kl": "openrlhf.models.utils",
    "compute_reward": "openrlhf.models.utils",
    "log_probs_from_logits": "openrlhf.models.utils",
}
_MAKER_MODULE, _MAKER_CLASS = "openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker"
_MAKER_METHODS = {
    "get_advantages_and_returns": _maker_get_advantages_and_returns,
    "get_cumulative_returns": _maker_get_cumulative_returns,
}


def drop_ins(version: str = "0.11.2") -> dict:
    """The drop-in of each name in _HOMES for an OpenRLHF version of SUPPORTED_VERSIONS."""
    version = version.split("+", 1)[0]  # a local build of a release is that release
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"OpenRLHF {version} is not supported; the drop-ins follow {', '.join(SUPPORTED_VERSIONS)}")
    return {
        "PolicyLoss": PolicyLossV0110 if version in ("0.11.0", "0.11.1") else PolicyLoss,
        "ValueLoss": ValueLoss,
        "DPOLoss": DPOLoss,
        "compute_approx_kl": compute_approx_kl_v0110 if version == "0.11.0" else compute_approx_kl,
        "compute_reward": compute_reward,
        "log_probs_from_logits": log_probs_from_logits,
    }


_patches = Patches()


def _openrlhf_modules():
    return loaded_modules("openrlhf")


def patch() -> int:
    """Replaces OpenRLHF's functions and loss classes (the names of _HOMES) in every loaded
    openrlhf module that holds OpenRLHF's own object (the defining module and every
    `from ... import name`), and RemoteExperienceMaker's advantage / return methods when
    its module is loaded; returns how many attributes were replaced. The installed
    openrlhf's version is checked first: one outside SUPPORTED_VERSIONS gets a warning
    (UnsupportedVersionWarning) and nothing is patched (returns 0)."""
    if _patches:
        return 0
    version = supported_version("openrlhf", "openrlhf", SUPPORTED_VERSIONS)
    if version is None:
        return 0
    ours = drop_ins(version)
    theirs = {name: getattr(importlib.import_module(home), name) for name, home in _HOMES.items()}
    _patches.replace_holders(_openrlhf_modules(), [(theirs[name], ours[name]) for name in theirs])
    maker = getattr(sys.modules.get(_MAKER_MODULE), _MAKER_CLASS, None)
    if isinstance(maker, type):
        for name, method in _MAKER_METHODS.items():
            if vars(maker).get(name) is not None:
                _patches.set_attr(maker, name, method)
    return len(_patches)


def unpatch() -> None:
    """Restores every attribute patch() replaced, and OpenRLHF's object wherever an
    openrlhf module imported ours while patched."""
    _patches.undo(_openrlhf_modules())


patched = patched_block(patch, unpatch)
patched.__doc__ = """with patched(): OpenRLHF runs on rlhf_kernels inside the block."""
