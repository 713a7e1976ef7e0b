"""torch.library layer: fake (meta) kernels and autograd of the compiled ops.

Importing a family module registers what torch.compile and opcheck need for
that family's torch.ops.rlhf_kernels.* ops (schemas: csrc/registration.cpp).
"""

import torch

from .._calling_thread import run_sized


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will want a backward through an op taking `tensors` (the kernels
    then also store the per-element gradient their backward scales)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def register_autograd(op, backward, *, setup_context) -> None:
    """torch.library.register_autograd, with the backward of a small CPU call run on the
    calling thread, as its forward is (rlhf_kernels._calling_thread; sized by the
    incoming gradients and the saved tensors): its torch ops, the chain rule's
    products, would otherwise wake the thread pool."""

    def sized_backward(ctx, *grads):
        return run_sized((*grads, *ctx.saved_tensors), backward, ctx, *grads)

    torch.library.register_autograd(op, sized_backward, setup_context=setup_context)
