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
    logits_ptr,
    labels_ptr,
    logprobs_ptr,
    entropy_ptr,
    lse_ptr,
    V,
    stride_row,
    scale,
    softcap,
    inv_temperature,
    ignore_index,
    HAS_SOFTCAP: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
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
    logits_ptr,
    grad_ptr,
    labels_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    V,
    stride_row,
    grad_stride_row,
    scale,
    softcap,
    inv_temperature,
    ignore_index,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
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
        scale=float(logit_scale),
        softcap=float(softcap or 1.0),
        inv_temperature=1.0 / float(temperature),
        HAS_SOFTCAP=softcap is not None,
    )


def token_logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    softcap: Optional[float],
    logit_scale: float,
    ignore_index: int,
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] (rows contiguous), labels [N] -> (logprobs, entropy, lse), each [N]
    float32 (float64 for float64 logits)."""
    N, V = logits.shape
    acc, out_dtype = _accumulation(logits.dtype)
    logprobs, entropy, lse = (torch.empty(N, dtype=out_dtype, device=logits.device) for _ in range(3))
    if N:
        _token_logprobs_forward_kernel[(N,)](
            logits,
            labels,
            logprobs,
            entropy,
            lse,
            V,
            logits.stride(0),
            ignore_index=ignore_index,
            RETURN_ENTROPY=return_entropy,
            ACC=acc,
            BLOCK_V=min(FORWARD_BLOCK_V, triton.next_power_of_2(V)),
            **_options(temperature, softcap, logit_scale),
        )
    return logprobs, entropy, lse


def token_logprobs_backward(
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
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """d logits [N, V] into `out` (default: a new tensor of logits' dtype). `out` may be
    `logits` itself: the in-place backward that needs no second [N, V] buffer."""
    N, V = logits.shape
    acc, _ = _accumulation(logits.dtype)
    grad = torch.empty_like(logits) if out is None else out
    block = min(BACKWARD_BLOCK_V, triton.next_power_of_2(V))
    if N:
        _token_logprobs_backward_kernel[(N, triton.cdiv(V, block))](
            logits,
            grad,
            labels,
            lse,
            entropy,
            grad_logprobs,
            grad_entropy,
            V,
            logits.stride(0),
            grad.stride(0),
            ignore_index=ignore_index,
            HAS_GRAD_ENTROPY=grad_entropy is not None,
            ACC=acc,
            BLOCK_V=block,
            **_options(temperature, softcap, logit_scale),
        )
    return grad


@triton.jit
def _linear_logprobs_forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    logprobs_ptr,
    entropy_ptr,
    lse_ptr,
    N,
    V,
    H,
    stride_hidden,
    stride_weight,
    scale,
    softcap,
    inv_temperature,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT_INPUTS: tl.constexpr,
    ROUND_LOGITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program per BLOCK_N rows: logits tiles [BLOCK_N, BLOCK_V] = hidden @ weight^T
    accumulated in fp32 over H, consumed at once by the online max / sum-exp / sum(e z)
    and the label pick; no logits ever reach memory."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    top = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sum_exp = tl.zeros([BLOCK_N], tl.float32)
    sum_exp_z = tl.zeros([BLOCK_N], tl.float32)
    label_z = tl.zeros([BLOCK_N], tl.float32)
    hidden_rows = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hidden
    for v_start in range(0, V, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        weight_rows = weight_ptr + cols.to(tl.int64)[:, None] * stride_weight
        logits = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for h_start in range(0, H, BLOCK_H):
            hs = h_start + tl.arange(0, BLOCK_H)
            h_ok = hs < H
            a = tl.load(hidden_rows + hs[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            b = tl.load(weight_rows + hs[None, :], mask=col_ok[:, None] & h_ok[None, :], other=0.0)
            if UPCAST_DOT_INPUTS:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            logits = tl.dot(a, tl.trans(b), logits, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            logits += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ROUND_LOGITS:
            # The unfused model's logits are hidden @ weight^T rounded to the input dtype;
            # so are the reference's and the backward's recomputed ones.
            logits = logits.to(hidden_ptr.dtype.element_ty).to(tl.float32)
        z = tl.where(col_ok[None, :], _transform(logits, scale, softcap, inv_temperature, HAS_SOFTCAP), float("-inf"))
        new_top = tl.maximum(top, tl.max(z, 1))
        rescale = tl.exp(top - new_top)
        e = tl.exp(z - new_top[:, None])
        sum_exp = sum_exp * rescale + tl.sum(e, 1)
        if RETURN_ENTROPY:
            sum_exp_z = sum_exp_z * rescale + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), 1)
        top = new_top
        # The label's logit is the tile's own fp32 value, the one the sums used.
        label_z += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
    lse = top + tl.log(sum_exp)
    valid = labels != ignore_index
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logprobs_ptr + rows, tl.where(valid, label_z - lse, 0.0), mask=row_ok)
    entropy = tl.where(valid, lse - sum_exp_z / sum_exp, 0.0) if RETURN_ENTROPY else tl.zeros([BLOCK_N], tl.float32)
    tl.store(entropy_ptr + rows, entropy, mask=row_ok)


def _linear_blocks(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H). The interpreter (CPU tensors) runs the smallest
    tl.dot tiles, 16, to stay fast; on a GPU 64 x 128 tiles over 64-wide slices of H
    (the usual Hopper/Ampere matmul tile; not yet tuned on a GPU)."""
    return (16, 32, 16) if device.type == "cpu" else (64, 128, 64)


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    temperature: float,
    softcap: Optional[float],
    logit_scale: float,
    ignore_index: int,
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: hidden [N, H] (rows contiguous), weight [V, H] (rows contiguous),
    bias [V] or None, labels [N] -> (logprobs, entropy, lse), each [N] float32; never
    materialises a logits tensor. fp16/bf16/fp32 inputs (fp32 dots in IEEE precision,
    not TF32: correctness first); 16-bit logits are rounded to the input dtype, as the
    unfused model's are, before the fp32 epilogue."""
    N, H = hidden.shape
    V = weight.shape[0]
    logprobs, entropy, lse = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3))
    block_n, block_v, block_h = _linear_blocks(hidden.device)
    if N:
        _linear_logprobs_forward_kernel[(triton.cdiv(N, block_n),)](
            hidden,
            weight,
            bias if bias is not None else weight,
            labels,
            logprobs,
            entropy,
            lse,
            N,
            V,
            H,
            hidden.stride(0),
            weight.stride(0),
            ignore_index=ignore_index,
            HAS_BIAS=bias is not None,
            RETURN_ENTROPY=return_entropy,
            DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
            # Triton's interpreter (CPU tensors) multiplies bf16 tiles wrongly (3.9: errors
            # of 1e10 on a 16 x 16 tile); upcast there, feed the tensor cores bf16 on a GPU.
            UPCAST_DOT_INPUTS=hidden.device.type == "cpu",
            ROUND_LOGITS=hidden.dtype != torch.float32,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
            BLOCK_H=block_h,
            **_options(temperature, softcap, logit_scale),
        )
    return logprobs, entropy, lse
