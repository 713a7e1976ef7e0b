"""torch.library layer of the log-prob ops on the compiled backends (cpu, triton).

- ``rlhf_kernels::token_logprobs`` (C++, csrc/cpu/logprobs.cpp) and
  ``rlhf_kernels::token_logprobs_triton`` (a custom op around
  rlhf_kernels/triton/logprobs.py): fakes and one shared autograd formula; each
  backward is its backend's backward kernel.
- ``rlhf_kernels::linear_logprobs`` (a custom op): on triton one fused kernel that
  never writes logits (float64 excepted); on cpu hidden @ weight.T in token chunks of
  at most reference.logprobs.CHUNK_ELEMENTS logits, each through the token kernel.
  Its backward op recomputes the logits chunk by chunk, so the extra memory is one
  chunk, and d weight / d bias accumulate in fp32.
All of them save only per-row statistics (lse, entropy) for the backward. Under
create_graph=True (double backward) the backward is the reference's math differentiated
as a graph instead (reference/autograd.py): exact, unchunked.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _extension
from ..reference.autograd import recording_backward
from ..reference.logprobs import (
    LogitTransform,
    backprop_linear_chunk,
    chunk_rows,
    compute_dtype,
    linear_chunk,
    linear_logprobs_vjp,
    token_logprobs_vjp,
)
from . import register_autograd


def _n_rows(logits: torch.Tensor) -> int:
    return logits.shape[:-1].numel()


def _row_stats_like(like: torch.Tensor, n_rows: int):
    row = like.new_empty(n_rows, dtype=compute_dtype(like.dtype))
    return row, torch.empty_like(row), torch.empty_like(row)


# ------------------------------------------------------------ token kernels --
# Each backend's raw kernels: forward(logits [N, V], labels [N], temperature,
# softcap, logit_scale, ignore_index, return_entropy) -> (logprobs, entropy, lse)
# and backward(grad_logprobs, grad_entropy, logits, labels, lse, entropy,
# temperature, softcap, logit_scale, ignore_index) -> d logits.


def _triton_kernels():
    return importlib.import_module("rlhf_kernels.triton.logprobs")


def _forward_kernel(kernel: str):
    if kernel == "cpu":
        return lambda *args: torch.ops.rlhf_kernels.token_logprobs(*args, False)
    return _triton_kernels().token_logprobs_forward


def _backward_kernel(kernel: str):
    """The raw backward, for logits that are a temporary: d logits is written over them
    (no second [chunk, V] buffer) and returned."""

    def backward(grad_logprobs, grad_entropy, logits, labels, lse, entropy, *options):
        if kernel == "cpu":
            torch.ops.rlhf_kernels.token_logprobs_backward_(
                logits, grad_logprobs, grad_entropy, labels, lse, entropy, *options
            )
            return logits
        return _triton_kernels().token_logprobs_backward(
            grad_logprobs, grad_entropy, logits, labels, lse, entropy, *options, out=logits
        )

    return backward


@torch.library.custom_op("rlhf_kernels::token_logprobs_triton", mutates_args=())
def _token_logprobs_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    softcap: Optional[float],
    logit_scale: float,
    ignore_index: int,
    return_entropy: bool,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_kernels().token_logprobs_forward(
        logits, labels, temperature, softcap, logit_scale, ignore_index, return_entropy
    )


@_token_logprobs_triton.register_fake
def _(logits, labels, *args):
    return _row_stats_like(logits, _n_rows(logits))


@torch.library.custom_op("rlhf_kernels::token_logprobs_triton_backward", mutates_args=())
def _token_logprobs_triton_backward(
    grad_logprobs: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    softcap: Optional[float],
    logit_scale: float,
    ignore_index: int,
) -> torch.Tensor:
    return _triton_kernels().token_logprobs_backward(
        grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, softcap, logit_scale, ignore_index
    )


@_token_logprobs_triton_backward.register_fake
def _(grad_logprobs, grad_entropy, logits, *args):
    return torch.empty_like(logits)


@torch.library.custom_op("rlhf_kernels::token_logprobs_triton_backward_", mutates_args=("logits",))
def _token_logprobs_triton_backward_inplace(
    logits: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    softcap: Optional[float],
    logit_scale: float,
    ignore_index: int,
) -> None:
    _triton_kernels().token_logprobs_backward(
        grad_logprobs,
        grad_entropy,
        logits,
        labels,
        lse,
        entropy,
        temperature,
        softcap,
        logit_scale,
        ignore_index,
        out=logits,
    )


def _register_token_autograd(op_name: str, backward_op, inplace_backward_op) -> None:
    """d logits from the saved logits, labels, lse and entropy, through `backward_op`,
    or, for inplace_backward=True, written over the logits by `inplace_backward_op`
    (a mutating op, so autograd's version check catches any other use of them)."""

    def setup_context(ctx, inputs, output):
        logits, labels, temperature, softcap, logit_scale, ignore_index, _, inplace = inputs
        _, entropy, lse = output
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.options = (temperature, softcap, logit_scale, ignore_index)
        ctx.inplace = inplace

    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        logits, labels, lse, entropy = ctx.saved_tensors
        if recording_backward():  # create_graph=True: differentiable, from the reference's formulas
            temperature, softcap, logit_scale, ignore_index = ctx.options
            opts = LogitTransform(temperature, softcap, logit_scale, ignore_index, True)
            grad = token_logprobs_vjp(logits, labels, grad_logprobs, grad_entropy, opts, ctx.needs_input_grad[0])
            return (None if grad is None else grad.to(logits.dtype),) + (None,) * 7
        grad_logprobs = grad_logprobs.contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.contiguous()
        if ctx.inplace:
            inplace_backward_op(logits, grad_logprobs, grad_entropy, labels, lse, entropy, *ctx.options)
            # A C++ (a!) op called here does not bump the version counter by itself; the
            # bump is what makes autograd refuse logits that another node saved.
            torch.autograd.graph.increment_version(logits)
            grad_logits = logits
        else:
            grad_logits = backward_op(grad_logprobs, grad_entropy, logits, labels, lse, entropy, *ctx.options)
        return (grad_logits,) + (None,) * 7

    register_autograd(op_name, backward, setup_context=setup_context)


_register_token_autograd(
    "rlhf_kernels::token_logprobs_triton", _token_logprobs_triton_backward, _token_logprobs_triton_backward_inplace
)

if _extension.LOADED:

    @torch.library.register_fake("rlhf_kernels::token_logprobs")
    def _token_logprobs_fake(logits, labels, *args):
        return _row_stats_like(logits, _n_rows(logits))

    @torch.library.register_fake("rlhf_kernels::token_logprobs_backward")
    def _token_logprobs_backward_fake(grad_logprobs, grad_entropy, logits, *args):
        return torch.empty_like(logits)

    @torch.library.register_fake("rlhf_kernels::token_logprobs_backward_")
    def _token_logprobs_backward_inplace_fake(logits, *args):
        return None

    _register_token_autograd(
        "rlhf_kernels::token_logprobs",
        torch.ops.rlhf_kernels.token_logprobs_backward,
        torch.ops.rlhf_kernels.token_logprobs_backward_,
    )

_TOKEN_OPS = {"cpu": lambda: torch.ops.rlhf_kernels.token_logprobs, "triton": lambda: _token_logprobs_triton}


def _kernel_logits(logits: torch.Tensor, kernel: str) -> torch.Tensor:
    """What the kernel reads. The C++ kernel takes contiguous [N, V]. The Triton kernels
    take [N, V] or [B, T, V] at any row strides, so the way every trainer calls them,
    logits[:, :-1] of [B, T, V], is read (and, with inplace_backward, written) in place
    instead of copied; only a last dim that is not contiguous, or leading dims that no
    [B, T] view describes, cost a copy."""
    V = logits.shape[-1]
    if kernel == "cpu":
        return logits.reshape(-1, V).contiguous()
    if logits.stride(-1) != 1 and V > 1:
        logits = logits.contiguous()
    if logits.dim() > 3:
        logits = logits.reshape(-1, logits.shape[-2], V)
    return logits.reshape(1, V) if logits.dim() == 1 else logits


def token_logprobs(
    logits, labels, *, temperature, ignore_index, return_entropy, softcap, logit_scale, inplace_backward, kernel
):
    """Runs `kernel` ("cpu" or "triton"); shapes as functional.token_logprobs."""
    batch_shape = labels.shape
    logprobs, entropy, _ = _TOKEN_OPS[kernel]()(
        _kernel_logits(logits, kernel),
        labels.reshape(-1).contiguous(),
        float(temperature),
        None if softcap is None else float(softcap),
        float(logit_scale),
        ignore_index,
        return_entropy,
        inplace_backward,
    )
    logprobs = logprobs.reshape(batch_shape)
    return (logprobs, entropy.reshape(batch_shape)) if return_entropy else logprobs


# ------------------------------------------------------------ linear_logprobs --


@torch.library.custom_op("rlhf_kernels::linear_logprobs", mutates_args=())
def _linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    temperature: float,
    softcap: Optional[float],
    logit_scale: float,
    ignore_index: int,
    return_entropy: bool,
    kernel: str,
    batch_invariant: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if kernel == "triton" and hidden.dtype != torch.float64:
        # One fused kernel, with or without autograd, so log-probs taken under no_grad
        # (old policy, reference) equal the ones trained on, bit for bit.
        return _triton_kernels().linear_logprobs_forward(
            hidden.contiguous(),
            weight.contiguous(),
            bias,
            labels.contiguous(),
            temperature,
            softcap,
            logit_scale,
            ignore_index,
            return_entropy,
            batch_invariant,
        )
    n_rows = hidden.shape[0]
    forward = _forward_kernel(kernel)
    stats = _row_stats_like(hidden, n_rows)
    step = chunk_rows(n_rows, weight.shape[0], hidden.device)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        outputs = forward(
            linear_chunk(hidden, weight, bias, rows, batch_invariant),
            labels[rows].contiguous(),
            temperature,
            softcap,
            logit_scale,
            ignore_index,
            return_entropy,
        )
        for stat, chunk in zip(stats, outputs):
            stat[rows] = chunk
    return stats


@_linear_logprobs.register_fake
def _(hidden, *args):
    return _row_stats_like(hidden, hidden.shape[0])


@torch.library.custom_op("rlhf_kernels::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward(
    grad_logprobs: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    softcap: Optional[float],
    logit_scale: float,
    ignore_index: int,
    kernel: str,
    batch_invariant: bool,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias); an unneeded one is an empty tensor."""
    dtype = compute_dtype(hidden.dtype)
    backward = _backward_kernel(kernel)
    # Unneeded gradients are fresh empty tensors: custom-op outputs may not alias.
    grad_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros_like(weight, dtype=dtype) if need_weight else weight.new_empty(0, dtype=dtype)
    grad_bias = weight.new_zeros(weight.shape[0], dtype=dtype) if need_bias else weight.new_empty(0, dtype=dtype)
    step = chunk_rows(hidden.shape[0], weight.shape[0], hidden.device)
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        # fp32 logits, so d logits (and with it d weight) is never rounded to bf16.
        grad_z = backward(
            grad_logprobs[rows].contiguous(),
            None if grad_entropy is None else grad_entropy[rows].contiguous(),
            linear_chunk(hidden, weight, bias, rows, batch_invariant).to(dtype),
            labels[rows].contiguous(),
            lse[rows].contiguous(),
            entropy[rows].contiguous(),
            temperature,
            softcap,
            logit_scale,
            ignore_index,
        )
        backprop_linear_chunk(
            grad_z,
            hidden,
            weight,
            rows,
            grad_hidden if need_hidden else None,
            grad_weight if need_weight else None,
            grad_bias if need_bias else None,
            batch_invariant,
        )
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@_linear_logprobs_backward.register_fake
def _(
    grad_logprobs,
    grad_entropy,
    hidden,
    weight,
    bias,
    labels,
    lse,
    entropy,
    temperature,
    softcap,
    logit_scale,
    ignore_index,
    kernel,
    batch_invariant,
    need_hidden,
    need_weight,
    need_bias,
):
    def maybe(needed, like):
        return torch.empty_like(like) if needed else like.new_empty(0)

    return maybe(need_hidden, hidden), maybe(need_weight, weight), maybe(need_bias, weight[:, 0])


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, softcap, logit_scale, ignore_index, _, kernel, batch_invariant = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.options = (temperature, softcap, logit_scale, ignore_index, kernel, batch_invariant)


def _linear_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    needed = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None)
    if recording_backward():  # create_graph=True: differentiable, from the reference's formulas
        temperature, softcap, logit_scale, ignore_index, _kernel, batch_invariant = ctx.options
        opts = LogitTransform(temperature, softcap, logit_scale, ignore_index, True)
        grads = linear_logprobs_vjp(
            hidden, weight, bias, labels, grad_logprobs, grad_entropy, opts, batch_invariant, needed
        )
        grads = [None if g is None else g.to(x.dtype) for g, x in zip(grads, (hidden, weight, bias))]
        return tuple(grads) + (None,) * 8
    grads = _linear_logprobs_backward(
        grad_logprobs.contiguous(),
        None if grad_entropy is None else grad_entropy.contiguous(),
        hidden,
        weight,
        bias,
        labels,
        lse,
        entropy,
        *ctx.options,
        *needed,
    )
    return tuple(g if n else None for g, n in zip(grads, needed)) + (None,) * 8


_linear_logprobs.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def linear_logprobs(
    hidden,
    weight,
    labels,
    *,
    bias,
    temperature,
    ignore_index,
    return_entropy,
    softcap,
    logit_scale,
    kernel,
    batch_invariant=False,
):
    """Runs the chunked path on `kernel` ("cpu" or "triton"); shapes as functional.linear_logprobs."""
    batch_shape = labels.shape
    logprobs, entropy, _ = _linear_logprobs(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        labels.reshape(-1),
        float(temperature),
        None if softcap is None else float(softcap),
        float(logit_scale),
        ignore_index,
        return_entropy,
        kernel,
        batch_invariant,
    )
    logprobs = logprobs.reshape(batch_shape)
    return (logprobs, entropy.reshape(batch_shape)) if return_entropy else logprobs
