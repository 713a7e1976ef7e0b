"""Reference DPO loss family, with the formulas of TRL's DPOTrainer.

With rho_c = pi_c - ref_c, rho_r = pi_r - ref_r (ref terms 0 when
reference_free) and h = rho_c - rho_r, per example (ls = label_smoothing):
    sigmoid    -logsigmoid(beta h) (1 - ls) - logsigmoid(-beta h) ls         (cDPO)
    robust     (-logsigmoid(beta h) (1 - ls) + logsigmoid(-beta h) ls) / (1 - 2 ls)
    hinge      relu(1 - beta h)
    ipo        (h - 1 / (2 beta))^2
    exo_pair   sigmoid(beta h) (logsigmoid(beta h) - log(1 - e))
               + sigmoid(-beta h) (logsigmoid(-beta h) - log e),  e = ls or 1e-3
    nca_pair   -logsigmoid(beta rho_c') - logsigmoid(-beta rho_c')/2 - logsigmoid(-beta rho_r')/2
    sppo_hard  (rho_c' - 1 / (2 beta))^2 + (rho_r' + 1 / (2 beta))^2
    apo_zero   1 - sigmoid(beta rho_c) + sigmoid(beta rho_r)
    apo_down   sigmoid(beta rho_c) + 1 - sigmoid(beta (rho_c - rho_r))
where rho' always uses the reference log-probs (TRL's nca_pair and sppo_hard
ignore reference_free). Rewards: beta (pi - ref), detached, as TRL reports them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .logprobs import sequence_logprobs

LOSS_TYPES = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
)
# TRL's default smoothing for exo_pair when label_smoothing == 0 (log 0 otherwise).
EXO_DEFAULT_EPSILON = 1e-3


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    reference_free=False,
    dtype: torch.dtype = torch.float32,
):
    pi_c, pi_r = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    ref_c, ref_r = ref_chosen_logps.detach().to(dtype), ref_rejected_logps.detach().to(dtype)
    rho_c_true, rho_r_true = pi_c - ref_c, pi_r - ref_r
    rho_c, rho_r = (pi_c, pi_r) if reference_free else (rho_c_true, rho_r_true)
    h = rho_c - rho_r
    ls = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - ls) - F.logsigmoid(-beta * h) * ls
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - ls) + F.logsigmoid(-beta * h) * ls) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)).square()
    elif loss_type == "exo_pair":
        eps = ls if ls > 0 else EXO_DEFAULT_EPSILON
        losses = torch.sigmoid(beta * h) * (F.logsigmoid(beta * h) - math.log(1 - eps)) + torch.sigmoid(-beta * h) * (
            F.logsigmoid(-beta * h) - math.log(eps)
        )
    elif loss_type == "nca_pair":
        chosen, rejected = beta * rho_c_true, beta * rho_r_true
        losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    elif loss_type == "sppo_hard":
        losses = (rho_c_true - 0.5 / beta).square() + (rho_r_true + 0.5 / beta).square()
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * rho_c) + torch.sigmoid(beta * rho_r)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * rho_c) + 1 - torch.sigmoid(beta * (rho_c - rho_r))
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return losses, (beta * rho_c_true).detach(), (beta * rho_r_true).detach()


def linear_dpo_loss(
    hidden,
    weight,
    labels,
    mask,
    *,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    reference_free=False,
    average: bool = False,
    temperature=1.0,
    dtype: torch.dtype = torch.float32,
    linear_logprobs=None,
    pair_loss=None,
):
    """DPO from hidden states [2B, T, H]: rows [:B] chosen, [B:] rejected.

    `linear_logprobs` is the token log-prob implementation and `pair_loss` the
    dpo_loss implementation (default: the reference's).
    """
    n_pairs = hidden.shape[0] // 2
    sequence_options = dict(average=average, temperature=temperature)
    if linear_logprobs is not None:
        sequence_options["linear_logprobs"] = linear_logprobs
    policy_logps = sequence_logprobs(hidden, weight, labels, mask, **sequence_options)
    if ref_chosen_logps is None:
        if ref_hidden is None:  # reference_free: no reference at all
            ref_logps = torch.zeros_like(policy_logps)
        else:
            with torch.no_grad():
                ref_logps = sequence_logprobs(
                    ref_hidden, weight if ref_weight is None else ref_weight, labels, mask, **sequence_options
                )
        ref_chosen_logps, ref_rejected_logps = ref_logps[:n_pairs], ref_logps[n_pairs:]
    chosen_logps, rejected_logps = policy_logps[:n_pairs], policy_logps[n_pairs:]
    losses, chosen_rewards, rejected_rewards = (pair_loss or dpo_loss)(
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        dtype=dtype,
    )
    metrics = {
        "chosen_rewards": chosen_rewards.mean(),
        "rejected_rewards": rejected_rewards.mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).to(dtype).mean(),
        "chosen_logps": chosen_logps.detach().mean(),
        "rejected_logps": rejected_logps.detach().mean(),
    }
    return losses.mean(), metrics
