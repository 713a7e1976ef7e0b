"""Triton kernels of token_logprobs: a row-streaming forward and a tiled backward.

Forward, one program per row, V in BLOCK_V tiles with an online max / sum-exp /
sum(e z) in the accumulation dtype (fp32; fp64 for fp64 logits); out-of-range
columns are -inf (never 0) before the max. Saves only lse and entropy per row.
Backward, one program per (row, V tile): recomputes p = exp(z - lse) and writes
    d x = (g_lp (onehot - p) - g_H p (z - (lse - H))) dz/dx
in the gradient buffer's dtype; that buffer may be the logits themselves (each
program reads its tile before writing it), which the chunked linear path uses.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# 4096 fp32 values per tile: 16 KiB of registers per row program, and V = 128k
# in 32 iterations; also a multiple of every vocabulary padding in use (64/128).
FORWARD_BLOCK_V = 4096
BACKWARD_BLOCK_V = 4096


@triton.jit
def _tanh(u):
    # exp of -2|u| never overflows; absolute error ~1e-7 near 0, which the
    # softcap multiplies into z (|z| error ~1e-7 * softcap).
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _transform(x, scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    z = x * scale
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z * inv_temperature


@triton.jit
def _transform_derivative(x, scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        t = _tanh(x * scale / softcap)
        return scale * (1.0 - t * t) * inv_temperature
    return scale * inv_temperature + 0.0 * x


@triton.jit
def _token_logprobs_forward_kernel(
    logits_ptr, labels_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
    V, stride_row, scale, softcap, inv_temperature, ignore_index,
    HAS_SOFTCAP: tl.constexpr, RETURN_ENTROPY: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    top = tl.full([], float("-inf"), ACC)
    sum_exp = tl.zeros([], ACC)
    sum_exp_z = tl.zeros([], ACC)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_range = cols < V
        x = tl.load(row_ptr + cols, mask=in_range, other=0.0).to(ACC)
        z = tl.where(in_range, _transform(x, scale, softcap, inv_temperature, HAS_SOFTCAP), float("-inf"))
        new_top = tl.maximum(top, tl.max(z, 0))
        rescale = tl.exp(top - new_top)
        e = tl.exp(z - new_top)
        sum_exp = sum_exp * rescale + tl.sum(e, 0)
        if RETURN_ENTROPY:
            # e is 0 out of range; zeroing z there too keeps 0 * -inf (NaN) out.
            sum_exp_z = sum_exp_z * rescale + tl.sum(e * tl.where(in_range, z, 0.0), 0)
        top = new_top
    lse = top + tl.log(sum_exp)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    # The label logit is read on its own, exactly, not picked out of a tile.
    x_label = tl.load(row_ptr + tl.where(valid, label, 0)).to(ACC)
    z_label = _transform(x_label, scale, softcap, inv_temperature, HAS_SOFTCAP)
    tl.store(lse_ptr + row, lse)
    tl.store(logprobs_ptr + row, tl.where(valid, z_label - lse, 0.0))
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, lse - sum_exp_z / sum_exp, 0.0))
    else:
        tl.store(entropy_ptr + row, tl.zeros([], ACC))


@triton.jit
def _token_logprobs_backward_kernel(
    logits_ptr, grad_ptr, labels_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
    V, stride_row, grad_stride_row, scale, softcap, inv_temperature, ignore_index,
    HAS_SOFTCAP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_range = cols < V
    label = tl.load(labels_ptr + row).to(tl.int64)
    x = tl.load(logits_ptr + row * stride_row + cols, mask=in_range, other=0.0).to(ACC)
    z = _transform(x, scale, softcap, inv_temperature, HAS_SOFTCAP)
    lse = tl.load(lse_ptr + row)
    p = tl.exp(z - lse)
    g = tl.load(grad_logprobs_ptr + row).to(ACC)
    dz = tl.where(cols == label, g, 0.0) - g * p
    if HAS_GRAD_ENTROPY:
        mean_z = lse - tl.load(entropy_ptr + row)
        dz -= tl.load(grad_entropy_ptr + row).to(ACC) * p * (z - mean_z)
    dx = dz * _transform_derivative(x, scale, softcap, inv_temperature, HAS_SOFTCAP)
    dx = tl.where(label != ignore_index, dx, 0.0)
    tl.store(grad_ptr + row * grad_stride_row + cols, dx.to(grad_ptr.dtype.element_ty), mask=in_range)


def _accumulation(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _options(temperature: float, softcap: Optional[float], logit_scale: float) -> dict:
    return dict(
        scale=float(logit_scale), softcap=float(softcap or 1.0), inv_temperature=1.0 / float(temperature),
        HAS_SOFTCAP=softcap is not None,
    )


def token_logprobs_forward(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, softcap: Optional[float],
    logit_scale: float, ignore_index: int, return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] (rows contiguous), labels [N] -> (logprobs, entropy, lse), each [N]
    float32 (float64 for float64 logits)."""
    N, V = logits.shape
    acc, out_dtype = _accumulation(logits.dtype)
    logprobs, entropy, lse = (torch.empty(N, dtype=out_dtype, device=logits.device) for _ in range(3))
    if N:
        _token_logprobs_forward_kernel[(N,)](
            logits, labels, logprobs, entropy, lse, V, logits.stride(0),
            ignore_index=ignore_index, RETURN_ENTROPY=return_entropy, ACC=acc,
            BLOCK_V=min(FORWARD_BLOCK_V, triton.next_power_of_2(V)),
            **_options(temperature, softcap, logit_scale),
        )
    return logprobs, entropy, lse


def token_logprobs_backward(
    grad_logprobs: torch.Tensor, grad_entropy: Optional[torch.Tensor], logits: torch.Tensor,
    labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, temperature: float,
    softcap: Optional[float], logit_scale: float, ignore_index: int, out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """d logits [N, V] into `out` (default: a new tensor of logits' dtype). `out` may be
    `logits` itself: the in-place backward that needs no second [N, V] buffer."""
    N, V = logits.shape
    acc, _ = _accumulation(logits.dtype)
    grad = torch.empty_like(logits) if out is None else out
    block = min(BACKWARD_BLOCK_V, triton.next_power_of_2(V))
    if N:
        _token_logprobs_backward_kernel[(N, triton.cdiv(V, block))](
            logits, grad, labels, lse, entropy, grad_logprobs, grad_entropy, V, logits.stride(0),
            grad.stride(0), ignore_index=ignore_index, HAS_GRAD_ENTROPY=grad_entropy is not None, ACC=acc,
            BLOCK_V=block, **_options(temperature, softcap, logit_scale),
        )
    return grad
