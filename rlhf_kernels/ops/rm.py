"""torch.library layer of the reward-model losses on the compiled backends (cpu, triton).

bradley_terry_loss's kernel returns per-element losses and d loss / d chosen (the
rejected side gets its negative; margin is a constant); the mean is taken here.
ranking_loss's kernel returns per-prompt mean losses, pair counts and
d row loss / d rewards; prompts with a ranked pair are averaged here. Ranks reach the
kernels as dense ranks (0, 1, ... per prompt, same order) in the compute dtype, so int64
ranks such as 2^25 and 2^25 + 1 stay distinct. Under create_graph=True (double backward)
the backward is the reference's loss differentiated as a graph (reference/autograd.py).
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _extension
from ..reference import rm as reference
from ..reference.autograd import recording_backward, vjp
from . import needs_grad, register_autograd


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
        ctx.save_for_backward(output[index], *inputs[:-1])

    return setup_context


def _bt_losses(chosen, rejected, margin):
    diff = chosen - rejected
    return -torch.nn.functional.logsigmoid(diff if margin is None else diff - margin)


def _bt_backward(ctx, grad_losses, _grad_grad):
    slope, chosen, rejected, margin = ctx.saved_tensors
    if recording_backward():  # create_graph=True: differentiable, from the reference's formula
        grad_c, grad_r = vjp(
            lambda c, r: _bt_losses(c, r, margin), [chosen, rejected], ctx.needs_input_grad[:2], [grad_losses]
        )
        return grad_c, grad_r, None, None
    grad = grad_losses * slope
    return grad, -grad, None, None


def _ranking_backward(ctx, grad_row_loss, _grad_pairs, _grad_grad):
    grad, rewards, ranks = ctx.saved_tensors
    if recording_backward():  # create_graph=True: differentiable, from the reference's formula
        (grad_rewards,) = vjp(
            lambda r: reference.ranking_row_losses(r, ranks)[0], [rewards], ctx.needs_input_grad[:1], [grad_row_loss]
        )
        return grad_rewards, None, None
    return grad_row_loss[:, None] * grad, None, None


def _register(bt_op: str, ranking_op: str) -> None:
    torch.library.register_fake(bt_op, _bt_fake)
    register_autograd(bt_op, _bt_backward, setup_context=_save_grad(1))
    torch.library.register_fake(ranking_op, _ranking_fake)
    register_autograd(ranking_op, _ranking_backward, setup_context=_save_grad(2))


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
    return losses.mean() if losses.numel() else losses.sum()  # no pairs: 0, not NaN


def dense_ranks(ranks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per prompt, each rank replaced by the number of distinct smaller ranks, in `dtype`:
    the same order and ties, in values exact in any float dtype (K < 2^24), so no two
    ranks tie by rounding (int64 2^25 and 2^25 + 1 did as float32). NaN ranks stay NaN
    (never in a pair)."""
    keys = ranks if ranks.is_floating_point() else ranks.to(torch.int64)
    ordered, order = keys.sort(-1)
    steps = (ordered[..., 1:] > ordered[..., :-1]).to(torch.int64).cumsum(-1)
    first = torch.zeros(*keys.shape[:-1], min(keys.shape[-1], 1), dtype=torch.int64, device=keys.device)
    dense_ordered = torch.cat([first, steps], -1)
    dense = torch.empty_like(dense_ordered).scatter_(-1, order, dense_ordered).to(dtype)
    if ranks.is_floating_point():
        dense = torch.where(torch.isnan(ranks), float("nan"), dense)
    return dense


def ranking_loss(rewards, ranks, *, dtype, kernel):
    """Runs `kernel` ("cpu" or "triton"); arguments and result as functional.ranking_loss."""
    row_loss, row_pairs, _ = _RANKING[kernel]()(
        rewards.to(dtype).contiguous(), dense_ranks(ranks.detach(), dtype).contiguous(), needs_grad(rewards)
    )
    has_pairs = (row_pairs > 0).to(dtype)
    return (row_loss * has_pairs).sum() / has_pairs.sum().clamp(min=1)
