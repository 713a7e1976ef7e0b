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

from ._launch import launch, row_block, widest_block

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
    return scale * inv_temperature + tl.zeros_like(x)  # not 0 * x: x may be -inf


@triton.jit
def _online_update(top, sum_exp, sum_exp_dz, z, AXIS: tl.constexpr, RETURN_ENTROPY: tl.constexpr):
    """One tile of the online log-sum-exp over `z` along AXIS (0 for a [BLOCK] tile, 1
    for [rows, BLOCK]): returns the running max m, S0 = sum e^(z - m) and
    S1 = sum e^(z - m) (z - m), so that lse = m + log S0 and entropy = log S0 - S1 / S0.
    S1 is kept relative to the max because sum e^(z - m) z overflows when a whole tile
    sits at finfo.min (a masked vocabulary); its rescale uses d e^d (d = m_old - m_new),
    which stays in [-1/e, 0]. -inf logits are exact: while everything seen is -inf the
    shift is 0, not -inf (exp(-inf - -inf) is NaN), and a zero weight never multiplies
    a -inf (0 * -inf)."""
    new_top = tl.maximum(top, tl.max(z, AXIS))
    shift = tl.where(new_top == float("-inf"), 0.0, new_top)
    old_shift = tl.where(top == float("-inf"), shift, top)
    rescale = tl.exp(top - shift)
    if AXIS == 0:
        dz = z - shift
    else:
        dz = z - shift[:, None]
    e = tl.exp(dz)
    sum_exp_rescaled = sum_exp * rescale
    if RETURN_ENTROPY:
        drift = rescale * (old_shift - shift)
        sum_exp_dz = sum_exp_dz * rescale + drift * sum_exp + tl.sum(tl.where(e > 0, e * dz, 0.0), AXIS)
    return new_top, sum_exp_rescaled + tl.sum(e, AXIS), sum_exp_dz


@triton.jit
def _row_offset(row, rows_per_group, group_stride, row_stride):
    # Row r of a [groups, rows_per_group, V] view: sliced logits (logits[:, :-1]) are
    # read in place, never copied to make them contiguous.
    return (row // rows_per_group) * group_stride + (row % rows_per_group) * row_stride


@triton.jit
def _token_logprobs_forward_kernel(
    logits_ptr,
    labels_ptr,
    logprobs_ptr,
    entropy_ptr,
    lse_ptr,
    V,
    rows_per_group,
    group_stride,
    row_stride,
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
    row_ptr = logits_ptr + _row_offset(row, rows_per_group, group_stride, row_stride)
    top = tl.full([], float("-inf"), ACC)
    sum_exp = tl.zeros([], ACC)
    sum_exp_dz = tl.zeros([], ACC)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_range = cols < V
        x = tl.load(row_ptr + cols, mask=in_range, other=0.0).to(ACC)
        z = tl.where(in_range, _transform(x, scale, softcap, inv_temperature, HAS_SOFTCAP), float("-inf"))
        top, sum_exp, sum_exp_dz = _online_update(top, sum_exp, sum_exp_dz, z, 0, RETURN_ENTROPY)
    lse = top + tl.log(sum_exp)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    # An out-of-range label is never read (no out-of-bounds access, even where the
    # host-side check is skipped, e.g. under torch.compile): its log-prob is NaN.
    in_vocab = (label >= 0) & (label < V)
    # The label logit is read on its own, exactly, not picked out of a tile.
    x_label = tl.load(row_ptr + tl.where(in_vocab, label, 0)).to(ACC)
    z_label = tl.where(in_vocab, _transform(x_label, scale, softcap, inv_temperature, HAS_SOFTCAP), float("nan"))
    tl.store(lse_ptr + row, lse)
    tl.store(logprobs_ptr + row, tl.where(valid, z_label - lse, 0.0))
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, tl.log(sum_exp) - sum_exp_dz / sum_exp, 0.0))
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
    rows_per_group,
    group_stride,
    row_stride,
    grad_group_stride,
    grad_row_stride,
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
    x = tl.load(
        logits_ptr + _row_offset(row, rows_per_group, group_stride, row_stride) + cols, mask=in_range, other=0.0
    ).to(ACC)
    z = _transform(x, scale, softcap, inv_temperature, HAS_SOFTCAP)
    lse = tl.load(lse_ptr + row)
    p = tl.exp(z - lse)
    g = tl.load(grad_logprobs_ptr + row).to(ACC)
    dz = tl.where(cols == label, g, 0.0) - g * p
    if HAS_GRAD_ENTROPY:
        mean_z = lse - tl.load(entropy_ptr + row)
        # p = 0 where z = -inf (a masked vocabulary): the term is 0, not 0 * -inf.
        dz -= tl.load(grad_entropy_ptr + row).to(ACC) * tl.where(p > 0, p * (z - mean_z), 0.0)
    dx = dz * _transform_derivative(x, scale, softcap, inv_temperature, HAS_SOFTCAP)
    in_vocab = (label >= 0) & (label < V)
    dx = tl.where(label != ignore_index, tl.where(in_vocab, dx, float("nan")), 0.0)
    grad_row = grad_ptr + _row_offset(row, rows_per_group, grad_group_stride, grad_row_stride)
    tl.store(grad_row + cols, dx.to(grad_ptr.dtype.element_ty), mask=in_range)


