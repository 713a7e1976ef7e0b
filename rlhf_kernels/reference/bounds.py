"""The reference's clamp, with its gradient at the bounds written out.

    clamp(x, low, high) = low where x < low, high where x > high, x elsewhere
    d clamp / d x       = 1 on the closed interval low <= x <= high, 0 outside

The gradient exactly at a bound is a convention, and torch changed its own: its
clamp passes the gradient at the bound up to torch 2.13 and blocks it from torch
2.14 (1/2 there with tensor bounds). The reference, the CPU, CUDA and Triton
kernels and so the framework drop-ins keep the closed interval on every torch:
the subgradient that continues the inside (a value exactly on the bound learns
like one just inside it), torch's rule through 2.13 and TensorFlow's
clip_by_value rule. Written with torch.where, whose gradient is the selection,
so no torch version changes it. NaN passes through, as with torch.clamp.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

Bound = Optional[Union[float, torch.Tensor]]


def clamp(x: torch.Tensor, low: Bound = None, high: Bound = None) -> torch.Tensor:
    """torch.clamp(x, low, high) whose gradient is 1 on [low, high], bounds included
    (bounds are constants: a tensor bound gets no gradient)."""
    if low is not None:
        low = low.detach() if isinstance(low, torch.Tensor) else low
        x = torch.where(x < low, low, x)
    if high is not None:
        high = high.detach() if isinstance(high, torch.Tensor) else high
        x = torch.where(x > high, high, x)
    return x
