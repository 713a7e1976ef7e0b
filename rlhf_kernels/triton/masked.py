"""Triton kernels of the masked statistics (gae family), with the conventions of
csrc/cpu/masked.cpp: masked_sums (per row of [R, C]), masked_whiten and its backward.

Each reduction is split into programs of at most SPLIT elements that write fp32
(fp64 for fp64 input) partial sums; the partials are added in float64 by torch, so
the totals are deterministic and no atomics are needed. Whitening is three launches:
sums of (mask, mask x), sums of (mask c^2, mask c) with c = x - mean, then the
elementwise write; its statistics stay on the device (no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._math import masked

# A program reduces 16 tiles of 1024: each lane adds 16 values before the tree sum,
# and [8 x 8192] fp32 already gives 8 programs' worth of parallel rows.
BLOCK = 1024
SPLIT = 16 * BLOCK
# Pass codes of _partial_sums_kernel (GRAD_ALL: every position's output was whitened).
# tl.constexpr, because a @triton.jit function may read only constexpr globals: a plain
# int runs in the interpreter but is a NameError for the GPU compiler.
SUMS, CENTERED, GRAD, GRAD_ALL = (tl.constexpr(code) for code in range(4))
# The float64 statistics vector shared with the C++ kernel.
COUNT, MEAN, RSTD, DENOMINATOR, CENTERED_SUM = range(5)


@triton.jit
def _partial_sums_kernel(
    x_ptr, w_ptr, g_ptr, stats_ptr, out_ptr, C, n_splits, PASS: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr
):
    """out[row, split] = (sum u, sum v) over the split's columns, where (u, v) is
    (w x, w) for SUMS, (w c^2, w c) for CENTERED, (g', g' c) for GRAD and (g, g c)
    for GRAD_ALL, with c = x - mean and g' = g where w != 0, else 0."""
    # (row, split) on grid axis 0, whose limit is 2^31 - 1 programs (axis 1: 65535, which
    # one flattened row of 2^34 elements, 2^20 splits, would exceed); int64 columns.
    program = tl.program_id(0).to(tl.int64)
    row = program // n_splits
    split = program % n_splits
    if PASS != SUMS:
        mean = tl.load(stats_ptr + 1).to(x_ptr.dtype.element_ty)
    acc_u = tl.zeros([BLOCK], dtype=x_ptr.dtype.element_ty)
    acc_v = tl.zeros([BLOCK], dtype=x_ptr.dtype.element_ty)
    for start in range(0, SPLIT, BLOCK):
        col = split * SPLIT + start + tl.arange(0, BLOCK)
        ok = col < C
        x = tl.load(x_ptr + row * C + col, mask=ok, other=0.0)
        w = tl.load(w_ptr + row * C + col, mask=ok, other=0.0)
        # selects, not products: NaN / inf at a mask-0 position never reaches a sum
        if PASS == SUMS:
            acc_u += masked(w, x)
            acc_v += w
        elif PASS == CENTERED:
            c = x - mean  # w = 0 past the end
            acc_u += masked(w, c * c)
            acc_v += masked(w, c)
        else:
            g = tl.load(g_ptr + row * C + col, mask=ok, other=0.0)
            live = g if PASS == GRAD_ALL else tl.where(w != 0, g, 0.0)
            acc_u += live
            acc_v += masked(live, x - mean)
    out = out_ptr + (row * n_splits + split) * 2
    tl.store(out, tl.sum(acc_u, axis=0))
    tl.store(out + 1, tl.sum(acc_v, axis=0))


