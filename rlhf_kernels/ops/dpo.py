"""torch.library layer of dpo_loss on the compiled backends (cpu, triton).

A kernel call computes one per-pair loss type: the losses, the implicit rewards and,
when autograd needs it, d loss / d policy log-probs [2, B]; the backward is a scale of
that gradient (LD-DPO tails get -(1 - ld_alpha) times it). The reference log-probs,
lengths and WPO weights are constants (detached), as in TRL. The loss types that
couple the pairs (aot, aot_unpaired: sorts across the batch; sft: a batch mean) run as
the reference's torch code here on every backend, and several loss types are summed
here with their loss_weights. Under create_graph=True (double backward) the backward is
the reference's per-pair loss differentiated as a graph (reference/autograd.py).
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _extension
from ..reference import dpo as reference
from ..reference.autograd import recording_backward, vjp
from . import needs_grad, register_autograd


@torch.library.custom_op("rlhf_kernels::dpo_loss_triton", mutates_args=())
def _dpo_loss_triton(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
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
    return importlib.import_module("rlhf_kernels.triton.dpo").dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, tails, lengths, weights, beta, loss_type,
        label_smoothing, reference_free, cdpo, f_divergence_type, f_alpha, f_alpha_clamp, ld_alpha, discopop_tau,
        need_grad,
    )  # fmt: skip


def _fake(chosen, *args):
    B, need_grad = chosen.shape[0], args[-1]
    return torch.empty_like(chosen), chosen.new_empty(2, B), chosen.new_empty(2 if need_grad else 0, B)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2], *inputs[:7])
    ctx.options = inputs[7:]
    ctx.has_tails, ctx.ld_drop = inputs[4] is not None, 1.0 - inputs[15]


def _pair_losses(chosen, rejected, tails, ref_chosen, ref_rejected, lengths, weights, options):
    """The op's losses by the reference's formulas (differentiable in chosen, rejected, tails)."""
    beta, loss_type, ls, reference_free, cdpo, f_type, f_alpha, f_clamp, ld_alpha, tau, _ = options
    pairs = reference.prepare(
        chosen, rejected, ref_chosen, ref_rejected,
        ld_alpha=None if tails is None else ld_alpha, tail_logps=None if tails is None else tuple(tails.unbind(0)),
        chosen_lengths=None if lengths is None else lengths[0],
        rejected_lengths=None if lengths is None else lengths[1], dtype=chosen.dtype,
    )  # fmt: skip
    losses = reference.elementwise_loss(
        pairs, loss_type, beta=beta, label_smoothing=ls, reference_free=reference_free, cdpo=cdpo,
        f_code=reference.f_divergence_code(f_type, f_alpha), alpha=f_alpha, clamp=f_clamp, discopop_tau=tau,
    )  # fmt: skip
    return losses if weights is None else losses * weights


def _backward(ctx, grad_losses, _grad_rewards, _grad_grad):
    grad, chosen, rejected, ref_chosen, ref_rejected, tails, lengths, weights = ctx.saved_tensors
    if recording_backward():  # create_graph=True: differentiable, from the reference's formulas
        needs = ctx.needs_input_grad
        d_chosen, d_rejected, d_tails = vjp(
            lambda c, r, t: _pair_losses(c, r, t, ref_chosen, ref_rejected, lengths, weights, ctx.options),
            [chosen, rejected, tails],
            [needs[0], needs[1], needs[4]],
            [grad_losses],
        )
        return (d_chosen, d_rejected, None, None, d_tails) + (None,) * 13
    d_chosen, d_rejected = grad_losses * grad[0], grad_losses * grad[1]
    d_tails = None
    if ctx.has_tails:  # pi = full - (1 - ld_alpha) tail; the reference rows get no gradient
        zeros = torch.zeros_like(d_chosen)
        d_tails = torch.stack([-ctx.ld_drop * d_chosen, -ctx.ld_drop * d_rejected, zeros, zeros])
    return (d_chosen, d_rejected, None, None, d_tails) + (None,) * 13


def _register(op: str) -> None:
    torch.library.register_fake(op, _fake)
    register_autograd(op, _backward, setup_context=_setup_context)


_register("rlhf_kernels::dpo_loss_triton")
if _extension.LOADED:
    _register("rlhf_kernels::dpo_loss")

_OPS = {"cpu": lambda: torch.ops.rlhf_kernels.dpo_loss, "triton": lambda: _dpo_loss_triton}


def dpo_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
    beta, loss_type, label_smoothing, reference_free, cdpo=False, loss_weights=None, f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5, chosen_lengths=None, rejected_lengths=None, ld_alpha=None, tail_logps=None,
    weights=None, discopop_tau=0.05, dtype, kernel,
):  # fmt: skip
    """Runs `kernel` ("cpu" or "triton"); arguments and results as reference.dpo_loss."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    factors = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)

    def cast(x):
        return None if x is None else x.to(dtype).contiguous()

    tails = None
    if ld_alpha is not None:
        tc, tr, trc, trr = tail_logps
        tails = cast(torch.stack([tc.to(dtype), tr.to(dtype), trc.detach().to(dtype), trr.detach().to(dtype)]))
    lengths = None
    if chosen_lengths is not None and rejected_lengths is not None:
        lengths = cast(torch.stack([chosen_lengths.detach().to(dtype), rejected_lengths.detach().to(dtype)]))
    pair_weights = cast(None if weights is None else weights.detach())
    need_grad = needs_grad(policy_chosen_logps, policy_rejected_logps, *([] if tails is None else [tails]))
    arguments = (
        cast(policy_chosen_logps), cast(policy_rejected_logps), cast(ref_chosen_logps.detach()),
        cast(ref_rejected_logps.detach()), tails, lengths, pair_weights,
    )  # fmt: skip
    pairs = rewards = total = None
    for name, factor in zip(types, factors):
        if name in reference.BATCH_LOSS_TYPES:
            if pairs is None:
                pairs = reference.prepare(
                    *logps, ld_alpha=ld_alpha, tail_logps=tail_logps, chosen_lengths=chosen_lengths,
                    rejected_lengths=rejected_lengths, dtype=dtype,
                )  # fmt: skip
            losses = reference.batch_loss(pairs, name, beta=beta, label_smoothing=label_smoothing)
            if pair_weights is not None:  # WPO (the kernels apply it to their own losses)
                losses = losses * pair_weights
        else:
            losses, rewards, _ = _OPS[kernel]()(
                *arguments, float(beta), name, float(label_smoothing), bool(reference_free), bool(cdpo),
                f_divergence_type, float(f_alpha_divergence_coef), reference.alpha_clamp(*logps),
                1.0 if ld_alpha is None else float(ld_alpha), float(discopop_tau), need_grad,
            )  # fmt: skip
        term = losses if factor == 1.0 else losses * factor
        total = term if total is None else total + term
    if rewards is None:  # only batch loss types
        return (total, *reference.rewards(pairs, beta))
    rewards = rewards.detach()
    return total, rewards[0], rewards[1]
