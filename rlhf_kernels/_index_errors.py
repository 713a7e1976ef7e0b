"""Out-of-range indices in GPU tensors, found without a host sync.

The range checks of labels and score_index read tensor values: free on CPU tensors,
where they raise at once, but a host sync on a GPU (it stalls the stream and breaks
CUDA-graph capture). There the kernels stay memory-safe without them (an out-of-range
index is never read: its row's result is NaN), and the check becomes a device flag,
OR-ed per (op, argument, device) by torch ops queued on the stream.
check_index_errors() reads the flags (one sync, where the caller already syncs, e.g.
when logging a step's loss), raises naming each op and argument, and clears them; the
bundled trainer calls it once a step. RLHF_KERNELS_DEBUG=1 raises at the call instead.
"""

from __future__ import annotations

import torch

_FLAGS: dict[tuple[str, str, torch.device], torch.Tensor] = {}


def deferred(x: torch.Tensor) -> bool:
    """Whether the range check of `x` is recorded as a flag (a GPU tensor outside
    torch.compile's tracing and CUDA-graph capture) rather than skipped."""
    if torch.compiler.is_compiling() or x.numel() == 0 or x.device.type in ("cpu", "meta"):
        return False
    return not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def record(op: str, name: str, bad: torch.Tensor) -> None:
    """ORs bad.any() into the flag of (op, name, bad's device); no host sync."""
    key = (op, name, bad.device)
    flag = bad.any()
    previous = _FLAGS.get(key)
    _FLAGS[key] = flag if previous is None else previous | flag


def check_index_errors() -> None:
    """Raises ValueError naming every op and argument that got an out-of-range index
    (a label outside [0, V) that is not ignore_index, a score_index outside [0, T)) in a
    GPU tensor since the last call, whose results were NaN; clears the flags either way.
    One host sync when a flag is set; nothing to do on CPU (the ops raise at the call)."""
    flags = dict(_FLAGS)
    _FLAGS.clear()
    found = [f"{op} ({name}, {device})" for (op, name, device), flag in flags.items() if bool(flag)]
    if found:
        raise ValueError(
            "out-of-range indices reached " + ", ".join(found) + " since the last check_index_errors(): "
            "their rows are NaN (set RLHF_KERNELS_DEBUG=1 to raise at the call, with the values)"
        )
