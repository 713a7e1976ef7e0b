"""Reference DPO loss family: the formulas of TRL 1.16's DPOTrainer._compute_loss.

Per pair, from [B] sequence log-probs pi_c, pi_r (policy) and ref_c, ref_r (reference),
summed over the completion tokens (ls = label_smoothing):

  LD-DPO      with ld_alpha = a and the sums t over each response's tokens past the
              shorter response of its pair: pi <- pi - (1 - a) t, ref <- ref - (1 - a) t
              (TRL's shared + a * tail), before everything below.
  rho         rho_c = pi_c - ref_c, rho_r = pi_r - ref_r.  Rewards: beta rho, detached.
  scores      s = f'(rho) of f_divergence_type (rho' = pi when reference_free, else rho):
                reverse_kl rho'; forward_kl 1 - exp(-rho'); js_divergence log 2 + logsigmoid(rho');
                alpha_divergence (exp(min((al - 1) rho', c)) - 1) / (al - 1), al = f_alpha_divergence_coef,
                c = 11 for float16 inputs, else 80 (reverse_kl when |al - 1| < 1e-6).
              ipo (when lengths are given) and sigmoid_norm divide s by the lengths (min 1).
  z           beta (s_c - s_r)
  sigmoid     -logsigmoid(z); with cdpo=True cDPO's -(1 - ls) logsigmoid(z) - ls logsigmoid(-z)
  hinge       relu(1 - z)
  ipo         (s_c - s_r - 1 / (2 beta))^2
  exo_pair    sigmoid(z) (logsigmoid(z) - log(1 - ls)) + sigmoid(-z) (logsigmoid(-z) - log ls)
  robust      (-(1 - ls) logsigmoid(z) + ls logsigmoid(-z)) / (1 - 2 ls)
  discopop    -logsigmoid(z) (1 - m) + exp(-z) m,  m = sigmoid(z / discopop_tau)
  sigmoid_norm  -logsigmoid(z) on length-normalised scores
  nca_pair    -logsigmoid(beta rho_c) - logsigmoid(-beta rho_c) / 2 - logsigmoid(-beta rho_r) / 2
  bco_pair    -logsigmoid(beta rho_c) - logsigmoid(-beta rho_r)
  sppo_hard   (rho_c - 1 / (2 beta))^2 + (rho_r + 1 / (2 beta))^2
  apo_zero    1 - sigmoid(beta rho'_c) + sigmoid(beta rho'_r)
  apo_down    sigmoid(beta rho'_c) + 1 - sigmoid(beta (rho'_c - rho'_r))
Across the batch (not per pair):
  aot         sigmoid-cDPO of beta (sort(pi_c - pi_r) - sort(ref_c - ref_r))
  aot_unpaired  sigmoid-cDPO of beta (sort(rho_c) - sort(rho_r))
  sft         -sum_b pi_c (without LD-DPO) / sum_b n_c, the same for every pair: the mean NLL
              of the chosen tokens (TRL's; 0 when there is no token, where TRL gives NaN)
Several loss types: sum_k loss_weights[k] loss_k per pair (its mean is TRL's loss; aot's
per-pair values are in sorted order, as TRL's). WPO weights w multiply each pair's loss.
nca_pair, bco_pair, sppo_hard, aot and aot_unpaired use rho even when reference_free
(TRL before 1.0, which had the option; 1.16 has none).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .logprobs import sequence_logprobs

# Losses of each pair alone (the compiled kernels' loss types), then the batch ones.
PAIR_LOSS_TYPES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down",
    "bco_pair", "discopop", "sigmoid_norm",
)  # fmt: skip
BATCH_LOSS_TYPES = ("aot", "aot_unpaired", "sft")
LOSS_TYPES = PAIR_LOSS_TYPES + BATCH_LOSS_TYPES
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL: the f-DPO reparameterisation only cancels log Z(x) in the chosen - rejected difference.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# Loss types that read the completion lengths: ipo normalises when they are given.
NEEDS_CHOSEN_LENGTHS = ("sigmoid_norm", "sft")
NEEDS_REJECTED_LENGTHS = ("sigmoid_norm",)
NORMALISED = ("ipo", "sigmoid_norm")
# TRL's alpha-divergence clamp of (al - 1) rho, so that exp stays finite in the input
# dtype; TRL has no float64 entry (KeyError), float64 takes float32's.
ALPHA_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 80.0}


def alpha_clamp(*logps) -> float:
    """TRL's clamp for the dtype its log-ratios have (the inputs' promoted dtype)."""
    dtype = logps[0].dtype
    for x in logps[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return ALPHA_CLAMP[dtype]


def f_divergence_code(f_divergence_type: str, f_alpha_divergence_coef: float) -> int:
    """Index into F_DIVERGENCES; alpha-divergence at al = 1 is reverse KL (TRL's limit case)."""
    if f_divergence_type == "alpha_divergence" and abs(f_alpha_divergence_coef - 1.0) < 1e-6:
        return 0
    return F_DIVERGENCES.index(f_divergence_type)


class Pairs(NamedTuple):
    """The per-pair inputs of the losses, in the compute dtype, reference detached."""

    chosen: torch.Tensor  # pi_c (LD-DPO weighted when ld_alpha is set)
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_sum: torch.Tensor  # pi_c over every completion token (sft)
    chosen_lengths: Optional[torch.Tensor]
    rejected_lengths: Optional[torch.Tensor]


def prepare(pc, pr, rc, rr, *, ld_alpha=None, tail_logps=None, chosen_lengths=None, rejected_lengths=None,
            dtype=torch.float32) -> Pairs:  # fmt: skip
    pc, pr = pc.to(dtype), pr.to(dtype)
    rc, rr = rc.detach().to(dtype), rr.detach().to(dtype)
    chosen_sum = pc
    if ld_alpha is not None:
        tc, tr, trc, trr = tail_logps
        drop = 1.0 - ld_alpha
        pc, pr = pc - drop * tc.to(dtype), pr - drop * tr.to(dtype)
        rc, rr = rc - drop * trc.detach().to(dtype), rr - drop * trr.detach().to(dtype)

    def lengths(x):  # counts as TRL divides by them (mask.sum(1).clamp(min=1.0))
        return None if x is None else x.detach().to(dtype).clamp(min=1.0)

    return Pairs(pc, pr, rc, rr, chosen_sum, lengths(chosen_lengths), lengths(rejected_lengths))


def _scores(rho, code: int, alpha: float, clamp: float):
    if code == 0:  # reverse_kl
        return rho
    if code == 1:  # forward_kl: f'(t) = 1 - 1/t
        return 1 - torch.exp(-rho)
    if code == 2:  # js_divergence: f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(rho)
    t = torch.clamp((alpha - 1.0) * rho, max=clamp)  # alpha: (t^(al-1) - 1) / (al - 1)
    return (torch.exp(t) - 1.0) * (1.0 / (alpha - 1.0))


def _smoothed_sigmoid(z, ls):
    return -F.logsigmoid(z) * (1 - ls) - F.logsigmoid(-z) * ls


def elementwise_loss(
    p: Pairs, loss_type, *, beta, label_smoothing, reference_free, cdpo, f_code, alpha, clamp, discopop_tau
):
    """The [B] losses of one loss type of PAIR_LOSS_TYPES."""
    rho_c, rho_r = p.chosen - p.ref_chosen, p.rejected - p.ref_rejected
    a, b = (p.chosen, p.rejected) if reference_free else (rho_c, rho_r)
    ls = label_smoothing
    if loss_type in ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down"):
        c, r = beta * rho_c, beta * rho_r
        if loss_type == "nca_pair":
            return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
        if loss_type == "bco_pair":
            return -F.logsigmoid(c) - F.logsigmoid(-r)
        if loss_type == "sppo_hard":
            return (rho_c - 0.5 / beta).square() + (rho_r + 0.5 / beta).square()
        if loss_type == "apo_zero":
            return 1 - torch.sigmoid(beta * a) + torch.sigmoid(beta * b)
        return torch.sigmoid(beta * a) + 1 - torch.sigmoid(beta * (a - b))  # apo_down
    s_c, s_r = _scores(a, f_code, alpha, clamp), _scores(b, f_code, alpha, clamp)
    if loss_type in NORMALISED and p.chosen_lengths is not None:
        s_c, s_r = s_c / p.chosen_lengths, s_r / p.rejected_lengths
    z = beta * (s_c - s_r)
    if loss_type == "sigmoid":
        return _smoothed_sigmoid(z, ls if cdpo else 0.0)
    if loss_type == "sigmoid_norm":
        return -F.logsigmoid(z)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        return (s_c - s_r - 1 / (2 * beta)).square()
    if loss_type == "exo_pair":
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-ls)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(ls)
        )
    if loss_type == "robust":
        return (-F.logsigmoid(z) * (1 - ls) + F.logsigmoid(-z) * ls) / (1 - 2 * ls)
    if loss_type == "discopop":
        # exp(-z) m as exp(logsigmoid(z / tau) - z): finite where exp(-z) alone overflows.
        return -F.logsigmoid(z) * torch.sigmoid(-z / discopop_tau) + torch.exp(F.logsigmoid(z / discopop_tau) - z)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def batch_loss(p: Pairs, loss_type, *, beta, label_smoothing):
    """The [B] losses of one loss type of BATCH_LOSS_TYPES (they couple the pairs)."""
    if loss_type == "sft":
        nll = -p.chosen_sum.sum() / p.chosen_lengths.sum().clamp(min=1.0)
        return nll.expand(p.chosen_sum.shape[0]).contiguous()
    if loss_type == "aot":
        policy, ref = p.chosen - p.rejected, p.ref_chosen - p.ref_rejected
    else:  # aot_unpaired
        policy, ref = p.chosen - p.ref_chosen, p.rejected - p.ref_rejected
    delta = torch.sort(policy, dim=0).values - torch.sort(ref, dim=0).values
    return _smoothed_sigmoid(beta * delta, label_smoothing)


