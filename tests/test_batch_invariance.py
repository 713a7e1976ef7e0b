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
# narrower H and V (what varies there is the vocabulary split merge: at V = 8200 and the
# interpreter's BLOCK_V = 32, five splits of 64 tiles, the last a single partial tile;
# V = 32000 took 4x as long, 170 s of the suite, for 16 splits of the same merge).
V = 32000
VOCAB = {"reference": V, "cpu": V, "triton": 8200}
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
    H, vocab = HIDDEN[backend_name], VOCAB[backend_name]
    return torch.randn(n, H), torch.randn(vocab, H) / H**0.5, torch.randint(0, vocab, (n,))


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


# ------------------------------------------------------------- token_logprobs --
# No mode: each row of the logits is its own reduction on every backend. V is not a
# multiple of any block (32000 + 7) so the last tile is partial.


@pytest.fixture(params=backends_of("token_logprobs"))
def token_backend(request):
    return request.param


def _token_rows(logits, labels, backend_name, rows):
    z = logits[rows].detach().requires_grad_(True)
    logprobs, entropy = rk.token_logprobs(z, labels[rows], return_entropy=True, backend=backend_name)
    (logprobs.sum() + 0.5 * entropy.sum()).backward()
    return logprobs.detach(), entropy.detach(), z.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_subset_permutation_and_padding_are_bitwise(token_backend, dtype):
    n, vocab = (12, 4103) if token_backend == "triton" else (96, V + 7)
    logits = (3 * torch.randn(n, vocab)).to(dtype)
    labels = torch.randint(0, vocab, (n,))
    permutation = torch.randperm(n)
    batch = _token_rows(logits, labels, token_backend, slice(None))
    alone = _token_rows(logits, labels, token_backend, slice(5, 6))
    permuted = _token_rows(logits, labels, token_backend, permutation)
    padded = _token_rows(
        torch.cat([logits, torch.randn(9, vocab).to(dtype)]),
        torch.cat([labels, torch.full((9,), -100)]),
        token_backend,
        slice(None),
    )
    for got_alone, got_permuted, got_padded, want in zip(alone, permuted, padded, batch):
        assert torch.equal(got_alone, want[5:6])
        assert torch.equal(got_permuted, want[permutation])
        assert torch.equal(got_padded[:n], want)


# ---------------------------------------------------------- sequence_logprobs --
# Runs on linear_logprobs, then sums each sequence over T: invariant to which other
# sequences share the batch (subset, order, all-masked padding sequences) in the mode.
# Padding along T (a longer T of masked positions) is not bitwise: torch's row sum
# blocks by the row's length; the bound is T ulps of the sum of |log p|.

SEQUENCE_SHAPE = {"reference": (6, 9, 96), "cpu": (6, 9, 96), "triton": (3, 5, 32)}  # B, T, H
SEQUENCE_VOCAB = {"reference": 4099, "cpu": 4099, "triton": 1031}


@pytest.fixture(params=backends_of("sequence_logprobs"))
def sequence_backend(request):
    return request.param


def _sequence_inputs(backend_name):
    B, T, H = SEQUENCE_SHAPE[backend_name]
    vocab = SEQUENCE_VOCAB[backend_name]
    hidden = torch.randn(B, T, H)
    weight = torch.randn(vocab, H) / H**0.5
    labels = torch.randint(0, vocab, (B, T))
    mask = torch.rand(B, T) < 0.8
    mask[:, 0] = True
    return hidden, weight, labels, mask


def _sequences(hidden, weight, labels, mask, backend_name, rows, average=False):
    h = hidden[rows].detach().requires_grad_(True)
    total = rk.sequence_logprobs(h, weight, labels[rows], mask[rows], average=average, backend=backend_name)
    total.sum().backward()
    return total.detach(), h.grad


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_subset_and_padding_sequences_are_bitwise(sequence_backend, average):
    hidden, weight, labels, mask = _sequence_inputs(sequence_backend)
    B, T, H = hidden.shape
    padded = (
        torch.cat([hidden, torch.randn(2, T, H)]),
        weight,
        torch.cat([labels, torch.zeros(2, T, dtype=labels.dtype)]),
        torch.cat([mask, torch.zeros(2, T, dtype=mask.dtype)]),
    )
    # In the interpreter a row keeps its bits only at the same position in its tile (above).
    one = slice(0, 1) if sequence_backend == "triton" else slice(1, 2)
    with rk.batch_invariant():
        batch = _sequences(hidden, weight, labels, mask, sequence_backend, slice(None), average)
        alone = _sequences(hidden, weight, labels, mask, sequence_backend, one, average)
        with_padding = _sequences(*padded, sequence_backend, slice(None), average)
    for got_alone, got_padded, want in zip(alone, with_padding, batch):
        assert torch.equal(got_alone, want[one])
        assert torch.equal(got_padded[:B], want)
    assert torch.equal(with_padding[0][B:], torch.zeros(2))  # an all-masked sequence sums to 0


