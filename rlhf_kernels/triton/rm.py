"""Triton kernels of the reward-model losses, with the conventions of csrc/cpu/rm.cpp:
bradley_terry_loss elementwise (loss and d loss / d chosen) and ranking_loss with one
program per prompt over its K x K pairs (row mean, pair count, d row mean / d rewards).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _neg_log_sigmoid(x):
    """(-logsigmoid(x), its derivative -sigmoid(-x))."""
    e = tl.exp(-tl.abs(x))
    slope = tl.where(x >= 0, -e / (1.0 + e), -1.0 / (1.0 + e))
    return tl.log(1.0 + e) - tl.minimum(x, 0.0), slope


@triton.jit
def _bradley_terry_kernel(
    c_ptr, r_ptr, m_ptr, loss_ptr, grad_ptr, n, HAS_MARGIN: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    d = tl.load(c_ptr + i, mask=ok, other=0.0) - tl.load(r_ptr + i, mask=ok, other=0.0)
    if HAS_MARGIN:
        d -= tl.load(m_ptr + i, mask=ok, other=0.0)
    loss, slope = _neg_log_sigmoid(d)
    tl.store(loss_ptr + i, loss, mask=ok)
    if NEED_GRAD:
        tl.store(grad_ptr + i, slope, mask=ok)


@triton.jit
def _ranking_kernel(
    r_ptr, rank_ptr, loss_ptr, pairs_ptr, grad_ptr, K, NEED_GRAD: tl.constexpr, BLOCK_K: tl.constexpr
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    ok = k < K
    r = tl.load(r_ptr + row * K + k, mask=ok, other=0.0)
    rank = tl.load(rank_ptr + row * K + k, mask=ok, other=0.0)
    # [i, j]: i ranked above j (both real responses); ties are skipped.
    better = (rank[:, None] < rank[None, :]) & ok[:, None] & ok[None, :]
    loss, slope = _neg_log_sigmoid(r[:, None] - r[None, :])
    loss = tl.where(better, loss, 0.0)
    slope = tl.where(better, slope, 0.0)
    count = tl.sum(tl.sum(better.to(r.dtype), axis=1), axis=0)
    scale = tl.where(count > 0, 1.0 / tl.maximum(count, 1.0), 0.0)
    tl.store(loss_ptr + row, tl.sum(tl.sum(loss, axis=1), axis=0) * scale)
    tl.store(pairs_ptr + row, count)
    if NEED_GRAD:  # d / d r_k: + slope where k is the better one, - where k is the worse one
        grad = (tl.sum(slope, axis=1) - tl.sum(slope, axis=0)) * scale
        tl.store(grad_ptr + row * K + k, grad, mask=ok)


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor], need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    losses = torch.empty_like(chosen)
    grad = torch.empty_like(chosen) if need_grad else chosen.new_empty(0)
    n = chosen.numel()
    if n > 0:
        _bradley_terry_kernel[(triton.cdiv(n, BLOCK),)](
            chosen, rejected, chosen if margin is None else margin, losses, grad, n,
            HAS_MARGIN=margin is not None, NEED_GRAD=need_grad, BLOCK=BLOCK,
        )  # fmt: skip
    return losses, grad


def ranking_loss(
    rewards: torch.Tensor, ranks: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, K = rewards.shape
    row_loss = rewards.new_empty(B)
    row_pairs = rewards.new_empty(B)
    grad = torch.empty_like(rewards) if need_grad else rewards.new_empty(0)
    if B > 0:
        _ranking_kernel[(B,)](
            rewards, ranks, row_loss, row_pairs, grad, K, NEED_GRAD=need_grad, BLOCK_K=max(triton.next_power_of_2(K), 2)
        )
    return row_loss, row_pairs, grad
