"""Reference group-relative advantages (the critic-free estimators of verl 0.9.1 and TRL 1.16).

Per-sequence estimators take scores s [B] (verl: token_level_rewards.sum(-1)) and a
group per sequence; g(b) is b's group, n_g its size, mean_g / std_g its mean and
unbiased standard deviation (torch.std):

    grpo, grpo_vectorized   (s - mean_g) / (std_g + eps)      norm_by_std=False: s - mean_g
    grpo_passk              best of the group: (s_max - s_second) [/ (std_g + eps)], others 0
    rloo                    n_g / (n_g - 1) (s - mean_g)
    rloo_vectorized         the same
    opo                     s - sum_g(L s) / sum_g(L)          L = response lengths (0 when sum_g(L) = 0)
    gpg                     alpha (s - mean_g) / f_norm         alpha = B / max(#(s != 0), 1)
    reinforce_plus_plus_baseline  whiten_L(s - mean_g)         token-weighted batch whitening
    gdpo                    whiten_L(sum_k w_k grpo(s[:, k]))   scores [B, K]
    trl                     (s - mean_g) / (std + eps), std by `scale_rewards`:
                            "group" std_g, "batch" the batch's std, "none" no division
                            (TRL's GRPO uses eps = 1e-4; Dr. GRPO is scale_rewards="none")

whiten_L is verl's masked_whiten over the [B, T] broadcast, i.e. weighted by the lengths
L: (x - mu) / sqrt(var + 1e-8), mu = sum L x / (sum L + 1e-8), var the weighted
variance times N / (N - 1), N = sum L.

Groups of one sequence, as verl 0.9.1 handles them (each estimator its own way):
grpo, grpo_vectorized, gpg, reinforce_plus_plus_baseline, gdpo: mean 0 and std 1, so
the advantage is s / (1 + eps) (s with norm_by_std=False); rloo: the raw score s;
rloo_vectorized: 0; opo: baseline 0 (s); grpo_passk: an error (needs two); trl: std 0
so the advantage is 0 (group) or the batch-scaled (s - s) = 0.

Token-level estimators return [B, T] from token_rewards [B, T] and the mask:
    remax                   returns_t = sum_{u >= t} r_u m_u;  A = returns - baseline_b m_t
    reinforce_plus_plus     returns_t = r_t + gamma returns_{t+1} over valid tokens
                            (mask-0 positions carry the running return), A = whiten(returns) m
    optimal_token_baseline  A_t = (G_t - B_t) m_t, per-timestep group baseline
                            B_t = sum_g G_t W_t m_t / (sum_g W_t m_t + eps), over the
                            sequences of b's group at the same position t, with
                            G_t = sum_{u >= t} r_u m_u (returns to go) and
                            W_t = sum_{u <= t} w_u m_u, w = (1 - 2 exp(old_lp) + sum_pi_squared)
                            [x is_weights^2] (the path-variance proxy |e_a - pi|^2)
    tir_optimal_token_baseline  the same, but the sequences of a group are aligned by the
                            ordinal of the valid token (k-th response token of each), not by
                            position t, so multi-turn rows with observation spans line up

Masks enter by select, never by product (0 x NaN is NaN): a value at a mask-0 position
(padding: NaN, inf, anything) reaches no output at a valid position, and the outputs
the module computes as "x m" are where(m != 0, x m, 0). For finite inputs and a 0/1
mask (any mask, as verl multiplies it in) the values are verl's, position by position.
NaN is never hidden: a NaN score or reward at a valid position makes every output that
reads it NaN (grpo_passk: the whole group, whose best sequence it leaves undefined).
An empty batch (B = 0, or T = 0 for the token estimators) gives an empty result; the
whitening estimators (reinforce_plus_plus, reinforce_plus_plus_baseline, gdpo) raise,
as verl does, when a non-empty batch has fewer than two valid tokens.

Both follow verl 0.9.1 (compute_optimal_token_baseline_advantage and
compute_multi_turn_optimal_token_baseline_advantage), whose epsilon default is 1e-8:
a group of one sequence gets baseline 0 (A = G m); tir leaves rows with no valid token
out of their group (their advantage is 0), optimal_token_baseline counts them (they add
nothing to the sums). handle_zero_tail: in a group of >= 2, when one sequence is
strictly the longest, its baseline is 0 from the second-longest length on (position for
optimal_token_baseline, ordinal for tir), where it would be its own return.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

SEQUENCE_ESTIMATORS = (
    "grpo",
    "grpo_vectorized",
    "grpo_passk",
    "rloo",
    "rloo_vectorized",
    "opo",
    "gpg",
    "reinforce_plus_plus_baseline",
    "gdpo",
    "trl",
)
OTB_ESTIMATORS = ("optimal_token_baseline", "tir_optimal_token_baseline")
TOKEN_ESTIMATORS = ("remax", "reinforce_plus_plus") + OTB_ESTIMATORS
# verl's epsilon defaults: 1e-6 for the group-normalised estimators, 1e-8 for OTB.
DEFAULT_EPS = 1e-6
OTB_EPS = 1e-8
ESTIMATORS = SEQUENCE_ESTIMATORS + TOKEN_ESTIMATORS
SCALE_REWARDS = ("group", "batch", "none")
# verl's masked_whiten: rsqrt(var + 1e-8), means over (mask.sum() + 1e-8).
WHITEN_EPS = 1e-8


def default_eps(estimator: str) -> float:
    """verl's epsilon of `estimator` (eps=None)."""
    return OTB_EPS if estimator in OTB_ESTIMATORS else DEFAULT_EPS