def test_sequence_logprobs_order_is_bitwise(sequence_backend):
    if sequence_backend == "triton":
        pytest.skip("row position inside a Triton tile: checked on a GPU (tests/test_gpu.py)")
    hidden, weight, labels, mask = _sequence_inputs(sequence_backend)
    permutation = torch.randperm(hidden.shape[0])
    with rk.batch_invariant():
        batch = _sequences(hidden, weight, labels, mask, sequence_backend, slice(None))
        permuted = _sequences(hidden, weight, labels, mask, sequence_backend, permutation)
    for got, want in zip(permuted, batch):
        assert torch.equal(got, want[permutation])


def test_sequence_logprobs_padding_along_time_is_within_rounding(sequence_backend):
    hidden, weight, labels, mask = _sequence_inputs(sequence_backend)
    B, T, H = hidden.shape
    longer = (
        torch.cat([hidden, torch.randn(B, 7, H)], dim=1),
        weight,
        torch.cat([labels, torch.zeros(B, 7, dtype=labels.dtype)], dim=1),
        torch.cat([mask, torch.zeros(B, 7, dtype=mask.dtype)], dim=1),
    )
    with rk.batch_invariant():
        want, want_grad = _sequences(hidden, weight, labels, mask, sequence_backend, slice(None))
        got, got_grad = _sequences(*longer, sequence_backend, slice(None))
    ulp = torch.finfo(torch.float32).eps
    # Per-token log-probs and d hidden are the same bits; only the sum over T regroups.
    assert torch.equal(got_grad[:, :T], want_grad)
    assert ((got - want).abs() <= (T + 7) * ulp * want.abs()).all()


# ------------------------------------------------------------ linear_dpo_loss --
# A batch mean over pairs: d hidden of a pair's rows and the pair's sequence log-probs
# are bitwise whatever the order of the pairs (the same B), while the loss and the
# metrics are means whose summation order follows the pairs' order (a few ulps).


@pytest.fixture(params=backends_of("linear_dpo_loss"))
def dpo_backend(request):
    if request.param == "triton":
        pytest.skip("row position inside a Triton tile: checked on a GPU (tests/test_gpu.py)")
    return request.param


def test_linear_dpo_loss_pair_order_keeps_each_rows_gradient(dpo_backend):
    pairs, T, H, vocab = 4, 7, 64, 2053
    hidden = torch.randn(2 * pairs, T, H)
    weight = torch.randn(vocab, H) / H**0.5
    labels = torch.randint(0, vocab, (2 * pairs, T))
    mask = torch.rand(2 * pairs, T) < 0.8
    mask[:, 0] = True
    ref_chosen, ref_rejected = -20 * torch.rand(pairs), -20 * torch.rand(pairs)
    order = torch.randperm(pairs)
    rows = torch.cat([order, order + pairs])

    def run(row_index, pair_index):
        h = hidden[row_index].detach().requires_grad_(True)
        loss, metrics = rk.linear_dpo_loss(
            h, weight, labels[row_index], mask[row_index],
            ref_chosen_logps=ref_chosen[pair_index], ref_rejected_logps=ref_rejected[pair_index],
            backend=dpo_backend,
        )  # fmt: skip
        loss.backward()
        return loss.detach(), metrics, h.grad

    with rk.batch_invariant():
        loss, metrics, grad = run(torch.arange(2 * pairs), torch.arange(pairs))
        permuted_loss, permuted_metrics, permuted_grad = run(rows, order)
    assert torch.equal(permuted_grad, grad[rows])
    torch.testing.assert_close(permuted_loss, loss, atol=0, rtol=4 * torch.finfo(torch.float32).eps)
    for name in ("chosen_logps", "rejected_logps", "reward_margin"):
        torch.testing.assert_close(permuted_metrics[name], metrics[name], atol=1e-6, rtol=1e-6)
