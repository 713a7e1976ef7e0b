"""torch.library layer: fake (meta) kernels and autograd of the compiled ops.

Importing a family module registers what torch.compile and opcheck need for
that family's torch.ops.rlhf_kernels.* ops (schemas: csrc/registration.cpp).
"""
