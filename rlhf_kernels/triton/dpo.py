"""Triton kernel of the DPO loss family: one pass over the B pairs computing each
loss, the implicit rewards and d loss / d policy log-probs, with the formulas and
conventions of csrc/cpu/dpo.cpp (TRL's, rlhf_kernels/reference/dpo.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference.dpo import EXO_DEFAULT_EPSILON, LOSS_TYPES
from ._launch import launch, widest_block

LOSS_CODES = {name: code for code, name in enumerate(LOSS_TYPES)}
BLOCK = 1024


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))  # <= 1: no overflow on either side
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _sigmoid_slope(x):
    return _sigmoid(x) * _sigmoid(-x)


@triton.jit
def _dpo_loss_kernel(
    pc_ptr, pr_ptr, rc_ptr, rr_ptr, loss_ptr, rewards_ptr, grad_ptr, B, beta, ls, exo_c1, exo_c2,
    LOSS: tl.constexpr, REFERENCE_FREE: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < B
    pc = tl.load(pc_ptr + i, mask=ok, other=0.0)
    pr = tl.load(pr_ptr + i, mask=ok, other=0.0)
    rc = tl.load(rc_ptr + i, mask=ok, other=0.0)
    rr = tl.load(rr_ptr + i, mask=ok, other=0.0)
    true_c = pc - rc
    true_r = pr - rr
    if REFERENCE_FREE:
        a = pc
        b = pr
    else:
        a = true_c
        b = true_r
    z = beta * (a - b)
    if LOSS == 0:  # sigmoid
        loss = -_log_sigmoid(z) * (1.0 - ls) - _log_sigmoid(-z) * ls
        dz = -(1.0 - ls) * _sigmoid(-z) + ls * _sigmoid(z)
        d_chosen, d_rejected = beta * dz, -beta * dz
    elif LOSS == 1:  # robust
        loss = (-_log_sigmoid(z) * (1.0 - ls) + _log_sigmoid(-z) * ls) / (1.0 - 2.0 * ls)
        dz = (-(1.0 - ls) * _sigmoid(-z) - ls * _sigmoid(z)) / (1.0 - 2.0 * ls)
        d_chosen, d_rejected = beta * dz, -beta * dz
    elif LOSS == 2:  # hinge
        loss = tl.maximum(1.0 - z, 0.0)
        dz = tl.where(1.0 - z > 0, -1.0, 0.0)
        d_chosen, d_rejected = beta * dz, -beta * dz
    elif LOSS == 3:  # ipo
        gap = (a - b) - 0.5 / beta
        loss = gap * gap
        d_chosen, d_rejected = 2.0 * gap, -2.0 * gap
    elif LOSS == 4:  # exo_pair
        loss = _sigmoid(z) * (_log_sigmoid(z) - exo_c1) + _sigmoid(-z) * (_log_sigmoid(-z) - exo_c2)
        dz = _sigmoid_slope(z) * (z - exo_c1 + exo_c2)
        d_chosen, d_rejected = beta * dz, -beta * dz
    elif LOSS == 5:  # nca_pair
        c = beta * true_c
        r = beta * true_r
        loss = -_log_sigmoid(c) - 0.5 * _log_sigmoid(-c) - 0.5 * _log_sigmoid(-r)
        d_chosen = beta * (-_sigmoid(-c) + 0.5 * _sigmoid(c))
        d_rejected = beta * 0.5 * _sigmoid(r)
    elif LOSS == 6:  # sppo_hard
        half = 0.5 / beta
        loss = (true_c - half) * (true_c - half) + (true_r + half) * (true_r + half)
        d_chosen, d_rejected = 2.0 * (true_c - half), 2.0 * (true_r + half)
    elif LOSS == 7:  # apo_zero
        loss = 1.0 - _sigmoid(beta * a) + _sigmoid(beta * b)
        d_chosen, d_rejected = -beta * _sigmoid_slope(beta * a), beta * _sigmoid_slope(beta * b)
    else:  # apo_down
        loss = _sigmoid(beta * a) + 1.0 - _sigmoid(z)
        d_chosen = beta * (_sigmoid_slope(beta * a) - _sigmoid_slope(z))
        d_rejected = beta * _sigmoid_slope(z)
    tl.store(loss_ptr + i, loss, mask=ok)
    tl.store(rewards_ptr + i, beta * true_c, mask=ok)
    tl.store(rewards_ptr + B + i, beta * true_r, mask=ok)
    if NEED_GRAD:
        tl.store(grad_ptr + i, d_chosen, mask=ok)
        tl.store(grad_ptr + B + i, d_rejected, mask=ok)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    reference_free: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (B,) = chosen.shape
    losses = torch.empty_like(chosen)
    rewards = chosen.new_empty(2, B)
    grad = chosen.new_empty(2 if need_grad else 0, B)
    eps = label_smoothing if label_smoothing > 0 else EXO_DEFAULT_EPSILON
    block = widest_block(BLOCK, chosen.dtype)
    if B > 0:
        launch(_dpo_loss_kernel, (triton.cdiv(B, block),),
            chosen, rejected, ref_chosen, ref_rejected, losses, rewards, grad, B, beta, label_smoothing,
            math.log1p(-eps), math.log(eps),
            LOSS=LOSS_CODES[loss_type], REFERENCE_FREE=reference_free, NEED_GRAD=need_grad, BLOCK=block,
        )  # fmt: skip
    return losses, rewards, grad
