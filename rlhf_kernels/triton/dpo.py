"""Triton kernel of the DPO loss family: one pass over the B pairs computing one loss
type's losses, the implicit rewards and d loss / d policy log-probs, with the formulas
and conventions of csrc/cpu/dpo.cpp (TRL 1.16's, rlhf_kernels/reference/dpo.py): LD-DPO
tails, f-divergence scores, length normalisation and WPO weights per pair. The loss
types that couple pairs (aot, aot_unpaired, sft) are in rlhf_kernels/ops/dpo.py.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.dpo import NORMALISED, PAIR_LOSS_TYPES, f_divergence_code
from ._launch import launch, widest_block
from ._math import maximum, minimum

LOSS_CODES = {name: code for code, name in enumerate(PAIR_LOSS_TYPES)}
_TRUE_RATIO_ONLY = ("nca_pair", "sppo_hard", "bco_pair")
BLOCK = 1024


@triton.jit
def _log_sigmoid(x):
    return minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))  # <= 1: no overflow on either side
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _sigmoid_slope(x):
    return _sigmoid(x) * _sigmoid(-x)


@triton.jit
def _score(x, fdiv, f_alpha, f_alpha_clamp):
    """The f-divergence score of log-ratios x and its derivative (fdiv: F_DIVERGENCES index)."""
    if fdiv == 0:  # reverse_kl
        score = x
        slope = tl.full(x.shape, 1.0, x.dtype)
    elif fdiv == 1:  # forward_kl
        slope = tl.exp(-x)
        score = 1.0 - slope
    elif fdiv == 2:  # js_divergence
        score = 0.6931471805599453 + _log_sigmoid(x)
        slope = _sigmoid(-x)
    else:  # alpha_divergence; the clamp passes the gradient on its closed interval, as torch's
        t = (f_alpha - 1.0) * x
        e = tl.exp(minimum(t, f_alpha_clamp))
        score = (e - 1.0) * (1.0 / (f_alpha - 1.0))
        slope = tl.where(t <= f_alpha_clamp, e, 0.0)
    return score, slope


# The options of a pair's inputs are run-time flags (uniform branches, not compiled
# variants): the kernel runs over B pairs, a few hundred values, so a branch costs
# nothing, while constexprs would multiply the specializations the AOT gate compiles.
@triton.jit(do_not_specialize=["fdiv", "has_tail", "normalise", "has_weights"])
def _dpo_loss_kernel(
    pc_ptr, pr_ptr, rc_ptr, rr_ptr, tail_ptr, length_ptr, weight_ptr, loss_ptr, rewards_ptr, grad_ptr, B,
    beta, ls, sigmoid_ls, exo_c1, exo_c2, fdiv, f_alpha, f_alpha_clamp, has_tail, ld_drop, normalise, has_weights, tau,
    LOSS: tl.constexpr, REFERENCE_FREE: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < B
    pc = tl.load(pc_ptr + i, mask=ok, other=0.0)
    pr = tl.load(pr_ptr + i, mask=ok, other=0.0)
    rc = tl.load(rc_ptr + i, mask=ok, other=0.0)
    rr = tl.load(rr_ptr + i, mask=ok, other=0.0)
    if has_tail:  # LD-DPO: shared + alpha tail = full - (1 - alpha) tail
        pc -= ld_drop * tl.load(tail_ptr + i, mask=ok, other=0.0)
        pr -= ld_drop * tl.load(tail_ptr + B + i, mask=ok, other=0.0)
        rc -= ld_drop * tl.load(tail_ptr + 2 * B + i, mask=ok, other=0.0)
        rr -= ld_drop * tl.load(tail_ptr + 3 * B + i, mask=ok, other=0.0)
    rho_c = pc - rc
    rho_r = pr - rr
    if REFERENCE_FREE:
        a = pc
        b = pr
    else:
        a = rho_c
        b = rho_r
    if LOSS == 5:  # nca_pair (the losses of rho or a, b alone: no f-divergence, no lengths)
        c = beta * rho_c
        r = beta * rho_r
        loss = -_log_sigmoid(c) - 0.5 * _log_sigmoid(-c) - 0.5 * _log_sigmoid(-r)
        d_chosen, d_rejected = beta * (-_sigmoid(-c) + 0.5 * _sigmoid(c)), beta * 0.5 * _sigmoid(r)
    elif LOSS == 6:  # sppo_hard
        half = 0.5 / beta
        loss = (rho_c - half) * (rho_c - half) + (rho_r + half) * (rho_r + half)
        d_chosen, d_rejected = 2.0 * (rho_c - half), 2.0 * (rho_r + half)
    elif LOSS == 7:  # apo_zero
        loss = 1.0 - _sigmoid(beta * a) + _sigmoid(beta * b)
        d_chosen, d_rejected = -beta * _sigmoid_slope(beta * a), beta * _sigmoid_slope(beta * b)
    elif LOSS == 8:  # apo_down
        loss = _sigmoid(beta * a) + 1.0 - _sigmoid(beta * (a - b))
        d_chosen = beta * (_sigmoid_slope(beta * a) - _sigmoid_slope(beta * (a - b)))
        d_rejected = beta * _sigmoid_slope(beta * (a - b))
    elif LOSS == 9:  # bco_pair
        c = beta * rho_c
        r = beta * rho_r
        loss = -_log_sigmoid(c) - _log_sigmoid(-r)
        d_chosen, d_rejected = -beta * _sigmoid(-c), beta * _sigmoid(r)
    else:  # the losses of the scores s; ds = d s / d log-ratio
        s_c, ds_c = _score(a, fdiv, f_alpha, f_alpha_clamp)
        s_r, ds_r = _score(b, fdiv, f_alpha, f_alpha_clamp)
        if normalise:  # ipo with lengths, sigmoid_norm: per-token scores (lengths min 1, as TRL)
            n_c = maximum(tl.load(length_ptr + i, mask=ok, other=1.0), 1.0)
            n_r = maximum(tl.load(length_ptr + B + i, mask=ok, other=1.0), 1.0)
            s_c, ds_c, s_r, ds_r = s_c / n_c, ds_c / n_c, s_r / n_r, ds_r / n_r
        z = beta * (s_c - s_r)
        if LOSS == 0 or LOSS == 11:  # sigmoid (cDPO smoothing when asked), sigmoid_norm (sigmoid_ls = 0)
            loss = -_log_sigmoid(z) * (1.0 - sigmoid_ls) - _log_sigmoid(-z) * sigmoid_ls
            dz = -(1.0 - sigmoid_ls) * _sigmoid(-z) + sigmoid_ls * _sigmoid(z)
        elif LOSS == 1:  # robust
            loss = (-_log_sigmoid(z) * (1.0 - ls) + _log_sigmoid(-z) * ls) / (1.0 - 2.0 * ls)
            dz = (-(1.0 - ls) * _sigmoid(-z) - ls * _sigmoid(z)) / (1.0 - 2.0 * ls)
        elif LOSS == 2:  # hinge; relu'(0) = 0 as torch
            loss = maximum(1.0 - z, 0.0)  # NaN stays NaN (tl.maximum gave 0)
            dz = tl.where(1.0 - z > 0, -1.0, 0.0)
        elif LOSS == 3:  # ipo
            gap = (s_c - s_r) - 0.5 / beta
            loss = gap * gap
            dz = 2.0 * gap / beta
        elif LOSS == 4:  # exo_pair; logsigmoid(z) - logsigmoid(-z) = z
            loss = _sigmoid(z) * (_log_sigmoid(z) - exo_c1) + _sigmoid(-z) * (_log_sigmoid(-z) - exo_c2)
            dz = _sigmoid_slope(z) * (z - exo_c1 + exo_c2)
        else:  # discopop; exp(-z) m as exp(logsigmoid(z / tau) - z): finite where exp(-z) overflows
            u = z / tau
            keep = _sigmoid(-u)
            blend = tl.exp(_log_sigmoid(u) - z)
            loss = -_log_sigmoid(z) * keep + blend
            dz = -_sigmoid(-z) * keep + _log_sigmoid(z) * _sigmoid_slope(u) / tau + blend * (keep / tau - 1.0)
        d_chosen, d_rejected = beta * dz * ds_c, -beta * dz * ds_r
    if has_weights:  # WPO
        w = tl.load(weight_ptr + i, mask=ok, other=0.0)
        loss, d_chosen, d_rejected = loss * w, d_chosen * w, d_rejected * w
    tl.store(loss_ptr + i, loss, mask=ok)
    tl.store(rewards_ptr + i, beta * rho_c, mask=ok)
    tl.store(rewards_ptr + B + i, beta * rho_r, mask=ok)
    if NEED_GRAD:
        tl.store(grad_ptr + i, d_chosen, mask=ok)
        tl.store(grad_ptr + B + i, d_rejected, mask=ok)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    tails: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    beta: float,
    loss_type: str,
    label_smoothing: float,
    reference_free: bool,
    cdpo: bool,
    f_divergence_type: str,
    f_alpha: float,
    f_alpha_clamp: float,
    ld_alpha: float,
    discopop_tau: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arguments and results as the C++ op rlhf_kernels::dpo_loss (csrc/registration.cpp)."""
    (B,) = chosen.shape
    losses = torch.empty_like(chosen)
    rewards = chosen.new_empty(2, B)
    grad = chosen.new_empty(2 if need_grad else 0, B)
    # exo_pair's constants; label_smoothing > 0 there (checked), any value elsewhere.
    exo_eps = min(max(label_smoothing, 1e-30), 0.5)
    block = widest_block(BLOCK, chosen.dtype)
    if B > 0:
        launch(_dpo_loss_kernel, (triton.cdiv(B, block),),
            chosen, rejected, ref_chosen, ref_rejected, chosen if tails is None else tails,
            chosen if lengths is None else lengths, chosen if weights is None else weights, losses, rewards, grad, B,
            beta, label_smoothing, label_smoothing if cdpo else 0.0, math.log1p(-exo_eps), math.log(exo_eps),
            f_divergence_code(f_divergence_type, f_alpha), f_alpha, f_alpha_clamp, int(tails is not None),
            1.0 - ld_alpha, int(lengths is not None and loss_type in NORMALISED), int(weights is not None),
            discopop_tau,
            # nca_pair, sppo_hard and bco_pair ignore reference_free: one compiled variant
            LOSS=LOSS_CODES[loss_type], REFERENCE_FREE=reference_free and loss_type not in _TRUE_RATIO_ONLY,
            NEED_GRAD=need_grad, BLOCK=block,
        )  # fmt: skip
    return losses, rewards, grad
