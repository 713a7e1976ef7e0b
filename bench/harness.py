"""Timing and memory measurement shared by every family's benchmark.

time_ms: median of `repeats` runs after `warmup` runs (CUDA events and a
synchronize on GPU, perf_counter on CPU). peak_mb: the peak extra memory of one
run: torch.cuda.max_memory_allocated on GPU; on CPU the process's peak resident
set (VmHWM, reset through /proc/self/clear_refs) above the resident set before
the run, with glibc's heap trimmed first (malloc_trim), so it needs Linux and
counts every allocation the run makes. busy(n): n background processes spinning
in pure Python while the block runs (the --contended mode of bench/run.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Result:
    family: str
    case: str  # the shape, e.g. "N=2048 V=32000 bf16"
    impl: str  # ours:<backend> or a baseline's name
    mode: str  # forward | forward+backward
    ms: float
    peak_mb: float
    rate: float  # GB/s or TFLOP/s, per `rate_unit`
    rate_unit: str
    device: str = ""
    torch: str = torch.__version__
    triton: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        row = asdict(self)
        row.pop("extra")
        return row


def copy_bandwidth_gbs(device: str, mib: int = 256) -> float:
    """Measured memory bandwidth: bytes read + written by a copy of a `mib` MiB tensor
    (large enough to leave every cache), median of repeated runs, in GB/s. The
    memory-bound kernels' GB/s are reported as a fraction of it."""
    source = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), device, warmup=2, repeats=9)
    return 2 * source.numel() * 4 / (ms / 1e3) / 1e9


def right_padded_mask(B: int, T: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """A [B, T] 0/1 mask of responses between T/2 and T tokens long, right-padded."""
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    return (torch.arange(T, device=device) < lengths[:, None]).to(dtype)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux, or no model line
        model = platform.machine()
    return f"{model}, {torch.get_num_threads()} threads"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, *, warmup: int = 2, repeats: int = 7, pause_s: float = 0.0) -> float:
    """pause_s: sleep before every run (untimed), so that each starts with the thread
    pool asleep, as a call between the steps of a training loop does (the OpenMP
    workers spin for a while after a parallel region, then sleep)."""
    for _ in range(warmup):
        time.sleep(pause_s)
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        time.sleep(pause_s)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def _glibc():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


_LIBC = _glibc()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Timing: large blocks come from the heap and are reused, as in a normal process
# (32 MiB is glibc's own ceiling for its dynamic threshold; forcing every tensor
# through mmap made a 0.1 ms op measure 0.3 ms). Setting the mmap threshold turns off
# glibc's dynamic trim threshold too (it stays 128 KiB), so the heap's top was handed
# back to the OS after every run and the next run faulted it in again: masked_whiten
# [256, 4096] forward took 992 page faults and 2.71 ms a call, against 154 and 1.29 ms
# in a process with glibc's defaults. So the trim threshold is set as glibc's dynamic
# rule sets it, twice the mmap threshold (0 faults, 1.02 ms). Memory: a fixed 128 KiB
# mmap threshold keeps every large tensor mmapped, so freed tensors leave the resident
# set and VmHWM - VmRSS is what one run allocated.
_TIMING_THRESHOLD, _MEMORY_THRESHOLD = 32 * 2**20, 128 * 2**10


def _mmap_threshold(size: int) -> None:
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, size)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * size)


_mmap_threshold(_TIMING_THRESHOLD)


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def trim_heap() -> None:
    """Return glibc's free heap memory to the OS (malloc_trim(0)). Freed blocks below the
    mmap threshold stay resident in the heap otherwise, and a run that reuses them adds
    nothing to the resident set: a forward that allocates 31 MiB measured 0 MiB."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


# Spins until killed, or until its parent is gone (a harness killed before its finally
# block ran must not leave busy loops behind).
_BUSY_LOOP = """
import os
parent = os.getppid()
while os.getppid() == parent:
    for _ in range(200000):
        pass
"""


@contextlib.contextmanager
def busy(processes: int = 2):
    """`processes` background processes, each a pure-Python busy loop (one core each),
    running for the duration of the block: a data loader and a second job on the same
    machine. Started before the block (and given time to be scheduled), killed after."""
    procs = [
        subprocess.Popen([sys.executable, "-S", "-c", _BUSY_LOOP], stdin=subprocess.DEVNULL) for _ in range(processes)
    ]
    try:
        time.sleep(0.2)
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def peak_mb(fn: Callable[[], object], device: str) -> Optional[float]:
    """Peak memory of one run of fn above what was allocated before it, in MiB.
    fn.reset(), if present, runs first (dropping gradients a previous run left)."""
    if hasattr(fn, "reset"):
        fn.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _mmap_threshold(_MEMORY_THRESHOLD)
    try:
        fn()  # once more, so that what the heap kept from the timing runs is not counted as new
        if hasattr(fn, "reset"):
            fn.reset()
        gc.collect()
        trim_heap()  # what earlier runs freed leaves the resident set: the growth below is this run's own
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident set
        before = _rss_kb("VmRSS:")
        fn()
        return max(0, _rss_kb("VmHWM:") - before) / 1024
    except OSError:
        return None
    finally:
        _mmap_threshold(_TIMING_THRESHOLD)
