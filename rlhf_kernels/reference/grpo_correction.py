"""Rollout / train mismatch correction for policy_loss: importance-sampling weights and masks.

One job: from the inference engine's log-probs (vLLM, SGLang: `rollout_logprobs`), the
training engine's (`old_logprobs`), the current ones and the token entropies, compute
the factors policy_loss applies before its kernels run. No gradient flows through any
of them; they are computed in the policy loss's float dtype (fp32, fp64 for fp64
inputs) with plain torch on any device. functional.policy_loss multiplies `weights`
into `is_weights` (the per-token factor of the policy term, before the KL term is
added) and `keep` into `mask` (verl's rejection replaces response_mask, so the
normalisers count only the kept tokens): the cpu / triton kernels need no change.

A position is valid where mask != 0. d = old_logprobs - rollout_logprobs at valid
positions (log pi_train / pi_rollout), 0 elsewhere, with NaN taken as 0 (TRL's
nan_to_num: a token the engine could not score gets no correction; verl and OpenRLHF
would give NaN), optionally clamped to +-rollout_log_ratio_clamp (verl's SAFETY_BOUND
20, applied to the token value or to the sequence sum before exp). [lo, hi] =
[rollout_clip_min, rollout_clip_max], a missing bound unbounded.
rollout_correction_from="current" reads sg(logprobs) in place of old_logprobs (d =
sg(logprobs) - rollout_logprobs, for the weights, the rejection and rollout_kl): verl
0.9.1's bypass mode, where old_logprobs = rollout_logprobs feed the PPO ratio and the
correction reads the current policy; "old" (default) is the trainer's old_logprobs.

rollout_correction (the IS weight w, multiplied into is_weights):

    token_truncate     w_t = clamp(exp(d_t), lo, hi)
    token_mask         w_t = exp(d_t) if lo <= s_t <= hi else 0
    sequence_truncate  w_b = clamp(exp(sum_t d_t), lo, hi)               (every token of row b)
    sequence_mask      w_b = exp(sum_t d_t) if lo <= exp(sum_t d_t) <= hi else 0
    geometric_mask     w_t = exp(d_t) if lo <= g_b <= hi else 0, g_b the row's gate statistic

  rollout_gate (the statistic s of the mask modes; OpenRLHF's is_correction_gating):
    "ratio"      s_t = exp(d_t); g_b = exp(mean_t d_t) (the geometric-mean ratio)
    "binary_kl"  s_t = p log(p / q) + (1 - p) log((1 - p) / (1 - q)), p = exp(rollout),
                 q = exp(old), both clamped to [1e-6, 1 - 1e-6]; g_b = mean_t s_t
    "tv"         s_t = |p - q|; g_b = mean_t s_t
  (binary_kl / tv with token_mask or geometric_mask only; truncation needs the ratio).
  rollout_batch_normalize (verl): w / mean(w) when mean(w) > 1e-8, the mean over valid
  tokens (token-level w) or over the rows with a valid token (sequence modes); local
  to this batch (verl all-reduces it under torch.distributed).

    Framework     its setting                                    policy_loss
    TRL 1.16      vllm_importance_sampling_mode = token_truncate, rollout_correction = the same name,
                  token_mask, sequence_truncate, sequence_mask;  rollout_clip_min / _max =
                  vllm_importance_sampling_clip_min / _max       clip_min / clip_max (TRL's defaults:
                  (_cap: the deprecated name of clip_max)        None / 3.0); old_logprobs = TRL's
                                                                 old_per_token_logps
    verl 0.9.1    rollout_is = "token" / "sequence" with         token_truncate / sequence_truncate,
                  rollout_is_threshold = U (TIS)                 rollout_clip_max = U
                  rollout_is_threshold = "L_U" (IcePop)          token_mask / sequence_mask, [L, U]
                  (both)                                         rollout_log_ratio_clamp = 20
                  rollout_is_batch_normalize                     rollout_batch_normalize
                  rollout_rs, rollout_rs_threshold               rollout_rejection(_threshold)
                  bypass mode (old_log_prob = rollout_log_prob)  rollout_correction_from = "current"
    OpenRLHF      is_correction_level token, mode clip           token_truncate, [low, high]
    0.11.2        level token, mode mask, gating g               token_mask, rollout_gate = g
                  level seq, mode mask, gating g                 geometric_mask, rollout_gate = g
                  is_correction_threshold (low, high)            rollout_clip_min / _max
                  (0.11.0 / 0.11.1: tis, icepop, seq-mask-tis = the three rows above, ratio gate)

    TRL's sequence_mask keeps the sequence ratio of a surviving row; OpenRLHF's
    seq-level mask (geometric_mask) keeps the per-token ratios. OpenRLHF corrects only
    its ppo loss; its gspo uses rollout_logprobs in place of old_logprobs instead (pass
    them as old_logprobs).

rollout_rejection (verl 0.9.1's rollout_rs; multiplies the mask: a rejected token leaves
the loss and its normaliser). With lr = clamp(d, -20, 20): k1 = -lr = log(pi_rollout /
pi_train), k2 = lr^2 / 2, k3 = exp(lr) - 1 - lr. token_kN: per token; seq_sum_kN /
seq_mean_kN / seq_max_kN: the row's masked sum / mean / max (an empty row's max is 0),
the decision applied to every token of the row. k1 options keep log(L) <= k1 <= log(U)
(threshold a pair (L, U), or U alone meaning (1 / U, U)); the others keep k <= U.
Several options (a comma-separated string or a sequence) must all pass.
rollout_rejection_threshold: a number or (L, U) pair shared by every option, a dict
{option: number or pair}, or verl's rollout_rs_threshold string ("2.0", "0.5_2.0",
"0.5_2.0,0.1": one entry, or one per option).

off_policy_mask_threshold (TRL 1.16's get_off_policy_mask, DeepSeek-V3.2's off-policy
sequence mask; multiplied into is_weights): a row (a token, for [B, T] advantages) is
kept when A >= 0 or mean_t(nan_to_num(r - sg(lp))) <= threshold, the mean over the
row's valid tokens, r = rollout_logprobs (old_logprobs when not given: TRL's
sampling_per_token_logps, else old_per_token_logps).

top_entropy_quantile rho (TRL 1.16's get_high_entropy_mask, "Beyond the 80/20 rule";
multiplied into is_weights): a valid token is kept when its entropy >= the (1 - rho)
quantile (linear interpolation, torch.quantile's) of the valid tokens' entropies in
float32; rho = 1 keeps every token. The quantile is over this batch (TRL's over every
process's tokens). A NaN entropy at a valid position makes the mask, and so the loss,
NaN (TRL's threshold is NaN there and drops every token).

The masks multiply the policy term only, like is_weights: the KL and entropy terms keep
every token (TRL's entropy bonus with top_entropy_quantile averages over the kept
tokens instead: its adapter computes that term itself). vespo and geo_mean read
is_weights inside their formulas (vespo's phi, as TRL feeds it the vLLM ratio; verl's
geo_mean takes exp(mean log w)), so the IS weight reaches them there, and the two masks
are refused for them.

Stats (float 0-d tensors; units: valid tokens, or rows with a valid token for the
sequence modes and the geometric gate):
    rollout_kl                     mean over valid tokens of rollout - old (rollout - logprobs
                                   with rollout_correction_from="current"), NaN as 0 (verl's
                                   rollout_corr/kl, OpenRLHF's vllm_kl)
    rollout_is_mean / _min / _max  of w over its units (TRL's sampling/importance_sampling_ratio/*
                                   and verl's rollout_is_mean), before batch normalisation
    rollout_is_frac_low / _high    units whose statistic was below lo / above hi (truncated or
                                   masked; verl's rollout_is_ratio_fraction_low / _high,
                                   their sum OpenRLHF's is_filter_ratio)
    rollout_is_batch_norm_factor   the divisor, with rollout_batch_normalize
    rollout_rejected_frac          valid tokens rejected (verl's rollout_rs_masked_fraction)
    off_policy_masked_frac         valid tokens dropped by the off-policy mask
    top_entropy_masked_frac        valid tokens dropped by the top-entropy mask
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "geometric_mask")
TOKEN_MODES = ("token_truncate", "token_mask", "geometric_mask")  # one weight per token
GATES = ("ratio", "binary_kl", "tv")
GATED_MODES = ("token_mask", "geometric_mask")  # the modes a divergence can gate
CORRECTION_FROM = ("old", "current")  # rollout_correction_from: old_logprobs or sg(logprobs)
REJECTIONS = (
    "token_k1", "token_k2", "token_k3",
    "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
    "seq_max_k2", "seq_max_k3",
)  # fmt: skip
SAFETY_BOUND = 20.0  # verl's clamp of the log-ratio before exp
PROB_CLAMP = 1e-6  # OpenRLHF's clamp of the sampled-token probabilities (binary_kl, tv)
# Loss types that read is_weights inside their formula rather than as a factor.
WEIGHT_READING_TYPES = ("vespo", "geo_mean")

Threshold = Union[float, tuple]


class Correction(NamedTuple):
    weights: Optional[torch.Tensor]  # [B, T] or [B, 1] factor of is_weights, None: none
    keep: Optional[torch.Tensor]  # [B, T] bool, the rejection's kept tokens, None: none
    stats: dict


def rejection_options(rejection: Union[str, Sequence[str]]) -> list:
    """The rollout_rejection options in order, duplicates dropped (verl's parsing)."""
    items = rejection.split(",") if isinstance(rejection, str) else list(rejection)
    out = []
    for item in items:
        name = item.strip() if isinstance(item, str) else item
        if name and name not in out:
            out.append(name)
    return out


def rejection_thresholds(options: list, threshold) -> list:
    """One (lower or None, upper) per option from rollout_rejection_threshold: a number
    or a (lower, upper) pair shared by every option, a dict {option: number or pair}, or
    verl's string ("2.0", "0.5_2.0", or one comma-separated entry per option). A number
    U for a k1 option means (1 / U, U); the other options take a number only. Raises
    ValueError naming rollout_rejection_threshold."""
    name = "rollout_rejection_threshold"
    if isinstance(threshold, str):
        parts = [part.strip() for part in threshold.split(",") if part.strip()]
        if len(parts) not in (1, len(options)):
            raise ValueError(f"{name} must hold one entry or one per rollout_rejection option, got {threshold!r}")
        try:
            parsed = [tuple(float(v) for v in part.split("_", 1)) if "_" in part else float(part) for part in parts]
        except ValueError:
            raise ValueError(f"{name} must be a number, 'lower_upper' or a comma-separated list, got {threshold!r}")
        specs = parsed * len(options) if len(parsed) == 1 else parsed
    elif isinstance(threshold, dict):
        if sorted(threshold) != sorted(options):
            raise ValueError(f"{name} as a dict must have one entry per rollout_rejection option {options}")
        specs = [threshold[option] for option in options]
    else:
        specs = [threshold] * len(options)
    out = []
    for option, spec in zip(options, specs):
        if isinstance(spec, (list, tuple)):
            if not option.endswith("k1"):
                raise ValueError(f"{name} for {option} must be one upper bound, got {spec!r}")
            if len(spec) != 2 or not all(_finite(v) for v in spec):
                raise ValueError(f"{name} for {option} must be a (lower, upper) pair of numbers, got {spec!r}")
            lower, upper = float(spec[0]), float(spec[1])
            if not 0 < lower <= upper:
                raise ValueError(f"{name} for {option} must have 0 < lower <= upper, got {spec!r}")
        else:
            if not _finite(spec) or not spec > 0:
                raise ValueError(f"{name} for {option} must be a number > 0, got {spec!r}")
            upper = float(spec)
            lower = 1.0 / upper if option.endswith("k1") else None
            if lower is not None and lower > upper:
                raise ValueError(f"{name} for {option}: U alone means (1 / U, U), so U must be >= 1, got {spec!r}")
        out.append((lower, upper))
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def log_ratio(old_logprobs, rollout_logprobs, valid, dtype):
    """d = old - rollout at valid positions, 0 elsewhere, NaN as 0 (TRL's nan_to_num)."""
    d = torch.where(valid, old_logprobs.detach().to(dtype) - rollout_logprobs.detach().to(dtype), 0.0)
    return torch.nan_to_num(d, nan=0.0)


def _band(x, lo, hi):
    """lo <= x <= hi (a NaN fails), a missing bound always passing."""
    keep = torch.ones_like(x, dtype=torch.bool) if lo is None else x >= lo
    return keep if hi is None else keep & (x <= hi)


def _unit_stats(w, stat, units, lo, hi, prefix="rollout_is"):
    """mean / min / max of w and the fractions of stat below lo / above hi, over units (bool)."""
    zero = w.new_zeros(())
    count = units.sum().to(w.dtype)
    denominator = torch.where(count > 0, count, 1)
    w_units = torch.where(units, w, 0.0)
    has = count > 0
    below = (stat < lo) if lo is not None else torch.zeros_like(units)
    above = (stat > hi) if hi is not None else torch.zeros_like(units)
    return {
        f"{prefix}_mean": w_units.sum() / denominator,
        f"{prefix}_min": torch.where(has, torch.where(units, w, math.inf).amin(), zero) if w.numel() else zero,
        f"{prefix}_max": torch.where(has, torch.where(units, w, -math.inf).amax(), zero) if w.numel() else zero,
        f"{prefix}_frac_low": (below & units).sum().to(w.dtype) / denominator,
        f"{prefix}_frac_high": (above & units).sum().to(w.dtype) / denominator,
    }


def _divergence(old_logprobs, rollout_logprobs, gate, dtype):
    """OpenRLHF's per-token binary KL or total variation of the sampled token's probability."""
    p = rollout_logprobs.detach().to(dtype).exp().clamp(PROB_CLAMP, 1 - PROB_CLAMP)
    q = old_logprobs.detach().to(dtype).exp().clamp(PROB_CLAMP, 1 - PROB_CLAMP)
    if gate == "binary_kl":
        return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    return (p - q).abs()


@torch.no_grad()
def is_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    gate: str = "ratio",
    clip_min: Optional[float] = None,
    clip_max: Optional[float] = None,
    log_ratio_clamp: Optional[float] = None,
    batch_normalize: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple:
    """(w [B, T] ([B, 1] for the sequence modes), stats) of rollout_correction `mode`."""
    valid = mask != 0
    rows = valid.any(-1, keepdim=True)
    d = log_ratio(old_logprobs, rollout_logprobs, valid, dtype)
    bound = (lambda x: x) if log_ratio_clamp is None else (lambda x: x.clamp(-log_ratio_clamp, log_ratio_clamp))
    if mode in ("sequence_truncate", "sequence_mask"):
        ratio = torch.exp(bound(d.sum(-1, keepdim=True)))
        stat, units = ratio, rows
    else:
        ratio = torch.exp(bound(d))
        if gate == "ratio":
            stat = ratio
        else:
            stat = torch.where(valid, _divergence(old_logprobs, rollout_logprobs, gate, dtype), 0.0)
        units = valid
        if mode == "geometric_mask":
            counts = valid.sum(-1, keepdim=True).to(dtype)
            mean = (d if gate == "ratio" else stat).sum(-1, keepdim=True) / torch.where(counts > 0, counts, 1)
            stat, units = (torch.exp(bound(mean)) if gate == "ratio" else mean), rows
    if mode.endswith("truncate"):
        w = ratio.clamp(clip_min, clip_max)
    else:
        w = torch.where(_band(stat, clip_min, clip_max), ratio, 0.0)
    if mode == "geometric_mask":
        stats = _unit_stats(w, w, valid, None, None)  # the weights are per token,
        stats.update({k: v for k, v in _unit_stats(stat, stat, rows, clip_min, clip_max).items() if "frac" in k})
    else:
        stats = _unit_stats(w, stat, units, clip_min, clip_max)
    if batch_normalize:
        w, stats["rollout_is_batch_norm_factor"] = _batch_normalize(w.expand_as(d) * valid, valid, mode)
    return w, stats


def _batch_normalize(w, valid, mode):
    """verl's rollout_is_batch_normalize on the masked [B, T] weights (its masked means, +1e-8 included)."""
    m = valid.to(w.dtype)
    if mode in ("sequence_truncate", "sequence_mask"):
        seq = (w * m).sum(-1) / (m.sum(-1) + 1e-8)
        rows = (m.sum(-1) > 0).to(w.dtype)
        mean = (seq * rows).sum() / rows.sum().clamp_min(1e-8)
    else:
        mean = (w * m).sum() / (m.sum() + 1e-8)
    big = mean > 1e-8
    return torch.where(big, w / torch.where(big, mean, 1), w), torch.where(big, mean, torch.ones_like(mean))


@torch.no_grad()
def rejection_keep(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    rejection: Union[str, Sequence[str]],
    threshold,
    dtype: torch.dtype = torch.float32,
) -> tuple:
    """(kept tokens [B, T] bool, stats) of verl 0.9.1's rollout_rs options."""
    valid = mask != 0
    options = rejection_options(rejection)
    bounds = rejection_thresholds(options, threshold)
    lr = log_ratio(old_logprobs, rollout_logprobs, valid, dtype).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    per_token = {"k1": -lr, "k2": 0.5 * lr**2, "k3": torch.exp(lr) - 1.0 - lr}
    counts = valid.sum(-1).to(dtype)
    keep = torch.ones_like(valid)
    for option, (lower, upper) in zip(options, bounds):
        level, k = option.rsplit("_", 1)
        values = torch.where(valid, per_token[k], 0.0)
        if level == "token":
            stat = values
        elif level == "seq_sum":
            stat = values.sum(-1, keepdim=True)
        elif level == "seq_mean":
            stat = values.sum(-1, keepdim=True) / (counts[:, None] + 1e-8)
        else:  # seq_max
            top = torch.where(valid, values, -math.inf).amax(-1, keepdim=True) if values.numel() else values[:, :1]
            stat = torch.where(top == -math.inf, 0.0, top)
        passed = (stat >= math.log(lower)) & (stat <= math.log(upper)) if k == "k1" else stat <= upper
        keep = keep & passed
    total = valid.sum().to(dtype)
    rejected = (valid & ~keep).sum().to(dtype) / torch.where(total > 0, total, 1)
    return keep & valid, {"rollout_rejected_frac": rejected}


@torch.no_grad()
def off_policy_mask(
    logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    threshold: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """TRL 1.16's get_off_policy_mask as a bool [B, 1] ([B, T] for [B, T] advantages)."""
    valid = mask != 0
    kl = torch.where(valid, torch.nan_to_num(sampling_logprobs.detach().to(dtype) - logprobs.detach().to(dtype)), 0.0)
    counts = valid.sum(-1, keepdim=True).to(dtype)
    mean_kl = kl.sum(-1, keepdim=True) / counts.clamp(min=1.0)
    adv = advantages.detach()
    adv = adv[:, None] if adv.dim() == 1 else adv
    return (adv >= 0) | (mean_kl <= threshold)


@torch.no_grad()
def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, *, quantile: float, dtype=torch.float32):
    """TRL 1.16's get_high_entropy_mask(entropy, mask, 1 - quantile) on one process, as a
    [B, T] factor: 1 kept, 0 dropped, NaN everywhere when a valid entropy is NaN."""
    valid = mask != 0
    flat = entropy.detach().float().reshape(-1)
    live = valid.reshape(-1)
    count = live.sum()
    # torch.quantile's linear interpolation over the valid entropies, without boolean
    # indexing (static shapes): invalid ones sort last as +inf.
    ordered = torch.sort(torch.where(live, flat, math.inf)).values
    q = torch.tensor(1.0 - quantile, dtype=torch.float32, device=flat.device)
    ranks = q * (count.clamp(min=1) - 1).to(torch.float32)
    below = ranks.floor().long()
    above = ranks.ceil().long()
    if ordered.numel():
        lo_value, hi_value = ordered.gather(0, below.reshape(1)), ordered.gather(0, above.reshape(1))
        cut = torch.lerp(lo_value, hi_value, (ranks - below).reshape(1)).reshape(())
    else:
        cut = q.new_zeros(())
    has_nan = (torch.isnan(flat) & live).any()
    keep = (entropy.detach().to(dtype) >= cut) & valid
    factor = keep.to(dtype)
    return torch.where(has_nan, torch.full_like(factor, math.nan), factor)


@torch.no_grad()
def correction(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    rollout_logprobs: Optional[torch.Tensor] = None,
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
    entropy: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> Correction:
    """Every factor policy_loss's correction keywords ask for (validated arguments):
    weights (for is_weights), keep (for the mask) and their stats."""
    valid = mask != 0
    stats, factors, keep = {}, [], None
    # The train-side log-probs the correction compares with the rollout's (log_ratio detaches).
    train = logprobs if rollout_correction_from == "current" else old_logprobs
    if rollout_logprobs is not None:
        total = valid.sum().to(dtype)
        # -d: rollout - train exactly (a float difference is antisymmetric), NaN as 0.
        stats["rollout_kl"] = -log_ratio(train, rollout_logprobs, valid, dtype).sum() / torch.where(total > 0, total, 1)
    if rollout_correction is not None:
        w, is_stats = is_weights(
            train, rollout_logprobs, mask, mode=rollout_correction, gate=rollout_gate,
            clip_min=rollout_clip_min, clip_max=rollout_clip_max, log_ratio_clamp=rollout_log_ratio_clamp,
            batch_normalize=rollout_batch_normalize, dtype=dtype,
        )  # fmt: skip
        factors.append(w)
        stats.update(is_stats)
    if rollout_rejection is not None:
        keep, rs_stats = rejection_keep(
            train, rollout_logprobs, mask, rejection=rollout_rejection,
            threshold=rollout_rejection_threshold, dtype=dtype,
        )  # fmt: skip
        stats.update(rs_stats)
    if off_policy_mask_threshold is not None:
        sampling = old_logprobs if rollout_logprobs is None else rollout_logprobs
        kept = off_policy_mask(logprobs, sampling, advantages, mask, threshold=off_policy_mask_threshold, dtype=dtype)
        factors.append(kept.to(dtype))
        stats["off_policy_masked_frac"] = _dropped(kept, valid, dtype)
    if top_entropy_quantile is not None and top_entropy_quantile < 1.0:
        kept = top_entropy_mask(entropy, mask, quantile=top_entropy_quantile, dtype=dtype)
        factors.append(kept)
        stats["top_entropy_masked_frac"] = _dropped(kept != 0, valid, dtype)
    weights = None
    for factor in factors:
        weights = factor if weights is None else weights * factor
    if weights is not None:
        weights = weights.expand(logprobs.shape)
    return Correction(weights, keep, stats)


def _dropped(kept, valid, dtype):
    total = valid.sum().to(dtype)
    return (valid & ~kept.expand_as(valid)).sum().to(dtype) / torch.where(total > 0, total, 1)
