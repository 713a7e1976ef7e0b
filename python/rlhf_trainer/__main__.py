"""`python -m rlhf_trainer demo|train|label ...`: the same commands and arguments as
`rlhf-kernels demo|train|label` (the parser is rlhf_kernels.cli's), as a module so that
torchrun can start it on every process:

    torchrun --standalone --nproc-per-node 2 -m rlhf_trainer demo --quick --output rlhf-demo
    torchrun --standalone --nproc-per-node 2 -m rlhf_trainer train sft --output out/sft
"""

from __future__ import annotations

import sys

from rlhf_kernels.cli import main

from .distributed import shutdown

if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    finally:
        shutdown()
    sys.exit(status)
