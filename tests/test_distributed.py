"""Vocab-parallel log-probs (process_group=) against the unsharded single-process ops.

Each test spawns one gloo group of CPU processes (torch.multiprocessing, spawn) and runs
every check in it: token_logprobs, linear_logprobs, sequence_logprobs and
linear_dpo_loss, forward values and every gradient (logits shard, hidden, weight
shard, bias shard), with temperature, softcap / logit_scale, ignore_index rows, a
padded vocabulary (vocab_size < sum of shards, a rank holding only padding), T = 1 and
all-masked rows; then bad input (shards of different H, labels out of the global range,
mismatched N, options that differ) must raise the same error on every rank. 2 ranks
with even shards, 3 ranks with uneven ones. fp32 tolerance: rtol = atol = 1e-5 (the
sharded sums group the vocabulary differently; measured: at most 3e-5 absolute on
gradients of magnitude ~10, 5e-6 relative, elsewhere ~1e-7).
A deadline fails a hung group instead of blocking the suite.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rlhf_kernels as rk

DEADLINE_S = 90
TOL = dict(rtol=1e-5, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world_size: int, *args) -> None:
    port = _free_port()
    context = mp.spawn(fn, args=(world_size, port, *args), nprocs=world_size, join=False)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world_size}-process group did not finish in {DEADLINE_S} s (a hang?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _init(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.pop("RLHF_KERNELS_BACKEND", None)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=60),
    )  # fmt: skip


def _bounds(shards, rank):
    start = sum(shards[:rank])
    return start, start + shards[rank]


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"rank {dist.get_rank()}, {what}: {m}")


def _labels(shape, vocab, generator, ignored=0.2):
    labels = torch.randint(0, vocab, shape, generator=generator)
    return torch.where(torch.rand(shape, generator=generator) < ignored, torch.full_like(labels, -100), labels)


# ------------------------------------------------------------------- checks --


def _check_token(rank, shards, vocab_size, generator, **options):
    total = sum(shards)
    start, end = _bounds(shards, rank)
    full = torch.randn(3, 5, total, generator=generator) * 3
    labels = _labels((3, 5), vocab_size or total, generator)
    labels[0, 0] = (vocab_size or total) - 1  # the last real entry
    w_lp, w_ent = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)

    expected_full = (
        full[..., :vocab_size].clone().requires_grad_(True) if vocab_size else full.clone().requires_grad_(True)
    )
    lp, ent = rk.token_logprobs(expected_full, labels, return_entropy=True, **options)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    expected_grad = torch.zeros_like(full)
    expected_grad[..., : expected_full.shape[-1]] = expected_full.grad

    shard = full[..., start:end].clone().requires_grad_(True)
    lp_s, ent_s = rk.token_logprobs(
        shard, labels, return_entropy=True, process_group=dist.group.WORLD, vocab_size=vocab_size, **options
    )
    ((lp_s * w_lp).sum() + (ent_s * w_ent).sum()).backward()
    _close(lp_s, lp.detach(), f"token logprobs {options}")
    _close(ent_s, ent.detach(), f"token entropy {options}")
    _close(shard.grad, expected_grad[..., start:end], f"token d logits {options}")
    assert bool((lp_s[labels == -100] == 0).all())

    # log-probs only (no entropy), through the in-place backward
    shard = full[..., start:end].clone().requires_grad_(True)
    work = shard * 1.0
    lp_s = rk.token_logprobs(
        work, labels, process_group=dist.group.WORLD, vocab_size=vocab_size, inplace_backward=True, **options
    )
    (lp_s * w_lp).sum().backward()
    expected_full.grad = None
    (rk.token_logprobs(expected_full, labels, **options) * w_lp).sum().backward()
    expected_grad = torch.zeros_like(full)
    expected_grad[..., : expected_full.shape[-1]] = expected_full.grad
    _close(shard.grad, expected_grad[..., start:end], f"token d logits, in place, {options}")


def _linear_data(shards, H, rows, generator, vocab_size):
    total = sum(shards)
    hidden = torch.randn(*rows, H, generator=generator)
    weight = torch.randn(total, H, generator=generator) / H**0.5 * 2
    bias = torch.randn(total, generator=generator)
    labels = _labels(rows, vocab_size or total, generator)
    return hidden, weight, bias, labels


def _check_linear(rank, shards, vocab_size, generator, **options):
    start, end = _bounds(shards, rank)
    V = vocab_size or sum(shards)
    hidden, weight, bias, labels = _linear_data(shards, 8, (4, 6), generator, vocab_size)
    w_lp, w_ent = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)

    h, w, b = (x.clone().requires_grad_(True) for x in (hidden, weight[:V], bias[:V]))
    lp, ent = rk.linear_logprobs(h, w, labels, bias=b, return_entropy=True, **options)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
    grad_weight[:V], grad_bias[:V] = w.grad, b.grad

    hs, ws, bs = (x.clone().requires_grad_(True) for x in (hidden, weight[start:end], bias[start:end]))
    lp_s, ent_s = rk.linear_logprobs(
        hs, ws, labels, bias=bs, return_entropy=True, process_group=dist.group.WORLD, vocab_size=vocab_size,
        **options,
    )  # fmt: skip
    ((lp_s * w_lp).sum() + (ent_s * w_ent).sum()).backward()
    what = f"linear {options} vocab_size={vocab_size}"
    _close(lp_s, lp.detach(), what + " logprobs")
    _close(ent_s, ent.detach(), what + " entropy")
    _close(hs.grad, h.grad, what + " d hidden")
    _close(ws.grad, grad_weight[start:end], what + " d weight")
    _close(bs.grad, grad_bias[start:end], what + " d bias")

    # Frozen lm_head (only hidden needs a gradient), no bias, log-probs only.
    hs = hidden.clone().requires_grad_(True)
    lp_s = rk.linear_logprobs(hs, weight[start:end], labels, process_group=dist.group.WORLD, vocab_size=vocab_size)
    (lp_s * w_lp).sum().backward()
    h = hidden.clone().requires_grad_(True)
    (rk.linear_logprobs(h, weight[:V], labels) * w_lp).sum().backward()
    _close(hs.grad, h.grad, what + " d hidden, frozen weight")


def _check_sequences(rank, shards, vocab_size, generator, T):
    start, end = _bounds(shards, rank)
    V = vocab_size or sum(shards)
    B = 4
    hidden, weight, _, labels = _linear_data(shards, 8, (B, T), generator, vocab_size)
    labels = labels.clamp(min=0)
    mask = (torch.rand(B, T, generator=generator) > 0.3).float()
    mask[1] = 0  # an all-masked sequence
    mask[0, 0] = 1
    labels[1] = 10**6  # never read: masked
    group = dict(process_group=dist.group.WORLD, vocab_size=vocab_size)

    for average in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight[:V].clone().requires_grad_(True)
        seq = rk.sequence_logprobs(h, w, labels, mask, average=average, temperature=0.9)
        seq.pow(2).sum().backward()
        hs, ws = hidden.clone().requires_grad_(True), weight[start:end].clone().requires_grad_(True)
        seq_s = rk.sequence_logprobs(hs, ws, labels, mask, average=average, temperature=0.9, **group)
        seq_s.pow(2).sum().backward()
        what = f"sequence_logprobs T={T} average={average}"
        _close(seq_s, seq.detach(), what)
        assert seq_s[1].item() == 0.0
        _close(hs.grad, h.grad, what + " d hidden")
        grad_weight = torch.zeros_like(weight)
        grad_weight[:V] = w.grad
        _close(ws.grad, grad_weight[start:end], what + " d weight")

    # DPO: rows [:2] chosen, [2:] rejected; the reference from ref_hidden (no grad).
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=generator)
    for loss_type in ("sigmoid", "ipo"):
        h, w = hidden.clone().requires_grad_(True), weight[:V].clone().requires_grad_(True)
        loss, metrics = rk.linear_dpo_loss(h, w, labels, mask, ref_hidden=ref_hidden, beta=0.3, loss_type=loss_type)
        loss.backward()
        hs, ws = hidden.clone().requires_grad_(True), weight[start:end].clone().requires_grad_(True)
        loss_s, metrics_s = rk.linear_dpo_loss(
            hs, ws, labels, mask, ref_hidden=ref_hidden, beta=0.3, loss_type=loss_type, **group
        )
        loss_s.backward()
        what = f"linear_dpo_loss {loss_type} T={T}"
        _close(loss_s, loss.detach(), what)
        for name, value in metrics.items():
            _close(metrics_s[name], value, f"{what} {name}")
        _close(hs.grad, h.grad, what + " d hidden")
        grad_weight = torch.zeros_like(weight)
        grad_weight[:V] = w.grad
        _close(ws.grad, grad_weight[start:end], what + " d weight")


def _expect_same_error(fn, needle: str) -> None:
    """fn raises ValueError on every rank, with the same message, which contains needle."""
    try:
        fn()
    except ValueError as exc:
        message = str(exc)
    else:
        message = "no error"
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    assert len(set(messages)) == 1, f"the ranks raised different errors: {messages}"
    assert needle in message, message


def _check_bad_input(rank, shards, generator):
    start, end = _bounds(shards, rank)
    group = dist.group.WORLD
    hidden, weight, _, labels = _linear_data(shards, 8, (3, 4), generator, None)
    V = sum(shards)
    last = dist.get_world_size() - 1

    # Shards of different H: the last rank's lm_head is [V_r, 6] (and its hidden [.., 6]).
    h, w = (hidden[..., :6], weight[start:end, :6]) if rank == last else (hidden, weight[start:end])
    _expect_same_error(lambda: rk.linear_logprobs(h, w, labels, process_group=group), "hidden size H")
    # Only the last rank's own shapes disagree (weight H != hidden H): its local error everywhere.
    w = weight[start:end, :6] if rank == last else weight[start:end]
    _expect_same_error(lambda: rk.linear_logprobs(hidden, w, labels, process_group=group), f"rank {last}")
    # A label out of the global range (in range of no shard), the same on every rank.
    bad = labels.clone()
    bad[1, 2] = V
    _expect_same_error(lambda: rk.linear_logprobs(hidden, weight[start:end], bad, process_group=group), "[0, ")
    _expect_same_error(
        lambda: rk.token_logprobs(torch.randn(3, 4, end - start), bad, process_group=group), f"found e.g. {V}"
    )
    # ... and beyond vocab_size (inside the padding).
    _expect_same_error(
        lambda: rk.linear_logprobs(hidden, weight[start:end], labels.clamp(max=V - 1).fill_(V - 1),
                                   process_group=group, vocab_size=V - 1),
        f"[0, {V - 1})",
    )  # fmt: skip
    _expect_same_error(
        lambda: rk.linear_logprobs(hidden, weight[start:end], labels, process_group=group, vocab_size=V + 1),
        "vocab_size",
    )
    # Mismatched N across ranks.
    rows = 2 if rank == 0 else 3
    _expect_same_error(
        lambda: rk.linear_logprobs(hidden[:rows], weight[start:end], labels[:rows], process_group=group),
        "number of rows",
    )
    # Labels that differ across ranks, and an option that differs.
    other = labels.clone()
    if rank == last:
        other[0, 0] = (int(other[0, 0]) + 1) % V
    _expect_same_error(lambda: rk.linear_logprobs(hidden, weight[start:end], other, process_group=group), "labels")
    temperature = 1.0 if rank == 0 else 0.5
    _expect_same_error(
        lambda: rk.linear_logprobs(hidden, weight[start:end], labels, temperature=temperature, process_group=group),
        "temperature",
    )
    # A sequence-level input error on one rank only (mask of another shape).
    mask = torch.ones(3, 4) if rank == 0 else torch.ones(3, 5)
    _expect_same_error(
        lambda: rk.sequence_logprobs(hidden, weight[start:end], labels.clamp(min=0), mask, process_group=group),
        "rank 1",
    )
    # An odd number of DPO rows on the last rank only.
    n = 3 if rank == last else 2
    _expect_same_error(
        lambda: rk.linear_dpo_loss(hidden[:n], weight[start:end], labels[:n].clamp(min=0), torch.ones(n, 4),
                                   reference_free=True, process_group=group),
        "odd number of rows",
    )  # fmt: skip
    # A compiled backend named explicitly.
    _expect_same_error(
        lambda: rk.linear_logprobs(hidden, weight[start:end], labels, process_group=group, backend="cpu"), "backend"
    )
    # The group still works after all of that.
    rk.linear_logprobs(hidden, weight[start:end], labels, process_group=group)


def _check_policy_and_verl(rank, shards, vocab_size, generator):
    """linear_policy_loss and verl's vocab-parallel linear_cross_entropy on the same path."""
    from rlhf_kernels.integrations import verl

    start, end = _bounds(shards, rank)
    V = vocab_size or sum(shards)
    hidden, weight, _, labels = _linear_data(shards, 8, (3, 5), generator, vocab_size)
    mask = (labels != -100).float()
    old, advantages = -torch.rand(3, 5, generator=generator), torch.randn(3, generator=generator)
    options = dict(old_logprobs=old, advantages=advantages, loss_type="dapo", clip_high=0.28, entropy_coef=0.01)
    h, w = hidden.clone().requires_grad_(True), weight[:V].clone().requires_grad_(True)
    loss, _ = rk.linear_policy_loss(h, w, labels, mask, **options)
    loss.backward()
    hs, ws = hidden.clone().requires_grad_(True), weight[start:end].clone().requires_grad_(True)
    loss_s, _ = rk.linear_policy_loss(
        hs, ws, labels, mask, process_group=dist.group.WORLD, vocab_size=vocab_size, **options
    )
    loss_s.backward()
    _close(loss_s, loss.detach(), "linear_policy_loss")
    _close(hs.grad, h.grad, "linear_policy_loss d hidden")
    _close(ws.grad, torch.cat([w.grad, torch.zeros(sum(shards) - V, 8)])[start:end], "linear_policy_loss d weight")

    if vocab_size is None:  # verl's tensor-parallel lm_head is not padded
        safe = labels.clamp(min=0)  # verl's labels are all real tokens
        lp, ent = verl.linear_cross_entropy(hidden, weight, safe, 0.8, "none")
        lp_s, ent_s = verl.linear_cross_entropy(hidden, weight[start:end], safe, 0.8, "none", dist.group.WORLD)
        _close(lp_s, lp, "verl linear_cross_entropy logprobs")
        _close(ent_s, ent, "verl linear_cross_entropy entropy")


