"""Elementwise helpers shared by the Triton kernels, with torch's NaN semantics.

tl.maximum / tl.minimum follow the GPU's fmaxf / fminf, which return the other operand
when one is NaN (torch.maximum, torch.minimum and torch.clamp return NaN), so a NaN
input came out of a clip as a bound: a finite, wrong loss. These are selects, which
keep NaN. Masks are applied by select too: m * x is NaN where m = 0 and x is inf.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def maximum(a, b):
    """torch.maximum: NaN if either is NaN."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def minimum(a, b):
    """torch.minimum: NaN if either is NaN."""
    return tl.where((a < b) | (a != a), a, b)


@triton.jit
def clamp(x, low, high):
    """torch.clamp(x, low, high): NaN stays NaN."""
    return tl.where(x < low, low, tl.where(x > high, high, x))


@triton.jit
def masked(m, x):
    """m * x where m != 0, else 0 (never 0 * inf)."""
    return tl.where(m != 0, m * x, 0.0)


@triton.jit
def exp_minus_one_minus_x(x):
    """exp(x) - 1 - x without the cancellation of exp(x) - 1 near 0: the Taylor series to
    x^10 below |x| = 0.5 (0.05 in float64, where the direct form is then within 1e-14),
    the direct form above; +inf at x = +inf (not inf - inf). k3 = exp(-d) + d - 1 is this
    at x = -d; PPO's approx_kl is it at the log-ratio (csrc/cpu/vector_math.h)."""
    if x.dtype == tl.float64:
        small = 0.05
    else:
        small = 0.5
    s = tl.zeros_like(x) + 1.0 / 3628800
    s = s * x + 1.0 / 362880
    s = s * x + 1.0 / 40320
    s = s * x + 1.0 / 5040
    s = s * x + 1.0 / 720
    s = s * x + 1.0 / 120
    s = s * x + 1.0 / 24
    s = s * x + 1.0 / 6
    s = s * x + 0.5
    value = tl.where(tl.abs(x) < small, s * x * x, tl.exp(x) - 1.0 - x)
    return tl.where(x == float("inf"), x, value)
