"""torch.library layer of dpo_loss on the compiled backends (cpu, triton).

The kernels return the per-pair losses, the implicit rewards and, when autograd
needs it, d loss / d policy log-probs [2, B]; the backward is a scale of that
gradient. The reference log-probs are constants (detached), as in TRL.
"""

from __future__ import annotations

import importlib

import torch

from .. import _extension
from . import needs_grad


@torch.library.custom_op("rlhf_kernels::dpo_loss_triton", mutates_args=())
def _dpo_loss_triton(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    reference_free: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return importlib.import_module("rlhf_kernels.triton.dpo").dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing, reference_free,
        need_grad,
    )  # fmt: skip


def _fake(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing, reference_free, need_grad):
    B = chosen.shape[0]
    return torch.empty_like(chosen), chosen.new_empty(2, B), chosen.new_empty(2 if need_grad else 0, B)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _backward(ctx, grad_losses, _grad_rewards, _grad_grad):
    (grad,) = ctx.saved_tensors
    return grad_losses * grad[0], grad_losses * grad[1], None, None, None, None, None, None, None


def _register(op: str) -> None:
    torch.library.register_fake(op, _fake)
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


_register("rlhf_kernels::dpo_loss_triton")
if _extension.LOADED:
    _register("rlhf_kernels::dpo_loss")

_OPS = {"cpu": lambda: torch.ops.rlhf_kernels.dpo_loss, "triton": lambda: _dpo_loss_triton}


def dpo_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
    beta, loss_type, label_smoothing, reference_free, dtype, kernel,
):  # fmt: skip
    """Runs `kernel` ("cpu" or "triton"); arguments and results as functional.dpo_loss."""
    need_grad = needs_grad(policy_chosen_logps, policy_rejected_logps)
    losses, rewards, _ = _OPS[kernel]()(
        policy_chosen_logps.to(dtype).contiguous(),
        policy_rejected_logps.to(dtype).contiguous(),
        ref_chosen_logps.detach().to(dtype).contiguous(),
        ref_rejected_logps.detach().to(dtype).contiguous(),
        float(beta),
        loss_type,
        float(label_smoothing),
        bool(reference_free),
        need_grad,
    )
    rewards = rewards.detach()
    return losses, rewards[0], rewards[1]