def _accumulation(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _options(temperature: float, softcap: Optional[float], logit_scale: float) -> dict:
    return dict(
        scale=float(logit_scale),
        softcap=float(softcap or 1.0),
        inv_temperature=1.0 / float(temperature),
        HAS_SOFTCAP=softcap is not None,
    )


def _row_layout(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, rows_per_group, group_stride, row_stride) of x [V], [N, V] or [B, T, V]
    (last dim contiguous), seen as [groups, rows_per_group, V]: rows of a 2-D tensor at
    any row stride, and 3-D slices such as logits[:, :-1] of [B, T, V], which no single
    row stride describes, are both read in place."""
    if x.dim() > 3 or (x.stride(-1) != 1 and x.shape[-1] > 1):
        raise ValueError(f"logits must be [V], [N, V] or [B, T, V], last dim contiguous; got strides {x.stride()}")
    if x.dim() == 3:
        groups, per_group = x.shape[0], x.shape[1]
        return groups * per_group, max(per_group, 1), x.stride(0), x.stride(1)
    rows = x.shape[0] if x.dim() == 2 else 1
    return rows, max(rows, 1), 0, x.stride(0) if x.dim() == 2 else 0


def token_logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    softcap: Optional[float],
    logit_scale: float,
    ignore_index: int,
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [V], [N, V] or [B, T, V] (last dim contiguous, rows at any strides: see _row_layout),
    labels [N] with N the product of the leading dims -> (logprobs, entropy, lse), each
    [N] float32 (float64 for float64 logits)."""
    V = logits.shape[-1]
    N, *layout = _row_layout(logits)
    acc, out_dtype = _accumulation(logits.dtype)
    logprobs, entropy, lse = (torch.empty(N, dtype=out_dtype, device=logits.device) for _ in range(3))
    if N:
        launch(
            _token_logprobs_forward_kernel,
            (N,),
            logits,
            labels,
            logprobs,
            entropy,
            lse,
            V,
            *layout,
            ignore_index=ignore_index,
            RETURN_ENTROPY=return_entropy,
            ACC=acc,
            BLOCK_V=row_block(V, widest_block(FORWARD_BLOCK_V, logits.dtype)),
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
    """d logits (logits' shape) into `out` (default: a new tensor of logits' shape and dtype).
    `out` may be `logits` itself, strided views included: the in-place backward that
    needs no second [N, V] buffer."""
    V = logits.shape[-1]
    N, *layout = _row_layout(logits)
    acc, _ = _accumulation(logits.dtype)
    grad = torch.empty_like(logits) if out is None else out
    _, _, grad_group_stride, grad_row_stride = _row_layout(grad)
    block = row_block(V, widest_block(BACKWARD_BLOCK_V, logits.dtype))
    if N:
        launch(
            _token_logprobs_backward_kernel,
            (N, triton.cdiv(V, block)),
            logits,
            grad,
            labels,
            lse,
            entropy,
            grad_logprobs,
            grad_entropy,
            V,
            *layout,
            grad_group_stride,
            grad_row_stride,
            ignore_index=ignore_index,
            HAS_GRAD_ENTROPY=grad_entropy is not None,
            ACC=acc,
            BLOCK_V=block,
            **_options(temperature, softcap, logit_scale),
        )
    return grad


# N is not specialized: Triton would compile N = 1 as a constant and add a divisibility
# hint for N % 16 == 0, so N = 1, 7 and 64 would run three different binaries; one binary
# for every N keeps a row's arithmetic independent of the batch it comes in (the batch-
# invariant mode; N only masks rows and addresses partials). tests/test_triton_aot.py.
@triton.jit(do_not_specialize=["N"])
def _linear_logprobs_forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    partials_ptr,
    N,
    V,
    H,
    v_per_split,
    stride_hidden,
    stride_weight,
    stride_bias,
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
    """Program (i, s): rows [i BLOCK_N, (i+1) BLOCK_N) over the vocabulary split
    s, columns [s v_per_split, (s+1) v_per_split). Logits tiles [BLOCK_N, BLOCK_V] =
    hidden @ weight^T accumulated in fp32 over H are consumed at once by the online
    (max, sum-exp, sum-exp dz) and the label pick; no logits ever reach memory. Writes
    the split's partials [4, N] (max, S0, S1, label logit) at partials[s]; the launcher
    combines the splits."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1).to(tl.int64)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    top = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sum_exp = tl.zeros([BLOCK_N], tl.float32)
    sum_exp_dz = tl.zeros([BLOCK_N], tl.float32)
    label_z = tl.zeros([BLOCK_N], tl.float32)
    hidden_rows = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hidden
    v_begin = split * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, V)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        weight_rows = weight_ptr + cols[:, None] * stride_weight
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
            logits += tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ROUND_LOGITS:
            # The unfused model's logits are hidden @ weight^T rounded to the input dtype;
            # so are the reference's and the backward's recomputed ones.
            logits = logits.to(hidden_ptr.dtype.element_ty).to(tl.float32)
        z = tl.where(col_ok[None, :], _transform(logits, scale, softcap, inv_temperature, HAS_SOFTCAP), float("-inf"))
        top, sum_exp, sum_exp_dz = _online_update(top, sum_exp, sum_exp_dz, z, 1, RETURN_ENTROPY)
        # The label's logit is the tile's own fp32 value, the one the sums used.
        label_z += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
    out = partials_ptr + split * 4 * N + rows
    tl.store(out, top, mask=row_ok)
    tl.store(out + N, sum_exp, mask=row_ok)
    tl.store(out + 2 * N, sum_exp_dz, mask=row_ok)
    tl.store(out + 3 * N, label_z, mask=row_ok)


def _linear_config(device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps) of the fused forward. The interpreter (CPU
    tensors) runs the smallest tl.dot tiles, 16, to stay fast. On a GPU, 16-bit inputs
    take 64 x 128 logits tiles over 64-wide slices of H at 8 warps: 142 registers on
    sm_90 and 176 on sm_80 (at 4 warps: 254-255, the ceiling, with no headroom); fp32
    (IEEE or TF32 dots) takes 64 x 64 x 32 at 8 warps: 128 registers on sm_80, where
    64 x 128 x 32 spilled. Numbers from tests/triton_aot.py (bench/results/
    triton-resources.md); tile sizes not yet tuned on a GPU."""
    if device.type == "cpu":
        return 16, 32, 16, 4
    if dtype == torch.float32:
        return 64, 64, 32, 8
    return 64, 128, 64, 8


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own matmul setting: TF32 tensor cores when
    torch.backends.cuda.matmul.allow_tf32 is on or torch.get_float32_matmul_precision()
    is "high"/"medium", IEEE fp32 (no tensor cores, ~8x slower on H100) otherwise, the
    default. 16-bit inputs always take the tensor cores with fp32 accumulation."""
    if dtype != torch.float32:
        return "tf32"  # unused by Triton for bf16/fp16 operands
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


# Batch-invariant mode: a fixed number of vocabulary tiles per split (64 x 128 = 8192
# columns), so the merge of a row's partials never depends on N.
INVARIANT_TILES_PER_SPLIT = 64


def _vocab_splits(n_row_blocks: int, v_tiles: int, device: torch.device, batch_invariant: bool = False) -> int:
    """How many programs share one row block's vocabulary. Small N (generation-time
    log-probs, short DPO batches) gives fewer row blocks than the GPU has SMs: then V is
    split so that about 2 programs per SM run (an H100 has 132 SMs; N = 1024 at
    BLOCK_N = 64 is 16 row blocks, 12% of the machine unsplit). The interpreter (CPU
    tensors) assumes 4 SMs so that the tests exercise the split path; meta tensors (the
    AOT gate) an H100. In batch-invariant mode the splits depend on V only."""
    if batch_invariant:
        return triton.cdiv(v_tiles, INVARIANT_TILES_PER_SPLIT)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4 if device.type == "cpu" else 132
    return max(1, min(triton.cdiv(2 * sms, max(n_row_blocks, 1)), v_tiles))  # N = 0: no row block


def _combine_vocab_splits(
    partials: torch.Tensor, labels: torch.Tensor, V: int, ignore_index: int, return_entropy: bool
):
    """partials [S, 4, N] (max, S0 = sum e^(z - max), S1 = sum e^(z - max)(z - max),
    label logit) of S vocabulary splits -> (logprobs, entropy, lse), each [N] float32;
    the same merge as _online_update, -inf-safe (a split can be all masked)."""
    # Splits innermost, so every row's merge is one contiguous reduction of S values: the
    # same arithmetic for every row whatever N (a reduction over dim 0 of [S, N] is
    # vectorised across N and its order changed with N).
    top, sum_exp, sum_exp_dz, label_z = partials.permute(1, 2, 0).contiguous().unbind(0)
    best = top.max(-1).values
    shift = torch.where(best == float("-inf"), torch.zeros_like(best), best)
    weight = torch.exp(top - shift[:, None])
    total = (weight * sum_exp).sum(-1)
    lse = best + torch.log(total)
    valid = labels != ignore_index
    in_vocab = (labels >= 0) & (labels < V)
    label_z = torch.where(in_vocab, label_z.sum(-1), torch.full_like(lse, float("nan")))
    zero = torch.zeros_like(lse)
    logprobs = torch.where(valid, label_z - lse, zero)
    if not return_entropy:
        return logprobs, zero, lse
    drift = torch.where(weight > 0, weight * (top - shift[:, None]), torch.zeros_like(weight))
    centered = (weight * sum_exp_dz + drift * sum_exp).sum(-1)
    entropy = torch.where(valid, torch.log(total) - centered / total, zero)
    return logprobs, entropy, lse


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
    batch_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: hidden [N, H] (rows contiguous), weight [V, H] (rows contiguous),
    bias [V] (any stride) or None, labels [N] -> (logprobs, entropy, lse), each [N]
    float32; never materialises a logits tensor. fp16/bf16/fp32 inputs (fp32 dots in
    IEEE precision or TF32 as torch's matmul setting says: _dot_precision); 16-bit
    logits are rounded to the input dtype, as the unfused model's are, before the fp32
    epilogue. An out-of-range label gives NaN."""
    N, H = hidden.shape
    V = weight.shape[0]
    block_n, block_v, block_h, num_warps = _linear_config(hidden.device, hidden.dtype)
    row_blocks = triton.cdiv(N, block_n)
    v_tiles = triton.cdiv(V, block_v)
    splits = _vocab_splits(row_blocks, v_tiles, hidden.device, batch_invariant)
    partials = torch.empty(splits, 4, N, dtype=torch.float32, device=hidden.device)
    if N:
        launch(
            _linear_logprobs_forward_kernel,
            (row_blocks, splits),
            hidden,
            weight,
            bias if bias is not None else weight,
            labels,
            partials,
            N,
            V,
            H,
            triton.cdiv(v_tiles, splits) * block_v,
            hidden.stride(0),
            weight.stride(0),
            bias.stride(0) if bias is not None else 0,
            ignore_index=ignore_index,
            HAS_BIAS=bias is not None,
            RETURN_ENTROPY=return_entropy,
            DOT_PRECISION=_dot_precision(hidden.dtype),
            # Triton's interpreter (CPU tensors) multiplies bf16 tiles wrongly (3.9: errors
            # of 1e10 on a 16 x 16 tile); upcast there, feed the tensor cores bf16 on a GPU.
            UPCAST_DOT_INPUTS=hidden.device.type == "cpu",
            ROUND_LOGITS=hidden.dtype != torch.float32,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
            BLOCK_H=block_h,
            num_warps=num_warps,
            **_options(temperature, softcap, logit_scale),
        )
    return _combine_vocab_splits(partials, labels, V, ignore_index, return_entropy)
