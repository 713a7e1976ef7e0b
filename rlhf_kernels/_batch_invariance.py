"""The batch-invariant mode of the linear log-prob paths (docs/DESIGN.md, "Batch
invariance"): per-row results bitwise independent of the batch a row is computed in.

    with rlhf_kernels.batch_invariant():     # or RLHF_KERNELS_BATCH_INVARIANT=1
        logprobs = rlhf_kernels.linear_logprobs(hidden, weight, labels)

A call's own batch_invariant= argument wins over this setting. A plain module global,
not a ContextVar, so torch.compile reads (and guards on) it without a graph break.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

ENV_VAR = "RLHF_KERNELS_BATCH_INVARIANT"
_enabled = os.environ.get(ENV_VAR, "0") == "1"


def enabled(explicit: Optional[bool] = None) -> bool:
    """The mode for one call: its explicit argument, else the process-wide setting."""
    return _enabled if explicit is None else bool(explicit)


@contextlib.contextmanager
def batch_invariant(enable: bool = True) -> Iterator[None]:
    """Turns the batch-invariant mode on (or off) inside the block."""
    global _enabled
    saved, _enabled = _enabled, bool(enable)
    try:
        yield
    finally:
        _enabled = saved