def group_ids(batch: int, group_index: Optional[torch.Tensor], group_size: Optional[int], device) -> torch.Tensor:
    """Dense group ids 0..G-1 [B]: from any integer labels, or contiguous runs of group_size (TRL's layout)."""
    if group_index is not None:
        return torch.unique(group_index, return_inverse=True)[1].to(device)
    size = max(batch, 1) if group_size is None else group_size
    return torch.arange(batch, device=device) // size


def _group_stats(x: torch.Tensor, ids: torch.Tensor):
    """Per-group (count, mean, unbiased std) [G], gathered back to [B]; std of a singleton is 0 here."""
    G = int(ids.max()) + 1 if ids.numel() else 0
    count = torch.zeros(G, dtype=x.dtype, device=x.device).index_add_(0, ids, torch.ones_like(x))
    mean = torch.zeros(G, dtype=x.dtype, device=x.device).index_add_(0, ids, x) / count.clamp(min=1)
    centered = x - mean[ids]
    var = torch.zeros(G, dtype=x.dtype, device=x.device).index_add_(0, ids, centered * centered)
    std = (var / (count - 1).clamp(min=1)).sqrt()
    return count[ids], mean[ids], std[ids]


def _select(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x m where m != 0, exactly 0 elsewhere (a select: 0 x NaN / inf would be NaN)."""
    return torch.where(m != 0, x * m, 0)


def _whiten_by_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """verl's masked_whiten of x[:, None] * mask over the mask (weights = response lengths;
    a row of length 0 adds nothing, as a select: its NaN / inf x stays out of the statistics)."""
    total = lengths.sum()
    if total <= 1:
        # verl's masked_var raises here ("at least one element" / "sum of the mask is one").
        raise ValueError("whitening needs at least two valid tokens in the batch (verl raises too)")
    mean = _select(x, lengths).sum() / (total + WHITEN_EPS)
    var = _select((x - mean) ** 2, lengths).sum() / (total + WHITEN_EPS) * (total / (total - 1))
    return (x - mean) * torch.rsqrt(var + WHITEN_EPS)


def _grpo(s, ids, eps, norm_by_std):
    count, mean, std = _group_stats(s, ids)
    single = count <= 1
    mean = torch.where(single, 0, mean)
    std = torch.where(single, 1, std)
    return (s - mean) / (std + eps) if norm_by_std else s - mean


def _passk(s, ids, eps, norm_by_std):
    count, _, std = _group_stats(s, ids)
    if bool((count < 2).any()):
        raise ValueError("grpo_passk needs at least 2 sequences per group (verl raises too)")
    G = int(ids.max()) + 1
    # First and second largest per group; the first index of the maximum is the best sequence.
    best = torch.full((G,), -torch.inf, dtype=s.dtype, device=s.device).scatter_reduce(0, ids, s, "amax")
    position = torch.arange(s.numel(), device=s.device)
    is_max = s == best[ids]
    first = torch.full((G,), s.numel(), device=s.device).scatter_reduce(
        0, ids, torch.where(is_max, position, s.numel()), "amin"
    )
    winner = position == first[ids]
    second = torch.full((G,), -torch.inf, dtype=s.dtype, device=s.device).scatter_reduce(
        0, ids, torch.where(winner, -torch.inf, s), "amax"
    )
    gap = best[ids] - second[ids]
    if norm_by_std:
        gap = gap / (std + eps)
    # A NaN score leaves the group's best undefined (s == best is never true for NaN):
    # every member of its group is NaN, never a silent 0.
    nan_group = torch.zeros(G, dtype=s.dtype, device=s.device).index_add_(0, ids, s.isnan().to(s.dtype)) > 0
    return torch.where(nan_group[ids], torch.nan, torch.where(winner, gap, 0))


def _trl(s, ids, eps, scale_rewards):
    _, mean, std = _group_stats(s, ids)
    if scale_rewards == "batch":
        std = s.std().expand_as(s) if s.numel() > 1 else torch.zeros_like(s)
    advantages = s - mean
    return advantages if scale_rewards == "none" else advantages / (std + eps)


def group_advantages(
    scores: torch.Tensor,
    group_index: Optional[torch.Tensor] = None,
    *,
    group_size: Optional[int] = None,
    estimator: str = "grpo",
    eps: Optional[float] = None,
    norm_by_std: bool = True,
    scale_rewards: str = "group",
    lengths: Optional[torch.Tensor] = None,
    f_norm: float = 1.0,
    reward_weights: Optional[Sequence[float]] = None,
    token_rewards: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    reward_baselines: Optional[torch.Tensor] = None,
    gamma: float = 1.0,
    old_logprobs: Optional[torch.Tensor] = None,
    sum_pi_squared: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    handle_zero_tail: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Advantages [B] (sequence estimators) or [B, T] (token estimators); see the module docstring."""
    eps = default_eps(estimator) if eps is None else eps
    if estimator in TOKEN_ESTIMATORS and token_rewards.numel() == 0:  # B = 0 or T = 0: nothing to estimate
        return torch.zeros(token_rewards.shape, dtype=dtype, device=token_rewards.device)
    if estimator not in TOKEN_ESTIMATORS and scores.shape[0] == 0:
        return torch.zeros(0, dtype=dtype, device=scores.device)
    if estimator in OTB_ESTIMATORS:
        ids = group_ids(token_rewards.shape[0], group_index, group_size, token_rewards.device)
        return _optimal_token_baseline(
            token_rewards, mask, ids, old_logprobs, sum_pi_squared, is_weights,
            aligned=estimator == "tir_optimal_token_baseline", handle_zero_tail=handle_zero_tail, eps=eps,
        ).to(dtype)  # fmt: skip
    if estimator in TOKEN_ESTIMATORS:
        return _token_estimator(estimator, token_rewards, mask, reward_baselines, gamma, dtype)
    # Group statistics in float64: sums of a few scores, so exactness costs nothing.
    s = scores.detach().to(torch.float64)
    ids = group_ids(s.shape[0], group_index, group_size, s.device)
    if estimator in ("grpo", "grpo_vectorized"):
        out = _grpo(s, ids, eps, norm_by_std)
    elif estimator == "grpo_passk":
        out = _passk(s, ids, eps, norm_by_std)
    elif estimator in ("rloo", "rloo_vectorized"):
        count, mean, _ = _group_stats(s, ids)
        single_value = s if estimator == "rloo" else torch.zeros_like(s)
        out = torch.where(count > 1, count / (count - 1).clamp(min=1) * (s - mean), single_value)
    elif estimator == "opo":
        L = lengths.to(torch.float64)
        count, _, _ = _group_stats(s, ids)
        G = int(ids.max()) + 1
        weighted = torch.zeros(G, dtype=s.dtype, device=s.device).index_add_(0, ids, _select(s, L))
        total = torch.zeros(G, dtype=s.dtype, device=s.device).index_add_(0, ids, L)
        # A group of one, or one whose sequences have no tokens (verl: 0 / 0), has baseline 0.
        out = s - torch.where((count > 1) & (total[ids] != 0), weighted[ids] / total[ids], 0)
    elif estimator == "gpg":
        alpha = s.shape[0] / max(int((s != 0).sum()), 1)
        count, mean, _ = _group_stats(s, ids)
        out = alpha * (s - torch.where(count > 1, mean, 0)) / f_norm
    elif estimator == "reinforce_plus_plus_baseline":
        count, mean, _ = _group_stats(s, ids)
        out = _whiten_by_length(s - torch.where(count > 1, mean, 0), lengths.to(torch.float64))
    elif estimator == "gdpo":
        columns = s if s.dim() == 2 else s[:, None]
        weights = [1.0] * columns.shape[1] if reward_weights is None else list(reward_weights)
        total = sum(w * _grpo(columns[:, k], ids, eps, norm_by_std) for k, w in enumerate(weights))
        out = _whiten_by_length(total, lengths.to(torch.float64))
    elif estimator == "trl":
        out = _trl(s, ids, eps, scale_rewards)
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return out.to(dtype)