def _worker(rank, world_size, port, shards, padded_shards, vocab_size):
    _init(rank, world_size, port)
    try:
        generator = torch.Generator().manual_seed(1234)  # the same data on every rank
        for layout, size in ((shards, None), (padded_shards, vocab_size)):
            _check_token(rank, layout, size, generator, temperature=0.7)
            _check_token(rank, layout, size, generator, softcap=4.0, logit_scale=0.5)
            _check_linear(rank, layout, size, generator, temperature=1.3)
            _check_linear(rank, layout, size, generator, softcap=3.0, logit_scale=2.0)
            for T in (1, 5):
                _check_sequences(rank, layout, size, generator, T)
            _check_policy_and_verl(rank, layout, size, generator)
        _check_bad_input(rank, shards, generator)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "world_size, shards, padded_shards, vocab_size",
    [
        # even shards; padded 2 x 8 = 16 rows for a vocabulary of 13 (the padding on rank 1)
        (2, (7, 7), (8, 8), 13),
        # uneven shards (V = 17 over 3); padded 3 x 6 for 9: rank 1 partly, rank 2 only padding
        (3, (6, 6, 5), (6, 6, 6), 9),
    ],
    ids=["2-ranks", "3-ranks-uneven"],
)
def test_vocab_parallel_matches_single_process(world_size, shards, padded_shards, vocab_size):
    _spawn(_worker, world_size, shards, padded_shards, vocab_size)


