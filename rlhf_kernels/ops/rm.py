"""torch.library layer of the reward-model losses on the compiled backends (cpu, triton).

bradley_terry_loss's kernel returns per-element losses and d loss / d chosen (the
rejected side gets its negative; margin is a constant); the mean is taken here.
ranking_loss's kernel returns per-prompt mean losses, pair counts and
d row loss / d rewards; prompts with a ranked pair are averaged here.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _extension
from . import needs_grad


def _triton_kernels():
    return importlib.import_module("rlhf_kernels.triton.rm")


@torch.library.custom_op("rlhf_kernels::bradley_terry_loss_triton", mutates_args=())
def _bradley_terry_loss_triton(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: Optional[torch.Tensor], need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_kernels().bradley_terry_loss(chosen_rewards, rejected_rewards, margin, need_grad)


@torch.library.custom_op("rlhf_kernels::ranking_loss_triton", mutates_args=())
def _ranking_loss_triton(
    rewards: torch.Tensor, ranks: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_kernels().ranking_loss(rewards, ranks, need_grad)


def _bt_fake(chosen, rejected, margin, need_grad):
    return torch.empty_like(chosen), torch.empty_like(chosen) if need_grad else chosen.new_empty(0)


def _ranking_fake(rewards, ranks, need_grad):
    B = rewards.shape[0]
    return rewards.new_empty(B), rewards.new_empty(B), torch.empty_like(rewards) if need_grad else rewards.new_empty(0)


def _save_grad(index):
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[index])

    return setup_context


def _bt_backward(ctx, grad_losses, _grad_grad):
    (slope,) = ctx.saved_tensors
    grad = grad_losses * slope
    return grad, -grad, None, None


def _ranking_backward(ctx, grad_row_loss, _grad_pairs, _grad_grad):
    (grad,) = ctx.saved_tensors
    return grad_row_loss[:, None] * grad, None, None


def _register(bt_op: str, ranking_op: str) -> None:
    torch.library.register_fake(bt_op, _bt_fake)
    torch.library.register_autograd(bt_op, _bt_backward, setup_context=_save_grad(1))
    torch.library.register_fake(ranking_op, _ranking_fake)
    torch.library.register_autograd(ranking_op, _ranking_backward, setup_context=_save_grad(2))


_register("rlhf_kernels::bradley_terry_loss_triton", "rlhf_kernels::ranking_loss_triton")
if _extension.LOADED:
    _register("rlhf_kernels::bradley_terry_loss", "rlhf_kernels::ranking_loss")

_BT = {"cpu": lambda: torch.ops.rlhf_kernels.bradley_terry_loss, "triton": lambda: _bradley_terry_loss_triton}
_RANKING = {"cpu": lambda: torch.ops.rlhf_kernels.ranking_loss, "triton": lambda: _ranking_loss_triton}


def bradley_terry_loss(chosen_rewards, rejected_rewards, *, margin, dtype, kernel):
    """Runs `kernel` ("cpu" or "triton"); arguments and result as functional.bradley_terry_loss."""
    if margin is not None:
        margin = torch.as_tensor(margin, dtype=dtype, device=chosen_rewards.device).detach()
        margin = margin.expand(chosen_rewards.shape).contiguous()
    losses, _ = _BT[kernel]()(
        chosen_rewards.to(dtype).contiguous(),
        rejected_rewards.to(dtype).contiguous(),
        margin,
        needs_grad(chosen_rewards, rejected_rewards),
    )
    return losses.mean()


def ranking_loss(rewards, ranks, *, dtype, kernel):
    """Runs `kernel` ("cpu" or "triton"); arguments and result as functional.ranking_loss."""
    row_loss, row_pairs, _ = _RANKING[kernel]()(
        rewards.to(dtype).contiguous(), ranks.detach().to(dtype).contiguous(), needs_grad(rewards)
    )
    has_pairs = (row_pairs > 0).to(dtype)
    return (row_loss * has_pairs).sum() / has_pairs.sum().clamp(min=1)
