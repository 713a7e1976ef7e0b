"""Small CPU calls run on the calling thread, torch's own ops around the kernel included.

The C++ kernels keep small calls off the thread pool (csrc/cpu/threading.h), but the
PyTorch code around them (dtype casts, mask sums, row weights, statistics, the
backward's products) is torch's, whose elementwise ops and reductions open an OpenMP
parallel region from 32768 elements on; on a busy machine each region waits for a pool
thread to get a core. So a CPU call whose tensors are small runs with one torch thread.

The choice depends on the size alone, never on the load: torch's full reductions give
different bits on 1 and 2 threads, so a load-dependent choice would let the load of the
machine change a result. Ops that run GEMMs (linear_logprobs) are never wrapped: a BLAS
GEMM's blocking, and with it its bits, depend on the thread count too.

Measured on the 2-core VM, median of 15 runs after a 10 ms pause each (a cold pool),
ppo_policy_loss / grpo policy_loss (vanilla) on [B, 1024] fp32, forward, pool vs
calling thread (ppo forward+backward in brackets):
- idle: B = 64 (2^16 elements) 0.96 vs 0.81 ms (1.22 vs 1.24), grpo 1.11 vs 1.04;
  B = 256 1.30 vs 1.63 (2.10 vs 2.42), grpo 1.41 vs 1.49; B = 1024 2.80 vs 3.06
  (3.45 vs 5.49), grpo 3.37 vs 4.84;
- two busy background processes: B = 256 14.7 vs 0.97 (9.6 vs 2.3), grpo 5.6 vs 1.2;
  B = 1024 13.8 vs 2.2 (9.7 vs 9.8), grpo 17.3 vs 3.0; B = 4096 15.9 vs 22.8, grpo
  40.5 vs 26.5.
Below 2^20 elements the calling thread costs at most 0.33 ms idle and saves 4-14 ms
busy; from 2^20 on the pool's gain idle grows (2 ms at 2^20 forward+backward) and the
busy loss fades (mixed at 2^22).
"""

from __future__ import annotations

import functools

import torch

SERIAL_BELOW = 1 << 20  # elements of the call's largest tensor
NOT_CPU = 1 << 62  # largest_cpu's answer when the thread count is nobody's business


def largest_cpu(values) -> int:
    """Elements of the largest tensor among values; a huge number when one is not on the
    CPU (the thread count is then nobody's business) or while torch.compile traces (its
    sizes may be symbolic, and the compiled graph decides)."""
    if torch.compiler.is_compiling():
        return NOT_CPU
    largest = 0
    for x in values:
        if isinstance(x, torch.Tensor):
            if x.device.type != "cpu":
                return NOT_CPU
            largest = max(largest, x.numel())
    return largest


def run_for(elements: int, fn, *args, **kwargs):
    """fn(*args, **kwargs), with torch.set_num_threads(1) when the call's largest CPU
    tensor (largest_cpu) has `elements` < SERIAL_BELOW (the thread count is restored
    after; not while torch.compile traces). set_num_threads is process-wide: another
    Python thread running torch ops meanwhile gets one thread too."""
    if elements >= SERIAL_BELOW or torch.compiler.is_compiling():
        return fn(*args, **kwargs)
    threads = torch.get_num_threads()
    if threads == 1:
        return fn(*args, **kwargs)
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def run_sized(tensors, fn, *args, **kwargs):
    """fn(*args, **kwargs), run as run_for does, sized by `tensors` (the call's data)."""
    return run_for(largest_cpu(tensors), fn, *args, **kwargs)


def one_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) on one torch thread, whatever the size, when its tensor
    arguments are on the CPU: for the single memory passes torch runs around a kernel
    (a mask's cast and row counts) while the kernel itself keeps its own threading
    policy. Such a pass costs ~0.1 ms more on one thread than on two idle at 2^20
    elements, and its parallel region alone cost 1.3-5.8 ms with two busy background
    processes (mask.sum(-1) on [256, 4096] fp32: 0.33 ms idle either way)."""
    elements = largest_cpu((*args, *kwargs.values()))
    return run_for(0 if elements < NOT_CPU else NOT_CPU, fn, *args, **kwargs)


def _cast(dtype: torch.dtype, tensors) -> list[torch.Tensor]:
    return [t.to(dtype).contiguous() for t in tensors]


def cast_on_one_thread(dtype: torch.dtype, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors in dtype and contiguous (themselves where they are), cast on one thread."""
    return one_thread(_cast, dtype, tensors)


def _run_sized_by_arguments(fn, *args, **kwargs):
    return run_sized((*args, *kwargs.values()), fn, *args, **kwargs)


def small_calls_serial(fn):
    """fn, run as run_sized does, sized by its own tensor arguments (a functools.partial:
    torch 2.8's dynamo cannot take the truth value of a lambda, `pair_loss or dpo_loss`)."""
    return functools.partial(_run_sized_by_arguments, fn)
