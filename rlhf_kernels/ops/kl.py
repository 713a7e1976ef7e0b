"""torch.library layer of the KL ops on the compiled backends (cpu, triton).

kl_penalty's kernels return the estimate and, when autograd needs it, d kl / d d
with d = logprobs - ref_logprobs; the backward is g * grad for logprobs and
-g * grad for ref_logprobs (under create_graph=True, the reference's estimate
differentiated as a graph: reference/autograd.py). kl_shaped_rewards is rollout data: no
autograd; an out-of-range score_index (possible where the Python check is skipped) raises
in the C++ kernel and gives a NaN row on triton, never an out-of-range write.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _extension
from .._calling_thread import cast_on_one_thread, one_thread
from ..reference import kl as reference
from ..reference.autograd import recording_backward, vjp
from . import needs_grad, register_autograd


def _triton_kernels():
    return importlib.import_module("rlhf_kernels.triton.kl")


@torch.library.custom_op("rlhf_kernels::kl_penalty_triton", mutates_args=())
def _kl_penalty_triton(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str, clamp: Optional[float], need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_kernels().kl_penalty(logprobs, ref_logprobs, estimator, clamp, need_grad)


@torch.library.custom_op("rlhf_kernels::kl_shaped_rewards_triton", mutates_args=())
def _kl_shaped_rewards_triton(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str,
    clamp: Optional[float],
    score_index: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_kernels().kl_shaped_rewards(
        scores, logprobs, ref_logprobs, mask, kl_coef, estimator, clamp, score_index
    )


def _kl_penalty_fake(logprobs, ref_logprobs, estimator, clamp, need_grad):
    return torch.empty_like(logprobs), torch.empty_like(logprobs) if need_grad else logprobs.new_empty(0)


def _kl_shaped_rewards_fake(scores, logprobs, *args):
    return torch.empty_like(logprobs), torch.empty_like(logprobs)


def _register(penalty_op: str, rewards_op: str) -> None:
    op = getattr(torch.ops.rlhf_kernels, penalty_op.split("::")[1])

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1], inputs[0], inputs[1])
        ctx.estimator, ctx.clamp = inputs[2], inputs[3]
        ctx.handed_out = False
        # The slope output is never differentiated: no [B, T] of zeros for its gradient
        # (0.7 ms of a 4.3 ms forward+backward at 256 x 4096 fp32).
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_kl, _grad_slope):
        """g * slope for logprobs, -g * slope for ref_logprobs, each only when asked. The
        first backward scales the kernel's slope buffer in place and hands it out (no
        [B, T] allocation: it is used once; its .data, so the saved tensor's version is
        untouched); a second backward of the graph (retain_graph=True) runs the kernel
        again for a fresh slope (the same bits)."""
        slope, logprobs, ref_logprobs = ctx.saved_tensors
        need_lp, need_ref = ctx.needs_input_grad[:2]
        if grad_kl is None:  # no gradient reached the estimate (grads are not materialised)
            return None, None, None, None, None
        if recording_backward():  # create_graph=True: differentiable, from the reference's formulas
            grad_lp, grad_ref = vjp(
                lambda a, b: reference.kl_penalty(a, b, estimator=ctx.estimator, clamp=ctx.clamp, dtype=a.dtype),
                [logprobs, ref_logprobs],
                ctx.needs_input_grad[:2],
                [grad_kl],
            )
            return grad_lp, grad_ref, None, None, None
        if type(slope) is not torch.Tensor:  # traced (fake / functional tensors): no aliasing
            grad = grad_kl * slope
        elif ctx.handed_out:
            grad = grad_kl * op(logprobs, ref_logprobs, ctx.estimator, ctx.clamp, True)[1]
        else:
            ctx.handed_out = True
            grad = one_thread(slope.data.mul_, grad_kl)  # one memory pass (_calling_thread.one_thread)
        return (grad if need_lp else None), (-grad if need_ref else None), None, None, None

    torch.library.register_fake(penalty_op, _kl_penalty_fake)
    register_autograd(penalty_op, backward, setup_context=setup_context)
    torch.library.register_fake(rewards_op, _kl_shaped_rewards_fake)


_register("rlhf_kernels::kl_penalty_triton", "rlhf_kernels::kl_shaped_rewards_triton")
if _extension.LOADED:
    _register("rlhf_kernels::kl_penalty", "rlhf_kernels::kl_shaped_rewards")

_PENALTY = {"cpu": lambda: torch.ops.rlhf_kernels.kl_penalty, "triton": lambda: _kl_penalty_triton}
_REWARDS = {"cpu": lambda: torch.ops.rlhf_kernels.kl_shaped_rewards, "triton": lambda: _kl_shaped_rewards_triton}


def kl_penalty(logprobs, ref_logprobs, *, estimator, clamp, dtype, kernel):
    """Runs `kernel` ("cpu" or "triton"); arguments and result as functional.kl_penalty."""
    need_grad = needs_grad(logprobs, ref_logprobs)
    kl, _ = _PENALTY[kernel]()(
        *cast_on_one_thread(dtype, logprobs, ref_logprobs),
        estimator,
        None if clamp is None else float(clamp),
        need_grad,
    )
    return kl


def kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef, estimator, clamp, score_index, dtype, kernel):
    """Runs `kernel` ("cpu" or "triton"); arguments and results as functional.kl_shaped_rewards."""
    rewards, kl = _REWARDS[kernel]()(
        *cast_on_one_thread(dtype, scores, logprobs, ref_logprobs, mask),
        float(kl_coef),
        estimator,
        None if clamp is None else float(clamp),
        None if score_index is None else score_index.long().contiguous(),
    )
    if score_index is not None and kernel == "triton":
        # The kernel neither reads nor writes at an out-of-range index (the C++ kernel
        # raises): that row is NaN, not a row silently without its score. No host sync.
        out_of_range = (score_index < 0) | (score_index >= logprobs.shape[-1])
        rewards = torch.where(out_of_range[:, None], float("nan"), rewards)
    return rewards, kl
