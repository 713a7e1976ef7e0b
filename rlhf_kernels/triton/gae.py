"""Triton kernel of GAE: one program per row, T in blocks from the end, each block one
pair of reverse associative scans of affine maps x_t = b_t + a_t x_{t+1}, chained
across blocks by the carried values (so any T, with BLOCK-wide parallel work).

For the mask modes of rlhf_kernels/reference/gae.py:
  next value nv_t: ignore/multiply V_{t+1}; carry the value of the next position
      with mask != 0, itself a scan: nv_t = m_{t+1} V_{t+1} + (1 - m_{t+1}) nv_{t+1};
  delta_t = r_t + gamma nv_t - V_t;
  A_t = delta_t + gamma lam A_{t+1} (ignore/multiply), or with carry
  A_t = m_t delta_t + (m_t gamma lam + 1 - m_t) A_{t+1}.
Accumulates in fp32 (fp64 for fp64 inputs); the scan's summation order differs from
the sequential recursion's, within fp32 rounding (tested against float64 at T = 32768).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import launch, row_block

MASK_MODE_CODES = {"ignore": 0, "multiply": 1, "carry": 2}
# 1024 positions a block: T = 8192 in 8 chained scans.
BLOCK_T = 1024


@triton.jit
def _compose(a_later, b_later, a_earlier, b_earlier):
    """Composition of two affine maps for a reverse scan (checked against the
    sequential recursion in the tests)."""
    return a_later * a_earlier, b_earlier + a_earlier * b_later


@triton.jit
def _first(x, BLOCK: tl.constexpr):
    """The block's element 0 as a scalar."""
    return tl.sum(tl.where(tl.arange(0, BLOCK) == 0, x, 0.0), 0)


@triton.jit
def _gae_kernel(
    rewards_ptr,
    values_ptr,
    mask_ptr,
    advantages_ptr,
    returns_ptr,
    T,
    gamma,
    lam,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    carried_advantage = tl.zeros([], ACC)
    carried_next_value = tl.zeros([], ACC)  # nv at the first position of the later block
    n_blocks = tl.cdiv(T, BLOCK)
    for block in range(0, n_blocks):
        start = (n_blocks - 1 - block) * BLOCK
        t = start + tl.arange(0, BLOCK)
        ok = t < T
        has_next = (t + 1) < T
        r = tl.load(rewards_ptr + base + t, mask=ok, other=0.0).to(ACC)
        v = tl.load(values_ptr + base + t, mask=ok, other=0.0).to(ACC)
        v_next = tl.load(values_ptr + base + t + 1, mask=has_next, other=0.0).to(ACC)
        if HAS_MASK:
            m = tl.load(mask_ptr + base + t, mask=ok, other=0.0).to(ACC)
            m_next = tl.load(mask_ptr + base + t + 1, mask=has_next, other=0.0).to(ACC)
        else:
            m = tl.where(ok, 1.0, 0.0).to(ACC)
            m_next = tl.where(has_next, 1.0, 0.0).to(ACC)
        # The mask enters by selects, not products: a mask-0 position's r and V never
        # reach the scans (0 * inf is NaN), as in csrc/gae_scan.h.
        if MODE == 1:  # multiply
            r = tl.where(m != 0, r * m, 0.0)
            v = tl.where(m != 0, v * m, 0.0)
            v_next = tl.where(m_next != 0, v_next * m_next, 0.0)
        if MODE == 2:  # carry: the next valid value, a scan
            a_nv = tl.where(ok, 1.0 - m_next, 1.0).to(ACC)
            b_nv = tl.where(ok & (m_next != 0), m_next * v_next, 0.0).to(ACC)
            a_nv, b_nv = tl.associative_scan((a_nv, b_nv), 0, _compose, reverse=True)
            next_value = b_nv + a_nv * carried_next_value
        else:
            next_value = v_next
        delta = r + gamma * next_value - v
        if MODE == 2:
            a_adv = tl.where(ok, m * gamma * lam + 1.0 - m, 1.0).to(ACC)
            b_adv = tl.where(ok & (m != 0), m * delta, 0.0).to(ACC)
        else:
            a_adv = tl.where(ok, gamma * lam + tl.zeros_like(delta), 1.0).to(ACC)  # not 0 * delta: inf
            b_adv = tl.where(ok, delta, 0.0).to(ACC)
        a_adv, b_adv = tl.associative_scan((a_adv, b_adv), 0, _compose, reverse=True)
        advantage = b_adv + a_adv * carried_advantage
        tl.store(advantages_ptr + base + t, advantage, mask=ok)
        tl.store(returns_ptr + base + t, advantage + v, mask=ok)
        carried_advantage = _first(advantage, BLOCK)
        if MODE == 2:
            carried_next_value = _first(next_value, BLOCK)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor], gamma: float, lam: float, mask_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] contiguous float32/float64 inputs of one dtype (mask too, or None) ->
    (advantages, returns) of that dtype."""
    advantages, returns = torch.empty_like(rewards), torch.empty_like(rewards)
    B, T = rewards.shape
    if B and T:
        launch(
            _gae_kernel,
            (B,),
            rewards,
            values,
            mask if mask is not None else rewards,
            advantages,
            returns,
            T,
            float(gamma),
            float(lam),
            MODE=MASK_MODE_CODES[mask_mode],
            HAS_MASK=mask is not None,
            ACC=tl.float64 if rewards.dtype == torch.float64 else tl.float32,
            BLOCK=row_block(T, BLOCK_T),
        )
    return advantages, returns
