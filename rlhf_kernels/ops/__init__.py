"""torch.library layer: fake (meta) kernels and autograd of the compiled ops.

Importing a family module registers what torch.compile and opcheck need for
that family's torch.ops.rlhf_kernels.* ops (schemas: csrc/registration.cpp).
"""

import torch

from .._calling_thread import largest_cpu, run_for


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will want a backward through an op taking `tensors` (the kernels
    then also store the per-element gradient their backward scales)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def register_autograd(op, backward, *, setup_context) -> None:
    """torch.library.register_autograd, with the backward of a small CPU call run on the
    calling thread, as its forward is (rlhf_kernels._calling_thread; sized by the op's
    inputs and outputs, recorded in setup_context, and the incoming gradients): its torch
    ops, the chain rule's products, would otherwise wake the thread pool."""

    def sized_setup_context(ctx, inputs, output):
        ctx.largest_cpu = largest_cpu((*inputs, *(output if isinstance(output, tuple) else (output,))))
        setup_context(ctx, inputs, output)

    def sized_backward(ctx, *grads):
        return run_for(max(ctx.largest_cpu, largest_cpu(grads)), backward, ctx, *grads)

    torch.library.register_autograd(op, sized_backward, setup_context=sized_setup_context)
