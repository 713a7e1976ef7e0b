"""Batch invariance (docs/DESIGN.md, "Batch invariance"): which results are bitwise the
same whatever batch a row or sequence is computed in, and the stated bound where they
are not, for token_logprobs, linear_logprobs, sequence_logprobs, linear_dpo_loss and
linear_policy_loss on every backend (Triton in its interpreter here; tests/test_gpu.py on
a GPU). Each op's batch is compared with the same rows as a subset (one row alone among
them), permuted, next to extra padding rows or sequences, and packed where packing applies
(rlhf_kernels/packing.py). Fresh random inputs in every test, never zeros.

In the interpreter tl.dot is numpy's matmul of a BLOCK_N = 16-row tile (TILE below), whose
BLAS may round a row differently by its position in the tile (on a GPU the MMA
instructions treat every row alike: tests/test_gpu.py): there a row is compared at the
same position in its tile, i.e. rows move by whole tiles (permutations of 16-row blocks,
sequences of T = 16, packed lengths of multiples of 16). That the GPU's launch does not
depend on N is tests/test_triton_aot.py's check of the AOT gate's launches.
"""

import math

import pytest
import torch

import rlhf_kernels as rk
from conftest import backends_of
from rlhf_kernels import _batch_invariance
from rlhf_kernels.packing import pack_padded, pad_packed, padding_mask

