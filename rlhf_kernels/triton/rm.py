"""Triton kernels of the reward-model losses, with the conventions of csrc/cpu/rm.cpp:
bradley_terry_loss elementwise (loss and d loss / d chosen) and ranking_loss with one
program per prompt over its K x K pairs (row mean, pair count, d row mean / d rewards).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._math import minimum

BLOCK = 1024
# Pair tiles of ranking_loss: [32, 32] is 8 values per thread at 4 warps (16 registers
# in fp64), and K is at most a few hundred responses per prompt.
RANKING_BLOCK = 32


@triton.jit
def _neg_log_sigmoid(x):
    """(-logsigmoid(x), its derivative -sigmoid(-x))."""
    e = tl.exp(-tl.abs(x))
    slope = tl.where(x >= 0, -e / (1.0 + e), -1.0 / (1.0 + e))
    return tl.log(1.0 + e) - minimum(x, 0.0), slope


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
def _ranking_kernel(r_ptr, rank_ptr, loss_ptr, pairs_ptr, grad_ptr, K, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per prompt; the K x K pairs in BLOCK x BLOCK tiles, so registers do
    not grow with K (one [K, K] tile reached the 255-register ceiling at K = 64 in
    fp64). Pass 1: the loss and the pair count; pass 2: d row mean / d r_k =
    (sum over j below k of slope(r_k - r_j) - sum over j above k of slope(r_j - r_k))
    / count. Ties are skipped."""
    row = tl.program_id(0).to(tl.int64)
    r_row = r_ptr + row * K
    rank_row = rank_ptr + row * K
    dtype = r_ptr.dtype.element_ty
    loss = tl.zeros([BLOCK], dtype)
    count = tl.zeros([BLOCK], dtype)
    for i_start in range(0, K, BLOCK):
        i = i_start + tl.arange(0, BLOCK)
        i_ok = i < K
        r_i = tl.load(r_row + i, mask=i_ok, other=0.0)
        rank_i = tl.load(rank_row + i, mask=i_ok, other=0.0)
        for j_start in range(0, K, BLOCK):
            j = j_start + tl.arange(0, BLOCK)
            j_ok = j < K
            r_j = tl.load(r_row + j, mask=j_ok, other=0.0)
            rank_j = tl.load(rank_row + j, mask=j_ok, other=0.0)
            # [i, j]: i ranked above j, both real responses.
            better = (rank_i[:, None] < rank_j[None, :]) & i_ok[:, None] & j_ok[None, :]
            pair_loss, _ = _neg_log_sigmoid(r_i[:, None] - r_j[None, :])
            loss += tl.sum(tl.where(better, pair_loss, 0.0), axis=1)
            count += tl.sum(better.to(dtype), axis=1)
    total = tl.sum(count, axis=0)
    scale = tl.where(total > 0, 1.0 / tl.maximum(total, 1.0), 0.0)
    tl.store(loss_ptr + row, tl.sum(loss, axis=0) * scale)
    tl.store(pairs_ptr + row, total)
    if NEED_GRAD:
        for k_start in range(0, K, BLOCK):
            k = k_start + tl.arange(0, BLOCK)
            k_ok = k < K
            r_k = tl.load(r_row + k, mask=k_ok, other=0.0)
            rank_k = tl.load(rank_row + k, mask=k_ok, other=0.0)
            grad = tl.zeros([BLOCK], dtype)
            for j_start in range(0, K, BLOCK):
                j = j_start + tl.arange(0, BLOCK)
                j_ok = j < K
                r_j = tl.load(r_row + j, mask=j_ok, other=0.0)
                rank_j = tl.load(rank_row + j, mask=j_ok, other=0.0)
                real = k_ok[:, None] & j_ok[None, :]
                x = r_k[:, None] - r_j[None, :]
                _, slope_above = _neg_log_sigmoid(x)  # k above j
                _, slope_below = _neg_log_sigmoid(-x)  # j above k
                above = (rank_k[:, None] < rank_j[None, :]) & real
                below = (rank_j[None, :] < rank_k[:, None]) & real
                grad += tl.sum(tl.where(above, slope_above, 0.0) - tl.where(below, slope_below, 0.0), axis=1)
            tl.store(grad_ptr + row * K + k, grad * scale, mask=k_ok)


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor], need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    losses = torch.empty_like(chosen)
    grad = torch.empty_like(chosen) if need_grad else chosen.new_empty(0)
    n = chosen.numel()
    if n > 0:
        launch(_bradley_terry_kernel, (triton.cdiv(n, BLOCK),),
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
        launch(
            _ranking_kernel,
            (B,),
            rewards,
            ranks,
            row_loss,
            row_pairs,
            grad,
            K,
            NEED_GRAD=need_grad,
            BLOCK=RANKING_BLOCK,
        )
    return row_loss, row_pairs, grad
