#!/usr/bin/env bash
# Validates this machine's GPU end to end (build, tests/test_gpu.py, every benchmark family,
# bench/results/<gpu>-<date>/summary.md); see bench/gpu.py. --dry-run: the CPU check CI runs.
exec python "$(dirname "$0")/gpu.py" "$@"