@triton.jit
def _whiten_kernel(
    x_ptr, w_ptr, stats_ptr, out_ptr, n, SHIFT_BACK: tl.constexpr, FILL: tl.constexpr, BLOCK: tl.constexpr
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    mean = tl.load(stats_ptr + 1).to(x_ptr.dtype.element_ty)
    rstd = tl.load(stats_ptr + 2).to(x_ptr.dtype.element_ty)
    x = tl.load(x_ptr + i, mask=ok, other=0.0)
    w = tl.load(w_ptr + i, mask=ok, other=0.0)
    y = (x - mean) * rstd
    if SHIFT_BACK:
        y += mean
    if FILL:
        y = tl.where(w != 0, y, 0.0)
    tl.store(out_ptr + i, y, mask=ok)


@triton.jit
def _whiten_backward_kernel(
    g_ptr, x_ptr, w_ptr, stats_ptr, coef_ptr, out_ptr, n, FILL: tl.constexpr, BLOCK: tl.constexpr
):
    """d x = r g' + w mean_coef - var_coef w (c - centered_mean); coef = (mean_coef,
    var_coef, centered_mean) as in csrc/cpu/masked.cpp."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    dtype = x_ptr.dtype.element_ty
    mean = tl.load(stats_ptr + 1).to(dtype)
    rstd = tl.load(stats_ptr + 2).to(dtype)
    mean_coef = tl.load(coef_ptr).to(dtype)
    var_coef = tl.load(coef_ptr + 1).to(dtype)
    centered_mean = tl.load(coef_ptr + 2).to(dtype)
    g = tl.load(g_ptr + i, mask=ok, other=0.0)
    x = tl.load(x_ptr + i, mask=ok, other=0.0)
    w = tl.load(w_ptr + i, mask=ok, other=0.0)
    live = tl.where(w != 0, g, 0.0) if FILL else g
    # a mask-0 position took no part in the statistics: no w (x - mean) term (0 * inf)
    statistics = masked(w, mean_coef - var_coef * (x - mean - centered_mean))
    tl.store(out_ptr + i, rstd * live + statistics, mask=ok)


def _pair_sums(x: torch.Tensor, w: torch.Tensor, pass_code: tl.constexpr, stats=None, grad=None) -> torch.Tensor:
    """float64 [R, 2] sums of one pass over the rows of [R, C] x and w."""
    R, C = x.shape
    n_splits = max(triton.cdiv(C, SPLIT), 1)
    partials = torch.zeros(R, n_splits, 2, dtype=x.dtype, device=x.device)
    if C > 0:
        launch(_partial_sums_kernel, (R * n_splits,),
            x, w, x if grad is None else grad, x if stats is None else stats, partials, C, n_splits,
            PASS=pass_code.value, SPLIT=SPLIT, BLOCK=BLOCK,
        )  # fmt: skip
    return partials.double().sum(1)


def _safe(denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def masked_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _pair_sums(x, mask, SUMS)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float, fill_masked: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    flat_x, flat_w = x.view(1, -1), mask.view(1, -1)
    weighted, count = _pair_sums(flat_x, flat_w, SUMS)[0].unbind()
    mean = torch.where(count > 0, weighted / _safe(count), torch.zeros_like(count))
    stats = torch.stack([count, mean, mean, mean, mean])  # rstd, denominator, sum w c filled below
    squares, centered = _pair_sums(flat_x, flat_w, CENTERED, stats=stats)[0].unbind()
    denominator = _safe(count - 1 if unbiased else count)
    stats = torch.stack([count, mean, torch.rsqrt(squares / denominator + eps), denominator, centered])
    out = torch.empty_like(x)
    n = x.numel()
    if n > 0:
        launch(
            _whiten_kernel,
            (triton.cdiv(n, BLOCK),),
            x,
            mask,
            stats,
            out,
            n,
            SHIFT_BACK=not shift_mean,
            FILL=fill_masked,
            BLOCK=BLOCK,
        )
    return out, stats


def masked_whiten_backward(
    grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor, shift_mean: bool, fill_masked: bool
) -> torch.Tensor:
    pass_code = GRAD if fill_masked else GRAD_ALL
    grad_sum, grad_centered = _pair_sums(x.view(1, -1), mask.view(1, -1), pass_code, stats=stats, grad=grad)[0].unbind()
    count, rstd = _safe(stats[COUNT]), stats[RSTD]
    shift = 0.0 if shift_mean else 1.0
    coef = torch.stack(
        [grad_sum / count * (shift - rstd), rstd**3 / stats[DENOMINATOR] * grad_centered, stats[CENTERED_SUM] / count]
    )
    grad_x = torch.empty_like(x)
    n = x.numel()
    if n > 0:
        launch(
            _whiten_backward_kernel,
            (triton.cdiv(n, BLOCK),),
            grad,
            x,
            mask,
            stats,
            coef,
            grad_x,
            n,
            FILL=fill_masked,
            BLOCK=BLOCK,
        )
    return grad_x
