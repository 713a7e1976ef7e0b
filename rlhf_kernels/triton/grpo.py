"""Triton kernel of the GRPO per-token policy loss: one program per row, T in BLOCK tiles.

The math and the conventions are csrc/cpu/grpo.cpp's (ties of max/min split the
gradient in half, clamps pass it on the closed interval, an option that is off is
+inf). The loss type and KL estimator are constexprs: each configuration compiles
to straight-line code. Every clamp, max and min keeps NaN as torch's do (_math.py:
tl.maximum / tl.minimum drop it on a GPU), and masks are selects, so NaN / inf at a
mask-0 position never reaches the sums or the gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, row_block, widest_block
from ._math import clamp, exp_minus_one_minus_x, masked, maximum, minimum
from .ppo import _max_grad_first

BLOCK_T = 1024
N_STATS = 8


@triton.jit
def _inside(x, low, high):
    return tl.where((x >= low) & (x <= high), 1.0, 0.0)


@triton.jit
def _kl(lp, ref, KL: tl.constexpr):
    """(kl(lp, ref), d kl / d lp) of reference.kl's estimators; KL + 8: straight-through (k2's slope);
    the + 16 of kl_is_corrected is the caller's."""
    d = lp - ref
    if KL % 8 == 1:
        value = d
        slope = tl.full(d.shape, 1.0, d.dtype)
    elif KL % 8 == 2:
        value = 0.5 * d * d
        slope = d
    elif KL % 8 == 3:
        value = tl.exp(-d) + d - 1.0
        slope = 1.0 - tl.exp(-d)
    elif KL % 8 == 4:
        value = tl.abs(d)
        slope = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    else:  # low_var_kl
        c = clamp(-d, -20.0, 20.0)
        raw = tl.exp(c) - c - 1.0
        value = clamp(raw, -10.0, 10.0)
        slope = -(tl.exp(c) - 1.0) * _inside(-d, -20.0, 20.0) * _inside(raw, -10.0, 10.0)
    if KL // 8 % 2 == 1:
        slope = d
    return value, slope