def test_vocab_size_without_a_group_slices_the_padding():
    """vocab_size alone (one process, a padded lm_head): the padded rows never enter the
    softmax and get exactly zero gradient, on the usual backend."""
    hidden, weight, labels = torch.randn(3, 4, 8), torch.randn(11, 8), torch.randint(0, 9, (3, 4))
    weight[9:] = 50.0  # padding rows that would dominate the softmax if they entered it
    w = weight.clone().requires_grad_(True)
    lp, ent = rk.linear_logprobs(hidden, w, labels, vocab_size=9, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    w_ref = weight[:9].clone().requires_grad_(True)
    lp_ref, ent_ref = rk.linear_logprobs(hidden, w_ref, labels, return_entropy=True)
    (lp_ref.sum() + ent_ref.sum()).backward()
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=0)
    torch.testing.assert_close(w.grad[:9], w_ref.grad, rtol=0, atol=0)
    assert bool((w.grad[9:] == 0).all())
    logits = (hidden @ weight.T).requires_grad_(True)
    torch.testing.assert_close(rk.token_logprobs(logits, labels, vocab_size=9), lp_ref, **TOL)
    with pytest.raises(ValueError, match="vocab_size=12"):
        rk.token_logprobs(logits, labels, vocab_size=12)
    with pytest.raises(ValueError, match="labels must be in"):
        rk.linear_logprobs(hidden, weight, labels.fill_(9), vocab_size=9)
