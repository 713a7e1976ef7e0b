"""Losses on the linear log-prob path whose gradient is finished in the forward.

linear_logprobs cannot know d loss / d logprob before its backward, so its backward
recomputes each chunk's logits: four GEMMs where the unfused model's forward +
backward does three. A loss that is a sum of terms over groups of rows (a DPO pair's
two sequences) can finish each group's gradient while the group's logits are still in
memory: per chunk of whole groups, the logits GEMM, the token kernel, d term / d logprob
by autograd over the chunk's [rows, T] log-probs, the token kernel's backward written
over the logits, then d hidden and d weight: three GEMMs, and one chunk of logits in
memory. The loss's backward is then a scale of the stored gradients (Liger's fused
linear losses work the same way).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..reference.autograd import recording_backward, vjp
from ..reference.logprobs import backprop_linear_chunk, compute_dtype, linear_chunk
from .logprobs import _backward_kernel, _forward_kernel


class _StoredGradients(torch.autograd.Function):
    """loss, with d loss / d hidden and d loss / d weight computed already.

    The first backward hands the stored gradients out, scaled in place unless the scale
    is 1 (loss.backward()), and drops its own reference, so autograd's accumulation takes
    them as .grad without a copy (saved for backward they would be cloned: one more
    [V, H] d weight at the peak). A second backward of the same graph (retain_graph) or a
    recorded one (create_graph=True: double backward) differentiates recompute(hidden,
    weight), a differentiable route to the same loss."""

    @staticmethod
    def forward(ctx, hidden, weight, loss, grad_hidden, grad_weight, recompute):
        ctx.save_for_backward(hidden, weight)
        ctx.gradients = [grad_hidden, grad_weight]
        ctx.recompute = recompute
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight = ctx.saved_tensors
        untouched = (None, None, None, None)
        if recording_backward() or ctx.gradients is None:
            grads = vjp(ctx.recompute, [hidden, weight], ctx.needs_input_grad[:2], [grad_loss])
            return (*grads, *untouched)
        grads = [g if need else None for g, need in zip(ctx.gradients, ctx.needs_input_grad[:2])]
        ctx.gradients = None
        if not (grad_loss.device.type == "cpu" and bool(grad_loss == 1)):
            for g in grads:
                if g is not None:
                    g.mul_(grad_loss.to(g.dtype))
        return (*grads, *untouched)


def grouped_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunks: Sequence[torch.Tensor],
    chunk_loss: Callable[[int, torch.Tensor, Optional[torch.Tensor]], torch.Tensor],
    recompute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    kernel: str,
    temperature: float,
    ignore_index: int = -100,
    batch_invariant: bool = False,
    return_entropy: bool = False,
    batch_loss: Optional[Callable[[], torch.Tensor]] = None,
) -> torch.Tensor:
    """sum_i chunk_loss(i, logprobs, entropy of chunks[i]) with its gradient in hidden and weight.

    hidden [R, T, H], weight [V, H], labels [R, T] (ignore_index where a position does
    not count); chunks: row indices [r_i] into R that cover every row once, each holding
    whole groups, so that chunk_loss(i, logprobs [r_i, T], entropy [r_i, T] or None) (a
    0-dim tensor, differentiable in logprobs; entropy, with return_entropy, is a constant)
    depends on that chunk's rows only; the terms are summed in fp32 (fp64 for fp64 hidden
    states). `kernel` is the token kernel ("cpu" or "triton"). batch_loss: the value
    returned instead of that sum, called after the chunks (the same loss from the whole
    batch's log-probs, which chunk_loss can collect). recompute(hidden, weight) gives the
    same loss by a differentiable route, for a double backward. Returns the loss (0-dim,
    differentiable in hidden and weight; its backward scales the gradients computed here)."""
    R, T, H = hidden.shape
    need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
    forward, backward = _forward_kernel(kernel), _backward_kernel(kernel)
    dtype = compute_dtype(hidden.dtype)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros_like(weight, dtype=dtype) if need_weight else weight.new_empty(0)
    total = torch.zeros((), dtype=dtype, device=hidden.device)
    flat_labels = labels.reshape(R, T)
    with torch.no_grad():
        for i, rows in enumerate(chunks):
            chunk_hidden = hidden.detach()[rows].reshape(-1, H)
            chunk_labels = flat_labels[rows].reshape(-1).contiguous()
            everything = slice(None)
            logits = linear_chunk(chunk_hidden, weight.detach(), None, everything, batch_invariant)
            logprobs, entropy, lse = forward(logits, chunk_labels, temperature, None, 1.0, ignore_index, return_entropy)
            with torch.enable_grad():
                chunk_logprobs = logprobs.reshape(len(rows), T).requires_grad_()
                term = chunk_loss(i, chunk_logprobs, entropy.reshape(len(rows), T) if return_entropy else None)
                (grad_logprobs,) = torch.autograd.grad(term, chunk_logprobs)
            total += term.detach()
            grad_z = backward(
                grad_logprobs.reshape(-1).to(dtype).contiguous(), None, logits.to(dtype), chunk_labels, lse, entropy,
                temperature, None, 1.0, ignore_index,
            )  # fmt: skip
            chunk_grad_hidden = torch.empty_like(chunk_hidden) if need_hidden else None
            backprop_linear_chunk(
                grad_z, chunk_hidden, weight.detach(), everything, chunk_grad_hidden,
                grad_weight if need_weight else None, None, batch_invariant,
            )  # fmt: skip
            if need_hidden:
                grad_hidden[rows] = chunk_grad_hidden.reshape(len(rows), T, H)
        loss = total if batch_loss is None else batch_loss()
    return _StoredGradients.apply(hidden, weight, loss, grad_hidden, grad_weight.to(weight.dtype), recompute)


def pair_chunks(n_pairs: int, pairs_per_chunk: int, device: Optional[torch.device] = None) -> list[torch.Tensor]:
    """Row indices of chunks of whole pairs for rows laid out as [chosen B | rejected B]:
    chunk k holds chosen rows p0..p1-1 then their rejected rows B+p0..B+p1-1."""
    chunks = []
    for start in range(0, n_pairs, pairs_per_chunk):
        chosen = torch.arange(start, min(start + pairs_per_chunk, n_pairs), device=device)
        chunks.append(torch.cat([chosen, chosen + n_pairs]))
    return chunks
