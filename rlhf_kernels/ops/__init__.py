"""torch.library layer: fake (meta) kernels and autograd of the compiled ops.

Importing a family module registers what torch.compile and opcheck need for
that family's torch.ops.rlhf_kernels.* ops (schemas: csrc/registration.cpp).
"""

import torch


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will want a backward through an op taking `tensors` (the kernels
    then also store the per-element gradient their backward scales)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
