"""The one place every Triton kernel of the package is launched from.

`launch(kernel, grid, *args, **constexprs)` runs `kernel[grid](...)` on the device of
its tensors (Triton launches on the *current* CUDA device, so a tensor on cuda:1 with
cuda:0 current would otherwise be read from the wrong GPU), and checks that the grid
fits the hardware's limits (axis 0: 2^31 - 1 programs, axes 1 and 2: 65535).

Under `recording()` nothing runs: each launch is appended to a list instead. The
ahead-of-time compile gate (tests/triton_aot.py) calls the real launchers on meta
tensors inside `recording()` and compiles exactly the specializations they produce
for a GPU target, so the configurations it checks cannot drift from the code.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

# CUDA's grid limits (CUDA C Programming Guide, "Compute Capabilities" table):
# x up to 2^31 - 1, y and z up to 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)
# Triton's defaults, written out so that every launch states the configuration the
# AOT gate compiles.
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3


@dataclass(frozen=True)
class Launch:
    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = DEFAULT_NUM_WARPS
    num_stages: int = DEFAULT_NUM_STAGES


_recorded: contextvars.ContextVar[Optional[list[Launch]]] = contextvars.ContextVar(
    "rlhf_kernels_launches", default=None
)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Collects launches instead of running them (launchers called on meta tensors)."""
    launches: list[Launch] = []
    token = _recorded.set(launches)
    try:
        yield launches
    finally:
        _recorded.reset(token)


def _device(args) -> Optional[torch.device]:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
    return None


def launch(
    kernel,
    grid: tuple[int, ...],
    *args,
    num_warps: int = DEFAULT_NUM_WARPS,
    num_stages: int = DEFAULT_NUM_STAGES,
    **constexprs,
) -> None:
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if size > limit:
            raise ValueError(
                f"{kernel.__name__}: grid axis {axis} has {size} programs, above CUDA's limit {limit}; "
                "the launcher must put large extents on axis 0"
            )
    record = _recorded.get()
    if record is not None:
        record.append(Launch(kernel, tuple(grid), args, constexprs, num_warps, num_stages))
        return
    device = _device(args)
    guard = torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[tuple(grid)](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)


# Row kernels (one program per row) take blocks of 128 to `largest` values: 128 is one
# value per thread at 4 warps; smaller blocks would save nothing (the program runs
# anyway) and each would be one more compiled variant (a JIT compile at first use).
MIN_ROW_BLOCK = 128


def row_block(length: int, largest: int) -> int:
    """The block a row kernel takes for rows of `length`: a power of two in
    [MIN_ROW_BLOCK, largest]."""
    power = 1 << max(length - 1, 0).bit_length()
    return min(largest, max(MIN_ROW_BLOCK, power))


def widest_block(largest: int, dtype: torch.dtype) -> int:
    """`largest` for 32-bit data, half of it for float64 (gradcheck and exact tests):
    fp64 values take two registers, and at the fp32 width the heaviest fp64 kernels
    (ppo_policy_loss, the token forward, dpo_loss) sat within 1-20 of the 255-register
    ceiling (tests/triton_aot.py)."""
    return largest // 2 if dtype == torch.float64 else largest