def rewards(p: Pairs, beta):
    return (beta * (p.chosen - p.ref_chosen)).detach(), (beta * (p.rejected - p.ref_rejected)).detach()


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
    cdpo=False,
    loss_weights: Optional[Sequence[float]] = None,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    chosen_lengths=None,
    rejected_lengths=None,
    ld_alpha=None,
    tail_logps=None,
    weights=None,
    discopop_tau=0.05,
    dtype: torch.dtype = torch.float32,
):
    """Arguments as rlhf_kernels.dpo_loss (tail_logps: its four *_tail_logps in order).
    Returns (losses, chosen_rewards, rejected_rewards) in `dtype`."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    factors = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    p = prepare(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, ld_alpha=ld_alpha,
        tail_logps=tail_logps, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, dtype=dtype,
    )  # fmt: skip
    options = dict(
        beta=beta, label_smoothing=label_smoothing, reference_free=reference_free, cdpo=cdpo,
        f_code=f_divergence_code(f_divergence_type, f_alpha_divergence_coef), alpha=f_alpha_divergence_coef,
        clamp=alpha_clamp(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps),
        discopop_tau=discopop_tau,
    )  # fmt: skip
    total = None
    for name, factor in zip(types, factors):
        if name in BATCH_LOSS_TYPES:
            losses = batch_loss(p, name, beta=beta, label_smoothing=label_smoothing)
        else:
            losses = elementwise_loss(p, name, **options)
        term = losses if factor == 1.0 else losses * factor
        total = term if total is None else total + term
    if weights is not None:  # WPO: detached, as TRL computes them under no_grad
        total = total * weights.detach().to(dtype)
    return (total, *rewards(p, beta))


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
    average: bool = False,
    temperature=1.0,
    dtype: torch.dtype = torch.float32,
    linear_logprobs=None,
    pair_loss=None,
    **loss_options,
):
    """DPO from hidden states [2B, T, H]: rows [:B] chosen, [B:] rejected.

    `linear_logprobs` is the token log-prob implementation and `pair_loss` the
    dpo_loss implementation (default: the reference's); loss_options go to it. With
    average=False the completion lengths (mask row sums) are passed on too.
    """
    n_pairs = hidden.shape[0] // 2
    sequence_options = dict(average=average, temperature=temperature)
    if linear_logprobs is not None:
        sequence_options["linear_logprobs"] = linear_logprobs
    policy_logps = sequence_logprobs(hidden, weight, labels, mask, **sequence_options)
    ref_chosen_logps, ref_rejected_logps = reference_logps(
        ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight if ref_weight is not None else weight, labels,
        mask, like=policy_logps, **sequence_options,
    )  # fmt: skip
    if not average:
        loss_options.update(completion_lengths(mask))
    chosen_logps, rejected_logps = policy_logps[:n_pairs], policy_logps[n_pairs:]
    losses, chosen_rewards, rejected_rewards = (pair_loss or dpo_loss)(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, dtype=dtype, **loss_options
    )
    return _mean(losses), pair_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, dtype)


def reference_logps(
    ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, labels, mask, *, like, **sequence_options
):
    """(ref chosen [B], ref rejected [B]) of linear_dpo_loss: as given, from ref_hidden
    without grad, or zeros (reference_free; `like` gives their shape and dtype)."""
    if ref_chosen_logps is not None:
        return ref_chosen_logps, ref_rejected_logps
    if ref_hidden is None:  # reference_free: no reference at all
        ref_logps = torch.zeros_like(like)
    else:
        with torch.no_grad():
            ref_logps = sequence_logprobs(ref_hidden, ref_weight, labels, mask, **sequence_options)
    n_pairs = ref_logps.shape[0] // 2
    return ref_logps[:n_pairs], ref_logps[n_pairs:]


def completion_lengths(mask) -> dict:
    """dpo_loss's chosen_lengths / rejected_lengths: the mask's row sums per half."""
    lengths = (mask != 0).sum(-1)
    n_pairs = lengths.shape[0] // 2
    return dict(chosen_lengths=lengths[:n_pairs], rejected_lengths=lengths[n_pairs:])


def pair_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, dtype) -> dict:
    """linear_dpo_loss's metrics: batch means over the pairs, detached."""
    return {
        "chosen_rewards": _mean(chosen_rewards),
        "rejected_rewards": _mean(rejected_rewards),
        "reward_margin": _mean(chosen_rewards - rejected_rewards),
        "reward_accuracy": _mean((chosen_rewards > rejected_rewards).to(dtype)),
        "chosen_logps": _mean(chosen_logps.detach()),
        "rejected_logps": _mean(rejected_logps.detach()),
    }


def _mean(x: torch.Tensor) -> torch.Tensor:
    """The mean, 0 for no pairs (B = 0) rather than NaN."""
    return x.mean() if x.numel() else x.sum()
