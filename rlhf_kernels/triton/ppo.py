"""Triton kernels of the PPO losses: one program per row, T in BLOCK_T tiles.

Each computes the per-token loss, its gradient (stored, so the backward is a
scale) and the row's sums, with the conventions of csrc/cpu/ppo.cpp: ties of a
max/min split the gradient in half (torch.maximum's rule), clamp passes the
gradient on its closed interval.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import launch, row_block, widest_block
from ._math import clamp, exp_minus_one_minus_x, masked, maximum, minimum

# 1024 tokens a tile: T = 8192 in 8 iterations; four fp32 accumulators of 1024 lanes.
BLOCK_T = 1024


@triton.jit
def _max_grad_first(a, b):
    """d max(a, b) / d a: 1, 0, or 1/2 on a tie."""
    return tl.where(a > b, 1.0, tl.where(a < b, 0.0, 0.5))


@triton.jit
def _ppo_policy_loss_kernel(
    logprobs_ptr,
    old_ptr,
    advantages_ptr,
    mask_ptr,
    row_weight_ptr,
    stats_ptr,
    grad_ptr,
    T,
    clip_low,
    clip_high,
    dual_clip,
    log_ratio_clamp,
    HAS_DUAL_CLIP: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    row_weight = tl.load(row_weight_ptr + row)
    low = 1.0 - clip_low
    high = 1.0 + clip_high
    loss_sum = tl.zeros([BLOCK], ACC)
    clipped_sum = tl.zeros([BLOCK], ACC)
    dual_sum = tl.zeros([BLOCK], ACC)
    k3_sum = tl.zeros([BLOCK], ACC)
    for start in range(0, T, BLOCK):
        t = start + tl.arange(0, BLOCK)
        ok = t < T
        lp = tl.load(logprobs_ptr + base + t, mask=ok, other=0.0)
        old = tl.load(old_ptr + base + t, mask=ok, other=0.0)
        a = tl.load(advantages_ptr + base + t, mask=ok, other=0.0)
        m = tl.load(mask_ptr + base + t, mask=ok, other=0.0)
        log_ratio = lp - old
        clamp_grad = tl.full([BLOCK], 1.0, ACC)
        if HAS_CLAMP:
            clamp_grad = tl.where(tl.abs(log_ratio) <= log_ratio_clamp, 1.0, 0.0)
            log_ratio = clamp(log_ratio, -log_ratio_clamp, log_ratio_clamp)
        ratio = tl.exp(log_ratio)
        unclipped = -a * ratio
        # selects (_math.py): a NaN log-prob gives a NaN loss, as torch.clamp / torch.maximum
        clipped = -a * clamp(ratio, low, high)
        loss = maximum(unclipped, clipped)
        in_range = tl.where((ratio >= low) & (ratio <= high), 1.0, 0.0)
        dloss = -a * (_max_grad_first(unclipped, clipped) + _max_grad_first(clipped, unclipped) * in_range)
        if HAS_DUAL_CLIP:
            bound = -a * dual_clip
            negative = a < 0
            dual_sum += m * tl.where(negative & (loss > bound), 1.0, 0.0)
            dloss = tl.where(negative, dloss * _max_grad_first(bound, loss), dloss)
            loss = tl.where(negative, minimum(loss, bound), loss)
        # masks by select: NaN / inf at a mask-0 position never reaches the sums
        loss_sum += masked(m, loss)
        clipped_sum += m * tl.where(clipped > unclipped, 1.0, 0.0)
        k3_sum += masked(m, exp_minus_one_minus_x(log_ratio))
        if NEED_GRAD:
            tl.store(grad_ptr + base + t, row_weight * masked(m, dloss * ratio * clamp_grad), mask=ok)
    tl.store(stats_ptr + 4 * row, row_weight * tl.sum(loss_sum, 0))
    tl.store(stats_ptr + 4 * row + 1, tl.sum(clipped_sum, 0))
    tl.store(stats_ptr + 4 * row + 2, tl.sum(dual_sum, 0))
    tl.store(stats_ptr + 4 * row + 3, tl.sum(k3_sum, 0))


@triton.jit
def _ppo_value_loss_kernel(
    values_ptr,
    old_ptr,
    returns_ptr,
    mask_ptr,
    row_weight_ptr,
    stats_ptr,
    grad_ptr,
    T,
    clip,
    HAS_CLIP: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    row_weight = tl.load(row_weight_ptr + row)
    loss_sum = tl.zeros([BLOCK], ACC)
    clipped_sum = tl.zeros([BLOCK], ACC)
    for start in range(0, T, BLOCK):
        t = start + tl.arange(0, BLOCK)
        ok = t < T
        v = tl.load(values_ptr + base + t, mask=ok, other=0.0)
        ret = tl.load(returns_ptr + base + t, mask=ok, other=0.0)
        m = tl.load(mask_ptr + base + t, mask=ok, other=0.0)
        error = v - ret
        unclipped = error * error
        loss = 0.5 * unclipped
        dloss = error
        if HAS_CLIP:
            old = tl.load(old_ptr + base + t, mask=ok, other=0.0)
            low = old - clip
            high = old + clip
            # clamp(v, old - clip, old + clip): exactly v inside the band (csrc/cpu/ppo.cpp)
            clipped_error = clamp(v, low, high) - ret
            clipped = clipped_error * clipped_error
            delta_grad = tl.where((v >= low) & (v <= high), 1.0, 0.0)
            loss = 0.5 * maximum(unclipped, clipped)
            dloss = (
                _max_grad_first(unclipped, clipped) * error
                + _max_grad_first(clipped, unclipped) * clipped_error * delta_grad
            )
            clipped_sum += m * tl.where(clipped > unclipped, 1.0, 0.0)
        loss_sum += masked(m, loss)
        if NEED_GRAD:
            tl.store(grad_ptr + base + t, row_weight * masked(m, dloss), mask=ok)
    tl.store(stats_ptr + 2 * row, row_weight * tl.sum(loss_sum, 0))
    tl.store(stats_ptr + 2 * row + 1, tl.sum(clipped_sum, 0))


def _outputs(x: torch.Tensor, n_stats: int, need_grad: bool):
    stats = torch.empty(x.shape[0], n_stats, dtype=x.dtype, device=x.device)
    grad = torch.empty_like(x) if need_grad else x.new_empty(0)
    return stats, grad


def _block(x: torch.Tensor) -> int:
    return row_block(x.shape[1], widest_block(BLOCK_T, x.dtype))


def _acc(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def ppo_policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    row_weight,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
    log_ratio_clamp: Optional[float],
    need_grad: bool,
):
    """Inputs [B, T] contiguous float32/float64 of one dtype, row_weight [B] -> (row_stats [B, 4], grad)."""
    stats, grad = _outputs(logprobs, 4, need_grad)
    if logprobs.shape[0]:
        launch(
            _ppo_policy_loss_kernel,
            (logprobs.shape[0],),
            logprobs,
            old_logprobs,
            advantages,
            mask,
            row_weight,
            stats,
            grad,
            logprobs.shape[1],
            clip_low,
            clip_high,
            dual_clip or 0.0,
            log_ratio_clamp or 0.0,
            HAS_DUAL_CLIP=dual_clip is not None,
            HAS_CLAMP=log_ratio_clamp is not None,
            NEED_GRAD=need_grad,
            ACC=_acc(logprobs),
            BLOCK=_block(logprobs),
        )
    return stats, grad


def ppo_value_loss(values, old_values, returns, mask, row_weight, clip: Optional[float], need_grad: bool):
    """Inputs [B, T] contiguous float32/float64 of one dtype, row_weight [B] -> (row_stats [B, 2], grad)."""
    stats, grad = _outputs(values, 2, need_grad)
    if values.shape[0]:
        launch(
            _ppo_value_loss_kernel,
            (values.shape[0],),
            values,
            old_values,
            returns,
            mask,
            row_weight,
            stats,
            grad,
            values.shape[1],
            clip or 0.0,
            HAS_CLIP=clip is not None,
            NEED_GRAD=need_grad,
            ACC=_acc(values),
            BLOCK=_block(values),
        )
    return stats, grad
