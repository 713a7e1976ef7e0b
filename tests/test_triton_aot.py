"""The ahead-of-time compile gate (tests/triton_aot.py) as a test, plus unit tests of
the launch recording it stands on.

The gate must run without TRITON_INTERPRET (conftest sets it for this process when
there is no GPU), so it runs in a clean subprocess. It compiles every specialization
the launchers produce for sm_80/sm_90 (and sm_100 where Triton can) and fails on a
compile error, a spill or a kernel above 240 registers (within 16 of the 255 ceiling); its table is
bench/results/triton-resources.md.
"""

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
# The gate drives Triton's binder and compiler internals, verified on 3.6 (the GPU
# machine's) and 3.9 (CI's); 3.4's differ.
pytestmark = pytest.mark.skipif(
    tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6),
    reason=f"the AOT gate needs Triton >= 3.6, found {triton.__version__}",
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_triton_specialization_compiles_for_gpu_targets_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "triton_aot.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "triton_aot: FAIL" not in result.stdout, report


def test_launches_are_recorded_not_run_with_their_gpu_configuration():
    from rlhf_kernels.triton import logprobs, masked
    from rlhf_kernels.triton._launch import recording

    hidden = torch.empty(8192, 4096, dtype=torch.bfloat16, device="meta")
    weight = torch.empty(152064, 4096, dtype=torch.bfloat16, device="meta")
    labels = torch.empty(8192, dtype=torch.int64, device="meta")
    with recording() as launches:
        logprobs.linear_logprobs_forward(hidden, weight, None, labels, 1.0, None, 1.0, -100, True)
        # one flattened whitening of 2^34 elements: 2^20 partial-sum programs
        x = torch.empty(1, 1 << 34, device="meta")
        masked.masked_sums(x, x)
    linear, sums = launches
    assert linear.num_warps == 8 and linear.constexprs["BLOCK_N"] == 64 and linear.constexprs["BLOCK_V"] == 128
    # 128 row blocks fill under 2 programs per SM of an H100 (132 SMs): V split in 3
    assert linear.grid == (8192 // 64, 3)
    # rows x splits on axis 0 (limit 2^31 - 1), not on axis 1 (limit 65535)
    assert sums.grid == (1 << 20,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batch_invariant_linear_launch_does_not_depend_on_the_number_of_rows(dtype):
    """The GPU launch configuration of the fused linear forward, as the AOT gate compiles
    it: in batch-invariant mode only the number of 64-row blocks (grid axis 0) follows N;
    tiles, warps, stages and the vocabulary splits, which fix each row's reduction order
    over H and V, are the same at N = 1 and N = 65536. Without the mode the splits follow N."""
    from rlhf_kernels.triton import logprobs
    from rlhf_kernels.triton._launch import recording

    H, V = 4096, 152064
    weight = torch.empty(V, H, dtype=dtype, device="meta")

    def configuration(N, batch_invariant):
        hidden = torch.empty(N, H, dtype=dtype, device="meta")
        labels = torch.empty(N, dtype=torch.int64, device="meta")
        with recording() as launches:
            logprobs.linear_logprobs_forward(
                hidden, weight, None, labels, 1.0, None, 1.0, -100, True, batch_invariant=batch_invariant
            )
        (launch,) = launches
        vocab_chunk = launch.args[8]  # the vocabulary columns each split covers
        return launch.kernel, launch.grid[1], vocab_chunk, launch.num_warps, launch.num_stages, launch.constexprs

    rows = (1, 64, 300, 8192, 65536)
    invariant = [configuration(N, True) for N in rows]
    assert all(config == invariant[0] for config in invariant)
    assert len({configuration(N, False)[1] for N in rows}) > 1


def test_batch_invariant_linear_forward_is_one_binary_for_every_number_of_rows():
    """What the GPU would compile, not only what the launcher passes: Triton's binder
    specializes an int argument equal to 1 (a constant) and one divisible by 16 (a hint),
    so without do_not_specialize=["N"] N = 1, 7 and 64 build three binaries of the fused
    forward. The gate's check (tests/triton_aot.py, batch_invariance_problems) runs the
    binder for sm_90 on the batch-invariant launches at N in (1, 7, 64, 300, 8192, 65536)
    for every dtype and option set and requires one specialization and one launch
    configuration (tiles, warps, stages, vocabulary splits) for all N. The Triton linear
    backward is torch's GEMMs in 64-row blocks and the token backward kernel, which is
    elementwise per (row, vocabulary tile): no reduction across or along rows there."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "triton_aot.py"), "--batch-invariance-only"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "x N in (1, 7, 64, 300, 8192, 65536): one specialization and launch configuration each" in result.stdout


def test_a_grid_over_the_hardware_limit_is_a_clear_error():
    from rlhf_kernels.triton import gae
    from rlhf_kernels.triton._launch import launch

    with pytest.raises(ValueError, match="grid axis 1 has 70000 programs"):
        launch(gae._gae_kernel, (1, 70000))
