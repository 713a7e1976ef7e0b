"""Reference critic-free policy losses (verl 0.9.1, TRL 1.16 GRPOTrainer, OpenRLHF 0.11).

Per token, with d = lp - old (clamped to +-log_ratio_clamp when set; verl clamps to
20 in vanilla, cispo, sapo, dppo_*), r = exp(d), A the advantage, sg() = detach:

    clip family   l = max(-A r', -A clip(r, 1 - clip_low, 1 + clip_high)),  r' = min(r, delta)
                  (loss types ppo, vanilla, grpo, bnpo, dr_grpo, dapo, luspo; delta is TRL's
                  two-sided clip); dual clip c, A < 0 only: l = min(l, -A c)
    gspo          the clip family on verl's sequence ratio: exp(lp - sg(lp) + sg(mean_t d)),
                  log clamped above at 10 (value: the sequence ratio, gradient: per token)
    cispo         l = -sg(w) A lp, w = clip(r, 1 - clip_low, 1 + clip_high) (verl, the paper)
                  or min(r, clip_high) with cispo_clip="upper" (TRL: clip_high is the cap, e.g. 5)
    sapo          l = -A sigmoid(tau (r - 1)) 4 / tau, tau = tau_pos if A > 0 else tau_neg
    gpg           l = -A lp (REINFORCE)
    dro           l = -(A lp - beta / 2 d^2)
    dppo_tv/_kl   l = -A sg(min(r, c)) lp valid, valid: trust region of p - p_old (tv) or the
                  binary KL (kl) by the advantage's sign (verl)
    vespo         l = -sg(phi_b) A lp, phi = exp(lam + k log w - lam w), log w = clamp(sum_t d m)
    geo_mean      one loss per sequence: -mean_t(A m) exp(mean_t(sgnA min(sgnA d, sgnA clip(d)))),
                  averaged over B (verl's GMPO; agg is not used by this term)
    clip_cov      the clip family times 0 at n = max(int(rho sum(m)), 1) tokens drawn at random
                  (torch.randperm, verl's draw) from the valid tokens whose clip does not bind
                  (-A clip(r) <= -A r) and whose covariance (A - mean A)(lp - mean lp) (batch
                  masked means) lies in (lb, ub); clip_cov=(rho, lb, ub), verl's clip_cov_ratio,
                  clip_cov_lb, clip_cov_ub (defaults 2e-4, 1, 5)
    kl_cov        l = -A r, plus c |d| at the k = max(1, int(rho N)) valid tokens of largest
                  covariance (A - mean A)(lp - mean lp) over the N valid tokens (a batch top-k on
                  CPU, verl's); kl_cov=(rho, c), verl's kl_cov_ratio and ppo_kl_coef (2e-4, 1)

clip_cov's randomness: the draw is verl's own call, torch.randperm(n_candidates,
generator=generator) on the default device, made once per policy_loss call; generator
None uses the global RNG, so torch.manual_seed(s) before verl's function and before
policy_loss gives the same tokens (the candidates are listed in row-major order, as
torch.nonzero lists them). The selection is computed in the loss dtype (fp32; verl: the
input's), so bf16 inputs can select other tokens than verl's bf16 arithmetic would.

importance_sampling_level="sequence" (TRL) replaces r by exp(mean_t(d m)) for the whole
row (gradient through the mean) before the loss type's formula. is_weights (verl's
rollout_is_weights, TRL's importance_sampling_ratio) multiply the policy term.

Then l += kl_coef * kl(lp, ref) (estimators of reference.kl; "k3" is TRL's unclamped k3,
verl's "k3"/"low_var_kl" is low_var_kl; a trailing "+" is verl's straight-through: the
estimator's value with k2's gradient; kl_is_corrected: kl * r, TRL's
use_bias_correction_kl), and the loss is agg(l) - entropy_coef * entropy_agg(entropy).
geo_mean adds the same two terms to its per-sequence loss, aggregated with `agg` (verl's
actor aggregates its KL and entropy losses with loss_agg_mode).

The entropy term's divisors: entropy_agg None aggregates the entropy exactly as the
policy term, mode and divisors (global_tokens, num_sequences, horizon), as verl's actor
does (agg_loss(entropy, ..., **global_batch_info)); an explicit entropy_agg is a mean
over this batch alone (divisors from `mask`), TRL's bonus: a token mean over the local
active tokens whatever the policy term's normaliser ("never by a loss-type-specific
policy normalizer", GRPOTrainer._compute_loss).

Aggregations (verl's agg_loss; the divisors are arguments because they are global):
    token-mean               sum(l m) / N,  N = global_tokens or sum(m)
    token-sum                sum(l m)
    seq-mean-token-sum       sum_b sum_t l m / S
    seq-mean-token-mean      sum_b (sum_t l m / sum_t m) / S
    seq-mean-token-sum-norm  sum_b sum_t l m / (S horizon)
S = num_sequences or the rows with a valid token (verl); TRL divides by B (pass
num_sequences=B; it differs only when a row has no valid token). horizon = T unless
given (verl's loss_scale_factor, TRL's max_completion_length).

Hostile inputs, on every backend: every input is zeroed at its mask-0 positions before
any arithmetic (reference.ppo.valid_only), so NaN / inf there never reaches the loss or
the statistics and the gradient there is exactly 0; vespo reads a row's advantage at
its first valid position and sums log is_weights over the valid ones (TRL: column 0 and
every position). A NaN at a valid position makes the loss NaN (torch's max / min /
clamp keep it; vespo's phi too, where TRL's nan_to_num made it a weight of 0). B = 0 or
T = 0 gives 0 in every mode, geo_mean included. The torch code is differentiable twice;
the compiled ops' double backward differentiates token_loss.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .bounds import clamp
from .kl import kl_penalty
from .ppo import valid_only

CLIP_TYPES = ("ppo", "vanilla", "grpo", "bnpo", "dr_grpo", "dapo", "luspo")
COV_TYPES = ("clip_cov", "kl_cov")  # verl's covariance-selected tokens: batch-coupled, reference only
LOSS_TYPES = CLIP_TYPES + ("gspo", "cispo", "sapo", "gpg", "dro", "dppo_tv", "dppo_kl", "vespo", "geo_mean") + COV_TYPES
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# TRL's normaliser of each of its loss types; verl's losses default to token-mean.
DEFAULT_AGG = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "gspo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "luspo": "seq-mean-token-sum",
}
KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "low_var_kl", "k1+", "k3+", "low_var_kl+", "abs+")


def default_agg(loss_type: str) -> str:
    return DEFAULT_AGG.get(loss_type, "token-mean")


def aggregate(loss, weights, agg, *, global_tokens=None, num_sequences=None, horizon=None):
    """Reduces a per-token loss [B, T] to a scalar (verl's agg_loss with explicit divisors)."""
    if agg == "token-mean":
        total = weights.sum() if global_tokens is None else torch.as_tensor(global_tokens, dtype=loss.dtype)
        return (loss * weights).sum() / torch.where(total > 0, total, 1)
    if agg == "token-sum":
        return (loss * weights).sum()
    counts = weights.sum(-1)
    rows = (counts > 0).sum() if num_sequences is None else torch.as_tensor(num_sequences)
    rows = torch.clamp(rows.to(loss.dtype), min=1)
    if agg == "seq-mean-token-mean":
        return ((loss * weights).sum(-1) / torch.where(counts > 0, counts, 1)).sum() / rows
    sums = (loss * weights).sum() / rows
    if agg == "seq-mean-token-sum":
        return sums
    if agg == "seq-mean-token-sum-norm":
        return sums / (max(loss.shape[-1], 1) if horizon is None else horizon)  # T = 0: every sum is 0
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def kl_term(lp, ref, estimator):
    """Per-token KL estimate; "name+" has the value of `name` and the gradient of k2."""
    straight_through = estimator.endswith("+")
    value = kl_penalty(lp, ref, estimator=estimator.rstrip("+"), dtype=lp.dtype)
    if not straight_through:
        return value
    k2 = 0.5 * (lp - ref).square()
    return k2 - k2.detach() + value.detach()


def _masked_row_mean(x, weights):
    counts = weights.sum(-1, keepdim=True)
    return (x * weights).sum(-1, keepdim=True) / torch.where(counts > 0, counts, 1)


def _dppo_valid(loss_type, lp, old, adv, clip_low, clip_high):
    prob, old_prob = torch.exp(lp), torch.exp(old)
    if loss_type == "dppo_tv":
        positive, negative = (prob - old_prob) <= clip_high, (prob - old_prob) >= -clip_low
    else:
        binary_kl = old_prob * (old - lp) + (1 - old_prob) * torch.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        positive = (binary_kl <= clip_high) | (prob <= old_prob)
        negative = (binary_kl <= clip_low) | (prob >= old_prob)
    return torch.where(adv > 0, positive, negative).to(lp.dtype)


def _vespo_phi(adv, log_ratio, weights, is_weights, k_pos, lambda_pos, k_neg, lambda_neg):
    lower = math.log(1e-8)
    seq = (torch.clamp(log_ratio, -20.0, 20.0) * weights).sum(-1, keepdim=True)
    if is_weights is not None:
        # TRL sums log w over every position; here over the valid ones (a mask-0 weight is never read).
        seq = seq + (torch.clamp(torch.log(is_weights), lower, 20.0) * weights).sum(-1, keepdim=True)
    log_w = torch.clamp(seq, lower, 20.0)
    nonneg = adv >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    # TRL's nan_to_num(nan=0, posinf=0, neginf=0), less nan=0: an overflow (a large k) gives
    # weight 0, but a NaN input stays NaN (log w is clamped, so only a NaN input makes one).
    return torch.where(torch.isinf(phi), torch.zeros_like(phi), phi)


def _first_valid(x, weights):
    """x[b, t] at each row's first valid position [B, 1] (0 for a row with none): a select,
    so a mask-0 position is never read (T = 0 too)."""
    live = weights != 0
    first = live & (live.cumsum(-1) == 1)
    return torch.where(first, x, torch.zeros_like(x)).sum(-1, keepdim=True)


class TokenOptions(NamedTuple):
    """policy_loss's per-token options, resolved (None: off). The compiled ops carry the
    token-level types' ones as numbers (ops/grpo.py) and rebuild them for their double
    backward; the last three only sequence-level types read."""

    clip_low: float
    clip_high: float
    low: float  # 1 - clip_low: the ratio's clip band, rounded once (as the kernels get it)
    high: float  # 1 + clip_high
    dual_clip: Optional[float]
    delta: Optional[float]
    log_ratio_clamp: Optional[float]
    w_low: float  # cispo's weight clip(r, w_low, w_high); w_low = 0 for TRL's cap min(r, clip_high)
    w_high: float
    tau_pos: float
    tau_neg: float
    dro_beta: float
    kl_coef: float
    kl_estimator: str
    kl_is_corrected: bool = False
    dppo_ratio_cap: float = 20.0
    vespo: tuple = (2.0, 3.0, 3.0, 2.0)
    clip_cov: tuple = (2e-4, 1.0, 5.0)  # clip_cov_ratio, clip_cov_lb, clip_cov_ub
    kl_cov: tuple = (2e-4, 1.0)  # kl_cov_ratio, ppo_kl_coef


def token_options(
    *, clip_low, clip_high, dual_clip, delta, log_ratio_clamp, cispo_clip, sapo_tau_pos, sapo_tau_neg, dro_beta,
    kl_coef, kl_estimator, kl_is_corrected, dppo_ratio_cap, vespo, clip_cov=(2e-4, 1.0, 5.0), kl_cov=(2e-4, 1.0),
    **_unused,
) -> TokenOptions:  # fmt: skip
    """TokenOptions from policy_loss's keyword arguments (others, such as loss_type, are ignored)."""
    clip_high = clip_low if clip_high is None else clip_high
    low, high = 1 - clip_low, 1 + clip_high
    w_low, w_high = (0.0, clip_high) if cispo_clip == "upper" else (low, high)
    return TokenOptions(
        clip_low, clip_high, low, high, dual_clip, delta, log_ratio_clamp, w_low, w_high, sapo_tau_pos, sapo_tau_neg,
        dro_beta, kl_coef, kl_estimator, kl_is_corrected, dppo_ratio_cap, tuple(vespo), tuple(clip_cov), tuple(kl_cov),
    )  # fmt: skip


def clamped_log_ratio(lp, old, o: TokenOptions):
    log_ratio = lp - old
    return log_ratio if o.log_ratio_clamp is None else clamp(log_ratio, -o.log_ratio_clamp, o.log_ratio_clamp)


def _cov_selected(loss_type, lp, adv, log_ratio, weights, o: TokenOptions, generator=None):
    """verl 0.9.1's token selection of clip_cov / kl_cov [B, T] bool (no gradient): the
    same arithmetic in the same order, so the same tokens for the same inputs and RNG."""
    lp, adv, ratio = lp.detach(), adv.detach(), torch.exp(log_ratio.detach())
    live = weights > 0
    selected = torch.zeros_like(live)
    if loss_type == "clip_cov":
        ratio_share, lb, ub = o.clip_cov
        count = weights.sum()
        mean = lambda x: torch.where(live, x, 0).mul(weights).sum() / (count + 1e-8)  # verl_F.masked_mean
        cov = (adv - mean(adv)) * (lp - mean(lp))
        clipped = (-adv * clamp(ratio, o.low, o.high) > -adv * ratio) & live
        candidates = torch.nonzero((cov < ub) & (cov > lb) & live & ~clipped)  # row-major, as verl's
        if len(candidates) > 0:
            take = max(int(ratio_share * count.item()), 1)
            perm = torch.randperm(len(candidates), generator=generator)  # verl's call (default device)
            chosen = candidates[perm[: min(take, len(candidates))].to(candidates.device)]
            selected[chosen[:, 0], chosen[:, 1]] = True
        return selected
    ratio_share = o.kl_cov[0]
    index = torch.nonzero(live.reshape(-1), as_tuple=True)[0]
    valid_adv, valid_lp = adv[live].reshape(-1).cpu(), lp[live].reshape(-1).cpu()  # verl ranks on CPU
    if min(ratio_share, len(valid_adv)) != 0:
        cov = (valid_adv - valid_adv.mean()) * (valid_lp - valid_lp.mean())
        top = torch.topk(cov, max(1, int(len(cov) * ratio_share)), largest=True).indices
        selected.view(-1)[index[top.to(index.device)]] = True
    return selected


def token_loss(loss_type, lp, old, adv, log_ratio, weights, o: TokenOptions, isw=None, ref=None, selected=None):
    """Per-token loss [B, T] of every loss type but geo_mean, from the log-ratio (token,
    sequence or gspo's); isw / ref None when absent; selected: clip_cov / kl_cov's tokens
    (_cov_selected). Inputs are finite at mask-0 positions (valid_only), so products with
    the mask there are exact zeros."""
    ratio = torch.exp(log_ratio)
    if loss_type in CLIP_TYPES or loss_type in ("gspo", "clip_cov"):
        first = ratio if o.delta is None else clamp(ratio, None, o.delta)
        unclipped, clipped = -adv * first, -adv * clamp(ratio, o.low, o.high)
        loss = torch.maximum(unclipped, clipped)
        if o.dual_clip is not None:
            loss = torch.where(adv < 0, torch.minimum(loss, -adv * o.dual_clip), loss)
        if loss_type == "clip_cov":  # verl's product with corr (a NaN loss stays NaN)
            loss = loss * (~selected).to(loss.dtype)
    elif loss_type == "kl_cov":
        loss = -adv * ratio
        loss = torch.where(selected, loss + o.kl_cov[1] * log_ratio.abs(), loss)
    elif loss_type == "cispo":
        loss = -clamp(ratio, o.w_low, o.w_high).detach() * adv * lp
    elif loss_type == "sapo":
        dtype = lp.dtype
        tau = torch.where(adv > 0, torch.tensor(o.tau_pos, dtype=dtype), torch.tensor(o.tau_neg, dtype=dtype))
        loss = -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * adv
    elif loss_type in ("gpg", "dro"):
        loss = -lp * adv
        if loss_type == "dro" and o.dro_beta != 0.0:  # beta 0 is gpg, which never reads old
            loss = loss + 0.5 * o.dro_beta * (lp - old).square()
    elif loss_type in ("dppo_tv", "dppo_kl"):
        capped = clamp(ratio, None, o.dppo_ratio_cap).detach()
        loss = -adv * capped * lp * _dppo_valid(loss_type, lp.detach(), old, adv, o.clip_low, o.clip_high)
    elif loss_type == "vespo":
        phi = _vespo_phi(_first_valid(adv, weights), (lp - old).detach(), weights, isw, *o.vespo)
        loss = -phi * adv * lp
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if isw is not None and loss_type != "vespo":
        loss = loss * isw
    if o.kl_coef != 0.0:
        loss = loss + _kl_loss(lp, ref, ratio, o)
    return loss


def _kl_loss(lp, ref, ratio, o: TokenOptions):
    kl = kl_term(lp, ref, o.kl_estimator)
    return o.kl_coef * (kl * ratio if o.kl_is_corrected else kl)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
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
    vespo: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
    is_weights: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_is_corrected: bool = False,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    entropy_agg: Optional[str] = None,
    agg: Optional[str] = None,
    global_tokens: Optional[float] = None,
    num_sequences: Optional[float] = None,
    horizon: Optional[float] = None,
    clip_cov: tuple[float, float, float] = (2e-4, 1.0, 5.0),
    kl_cov: tuple[float, float] = (2e-4, 1.0),
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    o = token_options(
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, delta=delta, log_ratio_clamp=log_ratio_clamp,
        cispo_clip=cispo_clip, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, dro_beta=dro_beta,
        kl_coef=kl_coef, kl_estimator=kl_estimator, kl_is_corrected=kl_is_corrected, dppo_ratio_cap=dppo_ratio_cap,
        vespo=vespo, clip_cov=clip_cov, kl_cov=kl_cov,
    )  # fmt: skip
    divisors = dict(global_tokens=global_tokens, num_sequences=num_sequences, horizon=horizon)
    agg = default_agg(loss_type) if agg is None else agg
    weights = mask.to(dtype)
    adv = advantages.detach().to(dtype)
    adv = adv[:, None].expand_as(logprobs) if adv.dim() == 1 else adv
    # Every input is zeroed at its mask-0 positions before any arithmetic: NaN / inf there
    # never reaches the loss or the statistics, and the gradient there is exactly 0.
    lp, old, adv = valid_only(mask, logprobs.to(dtype), old_logprobs.detach().to(dtype), adv)
    isw = None if is_weights is None else valid_only(mask, is_weights.detach().to(dtype))[0]
    ref = None if ref_logprobs is None else valid_only(mask, ref_logprobs.detach().to(dtype))[0]
    entropy = None if entropy is None else valid_only(mask, entropy.to(dtype))[0]

    if loss_type == "geo_mean":
        total, stats = _geo_mean(lp, old, adv, weights, o, isw)
        if o.kl_coef != 0.0:  # verl's actor: agg_loss(kl, loss_agg_mode) * kl_coef, outside the policy loss
            kl = _kl_loss(lp, ref, torch.exp(clamped_log_ratio(lp, old, o)), o)
            total = total + aggregate(kl, weights, agg, **divisors)
        total = total - entropy_term(entropy, weights, entropy_coef, entropy_agg, agg, divisors)
        if entropy is not None:
            stats["entropy"] = _masked_mean(entropy.detach(), weights)
        return total, stats
    log_ratio = clamped_log_ratio(lp, old, o)
    if importance_sampling_level == "sequence":
        log_ratio = _masked_row_mean(log_ratio, weights).expand_as(lp)
    elif loss_type == "gspo":
        seq = _masked_row_mean(lp.detach() - old, weights)
        log_ratio = clamp(lp - lp.detach() + seq, None, 10.0)
    selected = None
    if loss_type in COV_TYPES:
        share = (o.clip_cov if loss_type == "clip_cov" else o.kl_cov)[0]
        if not share > 0:  # verl asserts it
            raise ValueError(f"{loss_type}'s ratio ({loss_type}[0]) must be > 0, got {share!r}")
        selected = _cov_selected(loss_type, lp, adv, log_ratio, weights, o, generator)
    loss = token_loss(loss_type, lp, old, adv, log_ratio, weights, o, isw, ref, selected)
    total = aggregate(loss, weights, agg, **divisors)
    total = total - entropy_term(entropy, weights, entropy_coef, entropy_agg, agg, divisors)
    stats = _stats(torch.exp(log_ratio), lp, old, adv, weights, o.low, o.high, o.dual_clip, entropy)
    if selected is not None:  # verl's clip_cov pg_clipfrac: the share of valid tokens selected
        stats["cov_fraction"] = _masked_mean(selected.to(lp.dtype), weights)
    return total, stats


def entropy_term(entropy, weights, entropy_coef, entropy_agg, agg, divisors):
    """entropy_coef * the aggregated entropy (0 without one): entropy_agg None is the policy
    term's mode and divisors (verl), an explicit mode is over this batch alone (TRL)."""
    if entropy is None or entropy_coef == 0.0:
        return 0.0
    if entropy_agg is None:
        return entropy_coef * aggregate(entropy, weights, agg, **divisors)
    return entropy_coef * aggregate(entropy, weights, entropy_agg)


def _geo_mean(lp, old, adv, weights, o: TokenOptions, isw):
    d = lp - old
    sign = torch.sign(adv)
    d_min = sign * torch.minimum(sign * d, sign * clamp(d, -o.clip_low, o.clip_high))
    counts = weights.sum(-1)
    ratio = torch.exp((d_min * weights).sum(-1) / (counts + 1e-8))
    seq_adv = (adv * weights).sum(-1) / (counts + 1e-8)
    losses = -seq_adv * ratio
    if isw is not None:
        losses = losses * torch.exp((torch.log(isw + 1e-10) * weights).sum(-1) / (counts + 1e-8))
    # The mean over B sequences; B = 0 gives 0, as the seq-mean aggregations do.
    stats = _stats(torch.exp(d), lp, old, adv, weights, o.low, o.high, None, None)
    return losses.sum() / max(losses.numel(), 1), stats


def _masked_mean(x, weights):
    total = weights.sum()
    return (x * weights).sum() / torch.where(total > 0, total, 1)


def _dual_clipped(ratio, adv, low, high, dual_clip):
    if dual_clip is None:
        return torch.zeros_like(ratio, dtype=torch.bool)
    clip_loss = torch.maximum(-adv * ratio, -adv * clamp(ratio, low, high))
    return (adv < 0) & (clip_loss > -adv * dual_clip)


@torch.no_grad()
def _stats(ratio, lp, old, adv, weights, low, high, dual_clip, entropy):
    ratio = ratio.detach()
    d = (lp - old).detach()
    any_valid = weights > 0
    stats = {
        # TRL's clip_ratio/low_mean and high_mean: clipped where the clip binds.
        "clipfrac_low": _masked_mean(((ratio < low) & (adv < 0)).to(lp.dtype), weights),
        "clipfrac_high": _masked_mean(((ratio > high) & (adv > 0)).to(lp.dtype), weights),
        # verl's pg_clipfrac_lower: the dual clip binds (A < 0, clipped loss above -A c).
        "dual_clipfrac": _masked_mean(_dual_clipped(ratio, adv, low, high, dual_clip).to(lp.dtype), weights),
        # verl's actor/ppo_kl (k1 of KL(old || new)) and Schulman's k3 of it.
        "ppo_kl": _masked_mean(-d, weights),
        "approx_kl": _masked_mean(torch.expm1(d) - d, weights),
        "ratio_mean": _masked_mean(ratio, weights),
        "ratio_max": torch.where(any_valid, ratio, 0).amax() if ratio.numel() else ratio.new_zeros(()),
    }
    if entropy is not None:
        stats["entropy"] = _masked_mean(entropy.detach().to(lp.dtype), weights)
    return stats
