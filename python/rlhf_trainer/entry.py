"""The `rlhf-kernels` script: the trainer's commands (demo, train, label) and the
library's (info, step). It imports nothing heavy itself, so that without the `train`
extra (transformers, tokenizers) `rlhf-kernels info` and `step` still work and the
trainer's commands say what to install."""

from __future__ import annotations

import sys

TRAINER_COMMANDS = ("demo", "train", "label")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from . import cli
    except ImportError as error:
        from rlhf_kernels import cli as library_cli

        if argv and argv[0] in TRAINER_COMMANDS:
            print(f"rlhf-kernels {argv[0]} needs the trainer's dependencies ({error}): "
                  "pip install 'rlhf-kernels[train]'", file=sys.stderr)  # fmt: skip
            return 2
        return library_cli.main(argv)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