def _token_estimator(estimator, token_rewards, mask, reward_baselines, gamma, dtype):
    r = token_rewards.detach().to(torch.float64)
    m = mask.to(torch.float64)
    if estimator == "remax":
        # verl: returns - baseline m; a mask-0 position holds the returns to go of the valid tokens after it
        returns = _select(r, m).flip(-1).cumsum(-1).flip(-1)
        return (returns - _select(reward_baselines.detach().to(torch.float64)[:, None], m)).to(dtype)
    valid = m != 0
    total = m.sum()
    if total <= 1:
        # verl's masked_var raises here ("at least one element" / "sum of the mask is one").
        raise ValueError("reinforce_plus_plus whitens over the mask: it needs at least two valid tokens (mask != 0) "
                         "in a non-empty batch (verl raises too)")  # fmt: skip
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        new = r[:, t] + gamma * running
        returns[:, t] = _select(new, m[:, t])
        # mask-0 positions carry the running return (verl: new m + running (1 - m), as a select)
        running = torch.where(valid[:, t], new * m[:, t] + running * (1 - m[:, t]), running)
    mean = _select(returns, m).sum() / (total + WHITEN_EPS)
    var = _select((returns - mean) ** 2, m).sum() / (total + WHITEN_EPS) * (total / (total - 1))
    return _select((returns - mean) * torch.rsqrt(var + WHITEN_EPS), m).to(dtype)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence advantages [B] as token advantages [B, T]: A_b m on valid tokens, exactly 0
    elsewhere (verl's advantages[:, None] * mask, as a select: a NaN / inf A_b stays off
    its row's mask-0 positions)."""
    return _select(advantages[:, None], mask.to(advantages.dtype))


def _zero_tail(baselines, lengths, ids, member):
    """verl's handle_zero_tail: in each group of >= 2 members, a member strictly longer
    than every other gets baseline 0 from the second-longest length on (columns of
    `baselines` are positions or ordinals, whichever `lengths` counts)."""
    G = int(ids.max()) + 1
    neg = torch.tensor(-torch.inf, dtype=lengths.dtype, device=lengths.device)
    L = torch.where(member, lengths, neg)
    longest = torch.full((G,), -torch.inf, dtype=L.dtype, device=L.device).scatter_reduce(0, ids, L, "amax")
    is_longest = member & (L == longest[ids])
    zeros = torch.zeros(G, dtype=L.dtype, device=L.device)
    n_longest = zeros.index_add(0, ids, is_longest.to(L.dtype))
    n_members = zeros.index_add(0, ids, member.to(L.dtype))
    second = torch.full((G,), -torch.inf, dtype=L.dtype, device=L.device).scatter_reduce(
        0, ids, torch.where(is_longest, neg, L), "amax"
    )
    unique = is_longest & (n_longest[ids] == 1) & (n_members[ids] >= 2)
    column = torch.arange(baselines.shape[1], device=baselines.device, dtype=L.dtype)
    tail = unique[:, None] & (column[None, :] >= second[ids][:, None])
    return torch.where(tail, 0, baselines)


def _group_baseline(returns, weights, valid, ids, member, eps):
    """Per-column sum_g(R W) / (sum_g(W) + eps) of each row's group [B, C] over the valid
    entries (a select: a mask-0 entry's R or W never enters); 0 for groups with fewer
    than two members (verl: a single trajectory has no baseline)."""
    G = int(ids.max()) + 1
    grid = torch.zeros((G, returns.shape[1]), dtype=returns.dtype, device=returns.device)
    numerator = grid.index_add(0, ids, torch.where(valid, returns * weights, 0))
    denominator = grid.index_add(0, ids, torch.where(valid, weights, 0)) + eps
    members = torch.zeros(G, dtype=returns.dtype, device=returns.device).index_add(0, ids, member.to(returns.dtype))
    return torch.where((members[ids] >= 2)[:, None], (numerator / denominator)[ids], 0)


def _optimal_token_baseline(r, mask, ids, old_logprobs, sum_pi_squared, is_weights, *, aligned, handle_zero_tail, eps):
    """verl 0.9.1's optimal token baseline (aligned=False: by position t) and its
    multi-turn variant tir (aligned=True: by the ordinal of the valid token), in float64."""
    r = r.detach().to(torch.float64)
    B, T = r.shape
    if B == 0 or T == 0:
        return torch.zeros_like(r)
    m = mask.detach().to(torch.float64)
    valid = m != 0
    returns = _select(r, m).flip(-1).cumsum(-1).flip(-1)
    w = 1 - 2 * torch.exp(old_logprobs.detach().to(torch.float64)) + sum_pi_squared.detach().to(torch.float64)
    if is_weights is not None:
        w = w * is_weights.detach().to(torch.float64) ** 2
    path = _select(w, m).cumsum(-1)
    if not aligned:
        member = torch.ones(B, dtype=torch.bool, device=r.device)
        baselines = _group_baseline(returns, _select(path, m), valid, ids, member, eps)
        if handle_zero_tail:
            baselines = _zero_tail(baselines, m.sum(-1).floor(), ids, member)
        return _select(returns - baselines, m)
    # tir: row i's k-th valid token sits in column k of a [B, max length] grid.
    lengths = valid.sum(-1)
    width = int(lengths.max())
    rows, columns = valid.nonzero(as_tuple=True)
    ordinal = (valid.cumsum(-1) - 1)[rows, columns]
    packed_returns = r.new_zeros((B, width))
    packed_path = r.new_zeros((B, width))
    packed_returns[rows, ordinal] = returns[rows, columns]
    packed_path[rows, ordinal] = path[rows, columns]
    member = lengths > 0  # rows with no valid token belong to no group
    packed_valid = torch.arange(width, device=r.device) < lengths[:, None]
    baselines = _group_baseline(packed_returns, packed_path, packed_valid, ids, member, eps)
    if handle_zero_tail:
        baselines = _zero_tail(baselines, lengths.to(torch.float64), ids, member)
    advantages = torch.zeros_like(r)
    advantages[rows, columns] = (packed_returns - baselines)[rows, ordinal]
    return _select(advantages, m)
