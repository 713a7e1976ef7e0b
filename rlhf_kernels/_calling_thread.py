"""Small CPU calls run on the calling thread, torch's own ops around the kernel included.

The C++ kernels keep small calls off the thread pool (csrc/cpu/threading.h), but the
PyTorch code around them (dtype casts, mask sums, row weights, statistics, the
backward's scale) is torch's, whose elementwise ops and reductions open an OpenMP
parallel region from 32768 elements on; on a busy machine each region waits for a pool
thread to get a core. So a CPU call whose largest tensor is small runs with one torch
thread, with the kernels' two thresholds: a small one while the machine is idle, a
larger one while the kernels' busy back-off is on (rlhf_kernels._C.cpu_busy()).

Measured on the 2-core VM, median of 15 runs after a 10 ms pause each (a cold pool),
ppo_policy_loss / grpo policy_loss (vanilla) on [B, 1024] fp32, pool vs calling thread:
- idle, B = 64 (65536 elements): ppo forward 0.96 vs 0.81 ms, forward+backward 1.22 vs
  1.24, grpo forward 1.11 vs 1.04; B = 256: 1.30 vs 1.63, 2.10 vs 2.42, 1.41 vs 1.49
  (the pool wins from ~2^17 elements on);
- two busy background processes, B = 256: 14.7 vs 0.97, 9.6 vs 2.3, 5.6 vs 1.2;
  B = 1024: 13.8 vs 2.2, 9.7 vs 9.8, 17.3 vs 3.0; B = 4096: 15.9 vs 22.8, 33.1 vs
  40.3, 40.5 vs 26.5 (mixed); B = 16384: 89.7 vs 115, 150 vs 195, 96 vs 142 (the pool
  wins). So busy, the calling thread up to 2^21 elements.
"""

from __future__ import annotations

import importlib

import torch

from . import _extension

IDLE_SERIAL_BELOW = 1 << 17  # elements of the largest tensor argument
BUSY_SERIAL_BELOW = 1 << 21


def _largest(args, kwargs) -> int:
    return max((x.numel() for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)), default=0)


_C = importlib.import_module("rlhf_kernels._C") if _extension.LOADED else None


def _busy() -> bool:
    return _C is not None and _C.cpu_busy()


def small_calls_serial(fn):
    """fn, run with torch.set_num_threads(1) when its largest tensor argument has fewer
    elements than the threshold of the moment (the thread count is restored after; not
    while torch.compile traces, where the compiled graph decides)."""

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args, **kwargs)
        limit = BUSY_SERIAL_BELOW if _busy() else IDLE_SERIAL_BELOW
        if _largest(args, kwargs) >= limit:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return call
