"""`python -m rlhf_trainer demo|train|label ...`: the same commands and arguments as
`rlhf-kernels demo|train|label` (rlhf_trainer.entry's parser), as a module so that
torchrun can start it on every process:

    torchrun --standalone --nproc-per-node 2 -m rlhf_trainer demo --quick --output rlhf-demo
    torchrun --standalone --nproc-per-node 2 -m rlhf_trainer train sft --output out/sft
"""

from __future__ import annotations

import sys

from .distributed import shutdown
from .entry import main

if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    finally:
        shutdown()
    sys.exit(status)
