"""torch.library layer of the masked statistics (gae family) on the compiled backends.

masked_sums returns float64 per-row (sum mask * x, sum mask); its backward is the
mask times the first column's gradient, so masked_mean = sums / count is
differentiable through plain torch ops. masked_whiten saves its float64 statistics
(count, mean, rstd, denominator, sum mask (x - mean)) and its backward kernel needs
only them, x and the mask. Under create_graph=True (double backward) the backward is
the reference's whitening differentiated as a graph (reference/autograd.py).
"""

from __future__ import annotations

import importlib
from typing import Optional, Union

import torch

from .. import _extension
from .._calling_thread import cast_on_one_thread
from ..reference import masked as reference
from ..reference.autograd import recording_backward, vjp
from . import register_autograd


def _triton_kernels():
    return importlib.import_module("rlhf_kernels.triton.masked")


@torch.library.custom_op("rlhf_kernels::masked_sums_triton", mutates_args=())
def _masked_sums_triton(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _triton_kernels().masked_sums(x, mask)


@torch.library.custom_op("rlhf_kernels::masked_whiten_triton", mutates_args=())
def _masked_whiten_triton(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float, fill_masked: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_kernels().masked_whiten(x, mask, shift_mean, unbiased, eps, fill_masked)


@torch.library.custom_op("rlhf_kernels::masked_whiten_backward_triton", mutates_args=())
def _masked_whiten_backward_triton(
    grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor, shift_mean: bool, fill_masked: bool
) -> torch.Tensor:
    return _triton_kernels().masked_whiten_backward(grad, x, mask, stats, shift_mean, fill_masked)


def _sums_fake(x, mask):
    return x.new_empty(x.shape[0], 2, dtype=torch.float64)


def _whiten_fake(x, mask, shift_mean, unbiased, eps, fill_masked):
    return torch.empty_like(x), x.new_empty(5, dtype=torch.float64)


def _whiten_backward_fake(grad, x, *args):
    return torch.empty_like(x)


def _sums_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _sums_backward(ctx, grad_sums):
    (mask,) = ctx.saved_tensors
    return (grad_sums[:, :1] * mask).to(mask.dtype), None


def _register(sums_op: str, whiten_op: str, whiten_backward) -> None:
    def setup_context(ctx, inputs, output):
        x, mask, shift_mean, unbiased, eps, fill_masked = inputs
        ctx.save_for_backward(x, mask, output[1])
        ctx.shift_mean, ctx.fill_masked = shift_mean, fill_masked
        ctx.options = dict(shift_mean=shift_mean, unbiased=unbiased, eps=eps, fill_masked=fill_masked)

    def backward(ctx, grad_out, _grad_stats):
        x, mask, stats = ctx.saved_tensors
        if recording_backward():  # create_graph=True: differentiable, from the reference's formulas
            (grad_x,) = vjp(
                lambda x: reference.masked_whiten(x, mask, **ctx.options), [x], ctx.needs_input_grad[:1], [grad_out]
            )
            return grad_x, None, None, None, None, None
        grad_x = whiten_backward(grad_out.contiguous(), x, mask, stats, ctx.shift_mean, ctx.fill_masked)
        return grad_x, None, None, None, None, None

    torch.library.register_fake(sums_op, _sums_fake)
    register_autograd(sums_op, _sums_backward, setup_context=_sums_setup_context)
    torch.library.register_fake(whiten_op, _whiten_fake)
    register_autograd(whiten_op, backward, setup_context=setup_context)


torch.library.register_fake("rlhf_kernels::masked_whiten_backward_triton", _whiten_backward_fake)
_register("rlhf_kernels::masked_sums_triton", "rlhf_kernels::masked_whiten_triton", _masked_whiten_backward_triton)
if _extension.LOADED:
    torch.library.register_fake("rlhf_kernels::masked_whiten_backward", _whiten_backward_fake)
    _register(
        "rlhf_kernels::masked_sums",
        "rlhf_kernels::masked_whiten",
        lambda *args: torch.ops.rlhf_kernels.masked_whiten_backward(*args),
    )

_SUMS = {"cpu": lambda: torch.ops.rlhf_kernels.masked_sums, "triton": lambda: _masked_sums_triton}
_WHITEN = {"cpu": lambda: torch.ops.rlhf_kernels.masked_whiten, "triton": lambda: _masked_whiten_triton}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: Optional[Union[int, tuple[int, ...]]], *, kernel: str
) -> torch.Tensor:
    """Runs `kernel` ("cpu" or "triton") on the [R, C] view with the reduced dims last;
    arguments and result as functional.masked_mean."""
    dtype = _compute_dtype(x)
    if dim is None:
        reduced, kept_shape = list(range(x.dim())), ()
    else:
        reduced = sorted({d % x.dim() for d in ((dim,) if isinstance(dim, int) else dim)})
        kept_shape = tuple(size for d, size in enumerate(x.shape) if d not in reduced)
    kept = [d for d in range(x.dim()) if d not in reduced]
    n_rows, columns = 1, 1
    for d in kept:
        n_rows *= x.shape[d]
    for d in reduced:
        columns *= x.shape[d]

    def rows(t: torch.Tensor) -> torch.Tensor:  # explicit sizes: an empty x has no -1 to infer
        return t.to(dtype).permute(*kept, *reduced).reshape(n_rows, columns).contiguous()

    sums = _SUMS[kernel]()(rows(x), rows(mask))
    total, count = sums[:, 0], sums[:, 1]
    mean = torch.where(count > 0, total / torch.where(count > 0, count, 1), 0)
    return mean.to(x.dtype).reshape(kept_shape)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool,
    unbiased: bool,
    eps: float,
    fill_masked: bool,
    kernel: str,
) -> torch.Tensor:
    """Runs `kernel` ("cpu" or "triton"); arguments and result as functional.masked_whiten."""
    x_in, weights = cast_on_one_thread(_compute_dtype(x), x, mask)
    out, _ = _WHITEN[kernel]()(x_in, weights, shift_mean, unbiased, eps, fill_masked)
    return out.to(x.dtype)
