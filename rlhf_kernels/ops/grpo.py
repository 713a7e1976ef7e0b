"""torch.library layer of the GRPO policy loss on the compiled backends (cpu, triton).

The kernels (csrc/cpu/grpo.cpp, rlhf_kernels/triton/grpo.py) compute the per-token
losses of the token-level loss types (clip family, cispo, sapo, gpg / dro) with the
importance weights and the KL term (kl_is_corrected included: kl r, derivative
kl' r + kl r'), and store d loss / d logprob, so the backward is a scale, done in place
on that buffer, which the first backward hands out (a second backward of the same
graph reruns the kernel); under create_graph=True (double backward) it is the
reference's per-token loss (reference.grpo.token_loss) differentiated as a graph. The aggregation reaches
them as one weight per row. The entropy bonus is linear in the entropy, so it is
torch code here (autograd gives d / d entropy), with the reference's divisors
(reference.grpo.entropy_term). Loss types whose ratio couples a row or the batch
(gspo, vespo, geo_mean, importance_sampling_level="sequence", clip_cov, kl_cov) and
dppo_* run the reference's torch code on every backend, as DPO's batch-coupled types do.
Mask-0 positions are never read into a result: the kernels select, the torch code
here zeroes them first (reference.ppo.valid_only).
"""

from __future__ import annotations

import importlib
import math
from typing import Optional

import torch

from .. import _extension
from ..reference import grpo as _reference
from ..reference.masked import masked_sum
from ..reference.ppo import valid_only
from .._calling_thread import one_thread
from . import needs_grad, stored_gradient

N_STATS = 8
_N_TENSORS = 7  # the op's tensor inputs: logprobs ... row_weight
_LOSS_CODES = {**{name: 0 for name in _reference.CLIP_TYPES}, "cispo": 1, "sapo": 2, "gpg": 3, "dro": 3}
# The reference loss type that each code computes (dro with beta 0 is gpg).
_LOSS_NAMES = {0: "ppo", 1: "cispo", 2: "sapo", 3: "dro"}
_KL_CODES = {"k1": 1, "k2": 2, "k3": 3, "abs": 4, "low_var_kl": 5}
_KL_NAMES = {code: name for name, code in _KL_CODES.items()}
_STRAIGHT_THROUGH = 8
_CORRECTED = 16  # kl_is_corrected: the KL term times the ratio
_INF = math.inf


def kernel_supports(loss_type: str, importance_sampling_level: str, kl_is_corrected: bool = False) -> bool:
    """Whether the per-token kernels compute this configuration (else the reference's torch code runs)."""
    return loss_type in _LOSS_CODES and importance_sampling_level == "token"


def row_weights(weights: torch.Tensor, agg: str, global_tokens, num_sequences, horizon, counts=None) -> torch.Tensor:
    """Per-row scale [B] of `agg` (reference.grpo.aggregate): loss = sum_b w_b sum_t m l.
    counts: weights.sum(-1) when the caller has it."""
    counts = weights.sum(-1) if counts is None else counts
    B, T = weights.shape
    if agg == "token-mean":
        total = counts.sum() if global_tokens is None else torch.as_tensor(global_tokens, dtype=weights.dtype)
        return (1 / torch.where(total > 0, total, 1)).expand(B).contiguous()
    if agg == "token-sum":
        return torch.ones_like(counts)
    rows = (counts > 0).sum() if num_sequences is None else torch.as_tensor(num_sequences)
    rows = torch.clamp(rows.to(weights.dtype), min=1)
    if agg == "seq-mean-token-mean":
        return torch.where(counts > 0, 1 / (torch.where(counts > 0, counts, 1) * rows), 0)
    if agg == "seq-mean-token-sum":
        return (1 / rows).expand(B).contiguous()
    # T = 0: every row sum is 0 (the reference's aggregate divides by max(T, 1) too)
    return (1 / (rows * (max(T, 1) if horizon is None else horizon))).expand(B).contiguous()


def _triton_kernels():
    return importlib.import_module("rlhf_kernels.triton.grpo")


