"""torch.library layer of the PPO losses on the compiled backends (cpu, triton).

The kernels (csrc/cpu/ppo.cpp, rlhf_kernels/triton/ppo.py) return per-row sums and
the per-token gradient of the loss; the aggregation (agg) reaches them as one
weight per row, computed here from the mask's row sums, so every agg mode is the
same kernel: loss = sum_b row_weight_b sum_t mask_bt loss_bt. The backward is a
scale of the stored gradient, in place (ops/stored_gradient.py); under
create_graph=True (double backward) it is the reference's per-token loss
differentiated as a graph (reference/autograd.py).
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _extension
from ..reference.masked import masked_sum
from ..reference.ppo import policy_token_loss, valid_only, value_token_loss
from .._calling_thread import one_thread
from . import needs_grad, stored_gradient

_POLICY_STATS = ("clipfrac", "dual_clipfrac", "approx_kl")


def row_weights(counts: torch.Tensor, T: int, agg: str) -> torch.Tensor:
    """Per-row scale [B] of the aggregation `agg` (rlhf_kernels.reference.ppo.aggregate)
    over rows of T positions with counts [B] valid ones."""
    B = counts.shape[0]
    if agg == "token-mean":
        total = counts.sum()
        return torch.where(total > 0, 1 / torch.where(total > 0, total, 1), 0).expand(B).contiguous()
    if agg == "seq-mean-token-sum":
        return torch.full_like(counts, 1 / max(B, 1))  # B = 0: no rows, no weight
    if agg == "seq-mean-token-mean":
        valid = counts > 0
        n_valid = valid.sum().to(counts.dtype)
        return torch.where(valid, 1 / (torch.where(valid, counts, 1) * torch.clamp(n_valid, min=1)), 0)
    return torch.full_like(counts, 1 / max(T, 1))  # seq-mean-token-sum-norm; T = 0: every row sum is 0


def _triton_kernels():
    return importlib.import_module("rlhf_kernels.triton.ppo")


@torch.library.custom_op("rlhf_kernels::ppo_policy_loss_triton", mutates_args=())
def _ppo_policy_loss_triton(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    row_weight: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
    log_ratio_clamp: Optional[float],
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_kernels().ppo_policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        row_weight,
        clip_low,
        clip_high,
        dual_clip,
        log_ratio_clamp,
        need_grad,
    )


@torch.library.custom_op("rlhf_kernels::ppo_value_loss_triton", mutates_args=())
def _ppo_value_loss_triton(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    row_weight: torch.Tensor,
    clip: Optional[float],
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_kernels().ppo_value_loss(values, old_values, returns, mask, row_weight, clip, need_grad)


def _fake(n_stats: int):
    def fake(x, *args):
        need_grad = args[-1]
        return x.new_empty(x.shape[0], n_stats), torch.empty_like(x) if need_grad else x.new_empty(0)

    return fake


def _policy_rows(lp, old, adv, mask, row_weight, clip_low, clip_high, dual_clip, log_ratio_clamp, _need_grad):
    """The op's differentiable output row_stats[:, 0] by the reference's formulas."""
    lp, old, adv = valid_only(mask, lp, old, adv)
    loss, _ = policy_token_loss(
        lp, old, adv, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp
    )
    return row_weight * masked_sum(loss, mask, dim=-1)


def _value_rows(values, old, returns, mask, row_weight, clip, _need_grad):
    loss, _ = value_token_loss(*valid_only(mask, values, old, returns), clip=clip)
    return row_weight * masked_sum(loss, mask, dim=-1)


def _register(op_name: str, n_stats: int, rows) -> None:
    torch.library.register_fake(op_name, _fake(n_stats))
    stored_gradient.register(op_name, 5, rows)


_register("rlhf_kernels::ppo_policy_loss_triton", 4, _policy_rows)
_register("rlhf_kernels::ppo_value_loss_triton", 2, _value_rows)
if _extension.LOADED:
    _register("rlhf_kernels::ppo_policy_loss", 4, _policy_rows)
    _register("rlhf_kernels::ppo_value_loss", 2, _value_rows)

_OPS = {
    ("policy", "cpu"): lambda: torch.ops.rlhf_kernels.ppo_policy_loss,
    ("policy", "triton"): lambda: _ppo_policy_loss_triton,
    ("value", "cpu"): lambda: torch.ops.rlhf_kernels.ppo_value_loss,
    ("value", "triton"): lambda: _ppo_value_loss_triton,
}


def _prepare(dtype: torch.dtype, mask: torch.Tensor, agg: str, *tensors: torch.Tensor):
    """(tensors in dtype, mask weights, row weights, the number of valid positions); on
    one thread on the CPU (rlhf_kernels._calling_thread.one_thread)."""
    return one_thread(_prepare_passes, dtype, mask, agg, *tensors)


def _prepare_passes(dtype: torch.dtype, mask: torch.Tensor, agg: str, *tensors: torch.Tensor):
    weights = mask.to(dtype).contiguous()
    counts = weights.sum(-1)
    return (
        [x.to(dtype).contiguous() for x in tensors],
        weights,
        row_weights(counts, weights.shape[1], agg),
        counts.sum(),
    )


def _masked_fraction(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.where(count > 0, total / torch.where(count > 0, count, 1), 0)


def ppo_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, dual_clip, log_ratio_clamp, agg, dtype, kernel
):
    """Runs `kernel` ("cpu" or "triton"); arguments and results as functional.ppo_policy_loss."""
    (lp, old, adv), weights, row_weight, count = _prepare(
        dtype, mask, agg, logprobs, old_logprobs.detach(), advantages.detach()
    )
    need_grad = needs_grad(logprobs)
    row_stats, _ = _OPS[("policy", kernel)]()(
        lp,
        old,
        adv,
        weights,
        row_weight,
        float(clip_low),
        float(clip_low if clip_high is None else clip_high),
        None if dual_clip is None else float(dual_clip),
        None if log_ratio_clamp is None else float(log_ratio_clamp),
        need_grad,
    )
    sums = row_stats.detach()[:, 1:].sum(0)
    stats = {name: _masked_fraction(sums[i], count) for i, name in enumerate(_POLICY_STATS)}
    return row_stats[:, 0].sum(), stats


def ppo_value_loss(values, old_values, returns, mask, *, clip, agg, dtype, kernel):
    """Runs `kernel` ("cpu" or "triton"); arguments and results as functional.ppo_value_loss."""
    (v, old, ret), weights, row_weight, count = _prepare(
        dtype, mask, agg, values, old_values.detach(), returns.detach()
    )
    need_grad = needs_grad(values)
    row_stats, _ = _OPS[("value", kernel)]()(
        v, old, ret, weights, row_weight, None if clip is None else float(clip), need_grad
    )
    return row_stats[:, 0].sum(), {"vf_clipfrac": _masked_fraction(row_stats.detach()[:, 1].sum(), count)}
