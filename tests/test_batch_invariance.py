"""Batch invariance of the linear log-prob paths (docs/DESIGN.md, "Batch invariance"):
with rlhf_kernels.batch_invariant() a row's log-prob, entropy and d hidden are bitwise
the same computed alone, inside a larger batch, permuted, or next to padding rows, on
every backend (Triton in its interpreter here). token_logprobs needs no mode: each row
is its own reduction on every backend.
"""

import pytest
import torch

import rlhf_kernels as rk
from conftest import backends_of

# The shapes where a plain GEMM measurably differs (9.5e-7); the interpreter runs a
# narrower H (what varies there is the vocabulary split merge, 16 splits at V = 32000).
V = 32000
HIDDEN = {"reference": 512, "cpu": 512, "triton": 32}


@pytest.fixture(params=backends_of("linear_logprobs"))
def backend_name(request):
    return request.param


def _rows(hidden, weight, labels, backend_name, rows):
    h = hidden[rows].detach().requires_grad_(True)
    logprobs, entropy = rk.linear_logprobs(h, weight, labels[rows], return_entropy=True, backend=backend_name)
    (logprobs.sum() + 0.5 * entropy.sum()).backward()
    return logprobs.detach(), entropy.detach(), h.grad


def _inputs(n, backend_name):
    H = HIDDEN[backend_name]
    return torch.randn(n, H), torch.randn(V, H) / H**0.5, torch.randint(0, V, (n,))


def test_a_row_alone_and_in_a_batch_of_300_is_bitwise_the_same(backend_name):
    n = 300 if backend_name != "triton" else 70  # the interpreter is slow: still > 64 rows
    hidden, weight, labels = _inputs(n, backend_name)
    with rk.batch_invariant():
        batch = _rows(hidden, weight, labels, backend_name, slice(0, n))
        alone = _rows(hidden, weight, labels, backend_name, slice(0, 7))
    for got, want in zip(alone, batch):
        assert torch.equal(got, want[:7])


def test_row_order_does_not_change_a_row(backend_name):
    if backend_name == "triton":
        # In the interpreter tl.dot is numpy's matmul of the tile, whose BLAS rounds a row
        # differently by its position in the tile; on a GPU the MMA instructions treat
        # every row alike: tests/test_gpu.py checks it there.
        pytest.skip("row position inside a Triton tile: checked on a GPU (tests/test_gpu.py)")
    hidden, weight, labels = _inputs(300, backend_name)
    permutation = torch.randperm(300)
    with rk.batch_invariant():
        batch = _rows(hidden, weight, labels, backend_name, slice(None))
        permuted = _rows(hidden, weight, labels, backend_name, permutation)
    for got, want in zip(permuted, batch):
        assert torch.equal(got, want[permutation])


def test_padding_rows_do_not_change_the_real_rows(backend_name):
    hidden, weight, labels = _inputs(40 if backend_name == "triton" else 130, backend_name)
    padded_hidden = torch.cat([hidden, torch.zeros(23, hidden.shape[1])])
    padded_labels = torch.cat([labels, torch.full((23,), -100)])
    with rk.batch_invariant():
        real = _rows(hidden, weight, labels, backend_name, slice(None))
        with_padding = _rows(padded_hidden, weight, padded_labels, backend_name, slice(None))
    for got, want in zip(with_padding, real):
        assert torch.equal(got[: len(want)], want)


def test_the_mode_changes_no_value_beyond_rounding(backend_name):
    hidden, weight, labels = _inputs(37, backend_name)
    plain = _rows(hidden, weight, labels, backend_name, slice(None))
    with rk.batch_invariant():
        invariant = _rows(hidden, weight, labels, backend_name, slice(None))
    for got, want in zip(invariant, plain):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_explicit_argument_beats_the_setting():
    from rlhf_kernels import _batch_invariance

    with rk.batch_invariant():
        assert _batch_invariance.enabled() and not _batch_invariance.enabled(False)
    assert not _batch_invariance.enabled() and _batch_invariance.enabled(True)
