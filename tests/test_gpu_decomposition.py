"""How the log-prob paths cut work for a GPU (docs/DESIGN.md, "GPU work decomposition"),
checked on CPU: the chunk sizes, the vocabulary split of the fused forward for small N,
and the 16-bit d weight GEMM, each against the arithmetic that chose it."""

import pytest
import torch

from rlhf_kernels.reference import logprobs as ref


def test_cuda_chunks_keep_gemms_large_and_cpu_chunks_cache_sized():
    cuda = torch.device("cuda")
    # V = 152064: 2^24 logits would be 110 rows; on CUDA at least 2048 rows
    assert ref.chunk_rows(32768, 152064) == (1 << 24) // 152064 == 110
    assert ref.chunk_rows(32768, 152064, cuda) == 2048
    # a small vocabulary: 1 GiB of fp32 chunk logits is more than 2048 rows
    assert ref.chunk_rows(1 << 20, 32000, cuda) == (1 << 30) // (4 * 32000)
    assert ref.chunk_rows(100, 152064, cuda) == 100


@pytest.mark.parametrize("rows", [1, 64, 1024, 8192, 65536])
def test_small_batches_split_the_vocabulary_to_fill_the_gpu(rows):
    pytest.importorskip("triton")
    from rlhf_kernels.triton.logprobs import _vocab_splits

    meta = torch.device("meta")  # an H100's 132 SMs
    row_blocks = -(-rows // 64)
    splits = _vocab_splits(row_blocks, 1188, meta)  # V = 152064 in 128-wide tiles
    assert row_blocks * splits >= min(2 * 132, row_blocks * 1188)  # >= 2 programs per SM
    assert splits == 1 or row_blocks < 2 * 132


def test_weight_gradient_accumulates_in_fp32_on_cpu():
    """The CPU path: an fp32 addmm of the upcast hidden states, exact to the chunk. (The
    CUDA path, a 16-bit GEMM with fp32 output, runs in tests/test_gpu.py.)"""
    N, H, V = 64, 48, 200
    hidden = torch.randn(N, H).bfloat16()
    weight = torch.randn(V, H).bfloat16()
    grad_z = torch.randn(N, V)
    got = torch.zeros(V, H)
    ref.backprop_linear_chunk(grad_z, hidden, weight, slice(0, N), None, got, None)
    torch.testing.assert_close(got, grad_z.t() @ hidden.float())
