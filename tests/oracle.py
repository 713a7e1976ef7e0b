"""Independent float64 implementations for the parity tests: scalar Python loops over
nested lists (math module only), written from the formulas in DESIGN.md, sharing
no code with rlhf_kernels.reference.
"""

from __future__ import annotations

import math


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def transform(x: float, temperature=1.0, softcap=None, logit_scale=1.0) -> float:
    z = logit_scale * x
    if softcap is not None:
        z = softcap * math.tanh(z / softcap)
    return z / temperature


def row_logprob_entropy(row, label, **opts):
    z = [transform(x, **opts) for x in row]
    top = max(z)
    lse = top + math.log(sum(math.exp(v - top) for v in z))
    probs = [math.exp(v - lse) for v in z]
    return z[label] - lse, lse - sum(p * v for p, v in zip(probs, z))


def token_logprobs(logits, labels, ignore_index=-100, **opts):
    """logits: list of rows; labels: list. Returns (logprobs, entropies)."""
    out_lp, out_h = [], []
    for row, label in zip(logits, labels):
        if label == ignore_index:
            out_lp.append(0.0)
            out_h.append(0.0)
        else:
            lp, h = row_logprob_entropy(row, label, **opts)
            out_lp.append(lp)
            out_h.append(h)
    return out_lp, out_h


def kl(lp: float, ref: float, estimator: str, clamp=None) -> float:
    d = lp - ref
    if estimator == "k1":
        value = d
    elif estimator == "k2":
        value = d * d / 2
    elif estimator == "k3":
        value = math.exp(-d) + d - 1
    elif estimator == "abs":
        value = abs(d)
    else:  # low_var_kl
        c = min(max(-d, -20.0), 20.0)
        value = min(max(math.exp(c) - c - 1, -10.0), 10.0)
    if clamp is not None:
        value = min(max(value, -clamp), clamp)
    return value


def gae_row(rewards, values, mask, gamma, lam, mode):
    T = len(rewards)
    adv, ret = [0.0] * T, [0.0] * T
    next_v = running = 0.0
    for t in reversed(range(T)):
        r, v, m = rewards[t], values[t], mask[t]
        if mode == "multiply":
            r, v = r * m, v * m
        a = r + gamma * next_v - v + gamma * lam * running
        if not (mode == "carry" and m == 0):  # carry: a mask-0 position passes both through
            next_v, running = v, a
        adv[t] = running
        ret[t] = running + v
    return adv, ret


def masked_mean(xs, ms) -> float:
    n = sum(ms)
    return sum(x * m for x, m in zip(xs, ms)) / n if n else 0.0


def masked_whiten(xs, ms, shift_mean=True, unbiased=True, eps=1e-8, fill_masked=True):
    n = sum(ms)
    mean = masked_mean(xs, ms)
    denom = n - 1 if unbiased else n
    var = sum(m * (x - mean) ** 2 for x, m in zip(xs, ms)) / (denom if denom > 0 else 1)
    out = []
    for x, m in zip(xs, ms):
        w = (x - mean) / math.sqrt(var + eps) + (0 if shift_mean else mean)
        out.append(w if m or not fill_masked else 0.0)
    return out


def ppo_token_loss(lp, old, a, clip_low, clip_high, dual_clip, log_ratio_clamp):
    log_ratio = lp - old
    if log_ratio_clamp is not None:
        log_ratio = min(max(log_ratio, -log_ratio_clamp), log_ratio_clamp)
    ratio = math.exp(log_ratio)
    unclipped = -a * ratio
    clipped = -a * min(max(ratio, 1 - clip_low), 1 + clip_high)
    loss = max(unclipped, clipped)
    if dual_clip is not None and a < 0:
        loss = min(loss, -a * dual_clip)
    return loss, clipped > unclipped, (ratio - 1) - log_ratio


def aggregate(losses, mask, agg):
    """losses, mask: lists of rows."""
    if agg == "token-mean":
        flat = [(l, m) for lr, mr in zip(losses, mask) for l, m in zip(lr, mr)]
        n = sum(m for _, m in flat)
        return sum(l * m for l, m in flat) / n if n else 0.0
    sums = [sum(l * m for l, m in zip(lr, mr)) for lr, mr in zip(losses, mask)]
    if agg == "seq-mean-token-sum":
        return sum(sums) / len(sums)
    if agg == "seq-mean-token-sum-norm":
        return sum(sums) / len(losses[0])
    means = [s / sum(mr) for s, mr in zip(sums, mask) if sum(mr) > 0]
    return sum(means) / len(means) if means else 0.0


def value_token_loss(v, old, ret, clip):
    unclipped = (v - ret) ** 2
    if clip is None:
        return 0.5 * unclipped, False
    clipped = (old + min(max(v - old, -clip), clip) - ret) ** 2
    return 0.5 * max(unclipped, clipped), clipped > unclipped


def ranking(rewards_row, ranks_row):
    """Mean -logsigmoid(r_i - r_j) over pairs with rank_i < rank_j, or None without pairs."""
    terms = [
        -log_sigmoid(ri - rj)
        for ri, ki in zip(rewards_row, ranks_row)
        for rj, kj in zip(rewards_row, ranks_row)
        if ki < kj
    ]
    return sum(terms) / len(terms) if terms else None
