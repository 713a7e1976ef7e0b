#!/usr/bin/env bash
# CI: the package on the torch versions it claims, each installed as a user would:
# a fresh venv, `pip install torch==X numpy setuptools wheel ninja`, then the README's
# `pip install --no-build-isolation -e ".[test]"` (pip may not move torch: -c), with no
# CUDA_HOME set by hand, then `rlhf-kernels info` and the test suite.
#
#   torch 2.14.1   the CUDA 13.0 build (on this machine's disk): the GPU user's install.
#                  With nvcc 13 here (a wrapper script in /usr/local/bin), setup.py must
#                  find the toolkit, compile and link the CUDA extension; info must list
#                  the CUDA kernels; the CPU test suite runs under this torch.
#   torch OLDEST   the oldest the package claims (pyproject's torch>=), a CUDA 12 build
#                  from PyPI (cu128): nvcc 13 does not match it, so this also proves the clean
#                  fallback (one warning, the CPU build, info says why).
#   torch 2.13.0   tested by .ci/run's README test command.
#
# Budget: .ci/run within 20 minutes on the 2-core machine. The two versions run at the
# same time (one's pip unpacking and nvcc, single-threaded, overlap the other's build
# and tests: one after the other they took 406 + 402 s of a 24.4-minute .ci/run).
# OLDEST runs the test suite without the files whose minutes buy the least per torch
# version (the README test command runs them all, on torch 2.13), and without the
# Triton-interpreter cases (below):
#   tests/test_trainer.py, tests/test_label.py, tests/test_grpo_trainer.py,
#   tests/test_trainer_distributed.py   the bundled trainer's minutes-long runs
#       (no kernel the rest does not exercise);
#   tests/test_triton_aot.py   a developer gate driving Triton's GPU compiler internals,
#       minutes with a cold cache, tied to the Triton versions it was written for;
#   tests/test_gpu_script.py   a CPU dry run of bench/gpu.sh;
#   tests/test_batch_invariance.py   bitwise batch invariance at V = 32000.
# 2.14.1, one minor version above the README's 2.13 whose suite passes in full, runs the
# build, API and dispatch tests (SMOKE_TESTS): its job is the CUDA build and link.
# Each venv (5+ GB) holds its own copy of the tree (so the main checkout's editable build
# is left alone) and is removed when done; pip's cache is off: nothing is kept between runs.
#
# Usage: .ci/torch_versions.sh [VERSION...]   (default: 2.14.1 and OLDEST)
set -euo pipefail
cd "$(dirname "$0")/.."

# Keep in step with pyproject.toml's torch>= (dependencies and build-system).
OLDEST=2.8.0
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset CUDA_HOME CUDA_PATH TORCH_CUDA_ARCH_LIST RLHF_KERNELS_CUDA RLHF_KERNELS_CPP

have_cuda_toolkit() {
    command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]
}

run_version() {
    local version=$1 venv=".venv-torch$1" start=$SECONDS
    echo "== torch $version: fresh venv, README install, rlhf-kernels info, tests =="
    rm -rf "$venv"
    python3 -m venv "$venv"
    mkdir -p "$venv/src"
    # The working tree (tracked and untracked, not ignored files), as the README's user has it.
    git ls-files -z --cached --others --exclude-standard \
        | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$venv/src"
    echo "torch==$version" > "$venv/constraints.txt"
    (
        . "$venv/bin/activate"
        cd "$venv/src"
        # setuptools>=77 as the README's GPU section says (torch < 2.13 does not pull it)
        pip install -q "torch==$version" numpy "setuptools>=77" wheel ninja
        pip install -q -c ../constraints.txt --no-build-isolation -e ".[test]"
        echo "   installed in $((SECONDS - start)) s"
        rlhf-kernels info > ../info.txt
        head -6 ../info.txt
        installed=$(python -c "import torch; print(torch.__version__.split('+')[0])")
        [ "$installed" = "$version" ] || { echo "FAIL: torch $installed installed, not $version"; exit 1; }
        cuda=$(python -c "import torch; print(torch.version.cuda or '')")
        if [ "${cuda%%.*}" = "13" ] && have_cuda_toolkit; then
            grep -q "^build: C++ CPU + CUDA kernels" ../info.txt \
                || { echo "FAIL: torch $version (CUDA $cuda) with nvcc here: no CUDA build"; exit 1; }
            grep -q "CUDA kernels: discounted_returns, gae" ../info.txt \
                || { echo "FAIL: the CUDA kernels did not load"; exit 1; }
        else
            grep -q "^build: C++ CPU kernels only, no CUDA kernels: " ../info.txt \
                || { echo "FAIL: torch $version (CUDA ${cuda:-none}): expected the CPU fallback"; exit 1; }
        fi
        # The Triton-interpreter cases are skipped (half the suite's time): they run under
        # 2.13 (README test command), and on a GPU they compile, not interpret.
        if [ "$version" = "$OLDEST" ]; then
            python -m pytest -q -n 2 --dist loadfile tests -p no:cacheprovider -k "not triton" \
                --ignore=tests/test_trainer.py --ignore=tests/test_label.py --ignore=tests/test_grpo_trainer.py \
                --ignore=tests/test_trainer_distributed.py --ignore=tests/test_triton_aot.py \
                --ignore=tests/test_gpu_script.py --ignore=tests/test_batch_invariance.py
        else
            python -m pytest -q -p no:cacheprovider -k "not triton" "${SMOKE_TESTS[@]}"
        fi
    )
    rm -rf "$venv"
    echo "   torch $version: done in $((SECONDS - start)) s"
}

SMOKE_TESTS=(tests/test_setup.py tests/test_api.py tests/test_backend.py tests/test_bad_input.py)
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(2.14.1 "$OLDEST")
# Each version in the background, its output to its own log, printed in order when all
# are done; the first failure fails the script.
pids=() logs=()
for version in "${versions[@]}"; do
    logs+=("$(mktemp)")
    run_version "$version" > "${logs[-1]}" 2>&1 &
    pids+=($!)
done
failed=0
for i in "${!versions[@]}"; do
    status=0
    wait "${pids[$i]}" || status=$?
    cat "${logs[$i]}"
    rm -f "${logs[$i]}"
    if [ "$status" -ne 0 ]; then
        echo "FAIL: torch ${versions[$i]} (exit $status)"
        failed=1
    fi
done
exit "$failed"