@triton.jit
def _grpo_policy_loss_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, isw_ptr, ref_ptr, row_weight_ptr, stats_ptr, grad_ptr, T,
    low, high, dual_clip, delta, ratio_clamp, tau_pos, tau_neg, dro_beta, w_low, w_high, kl_coef,
    LOSS: tl.constexpr, KL: tl.constexpr, HAS_ISW: tl.constexpr, NEED_GRAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    row_weight = tl.load(row_weight_ptr + row)
    loss_sum = tl.zeros([BLOCK], ACC)
    low_sum = tl.zeros([BLOCK], ACC)
    high_sum = tl.zeros([BLOCK], ACC)
    dual_sum = tl.zeros([BLOCK], ACC)
    k1_sum = tl.zeros([BLOCK], ACC)
    k3_sum = tl.zeros([BLOCK], ACC)
    ratio_sum = tl.zeros([BLOCK], ACC)
    ratio_max = tl.zeros([BLOCK], ACC)
    for start in range(0, T, BLOCK):
        t = start + tl.arange(0, BLOCK)
        ok = t < T
        lp = tl.load(lp_ptr + base + t, mask=ok, other=0.0)
        old = tl.load(old_ptr + base + t, mask=ok, other=0.0)
        a = tl.load(adv_ptr + base + t, mask=ok, other=0.0)
        m = tl.load(mask_ptr + base + t, mask=ok, other=0.0)
        raw = lp - old
        clamp_grad = _inside(raw, -ratio_clamp, ratio_clamp)
        ratio = tl.exp(clamp(raw, -ratio_clamp, ratio_clamp))
        if LOSS == 0:  # clip family (+ TRL's delta, dual clip for A < 0)
            first = minimum(ratio, delta)
            unclipped = -a * first
            clipped = -a * clamp(ratio, low, high)
            loss = maximum(unclipped, clipped)
            dratio = -a * (
                _max_grad_first(unclipped, clipped) * tl.where(ratio <= delta, 1.0, 0.0)
                + _max_grad_first(clipped, unclipped) * _inside(ratio, low, high)
            )
            negative = a < 0
            bound = tl.where(negative, -a * dual_clip, float("inf"))
            dual_sum += m * tl.where(loss > bound, 1.0, 0.0)
            dratio = dratio * _max_grad_first(bound, loss)
            loss = minimum(loss, bound)
            dloss = dratio * ratio * clamp_grad
        elif LOSS == 1:  # cispo: constant weight clip(r) times -A lp
            w = clamp(ratio, w_low, w_high)
            loss = -w * a * lp
            dloss = -w * a
        elif LOSS == 2:  # sapo: -A sigmoid(tau (r - 1)) 4 / tau
            tau = tl.where(a > 0, tau_pos, tau_neg)
            s = tl.sigmoid(tau * (ratio - 1.0))
            loss = -a * s * (4.0 / tau)
            dloss = -a * 4.0 * s * (1.0 - s) * ratio * clamp_grad
        else:  # pg: -A lp + beta / 2 (lp - old)^2; beta 0 (gpg) never reads old: no 0 x inf
            loss = -a * lp + tl.where(dro_beta != 0.0, 0.5 * dro_beta * raw * raw, 0.0)
            dloss = -a + tl.where(dro_beta != 0.0, dro_beta * raw, 0.0)
        if HAS_ISW:
            isw = tl.load(isw_ptr + base + t, mask=ok, other=0.0)
            loss = loss * isw
            dloss = dloss * isw
        if KL != 0:
            ref = tl.load(ref_ptr + base + t, mask=ok, other=0.0)
            kl, slope = _kl(lp, ref, KL)
            if KL >= 16:  # kl_is_corrected: kl r, derivative kl' r + kl r'
                slope = (slope + kl * clamp_grad) * ratio
                kl = kl * ratio
            loss += kl_coef * kl
            dloss += kl_coef * slope
        loss_sum += masked(m, loss)
        low_sum += m * tl.where((ratio < low) & (a < 0), 1.0, 0.0)
        high_sum += m * tl.where((ratio > high) & (a > 0), 1.0, 0.0)
        k1_sum += masked(m, -raw)
        k3_sum += masked(m, exp_minus_one_minus_x(raw))
        ratio_sum += masked(m, ratio)
        ratio_max = maximum(ratio_max, tl.where(m != 0, ratio, 0.0))
        if NEED_GRAD:
            tl.store(grad_ptr + base + t, row_weight * masked(m, dloss), mask=ok)
    out = stats_ptr + 8 * row  # N_STATS: a module-level int is not visible to the GPU compiler
    tl.store(out, row_weight * tl.sum(loss_sum, 0))
    tl.store(out + 1, tl.sum(low_sum, 0))
    tl.store(out + 2, tl.sum(high_sum, 0))
    tl.store(out + 3, tl.sum(dual_sum, 0))
    tl.store(out + 4, tl.sum(k1_sum, 0))
    tl.store(out + 5, tl.sum(k3_sum, 0))
    tl.store(out + 6, tl.sum(ratio_sum, 0))
    tl.store(out + 7, tl.reduce(ratio_max, 0, maximum))  # tl.max would drop a NaN on a GPU


def grpo_policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    is_weights,
    ref_logprobs,
    row_weight,
    loss_code,
    kl_code,
    params,
    need_grad,
):
    """Inputs [B, T] contiguous float32/float64 of one dtype (is_weights / ref_logprobs may be
    empty), row_weight [B] -> (row_stats [B, 8], grad); see csrc/registration.cpp."""
    stats = torch.empty(logprobs.shape[0], N_STATS, dtype=logprobs.dtype, device=logprobs.device)
    grad = torch.empty_like(logprobs) if need_grad else logprobs.new_empty(0)
    has_isw = is_weights.numel() != 0
    if logprobs.shape[0]:
        launch(
            _grpo_policy_loss_kernel,
            (logprobs.shape[0],),
            logprobs,
            old_logprobs,
            advantages,
            mask,
            is_weights if has_isw else logprobs,  # never read without HAS_ISW
            ref_logprobs if kl_code else logprobs,  # never read without KL
            row_weight,
            stats,
            grad,
            logprobs.shape[1],
            *params[:11],
            LOSS=loss_code,
            KL=kl_code,
            HAS_ISW=has_isw,
            NEED_GRAD=need_grad,
            ACC=tl.float64 if logprobs.dtype == torch.float64 else tl.float32,
            BLOCK=row_block(logprobs.shape[1], widest_block(BLOCK_T, logprobs.dtype)),
        )
    return stats, grad