@torch.library.custom_op("rlhf_kernels::grpo_policy_loss_triton", mutates_args=())
def _grpo_policy_loss_triton(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    is_weights: torch.Tensor,
    ref_logprobs: torch.Tensor,
    row_weight: torch.Tensor,
    loss_code: int,
    kl_code: int,
    params: list[float],
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_kernels().grpo_policy_loss(
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
    )


def _fake(x, *args):
    need_grad = args[-1]
    return x.new_empty(x.shape[0], N_STATS), torch.empty_like(x) if need_grad else x.new_empty(0)


def _token_options(loss_code: int, kl_code: int, params: list[float]) -> _reference.TokenOptions:
    """The reference's TokenOptions that `params` (_params) encode. clip_low / clip_high are
    read only by loss types that never reach the kernels (dppo_*, geo_mean)."""
    low, high, dual_clip, delta, ratio_clamp, tau_pos, tau_neg, beta, w_low, w_high, kl_coef = params[:11]
    on = lambda x: None if x == _INF else x
    # kl_code 0: no KL term (kl_coef 0), the estimator is not read
    estimator = _KL_NAMES.get(kl_code % _STRAIGHT_THROUGH, "k1") + ("+" if kl_code & _STRAIGHT_THROUGH else "")
    return _reference.TokenOptions(
        1 - low, high - 1, low, high, on(dual_clip), on(delta), on(ratio_clamp), w_low, w_high, tau_pos, tau_neg,
        beta, kl_coef if kl_code else 0.0, estimator, bool(kl_code & _CORRECTED),
    )  # fmt: skip


def _loss_rows(lp, old, adv, mask, is_weights, ref, row_weight, loss_code, kl_code, params, _need_grad):
    """The op's differentiable output row_stats[:, 0] by the reference's formulas."""
    lp, old, adv = valid_only(mask, lp, old, adv)
    # an absent optional input arrives as new_empty(0)
    isw = valid_only(mask, is_weights)[0] if is_weights.shape == lp.shape else None
    ref = valid_only(mask, ref)[0] if ref.shape == lp.shape else None
    o = _token_options(loss_code, kl_code, params)
    log_ratio = _reference.clamped_log_ratio(lp, old, o)
    loss = _reference.token_loss(_LOSS_NAMES[loss_code], lp, old, adv, log_ratio, mask, o, isw, ref)
    return row_weight * masked_sum(loss, mask, dim=-1)


def _register(op_name: str) -> None:
    torch.library.register_fake(op_name, _fake)
    stored_gradient.register(op_name, _N_TENSORS, _loss_rows)


_register("rlhf_kernels::grpo_policy_loss_triton")
if _extension.LOADED and _extension.has_kernel("grpo_policy_loss", "CPU"):
    _register("rlhf_kernels::grpo_policy_loss")

_OPS = {
    "cpu": lambda: torch.ops.rlhf_kernels.grpo_policy_loss,
    "triton": lambda: _grpo_policy_loss_triton,
}


def _params(options) -> list[float]:
    """The kernels' numbers (csrc/registration.cpp): an option that is off is +inf."""
    o = _reference.token_options(**options)
    beta = o.dro_beta if options["loss_type"] == "dro" else 0.0
    off = lambda x: _INF if x is None else float(x)
    return [
        o.low, o.high, off(o.dual_clip), off(o.delta), off(o.log_ratio_clamp), float(o.tau_pos), float(o.tau_neg),
        float(beta), float(o.w_low), float(o.w_high), float(o.kl_coef), 0.0,
    ]  # fmt: skip


def _kl_code(options) -> int:
    if options["kl_coef"] == 0.0:
        return 0
    name = options["kl_estimator"]
    code = _KL_CODES[name.rstrip("+")] + (_STRAIGHT_THROUGH if name.endswith("+") else 0)
    return code + (_CORRECTED if options["kl_is_corrected"] else 0)


def _kernel_inputs(dtype, agg, divisors, logprobs, old_logprobs, advantages, mask, is_weights, ref_logprobs):
    """The kernel's tensors: contiguous, in dtype, advantages [B] broadcast to [B, T],
    absent ones empty; the row weights of `agg` and the mask's row counts."""
    weights = mask.to(dtype).contiguous()
    counts = weights.sum(-1)  # the one pass over the mask outside the kernel
    lp = logprobs.to(dtype).contiguous()
    adv = advantages.detach().to(dtype)
    adv = (adv[:, None].expand_as(lp) if adv.dim() == 1 else adv).contiguous()
    empty = lp.new_empty(0)
    is_weights = empty if is_weights is None else is_weights.detach().to(dtype).contiguous()
    ref_logprobs = empty if ref_logprobs is None else ref_logprobs.detach().to(dtype).contiguous()
    old = old_logprobs.detach().to(dtype).contiguous()
    row_weight = row_weights(weights, agg, **divisors, counts=counts)
    return lp, old, adv, weights, is_weights, ref_logprobs, row_weight, counts


def policy_loss(logprobs, old_logprobs, advantages, mask, *, kernel, **options):
    """Runs `kernel` ("cpu" or "triton"); arguments and results as functional.policy_loss."""
    loss_type, dtype = options["loss_type"], options["dtype"]
    if not kernel_supports(loss_type, options["importance_sampling_level"]):
        return _reference.policy_loss(logprobs, old_logprobs, advantages, mask, **options)
    agg = _reference.default_agg(loss_type) if options["agg"] is None else options["agg"]
    divisors = {k: options[k] for k in ("global_tokens", "num_sequences", "horizon")}
    kl_code = _kl_code(options)
    ref = options["ref_logprobs"] if kl_code else None
    lp, old, adv, weights, is_weights, ref, row_weight, counts = one_thread(
        _kernel_inputs, dtype, agg, divisors, logprobs, old_logprobs, advantages, mask, options["is_weights"], ref
    )
    row_stats, _ = _OPS[kernel]()(
        lp,
        old,
        adv,
        weights,
        is_weights,
        ref,
        row_weight,
        _LOSS_CODES[loss_type],
        kl_code,
        _params(options),
        needs_grad(logprobs),
    )
    total = row_stats[:, 0].sum()
    entropy = options["entropy"]
    if entropy is not None:
        (entropy,) = valid_only(mask, entropy.to(dtype))
    # entropy_agg None: the policy term's mode and divisors (verl); explicit: this batch's (TRL)
    total = total - _reference.entropy_term(
        entropy, weights, options["entropy_coef"], options["entropy_agg"], agg, divisors
    )
    return total, _stats(row_stats.detach(), weights, counts.sum(), entropy)


def _stats(row_stats: torch.Tensor, weights: torch.Tensor, count: torch.Tensor, entropy: Optional[torch.Tensor]):
    """The masked means of the kernel's row sums; count = sum(weights)."""
    sums = row_stats[:, 1:7].sum(0)
    fractions = torch.where(count > 0, sums / torch.where(count > 0, count, 1), 0)
    names = ("clipfrac_low", "clipfrac_high", "dual_clipfrac", "ppo_kl", "approx_kl", "ratio_mean")
    stats = dict(zip(names, fractions.unbind()))
    stats["ratio_max"] = row_stats[:, 7].amax() if row_stats.shape[0] else row_stats.new_zeros(())
    if entropy is not None:
        total = masked_sum(entropy.detach(), weights)
        stats["entropy"] = torch.where(count > 0, total / torch.where(count > 0, count, 1), 0)
    return stats
