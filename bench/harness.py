"""Timing and memory measurement shared by every family's benchmark.

time_ms: median of `repeats` runs after `warmup` runs (CUDA events and a
synchronize on GPU, perf_counter on CPU). peak_mb: the peak extra memory of one
run: torch.cuda.max_memory_allocated on GPU; on CPU the process's peak resident
set (VmHWM, reset through /proc/self/clear_refs) above the resident set before
the run, so it needs Linux and counts every allocation the run makes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import platform
import statistics
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


def time_ms(fn: Callable[[], object], device: str, *, warmup: int = 2, repeats: int = 7) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
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


def _return_freed_memory_to_the_os() -> None:
    """glibc raises its mmap threshold as large blocks are freed, after which they
    are reused from the heap and never leave the resident set; a fixed threshold of
    128 KiB keeps every large tensor mmapped, so VmHWM - VmRSS is what a run allocated."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name)
    if hasattr(libc, "mallopt"):
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 128 * 1024)


_return_freed_memory_to_the_os()


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


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
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident set
        before = _rss_kb("VmRSS:")
        fn()
        return max(0, _rss_kb("VmHWM:") - before) / 1024
    except OSError:
        return None
