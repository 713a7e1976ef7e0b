"""torch.library layer of the log-prob ops on the C++ backends.

- ``rlhf_kernels::token_logprobs`` (C++, csrc/cpu/logprobs.cpp): fake kernel and
  autograd here; the backward is the C++ ``token_logprobs_backward``.
- ``rlhf_kernels::linear_logprobs`` (a Python custom op): hidden @ weight.T in token
  chunks of at most reference.logprobs.CHUNK_ELEMENTS logits, each through the C++
  kernel; its backward op recomputes every chunk, so the extra memory is one chunk.
Both save only per-row statistics (lse, entropy) for the backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension
from ..reference.logprobs import chunk_rows, compute_dtype

if _extension.LOADED:

    @torch.library.register_fake("rlhf_kernels::token_logprobs")
    def _token_logprobs_fake(logits, labels, temperature, softcap, logit_scale, ignore_index, return_entropy):
        row = logits.new_empty(logits.shape[:1], dtype=compute_dtype(logits.dtype))
        return row, torch.empty_like(row), torch.empty_like(row)

    @torch.library.register_fake("rlhf_kernels::token_logprobs_backward")
    def _token_logprobs_backward_fake(grad_logprobs, grad_entropy, logits, *args):
        return torch.empty_like(logits)

    def _token_setup_context(ctx, inputs, output):
        logits, labels, temperature, softcap, logit_scale, ignore_index, _ = inputs
        _, entropy, lse = output
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.options = (temperature, softcap, logit_scale, ignore_index)

    def _token_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        logits, labels, lse, entropy = ctx.saved_tensors
        grad_logits = torch.ops.rlhf_kernels.token_logprobs_backward(
            grad_logprobs.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
            logits, labels, lse, entropy, *ctx.options,
        )
        return grad_logits, None, None, None, None, None, None

    torch.library.register_autograd(
        "rlhf_kernels::token_logprobs", _token_backward, setup_context=_token_setup_context
    )


def token_logprobs(logits, labels, *, temperature, ignore_index, return_entropy, softcap, logit_scale):
    """Runs the compiled kernel of logits' device; shapes as functional.token_logprobs."""
    batch_shape = labels.shape
    logprobs, entropy, _ = torch.ops.rlhf_kernels.token_logprobs(
        logits.reshape(-1, logits.shape[-1]).contiguous(), labels.reshape(-1).contiguous(),
        float(temperature), None if softcap is None else float(softcap), float(logit_scale),
        ignore_index, return_entropy,
    )
    logprobs = logprobs.reshape(batch_shape)
    return (logprobs, entropy.reshape(batch_shape)) if return_entropy else logprobs


# ------------------------------------------------------------ linear_logprobs --


def _chunk_logits(hidden, weight, bias, rows):
    # In the input dtype, as the unfused model computes its logits.
    return torch.nn.functional.linear(hidden[rows], weight, bias)


@torch.library.custom_op("rlhf_kernels::linear_logprobs", mutates_args=(), device_types="cpu")
def _linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    temperature: float, softcap: Optional[float], logit_scale: float, ignore_index: int, return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows = hidden.shape[0]
    stats = [torch.empty(n_rows, dtype=compute_dtype(hidden.dtype)) for _ in range(3)]
    step = chunk_rows(n_rows, weight.shape[0])
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        outputs = torch.ops.rlhf_kernels.token_logprobs(
            _chunk_logits(hidden, weight, bias, rows), labels[rows].contiguous(), temperature, softcap,
            logit_scale, ignore_index, return_entropy,
        )
        for stat, chunk in zip(stats, outputs):
            stat[rows] = chunk
    return tuple(stats)


@_linear_logprobs.register_fake
def _(hidden, weight, bias, labels, temperature, softcap, logit_scale, ignore_index, return_entropy):
    row = hidden.new_empty(hidden.shape[:1], dtype=compute_dtype(hidden.dtype))
    return row, torch.empty_like(row), torch.empty_like(row)


@torch.library.custom_op("rlhf_kernels::linear_logprobs_backward", mutates_args=(), device_types="cpu")
def _linear_logprobs_backward(
    grad_logprobs: torch.Tensor, grad_entropy: Optional[torch.Tensor], hidden: torch.Tensor,
    weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor, lse: torch.Tensor,
    entropy: torch.Tensor, temperature: float, softcap: Optional[float], logit_scale: float,
    ignore_index: int, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias); an unneeded one is an empty tensor. d weight and
    d bias accumulate over chunks in fp32 (fp64 for fp64 inputs)."""
    dtype = compute_dtype(hidden.dtype)
    # Unneeded gradients are fresh empty tensors: custom-op outputs may not alias.
    grad_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape, dtype=dtype) if need_weight else weight.new_empty(0, dtype=dtype)
    grad_bias = torch.zeros(weight.shape[0], dtype=dtype) if need_bias else weight.new_empty(0, dtype=dtype)
    step = chunk_rows(hidden.shape[0], weight.shape[0])
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        # fp32 logits, so d logits (and with it d weight) is never rounded to bf16.
        grad_z = torch.ops.rlhf_kernels.token_logprobs_backward(
            grad_logprobs[rows].contiguous(), None if grad_entropy is None else grad_entropy[rows].contiguous(),
            _chunk_logits(hidden, weight, bias, rows).to(dtype), labels[rows].contiguous(),
            lse[rows].contiguous(), entropy[rows].contiguous(), temperature, softcap, logit_scale, ignore_index,
        )
        if need_hidden:
            grad_hidden[rows] = grad_z.to(weight.dtype) @ weight
        if need_weight:
            grad_weight.addmm_(grad_z.t(), hidden[rows].to(dtype))
        if need_bias:
            grad_bias += grad_z.sum(0)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@_linear_logprobs_backward.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy, temperature, softcap,
      logit_scale, ignore_index, need_hidden, need_weight, need_bias):
    def maybe(needed, like):
        return torch.empty_like(like) if needed else like.new_empty(0)

    return maybe(need_hidden, hidden), maybe(need_weight, weight), maybe(need_bias, weight[:, 0])


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, softcap, logit_scale, ignore_index, _ = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.options = (temperature, softcap, logit_scale, ignore_index)


def _linear_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grads = _linear_logprobs_backward(
        grad_logprobs.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
        hidden, weight, bias, labels, lse, entropy, *ctx.options, need_hidden, need_weight,
        need_bias and bias is not None,
    )
    needed = (need_hidden, need_weight, need_bias and bias is not None)
    return tuple(g if n else None for g, n in zip(grads, needed)) + (None,) * 6


_linear_logprobs.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def linear_logprobs(hidden, weight, labels, *, bias, temperature, ignore_index, return_entropy, softcap,
                    logit_scale):
    """Runs the chunked C++ path; shapes as functional.linear_logprobs."""
    batch_shape = labels.shape
    logprobs, entropy, _ = _linear_logprobs(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), float(temperature),
        None if softcap is None else float(softcap), float(logit_scale), ignore_index, return_entropy,
    )
    logprobs = logprobs.reshape(batch_shape)
    return (logprobs, entropy.reshape(batch_shape)) if return_entropy else logprobs
