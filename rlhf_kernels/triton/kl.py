"""Triton kernels of the KL estimators: elementwise kl_penalty (value and d kl / d d)
and kl_shaped_rewards (one program per row: the masked estimate, the rewards and the
score at the row's last valid position or a given index), with the conventions of
csrc/cpu/kl.cpp.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import launch, row_block
from ._math import clamp as _clamp
from ._math import exp_minus_one_minus_x, masked

ESTIMATOR_CODES = {"k1": 0, "k2": 1, "k3": 2, "abs": 3, "low_var_kl": 4}
# 1024 elements a program for the elementwise kernel, and a row tile of 1024 tokens.
BLOCK = 1024


@triton.jit
def _passes(x, bound):
    return tl.where(tl.abs(x) <= bound, 1.0, 0.0)


@triton.jit
def _estimate(d, clamp, ESTIMATOR: tl.constexpr, HAS_CLAMP: tl.constexpr):
    """(estimate, d estimate / d d) at d = logprobs - ref_logprobs."""
    if ESTIMATOR == 0:
        value = d
        slope = tl.full(d.shape, 1.0, d.dtype)
    elif ESTIMATOR == 1:
        value = 0.5 * d * d
        slope = d
    elif ESTIMATOR == 2:
        # exp(-d) + d - 1 without cancellation near 0, +inf at d = -inf; slope 1 - exp(-d) = d - k3
        value = exp_minus_one_minus_x(-d)
        slope = tl.where(d == float("inf"), 1.0, d - value)
    elif ESTIMATOR == 3:
        value = tl.abs(d)
        slope = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    else:  # clamps by select: NaN stays NaN (tl.minimum / tl.maximum dropped it)
        c = _clamp(-d, -20.0, 20.0)
        raw = exp_minus_one_minus_x(c)
        value = _clamp(raw, -10.0, 10.0)
        slope = -_passes(-d, 20.0) * (c + raw) * _passes(raw, 10.0)  # c + raw = exp(c) - 1
    if HAS_CLAMP:
        slope = slope * _passes(value, clamp)
        value = _clamp(value, -clamp, clamp)
    return value, slope


@triton.jit
def _kl_penalty_kernel(
    lp_ptr,
    ref_ptr,
    kl_ptr,
    grad_ptr,
    n,
    clamp,
    ESTIMATOR: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    d = tl.load(lp_ptr + i, mask=ok, other=0.0) - tl.load(ref_ptr + i, mask=ok, other=0.0)
    value, slope = _estimate(d, clamp, ESTIMATOR, HAS_CLAMP)
    tl.store(kl_ptr + i, value, mask=ok)
    if NEED_GRAD:
        tl.store(grad_ptr + i, slope, mask=ok)


@triton.jit
def _kl_shaped_rewards_kernel(
    scores_ptr,
    lp_ptr,
    ref_ptr,
    mask_ptr,
    index_ptr,
    rewards_ptr,
    kl_ptr,
    T,
    kl_coef,
    clamp,
    ESTIMATOR: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    last_valid = tl.full([BLOCK], -1, tl.int64)
    for start in range(0, T, BLOCK):
        t = start + tl.arange(0, BLOCK)
        ok = t < T
        d = tl.load(lp_ptr + base + t, mask=ok, other=0.0) - tl.load(ref_ptr + base + t, mask=ok, other=0.0)
        m = tl.load(mask_ptr + base + t, mask=ok, other=0.0)
        value, _ = _estimate(d, clamp, ESTIMATOR, HAS_CLAMP)
        kl = masked(m, value)  # NaN / inf at a mask-0 position stays out
        tl.store(kl_ptr + base + t, kl, mask=ok)
        tl.store(rewards_ptr + base + t, -kl_coef * kl, mask=ok)
        last_valid = tl.maximum(last_valid, tl.where(ok & (m != 0), t.to(tl.int64), -1))
    if HAS_INDEX:
        where = tl.load(index_ptr + row)
    else:
        where = tl.max(last_valid, 0)
    # The score's position gets its reward recomputed (bit-identical) plus the score;
    # the barrier orders this store after the loop's store of the same element.
    # An index outside [0, T) (unchecked on GPU tensors: the check would sync the host)
    # is never read or written; rlhf_kernels/ops/kl.py then fills that row with NaN.
    in_row = (where >= 0) & (where < T)
    safe = tl.where(in_row, where, 0)
    d = tl.load(lp_ptr + base + safe) - tl.load(ref_ptr + base + safe)
    value, _ = _estimate(d, clamp, ESTIMATOR, HAS_CLAMP)
    reward = -kl_coef * masked(tl.load(mask_ptr + base + safe), value)
    tl.debug_barrier()
    tl.store(rewards_ptr + base + safe, reward + tl.load(scores_ptr + row), mask=in_row)


def _codes(estimator: str, clamp: Optional[float]) -> dict:
    return dict(ESTIMATOR=ESTIMATOR_CODES[estimator], HAS_CLAMP=clamp is not None)


def kl_penalty(logprobs, ref_logprobs, estimator: str, clamp: Optional[float], need_grad: bool):
    """Contiguous float32/float64 inputs of one shape -> (kl, d kl / d d or empty)."""
    kl = torch.empty_like(logprobs)
    grad = torch.empty_like(logprobs) if need_grad else logprobs.new_empty(0)
    n = logprobs.numel()
    if n:
        launch(
            _kl_penalty_kernel,
            (triton.cdiv(n, BLOCK),),
            logprobs,
            ref_logprobs,
            kl,
            grad,
            n,
            clamp or 0.0,
            NEED_GRAD=need_grad,
            BLOCK=BLOCK,
            **_codes(estimator, clamp),
        )
    return kl, grad


def kl_shaped_rewards(
    scores,
    logprobs,
    ref_logprobs,
    mask,
    kl_coef: float,
    estimator: str,
    clamp: Optional[float],
    score_index: Optional[torch.Tensor],
):
    """[B, T] contiguous inputs of one dtype, scores [B], score_index int64 [B] or None -> (rewards, kl)."""
    rewards, kl = torch.empty_like(logprobs), torch.empty_like(logprobs)
    B, T = logprobs.shape
    if B:
        launch(
            _kl_shaped_rewards_kernel,
            (B,),
            scores,
            logprobs,
            ref_logprobs,
            mask,
            score_index if score_index is not None else scores,
            rewards,
            kl,
            T,
            kl_coef,
            clamp or 0.0,
            HAS_INDEX=score_index is not None,
            BLOCK=row_block(T, BLOCK),
            **_codes(estimator, clamp),
        )
    return rewards, kl