TILE = 16  # the interpreter's BLOCK_N (rlhf_kernels/triton/logprobs.py, _linear_config)
EPS = torch.finfo(torch.float32).eps  # the losses, log-probs and metrics are float32
ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fp16 GEMMs have no fast CPU kernel and the interpreter's 16-bit path is bf16's (inputs
# upcast, logits rounded to the input dtype): fp16 runs on the reference and cpu only.
TRITON_DTYPES = (torch.float32, torch.bfloat16)
FP32 = (torch.float32,)


def cases(op: str, dtypes=ALL_DTYPES, triton_dtypes=TRITON_DTYPES) -> list:
    """(backend, dtype) params: every backend of `op` here x its dtypes."""
    out = []
    for param in backends_of(op):
        name, marks = (param, ()) if isinstance(param, str) else (param.values[0], param.marks)
        for dtype in triton_dtypes if name == "triton" else dtypes:
            out.append(pytest.param(name, dtype, marks=marks, id=f"{name}-{str(dtype)[6:]}"))
    return out


def _assert_bitwise(got, want, what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"{what}: output {i} differs, max |diff| {(g.double() - w.double()).abs().max()}"


def _assert_reordered_sum(got, want, n: int, magnitude, what: str) -> None:
    """got and want are the same n float32 terms summed in two orders (then scaled):
    |got - want| <= 2 n eps magnitude, magnitude >= the mean of the terms' |value| times
    the scale (the worst-case rounding of an n-term sum, (n - 1) eps sum |terms|, for
    each order, plus the final division)."""
    bound = 2 * n * EPS * float(magnitude)
    diff = abs(float(got) - float(want))
    assert diff <= bound, f"{what}: |{float(got)} - {float(want)}| = {diff} > {bound}"


def _assert_scaled(got, want, factor: int, weight, what: str) -> None:
    """got and want: d hidden of two batches whose losses differ by a power-of-two
    factor (a mean over fewer or more pairs), one of them times `factor`. Bitwise in fp32
    and bf16: scaling by 2^k commutes with their rounding. fp16 rounds d logits to its
    dtype for the d hidden GEMM and those below its normal range (2^-14) become
    subnormals, which do not scale: each is off by <= 2^-25 in each computation, so
    |got - want| <= (1 + factor) 2^-25 sum_v |W[v]| (the scaled side's error scaled too)
    + 2 fp16 ulps (the outputs' rounding)."""
    if want.dtype != torch.float16:
        assert torch.equal(got, want), f"{what}: max |diff| {(got.double() - want.double()).abs().max()}"
        return
    ulp = want.double().abs().clamp(min=2.0**-14) * 2.0**-10
    bound = (1 + factor) * 2.0**-25 * weight.double().abs().sum(0) + 2 * ulp
    excess = (got.double() - want.double()).abs() - bound
    assert (excess <= 0).all(), f"{what}: exceeds the fp16 bound by {excess.max()}"


def _permuted_tiles(n: int) -> torch.Tensor:
    """A permutation of n rows (a multiple of TILE) that moves whole tiles."""
    return (torch.randperm(n // TILE)[:, None] * TILE + torch.arange(TILE)).flatten()


# ------------------------------------------------------------ linear_logprobs --
# In the mode: a row's log-prob, entropy and d hidden are bitwise. The reference and cpu
# run fp32 at the shape where a plain GEMM measurably differs (9.5e-7: H = 512,
# V = 32000) for the 300-row case and H = 128, V = 4099 otherwise (the plain path's d
# hidden already differs there). The interpreter: V = 2055 = 64 tiles of 32 and 7
# columns, so the mode's fixed vocabulary splits (64 tiles each) are two, the second a
# single partial tile, merged per row; 300 rows at V = 330 (one split in the mode; the
# plain mode would split it 8 ways at N = 1 and not at N = 300). In the interpreter bf16
# runs the 300-row case only (its path differs from fp32's by the upcast tiles and the
# rounded logits, not by the row layout); the ops built on linear_logprobs run it at
# V = 301 and in fp32 only: their own part is torch code on the per-row results.

LINEAR_SHAPE = {"reference": (130, 128, 4099), "cpu": (130, 128, 4099), "triton": (3 * TILE, 16, 2055)}  # N, H, V


def _linear_inputs(n, H, V, dtype):
    hidden = torch.randn(n, H).to(dtype)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    return hidden, weight, torch.randint(0, V, (n,))


def _rows(hidden, weight, labels, backend, rows=slice(None), **kwargs):
    """(logprobs, entropy, d hidden) of hidden[rows] for the loss sum(logprobs) + sum(entropy) / 2."""
    h = hidden[rows].detach().requires_grad_(True)
    logprobs, entropy = rk.linear_logprobs(h, weight, labels[rows], return_entropy=True, backend=backend, **kwargs)
    (logprobs.sum() + 0.5 * entropy.sum()).backward()
    return logprobs.detach(), entropy.detach(), h.grad


@pytest.mark.parametrize("backend,dtype", cases("linear_logprobs"))
def test_one_row_alone_is_bitwise_its_row_in_a_batch_of_300(backend, dtype):
    """The issue's criterion: linear_logprobs in batch-invariant mode gives identical bits
    for a row computed alone (1 row) and inside a 300-row batch."""
    if backend == "triton":
        (H, V), row = (16, 330), TILE * int(torch.randint(300 // TILE, ()))  # alone it sits at tile position 0
    else:
        (H, V), row = ((128, 4099) if dtype == torch.float16 else (512, 32000)), int(torch.randint(300, ()))
    hidden, weight, labels = _linear_inputs(300, H, V, dtype)
    with rk.batch_invariant():
        batch = _rows(hidden, weight, labels, backend)
    alone = _rows(hidden, weight, labels, backend, slice(row, row + 1), batch_invariant=True)  # the per-call switch
    assert alone[0].shape == (1,)
    _assert_bitwise(alone, [x[row : row + 1] for x in batch], f"row {row} alone vs in 300 rows")


@pytest.mark.parametrize("backend,dtype", cases("linear_logprobs", triton_dtypes=FP32))
def test_linear_logprobs_subset_permutation_padding_and_packing_are_bitwise(backend, dtype):
    n, H, V = LINEAR_SHAPE[backend]
    hidden, weight, labels = _linear_inputs(n, H, V, dtype)
    triton = backend == "triton"
    subset = slice(TILE, 2 * TILE) if triton else slice(37, 44)  # 7 rows: a plain GEMM rounds them otherwise
    permutation = _permuted_tiles(n) if triton else torch.randperm(n)
    extra = 9 if triton else 23  # padding rows after the batch: random hidden states, label ignore_index
    padded_rows = torch.cat([hidden, torch.randn(extra, H).to(dtype)])
    padded_row_labels = torch.cat([labels, torch.full((extra,), -100)])
    # Packed: the batch's rows are B packed sequences; the padded batch [B, T, H] holds
    # them at b T + t, with random hidden states and label -100 at the padding.
    lengths = torch.tensor([TILE, 2 * TILE]) if triton else torch.tensor([37, 1, 0, 60, 32])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    T = int(lengths.max()) + (0 if triton else 3)
    valid = padding_mask(cu_seqlens, T)
    padded_hidden = pad_packed(hidden, cu_seqlens, max_len=T)
    padded_hidden[~valid] = torch.randn(int((~valid).sum()), H).to(dtype)
    padded_labels = pad_packed(labels, cu_seqlens, max_len=T, value=-100)
    with rk.batch_invariant():
        batch = _rows(hidden, weight, labels, backend)
        _assert_bitwise(_rows(hidden, weight, labels, backend, subset), [x[subset] for x in batch], "subset")
        permuted = _rows(hidden, weight, labels, backend, permutation)
        _assert_bitwise(permuted, [x[permutation] for x in batch], "permutation")
        with_padding = _rows(padded_rows, weight, padded_row_labels, backend)
        _assert_bitwise([x[:n] for x in with_padding], batch, "padding rows")
        from_padded = _rows(padded_hidden, weight, padded_labels, backend)
        _assert_bitwise([pack_padded(x, cu_seqlens) for x in from_padded], batch, "packed vs padded")
        assert from_padded[2].shape == (len(lengths), T, H)


@pytest.mark.parametrize("backend,dtype", cases("linear_logprobs", FP32, FP32))
def test_the_mode_changes_no_value_beyond_rounding(backend, dtype):
    # The interpreter at V = 301: 3 vocabulary splits in the plain mode, 1 in the mode.
    H, V = (16, 301) if backend == "triton" else LINEAR_SHAPE[backend][1:]
    hidden, weight, labels = _linear_inputs(37, H, V, dtype)
    plain = _rows(hidden, weight, labels, backend, batch_invariant=False)
    invariant = _rows(hidden, weight, labels, backend, batch_invariant=True)
    for got, want in zip(invariant, plain):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_explicit_argument_beats_the_setting():
    with rk.batch_invariant():
        assert _batch_invariance.enabled() and not _batch_invariance.enabled(False)
    assert not _batch_invariance.enabled() and _batch_invariance.enabled(True)


def test_the_sequence_ops_hand_their_batch_invariant_argument_to_linear_logprobs(monkeypatch):
    """sequence_logprobs and linear_dpo_loss (its policy and ref_hidden passes) take
    batch_invariant= (None: the setting) and run linear_logprobs in that mode, also on
    the vocab_size route (which hands the mode on as the setting)."""
    from rlhf_kernels.functional import logprobs as functional_logprobs

    seen = []
    original = functional_logprobs.linear_logprobs

    def spy(*args, **kwargs):
        seen.append(_batch_invariance.enabled(kwargs.get("batch_invariant")))
        return original(*args, **kwargs)

    monkeypatch.setattr(functional_logprobs, "linear_logprobs", spy)
    B, T, H, V = 2, 3, 8, 11
    hidden, weight = torch.randn(2 * B, T, H), torch.randn(V, H)
    labels, mask = torch.randint(0, V, (2 * B, T)), torch.ones(2 * B, T)
    for setting, argument, want in [
        (False, None, False),
        (True, None, True),
        (False, True, True),
        (True, False, False),
    ]:
        with rk.batch_invariant(setting):
            for extra in ({}, {"vocab_size": V}):
                seen.clear()
                rk.sequence_logprobs(hidden, weight, labels, mask, batch_invariant=argument, **extra)
                rk.linear_dpo_loss(hidden, weight, labels, mask, ref_hidden=hidden, batch_invariant=argument, **extra)
                assert seen == [want] * 3, (setting, argument, extra, seen)
            assert _batch_invariance.enabled() == setting


# ------------------------------------------------------------- token_logprobs --
# No mode: each row of the logits is its own reduction on every backend (Triton: one
# program per row, so no tile position either). V is not a multiple of any block
# (32000 + 7) so the last tile is partial.


def _token_rows(logits, labels, backend, rows=slice(None)):
    z = logits[rows].detach().requires_grad_(True)
    logprobs, entropy = rk.token_logprobs(z, labels[rows], return_entropy=True, backend=backend)
    (logprobs.sum() + 0.5 * entropy.sum()).backward()
    return logprobs.detach(), entropy.detach(), z.grad


@pytest.mark.parametrize("backend,dtype", cases("token_logprobs", triton_dtypes=ALL_DTYPES))
def test_token_logprobs_subset_permutation_padding_and_packing_are_bitwise(backend, dtype):
    n, vocab = (12, 4103) if backend == "triton" else (96, 32000 + 7)
    logits = (3 * torch.randn(n, vocab)).to(dtype)
    labels = torch.randint(0, vocab, (n,))
    permutation = torch.randperm(n)
    batch = _token_rows(logits, labels, backend)
    _assert_bitwise(_token_rows(logits, labels, backend, slice(5, 6)), [x[5:6] for x in batch], "one row alone")
    _assert_bitwise(_token_rows(logits, labels, backend, permutation), [x[permutation] for x in batch], "permutation")
    padded = _token_rows(
        torch.cat([logits, torch.randn(9, vocab).to(dtype)]), torch.cat([labels, torch.full((9,), -100)]), backend
    )
    _assert_bitwise([x[:n] for x in padded], batch, "padding rows")
    lengths = torch.tensor([5, 1, 0, 6]) if backend == "triton" else torch.tensor([40, 1, 0, 55])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    T = int(lengths.max()) + 2
    valid = padding_mask(cu_seqlens, T)
    padded_logits = pad_packed(logits, cu_seqlens, max_len=T)
    padded_logits[~valid] = torch.randn(int((~valid).sum()), vocab).to(dtype)
    from_padded = _token_rows(padded_logits, pad_packed(labels, cu_seqlens, max_len=T, value=-100), backend)
    _assert_bitwise([pack_padded(x, cu_seqlens) for x in from_padded], batch, "packed vs padded")


# ---------------------------------------------------------- sequence_logprobs --
# Runs on linear_logprobs, then sums each sequence over T: invariant to which other
# sequences share the batch (subset, order, all-masked padding sequences) in the mode.
# Padding along T (a longer T of masked positions) is not bitwise: torch's row sum
# blocks by the row's length; the bound is T ulps of the sum of |log p|. Packing does
# not apply: a sequence sum needs the padded view (pad_packed). The interpreter's
# sequences are one tile long, so moving a sequence moves whole tiles.

SEQUENCE_SHAPE = {"reference": (6, 9, 96, 4099), "cpu": (6, 9, 96, 4099), "triton": (3, TILE, 16, 301)}  # B T H V


def _sequence_inputs(backend, dtype):
    B, T, H, vocab = SEQUENCE_SHAPE[backend]
    hidden = torch.randn(B, T, H).to(dtype)
    weight = (torch.randn(vocab, H) / H**0.5).to(dtype)
    labels = torch.randint(0, vocab, (B, T))
    mask = torch.rand(B, T) < 0.8
    mask[:, 0] = True
    return hidden, weight, labels, mask


def _sequences(hidden, weight, labels, mask, backend, rows=slice(None), average=False):
    h = hidden[rows].detach().requires_grad_(True)
    total = rk.sequence_logprobs(
        h, weight, labels[rows], mask[rows], average=average, batch_invariant=True, backend=backend
    )
    total.sum().backward()
    return total.detach(), h.grad


SEQUENCE_CASES = [
    pytest.param(*p.values, average, marks=p.marks, id=f"{p.id}-{'mean' if average else 'sum'}")
    for p in cases("sequence_logprobs", triton_dtypes=FP32)
    for average in ((False, True) if p.values[1] == torch.float32 else (False,))
]


@pytest.mark.parametrize("backend,dtype,average", SEQUENCE_CASES)
def test_sequence_logprobs_subset_order_and_padding_sequences_are_bitwise(backend, dtype, average):
    hidden, weight, labels, mask = _sequence_inputs(backend, dtype)
    B, T, H = hidden.shape
    padded = (
        torch.cat([hidden, torch.randn(2, T, H).to(dtype)]),
        weight,
        torch.cat([labels, torch.randint(0, weight.shape[0], (2, T))]),
        torch.cat([mask, torch.zeros(2, T, dtype=mask.dtype)]),
    )
    permutation = torch.randperm(B)
    with rk.batch_invariant(False):  # the per-call argument decides
        batch = _sequences(hidden, weight, labels, mask, backend, average=average)
        alone = _sequences(hidden, weight, labels, mask, backend, slice(1, 2), average)
        permuted = _sequences(hidden, weight, labels, mask, backend, permutation, average)
        with_padding = _sequences(*padded, backend, average=average)
    _assert_bitwise(alone, [x[1:2] for x in batch], "one sequence alone")
    _assert_bitwise(permuted, [x[permutation] for x in batch], "sequence order")
    _assert_bitwise([x[:B] for x in with_padding], batch, "padding sequences")
    assert torch.equal(with_padding[0][B:], torch.zeros(2))  # an all-masked sequence is exactly 0
    assert torch.equal(with_padding[1][B:], torch.zeros(2, T, H).to(dtype))


@pytest.mark.parametrize("backend,dtype", cases("sequence_logprobs", triton_dtypes=FP32))
def test_sequence_logprobs_padding_along_time_is_within_rounding(backend, dtype):
    hidden, weight, labels, mask = _sequence_inputs(backend, dtype)
    B, T, H = hidden.shape
    pad = TILE if backend == "triton" else 7  # the interpreter: rows move by whole tiles
    longer = (
        torch.cat([hidden, torch.randn(B, pad, H).to(dtype)], dim=1),
        weight,
        torch.cat([labels, torch.zeros(B, pad, dtype=labels.dtype)], dim=1),
        torch.cat([mask, torch.zeros(B, pad, dtype=mask.dtype)], dim=1),
    )
    want, want_grad = _sequences(hidden, weight, labels, mask, backend)
    got, got_grad = _sequences(*longer, backend)
    # Per-token log-probs and d hidden are the same bits; only the sum over T regroups
    # (all log p <= 0, so |sum| = sum |log p|).
    assert torch.equal(got_grad[:, :T], want_grad)
    assert ((got - want).abs() <= (T + pad) * EPS * want.abs()).all()


# ------------------------------------------------------------ linear_dpo_loss --
# The loss and the metrics are means over the B pairs. In the mode each pair's sequence
# log-probs (policy and ref_hidden) are bitwise whatever the batch, so:
# - pair order: each row's d hidden is bitwise (permuted with its pair); the loss and the
#   metrics are the same B terms summed in another order: within 2 B eps mean |term|;
# - subset (B' of the B pairs; one pair here): d hidden of a pair's rows is its d hidden
#   in the batch times B / B', bitwise when that factor is a power of two in fp32 and
#   bf16 (fp16: _assert_scaled's bound); the loss is within 2 B' eps of the mean of the
#   same pairs' losses in the batch;
# - P all-masked padding pairs: log-probs exactly 0, the real rows' d hidden times
#   (B + P) / B (as the subset's) and the padding rows' exactly 0; the metrics
#   times (B + P) / B and (B + P) loss - P loss_pad within 2 (B + P) eps of the batch's.
# The interpreter's sequences are one tile (T = 16) so pairs move by whole tiles.

DPO_SHAPE = {"reference": (4, 7, 64, 2053), "cpu": (4, 7, 64, 2053), "triton": (2, TILE, 16, 301)}  # B T H V
BETA = 0.1


def _dpo_inputs(backend, dtype):
    B, T, H, vocab = DPO_SHAPE[backend]
    hidden = torch.randn(2 * B, T, H).to(dtype)
    weight = (torch.randn(vocab, H) / H**0.5).to(dtype)
    labels = torch.randint(0, vocab, (2 * B, T))
    mask = torch.rand(2 * B, T) < 0.8
    mask[:, 0] = True
    ref_hidden = hidden + 0.1 * torch.randn(2 * B, T, H).to(dtype)
    return hidden, weight, labels, mask, ref_hidden


def _dpo(hidden, weight, labels, mask, backend, reference, rows=None):
    """(loss, metrics, d hidden) on hidden[rows]; reference: ("logps", [2B]) or ("hidden", [2B, T, H])."""
    rows = torch.arange(hidden.shape[0]) if rows is None else rows
    kind, ref = reference
    ref_args = (
        dict(ref_chosen_logps=ref[rows[: len(rows) // 2]], ref_rejected_logps=ref[rows[len(rows) // 2 :]])
        if kind == "logps"
        else dict(ref_hidden=ref[rows])
    )
    h = hidden[rows].detach().requires_grad_(True)
    loss, metrics = rk.linear_dpo_loss(
        h, weight, labels[rows], mask[rows], beta=BETA, batch_invariant=True, backend=backend, **ref_args
    )
    loss.backward()
    return loss.detach(), metrics, h.grad


def _pair_rows(pairs: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """Rows of [chosen; rejected] for the given pairs: chosen first, then rejected, in pair order."""
    return torch.cat([pairs, pairs + n_pairs])


def _metric_magnitudes(metrics, ref_chosen, ref_rejected) -> dict:
    """Upper bounds of each metric's mean |term| (the log-probs are <= 0, so their |mean|
    is their mean |term|; a reward is BETA (pi - ref))."""
    chosen, rejected = metrics["chosen_logps"].abs(), metrics["rejected_logps"].abs()
    reward_chosen = BETA * (chosen + ref_chosen.abs().mean())
    reward_rejected = BETA * (rejected + ref_rejected.abs().mean())
    return dict(
        chosen_logps=chosen,
        rejected_logps=rejected,
        chosen_rewards=reward_chosen,
        rejected_rewards=reward_rejected,
        reward_margin=reward_chosen + reward_rejected,
        reward_accuracy=torch.tensor(0.0),  # a mean of 0 / 1: exact
    )


@pytest.mark.parametrize("route", ["ref_logps", "ref_hidden"])
@pytest.mark.parametrize("backend,dtype", cases("linear_dpo_loss", triton_dtypes=FP32))
def test_linear_dpo_loss_pair_order_subset_and_padding_pairs(backend, dtype, route):
    hidden, weight, labels, mask, ref_hidden = _dpo_inputs(backend, dtype)
    B = hidden.shape[0] // 2
    if route == "ref_logps":
        reference = ("logps", -20 * torch.rand(2 * B))
        ref_logps = reference[1]
    else:
        reference = ("hidden", ref_hidden)
        ref_logps = rk.sequence_logprobs(ref_hidden, weight, labels, mask, batch_invariant=True, backend=backend)
    ref_chosen, ref_rejected = ref_logps[:B], ref_logps[B:]
    loss, metrics, grad = _dpo(hidden, weight, labels, mask, backend, reference)
    magnitude = _metric_magnitudes(metrics, ref_chosen, ref_rejected)

    order = torch.randperm(B)
    rows = _pair_rows(order, B)
    permuted_loss, permuted_metrics, permuted_grad = _dpo(hidden, weight, labels, mask, backend, reference, rows)
    assert torch.equal(permuted_grad, grad[rows])
    _assert_reordered_sum(permuted_loss, loss, B, loss, "pair order: loss")  # sigmoid losses are > 0
    for name, value in metrics.items():
        _assert_reordered_sum(permuted_metrics[name], value, B, magnitude[name], f"pair order: {name}")

    # Subset: one pair (B / B' = B, a power of two: an exact factor).
    pairs = torch.randint(B, (1,))
    rows = _pair_rows(pairs, B)
    subset_loss, _, subset_grad = _dpo(hidden, weight, labels, mask, backend, reference, rows)
    _assert_scaled(subset_grad, B * grad[rows], B, weight, "subset: d hidden")
    policy = rk.sequence_logprobs(hidden, weight, labels, mask, batch_invariant=True, backend=backend)
    pair_losses, _, _ = rk.dpo_loss(
        policy[:B], policy[B:], ref_chosen, ref_rejected, beta=BETA, backend=backend,
        chosen_lengths=mask[:B].sum(-1), rejected_lengths=mask[B:].sum(-1),
    )  # fmt: skip
    # Its own B terms of the batch, in batch order, as the loss (a mean of float32 terms).
    assert torch.equal(loss, pair_losses.float().mean())
    _assert_reordered_sum(subset_loss, pair_losses[pairs].mean(), len(pairs), subset_loss, "subset: loss")

    # Padding: B all-masked pairs after the real ones (B + P = 2 B, an exact factor).
    P = B
    T, H = hidden.shape[1:]

    def pad(x, filler):
        return torch.cat([x[:B], filler, x[B:], filler])

    padded_reference = (
        ("logps", pad(reference[1], torch.zeros(P)))
        if route == "ref_logps"
        else ("hidden", pad(ref_hidden, torch.randn(P, T, H).to(dtype)))
    )
    padded_loss, padded_metrics, padded_grad = _dpo(
        pad(hidden, torch.randn(P, T, H).to(dtype)),
        weight,
        pad(labels, torch.randint(0, weight.shape[0], (P, T))),
        pad(mask, torch.zeros(P, T, dtype=mask.dtype)),
        backend,
        padded_reference,
    )
    real = _pair_rows(torch.arange(B), B + P)
    _assert_scaled(2 * padded_grad[real], grad, 2, weight, "padding pairs: d hidden")
    assert torch.equal(padded_grad[_pair_rows(torch.arange(B, B + P), B + P)], torch.zeros(2 * P, T, H).to(dtype))
    padding_loss = math.log(2.0)  # -log sigmoid(0): log-probs and rewards 0
    _assert_reordered_sum(
        ((B + P) * padded_loss - P * padding_loss) / B, loss, B + P, loss + padding_loss, "padding pairs: loss"
    )
    for name, value in metrics.items():
        got = padded_metrics[name] * (B + P) / B
        _assert_reordered_sum(got, value, B + P, magnitude[name], f"padding pairs: {name}")


# --------------------------------------------------------- linear_policy_loss --
# It runs linear_logprobs on the B T rows (mask-0 rows selected to 0) and policy_loss on
# the [B, T] results. In the mode:
# - d hidden of every row is bitwise under sequence order, next to all-masked padding
#   sequences (whose rows get exactly 0), in a subset of the sequences when the loss's
#   normaliser is held (num_sequences= for seq-mean, global_tokens= for token-mean: the
#   micro-batch setting), and packed as one row [1, N] (a token-mean loss, per-token
#   advantages) vs the padded batch [B, T];
# - the loss is a mean of the same per-token / per-sequence terms summed in another
#   order: within 2 n eps mean |term| (n: sequences for the seq-mean "grpo", tokens
#   for the token-mean "dapo"); a subset's and the rest's losses add up to the batch's
#   within that bound. Positive advantages make every term negative (|mean| = mean |term|).

POLICY_SHAPE = {"reference": (6, 9, 64, 2053), "cpu": (6, 9, 64, 2053), "triton": (3, TILE, 16, 301)}  # B T H V


def _policy(hidden, weight, labels, mask, old, advantages, backend, **options):
    h = hidden.detach().requires_grad_(True)
    loss, _ = rk.linear_policy_loss(
        h, weight, labels, mask, old_logprobs=old, advantages=advantages, batch_invariant=True, backend=backend,
        **options,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("backend,dtype", cases("linear_policy_loss", triton_dtypes=FP32))
def test_linear_policy_loss_order_padding_subset_and_packing(backend, dtype):
    B, T, H, vocab = POLICY_SHAPE[backend]
    weight = (torch.randn(vocab, H) / H**0.5).to(dtype)

    def sequences(n, length):
        mask = torch.rand(n, length) < 0.8
        mask[:, 0] = True
        return dict(
            hidden=torch.randn(n, length, H).to(dtype),
            labels=torch.randint(0, vocab, (n, length)),
            mask=mask.float(),
            old=-3 * torch.rand(n, length),
            advantages=torch.rand(n, length) + 0.1,
        )

    def run(x, rows=slice(None), **options):
        hidden, labels, mask, old, advantages = (x[k][rows] for k in ("hidden", "labels", "mask", "old", "advantages"))
        return _policy(hidden, weight, labels, mask, old, advantages, backend, **options)

    x = sequences(B, T)
    loss, grad = run(x, num_sequences=float(B))  # grpo: seq-mean-token-mean; every row has a token
    order = torch.randperm(B)
    permuted_loss, permuted_grad = run(x, order)
    assert torch.equal(permuted_grad, grad[order])
    _assert_reordered_sum(permuted_loss, loss, B, loss.abs(), "sequence order: loss")

    padding = sequences(2, T)
    padding["mask"].zero_()
    with_padding = {k: torch.cat([x[k], padding[k]]) for k in x}
    padded_loss, padded_grad = run(with_padding)  # the default normaliser counts sequences with a token
    assert torch.equal(padded_grad[:B], grad)
    assert torch.equal(padded_grad[B:], torch.zeros(2, T, H).to(dtype))
    _assert_reordered_sum(padded_loss, loss, B + 2, loss.abs(), "padding sequences: loss")

    part = torch.randint(B, (1,))  # one sequence (T rows: a plain GEMM rounds them otherwise)
    rest = torch.tensor([i for i in range(B) if i != int(part)])
    part_loss, part_grad = run(x, part, num_sequences=float(B))
    rest_loss, rest_grad = run(x, rest, num_sequences=float(B))
    assert torch.equal(part_grad, grad[part]) and torch.equal(rest_grad, grad[rest])
    _assert_reordered_sum(part_loss + rest_loss, loss, B, loss.abs(), "subset losses add up")

    # Packed [1, N] vs padded [B, T]; token-mean ("dapo"), per-token advantages.
    lengths = torch.tensor([TILE, 2 * TILE, TILE]) if backend == "triton" else torch.tensor([5, 1, 9, 7])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    packed = {k: v[0] for k, v in sequences(1, int(cu_seqlens[-1])).items()}
    packed["mask"][TILE] = 0  # a hole inside a sequence (tool / prompt token)
    T_padded = int(lengths.max()) + (0 if backend == "triton" else 2)
    padded = {k: pad_packed(v, cu_seqlens, max_len=T_padded) for k, v in packed.items()}
    valid = padding_mask(cu_seqlens, T_padded)
    padded["hidden"][~valid] = torch.randn(int((~valid).sum()), H).to(dtype)  # masked: never read
    one_row_loss, one_row_grad = run({k: v[None] for k, v in packed.items()}, loss_type="dapo")
    padded_loss, padded_grad = run(padded, loss_type="dapo")
    assert torch.equal(one_row_grad[0], pack_padded(padded_grad, cu_seqlens))
    n_tokens = int(packed["mask"].sum())
    _assert_reordered_sum(one_row_loss, padded_loss, n_tokens, padded_loss.abs(), "packed vs padded: loss")


def test_process_group_route_reads_the_mode():
    """sequence_logprobs / linear_dpo_loss with a process_group run vocab_parallel's own
    linear path; it follows batch_invariant= too: a sequence alone is bitwise its row in
    a batch of 42 (a one-process gloo group, in process; without the mode the GEMM's
    blocking follows N)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        B, T, H, V = 42, 7, 512, 2000  # 7 rows alone vs 294: measured apart without the mode
        hidden, weight = torch.randn(B, T, H), torch.randn(V, H) * 0.1
        labels, mask = torch.randint(0, V, (B, T)), torch.ones(B, T)
        row = int(torch.randint(B, (1,)))

        def seq(rows):
            return rk.sequence_logprobs(
                hidden[rows], weight, labels[rows], mask[rows], process_group=group, batch_invariant=True
            )

        assert torch.equal(seq(slice(row, row + 1)), seq(slice(None))[row : row + 1])
        pairs = B // 2
        pair = row % pairs

        def dpo(pair_rows):
            rows = torch.cat([pair_rows, pair_rows + pairs])
            _, metrics = rk.linear_dpo_loss(
                hidden[rows], weight, labels[rows], mask[rows], reference_free=True, process_group=group,
                batch_invariant=True,
            )  # fmt: skip
            return metrics["chosen_logps"] * len(pair_rows)

        alone = dpo(torch.tensor([pair]))
        in_batch = seq(slice(None))[pair]
        assert torch.equal(alone, in_batch)
    finally:
        dist.destroy_process_group()
