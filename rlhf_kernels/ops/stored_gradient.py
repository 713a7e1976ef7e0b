"""Autograd of the loss ops whose kernel stores d loss / d x in its forward (ppo, grpo).

Such an op takes (x, *constants, *options, need_grad) and returns (row_stats [B, S],
grad [B, T]), where row_stats[:, 0] is each row's weighted loss sum and grad its
per-token derivative in x. The backward is then a per-row scale of grad.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..reference.autograd import recording_backward, vjp
from .._calling_thread import one_thread
from . import register_autograd


def register(op_name: str, n_tensors: int, rows: Callable[..., torch.Tensor]) -> None:
    """Registers the autograd of `op_name` ("rlhf_kernels::name"), whose first n_tensors
    inputs are tensors (x first); rows(x, *constants, *options) is row_stats[:, 0] by the
    reference's formulas, differentiated under create_graph=True (double backward).

    The first backward hands the stored gradient itself out, scaled in place (skipped on
    CPU when every row's scale is 1, loss.backward()'s case): no [B, T] allocation and no
    pass over it, as the kernel's buffer is used once (its .data, so the saved tensor's
    version is untouched). Measured on ppo_value_loss 256 x 4096 fp32, 2 CPU threads:
    the out-of-place scale was a fresh 4 MiB buffer and one more pass. A second backward
    of the same graph (retain_graph=True) runs the kernel again for a fresh buffer (the
    same bits)."""
    op = getattr(torch.ops.rlhf_kernels, op_name.split("::")[1])

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1], *inputs[:n_tensors])
        ctx.options = inputs[n_tensors:]
        ctx.handed_out = False
        # The gradient output is never differentiated: no [B, T] of zeros for its gradient.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_row_stats, _grad_grad):
        grad, x, *constants = ctx.saved_tensors
        untouched = (None,) * (n_tensors - 1 + len(ctx.options))
        if grad_row_stats is None:  # no gradient reached row_stats (grads are not materialised)
            return (None,) + untouched
        scale = grad_row_stats[:, :1]
        if recording_backward():  # create_graph=True: differentiable, from the reference's formulas
            (grad_x,) = vjp(lambda x: rows(x, *constants, *ctx.options), [x], ctx.needs_input_grad[:1], [scale[:, 0]])
            return (grad_x,) + untouched
        if type(grad) is not torch.Tensor:  # traced (fake / functional tensors): no aliasing, no data checks
            return (scale * grad,) + untouched
        if ctx.handed_out:
            _, fresh = op(x, *constants, *ctx.options[:-1], True)
            return (scale * fresh,) + untouched
        ctx.handed_out = True
        grad = grad.data
        if grad.device.type != "cpu" or not bool((scale == 1).all()):
            one_thread(grad.mul_, scale)  # one memory pass (_calling_thread.one_thread)
        return (grad,) + untouched

    register_autograd(op_name, backward, setup_context=setup_context)
