"""Sequence packing (rlhf_kernels.packing): the helpers, and every op on packed batches.

A packed batch is the same tokens as a padded one, so each op must give the same per-token
values and gradients either way. Three routes are checked against the user's padded batch
[B, T] (padding filled with garbage where the op's mask hides it, T one longer than the
packed route's, and a loss mask with holes, so nothing passes by sharing the padding):
- rows: per-token ops on the packed rows [N, ...] as they are (no mask, no padding);
- row1: ops whose math is per token or a mean over all tokens, on the packed tensor viewed
  as one row [1, N] with the packed loss mask (all ones without holes);
- pad: everything else through pad_packed -> op -> pack_padded.
The reference packing in this file is boolean indexing of the padded batch (row-major =
packed order), not the helpers under test. Ops that need the padded view are shown to give
different results on one [1, N] row (docs/DESIGN.md, "Sequence packing").
"""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import backend as rk_backend
from rlhf_kernels.packing import cu_seqlens_from_position_ids, pack_padded, pad_packed, padding_mask

BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not rk_backend.HAS_CPU, reason="rlhf_kernels._C not built")),
]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
H, V = 8, 24


class Batch:
    """B ragged sequences (one of length 1), packed and padded.

    valid [B, T]: positions holding tokens in the user's padded layout, T = longest + 1.
    token_mask [N]: the packed loss mask (0 at ~20% of tokens, e.g. prompt or tool tokens,
    when holes); mask [B, T]: the same mask padded with 0, float as a padded trainer has it.
    """

    def __init__(self, B: int = 5, max_seq: int = 9, holes: bool = True):
        lengths = torch.randint(1, max_seq + 1, (B,))
        lengths[torch.randint(B, ())] = 1
        self.B, self.lengths, self.N = B, lengths, int(lengths.sum())
        self.longest, self.T = int(lengths.max()), int(lengths.max()) + 1
        self.cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
        self.valid = torch.arange(self.T) < lengths[:, None]
        self.token_mask = (torch.rand(self.N) > 0.2).float() if holes else torch.ones(self.N)
        self.mask = self.pad_ref(self.token_mask, garbage=False)

    def pad_ref(self, packed: torch.Tensor, garbage: bool = True) -> torch.Tensor:
        """The user's padded tensor [B, T, ...]: packed rows at valid positions; padding is
        garbage (float, when garbage) or 0."""
        out = torch.zeros(self.B, self.T, *packed.shape[1:], dtype=packed.dtype)
        if garbage and packed.is_floating_point():
            out = 2 * torch.randn_like(out)
        out[self.valid] = packed.detach()
        return out


def _flat(out) -> list:
    """An op's outputs as a list of tensors (dict stats in key order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    flat = []
    for o in out:
        flat += [o[k] for k in sorted(o)] if isinstance(o, dict) else _flat(o)
    return flat


def _run(fn, leaves: dict, view, mask, tokens_of) -> list:
    outs = _flat(fn({k: view(k, x) for k, x in leaves.items()}, mask))
    return [tokens_of(o) if tokens_of(o) is not None else o for o in outs]


def check_routes(fn, b: Batch, packed: dict, *, shared=None, grad=(), route="pad", tol, max_len=None, zero_pad=False):
    """fn(inputs, mask) on the user's padded batch vs on the packed tensors by `route`:
    outputs [B, T] compared per token, others ([B], scalars, stats) as they are; gradients
    of one random weighted sum of the outputs w.r.t. the `grad` inputs compared per token
    (packed inputs) or whole (shared inputs, e.g. the lm_head weight)."""
    shared = shared or {}

    def leaves_of(tensors):
        return {k: x.detach().clone().requires_grad_(k in grad) for k, x in tensors.items()}

    # The user's padded batch; its outputs and input gradients read at the valid positions.
    padded = leaves_of({**{k: b.pad_ref(x, garbage=not zero_pad) for k, x in packed.items()}, **shared})
    expected = _run(
        fn,
        padded,
        lambda k, x: x,
        b.mask,
        lambda o: o[b.valid] if o.dim() >= 2 and o.shape[:2] == (b.B, b.T) else None,
    )
    ours = leaves_of({**packed, **shared})
    if route == "pad":
        T = max_len or b.longest
        got = _run(
            fn,
            ours,
            lambda k, x: pad_packed(x, b.cu, max_len=max_len) if k in packed else x,
            pad_packed(b.token_mask, b.cu, max_len=max_len),
            lambda o: pack_padded(o, b.cu) if o.dim() >= 2 and o.shape[:2] == (b.B, T) else None,
        )
    elif route == "row1":
        got = _run(
            fn,
            ours,
            lambda k, x: x[None] if k in packed else x,
            b.token_mask[None],
            lambda o: o[0] if o.dim() >= 2 and o.shape[:2] == (1, b.N) else None,
        )
    else:  # rows: per-token ops on [N, ...] directly
        got = _run(fn, ours, lambda k, x: x, None, lambda o: o)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.detach(), e.detach(), **tol)
    if not grad:
        return
    weights = [torch.randn_like(e) if e.requires_grad else None for e in expected]
    assert any(w is not None for w in weights), "no output is differentiable"

    def grads(outs, leaves):
        loss = sum((w * o).sum() for w, o in zip(weights, outs) if w is not None)
        return dict(zip(grad, torch.autograd.grad(loss, [leaves[k] for k in grad])))

    g_got, g_expected = grads(got, ours), grads(expected, padded)
    for k in grad:
        want = g_expected[k][b.valid] if k in packed else g_expected[k]
        torch.testing.assert_close(g_got[k], want, **tol, msg=lambda m, k=k: f"d {k}: {m}")


def rand(b: Batch, dtype, *shape) -> torch.Tensor:
    return torch.randn(b.N, *shape, dtype=dtype)


# ---------------------------------------------------------------------------- the helpers


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_pad_pack_round_trip(cu_dtype):
    b = Batch()
    cu = b.cu.to(cu_dtype)
    for packed in (torch.randn(b.N), torch.randn(b.N, H), torch.randint(0, V, (b.N,)), b.token_mask.bool()):
        padded = pad_packed(packed, cu)
        assert padded.shape == (b.B, b.longest, *packed.shape[1:]) and padded.dtype == packed.dtype
        torch.testing.assert_close(padded, b.pad_ref(packed, garbage=False)[:, : b.longest], rtol=0, atol=0)
        assert torch.equal(pack_padded(padded, cu), packed)
        wide = pad_packed(packed, cu, max_len=b.T, value=-100 if not packed.is_floating_point() else -1.5)
        assert wide.shape[1] == b.T and torch.equal(pack_padded(wide, cu), packed)
        assert bool((wide[~b.valid] == wide.new_tensor(-100 if not packed.is_floating_point() else -1.5)).all())
    assert torch.equal(padding_mask(cu), b.valid[:, : b.longest])
    assert torch.equal(padding_mask(cu, b.T), b.valid)


def test_empty_sequences_and_empty_batch():
    cu = torch.tensor([0, 2, 2, 3, 3])
    x = torch.randn(3, 2)
    padded = pad_packed(x, cu)
    assert padded.shape == (4, 2, 2) and not bool(padded[1].any()) and not bool(padded[3].any())
    assert torch.equal(pack_padded(padded, cu), x)
    assert pad_packed(torch.zeros(0, H), torch.tensor([0])).shape == (0, 0, H)
    assert pack_padded(torch.zeros(2, 3), torch.tensor([0, 0, 0])).shape == (0,)


def test_gradients_flow_through_pad_and_pack():
    b = Batch()
    x = torch.randn(b.N, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: pad_packed(t, b.cu, max_len=b.T), (x,))
    y = torch.randn(b.B, b.T, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: pack_padded(t, b.cu), (y,))
    # Padding receives exactly no gradient.
    pack_padded(y, b.cu).sum().backward()
    assert bool((y.grad[~b.valid] == 0).all()) and bool((y.grad[b.valid] == 1).all())


def test_cu_seqlens_from_position_ids():
    b = Batch()
    starts = b.cu[:-1].long().repeat_interleave(b.lengths)
    position_ids = torch.arange(b.N) - starts  # 0, 1, .. per sequence, as HF's packed collators write them
    for pos in (position_ids, position_ids[None], position_ids.int()):
        cu = cu_seqlens_from_position_ids(pos)
        assert cu.dtype == torch.int32 and torch.equal(cu, b.cu)
    assert torch.equal(cu_seqlens_from_position_ids(torch.zeros(0, dtype=torch.int64)), torch.tensor([0]).int())


x8, cu8 = torch.zeros(8), torch.tensor([0, 3, 4, 8])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: pad_packed(x8, torch.tensor([0, 5, 4, 8])), ValueError, r"non-decreasing.*cu_seqlens\[1\] = 5"),
        (lambda: pad_packed(x8, torch.tensor([0, 3, 9])), ValueError, r"cu_seqlens\[-1\] must equal .* N = 8, got 9"),
        (lambda: pad_packed(x8, torch.tensor([1, 3, 8])), ValueError, r"cu_seqlens\[0\] must be 0"),
        (lambda: pad_packed(x8, cu8.float()), TypeError, r"cu_seqlens must have dtype in \(int32, int64\)"),
        (lambda: pad_packed(x8, cu8[None]), ValueError, r"cu_seqlens must have 1 dims \[B \+ 1\]"),
        (lambda: pad_packed(x8, cu8[:0]), ValueError, r"cu_seqlens must have B \+ 1 >= 1"),
        (lambda: pad_packed(x8, cu8, max_len=3), ValueError, r"max_len = 3 is shorter than the longest sequence"),
        (lambda: pad_packed(x8, cu8, max_len=2.0), ValueError, r"max_len must be None or an int >= 0"),
        (lambda: pad_packed(x8.tolist(), cu8), TypeError, r"packed must be a torch.Tensor \[N, ...\]"),
        (lambda: pad_packed(torch.tensor(1.0), cu8), ValueError, r"packed must have at least 1 dims"),
        (lambda: pack_padded(x8, cu8), ValueError, r"padded must have at least 2 dims \[B, T, ...\]"),
        (lambda: pack_padded(torch.zeros(2, 4), cu8), ValueError, r"cu_seqlens must have B \+ 1 = 3 entries"),
        (lambda: pack_padded(torch.zeros(3, 3), cu8), ValueError, r"padded's T \(dim 1\) = 3 is shorter"),
        (lambda: padding_mask(cu8, 2), ValueError, r"max_len = 2 is shorter"),
        (lambda: cu_seqlens_from_position_ids(torch.tensor([1, 2])), ValueError, r"position_ids must start at 0"),
        (lambda: cu_seqlens_from_position_ids(torch.tensor([0, 1, 3])), ValueError, r"got 1 then 3 at index 2"),
        (lambda: cu_seqlens_from_position_ids(torch.zeros(2, 3).long()), ValueError, r"\[N\] or \[1, N\]"),
        (lambda: cu_seqlens_from_position_ids(torch.zeros(3)), TypeError, r"position_ids must have dtype"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------- rows: per-token ops on [N, ...] directly


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_ops_take_packed_rows(backend, dtype):
    b, tol = Batch(), TOL[dtype]
    labels = torch.randint(0, V, (b.N,))
    check_routes(
        lambda x, m: rk.token_logprobs(x["logits"], x["labels"], return_entropy=True, temperature=0.7, backend=backend),
        b,
        {"logits": rand(b, dtype, V), "labels": labels},
        grad=("logits",),
        route="rows",
        tol=tol,
    )
    check_routes(
        lambda x, m: rk.linear_logprobs(x["hidden"], x["weight"], x["labels"], return_entropy=True, backend=backend),
        b,
        {"hidden": rand(b, dtype, H), "labels": labels},
        shared={"weight": torch.randn(V, H, dtype=dtype)},
        grad=("hidden", "weight"),
        route="rows",
        tol=tol,
    )
    check_routes(
        lambda x, m: rk.kl_penalty(x["logprobs"], x["ref"], estimator="k3", clamp=10.0, backend=backend),
        b,
        {"logprobs": rand(b, dtype), "ref": rand(b, dtype)},
        grad=("logprobs", "ref"),
        route="rows",
        tol=tol,
    )


# ------------------------------------- row1: per-token or token-mean ops on one row [1, N]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("holes", [False, True], ids=["all-ones-mask", "loss-mask"])
def test_token_mean_ops_take_one_packed_row(backend, dtype, holes):
    b, tol = Batch(holes=holes), TOL[dtype]
    ppo = {"logprobs": rand(b, dtype), "old": rand(b, dtype), "adv": rand(b, dtype)}
    for route in ("row1", "pad"):
        check_routes(
            lambda x, m: rk.masked_mean(x["x"], m, backend=backend),
            b,
            {"x": rand(b, dtype)},
            grad=("x",),
            route=route,
            tol=tol,
        )
        for fill_masked in (True, False):
            check_routes(
                lambda x, m: rk.masked_whiten(x["x"], m, fill_masked=fill_masked, backend=backend),
                b,
                {"x": rand(b, dtype)},
                grad=("x",),
                route=route,
                tol=tol,
            )
        check_routes(
            lambda x, m: rk.ppo_policy_loss(x["logprobs"], x["old"], x["adv"], m, dual_clip=3.0, backend=backend),
            b,
            ppo,
            grad=("logprobs",),
            route=route,
            tol=tol,
        )
        check_routes(
            lambda x, m: rk.ppo_value_loss(x["v"], x["old"], x["ret"], m, backend=backend),
            b,
            {"v": rand(b, dtype), "old": rand(b, dtype), "ret": rand(b, dtype)},
            grad=("v",),
            route=route,
            tol=tol,
        )
        for loss_type in ("bnpo", "dapo"):  # token-mean normalisers; token advantages
            check_routes(
                lambda x, m: rk.policy_loss(
                    x["logprobs"],
                    x["old"],
                    x["adv"],
                    m,
                    loss_type=loss_type,
                    clip_high=0.28,
                    ref_logprobs=x["ref"],
                    kl_coef=0.05,
                    entropy=x["ent"],
                    entropy_coef=0.01,
                    backend=backend,
                ),
                b,
                {**ppo, "ref": rand(b, dtype), "ent": rand(b, dtype).abs()},
                grad=("logprobs", "ent"),
                route=route,
                tol=tol,
            )
        check_routes(
            lambda x, m: rk.linear_policy_loss(
                x["hidden"],
                x["weight"],
                x["labels"],
                m,
                old_logprobs=x["old"],
                advantages=x["adv"],
                loss_type="dapo",
                entropy_coef=0.01,
                backend=backend,
            ),
            b,
            {
                "hidden": rand(b, dtype, H),
                "labels": torch.randint(0, V, (b.N,)),
                "old": rand(b, dtype) - 3,
                "adv": rand(b, dtype),
            },
            shared={"weight": torch.randn(V, H, dtype=dtype)},
            grad=("hidden", "weight"),
            route=route,
            tol=tol,
        )


# ------------------------------------ pad: ops with per-sequence structure, via pad_packed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_logprobs_and_dpo(backend, dtype):
    b, tol = Batch(B=6), TOL[dtype]
    hidden, labels = rand(b, dtype, H), torch.randint(0, V, (b.N,))
    weight = torch.randn(V, H, dtype=dtype)
    for average in (False, True):
        check_routes(
            lambda x, m: rk.sequence_logprobs(
                x["hidden"], x["weight"], x["labels"], m, average=average, backend=backend
            ),
            b,
            {"hidden": hidden, "labels": labels},
            shared={"weight": weight},
            grad=("hidden", "weight"),
            tol=tol,
        )
    # Rows [:3] chosen, [3:] rejected; the per-sequence log-probs (and lengths) need the padded view.
    ref = {"ref_c": torch.randn(3, dtype=dtype), "ref_r": torch.randn(3, dtype=dtype)}
    for loss_type in ("sigmoid", "ipo", "sigmoid_norm"):
        check_routes(
            lambda x, m: rk.linear_dpo_loss(
                x["hidden"],
                x["weight"],
                x["labels"],
                m,
                ref_chosen_logps=x["ref_c"],
                ref_rejected_logps=x["ref_r"],
                loss_type=loss_type,
                backend=backend,
            ),
            b,
            {"hidden": hidden, "labels": labels},
            shared={"weight": weight, **ref},
            grad=("hidden", "weight"),
            tol=tol,
        )

    def dpo(x, m):
        seq = rk.sequence_logprobs(x["hidden"], x["weight"], x["labels"], m, backend=backend)
        lengths = m.sum(-1)
        return rk.dpo_loss(
            seq[:3],
            seq[3:],
            x["ref_c"],
            x["ref_r"],
            loss_type=["sigmoid", "bco_pair"],
            loss_weights=[1.0, 0.5],
            chosen_lengths=lengths[:3],
            rejected_lengths=lengths[3:],
            backend=backend,
        )

    check_routes(
        dpo, b, {"hidden": hidden, "labels": labels}, shared={"weight": weight, **ref}, grad=("hidden",), tol=tol
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rewards_gae_and_returns(backend, dtype):
    b, tol = Batch(), TOL[dtype]
    scores = torch.randn(b.B, dtype=dtype)
    for estimator in ("k1", "k3"):
        check_routes(
            lambda x, m: rk.kl_shaped_rewards(
                x["s"], x["lp"], x["ref"], m, kl_coef=0.1, estimator=estimator, backend=backend
            ),
            b,
            {"lp": rand(b, dtype), "ref": rand(b, dtype)},
            shared={"s": scores},
            tol=tol,
        )
    rv = {"r": rand(b, dtype), "v": rand(b, dtype)}
    for mask_mode in ("carry", "multiply", "ignore"):
        check_routes(
            lambda x, m: rk.gae(x["r"], x["v"], m, gamma=0.99, lam=0.9, mask_mode=mask_mode, backend=backend),
            b,
            rv,
            tol=tol,
            zero_pad=mask_mode == "ignore",  # "ignore" (TRL) scans the padding: it must be 0 there, as TRL pads
        )
    check_routes(lambda x, m: rk.discounted_returns(x["r"], m, gamma=0.9, backend=backend), b, rv, tol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_with_sequence_aggregation(backend, dtype):
    b, tol = Batch(), TOL[dtype]
    ppo = {"logprobs": rand(b, dtype), "old": rand(b, dtype), "adv": rand(b, dtype)}
    check_routes(
        lambda x, m: rk.masked_mean(x["x"], m, dim=-1, backend=backend), b, {"x": rand(b, dtype)}, grad=("x",), tol=tol
    )
    for agg in ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        # seq-mean-token-sum-norm divides by T: pad to the padded batch's T (or pass horizon=).
        max_len = b.T if agg == "seq-mean-token-sum-norm" else None
        check_routes(
            lambda x, m: rk.ppo_policy_loss(x["logprobs"], x["old"], x["adv"], m, agg=agg, backend=backend),
            b,
            ppo,
            grad=("logprobs",),
            tol=tol,
            max_len=max_len,
        )
        check_routes(
            lambda x, m: rk.ppo_value_loss(x["logprobs"], x["old"], x["adv"], m, clip=0.5, agg=agg, backend=backend),
            b,
            ppo,
            grad=("logprobs",),
            tol=tol,
            max_len=max_len,
        )
    seq_adv = {"adv": torch.randn(b.B, dtype=dtype)}  # GRPO: one advantage per sequence
    cases = [
        ("grpo", {}),
        ("grpo", {"agg": "seq-mean-token-sum"}),
        ("dr_grpo", {"horizon": 16.0}),
        ("luspo", {}),
        ("gspo", {}),
        ("cispo", {}),
        ("sapo", {}),
        ("geo_mean", {}),
        ("grpo", {"importance_sampling_level": "sequence"}),
    ]
    for loss_type, options in cases:
        check_routes(
            lambda x, m: rk.policy_loss(
                x["logprobs"],
                x["old"],
                x["adv"],
                m,
                loss_type=loss_type,
                ref_logprobs=x["ref"],
                kl_coef=0.05,
                backend=backend,
                **options,
            ),
            b,
            {"logprobs": ppo["logprobs"], "old": ppo["old"], "ref": rand(b, dtype)},
            shared=seq_adv,
            grad=("logprobs",),
            tol=tol,
        )
    check_routes(
        lambda x, m: rk.linear_policy_loss(
            x["hidden"],
            x["weight"],
            x["labels"],
            m,
            old_logprobs=x["old"],
            advantages=x["adv"],
            loss_type="grpo",
            backend=backend,
        ),
        b,
        {"hidden": rand(b, dtype, H), "labels": torch.randint(0, V, (b.N,)), "old": rand(b, dtype) - 3},
        shared={**seq_adv, "weight": torch.randn(V, H, dtype=dtype)},
        grad=("hidden", "weight"),
        tol=tol,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_advantages(dtype):
    """Reference-only ops. Sequence estimators never see tokens; their [B] advantages reach
    packed tokens by broadcast_advantages on the padded view, or by repeat_interleave."""
    b, tol = Batch(B=6), TOL[dtype]
    adv = rk.group_advantages(torch.randn(b.B, dtype=dtype), group_size=3)
    check_routes(lambda x, m: rk.broadcast_advantages(adv, m), b, {}, tol=tol)
    on_tokens = pack_padded(rk.broadcast_advantages(adv, pad_packed(b.token_mask, b.cu)), b.cu)
    torch.testing.assert_close(on_tokens, adv.repeat_interleave(b.lengths) * b.token_mask, **tol)
    check_routes(
        lambda x, m: rk.group_advantages(
            None, token_rewards=x["r"], mask=m, estimator="reinforce_plus_plus", gamma=0.9
        ),
        b,
        {"r": rand(b, dtype)},
        tol=tol,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_ops_pad_the_log_probs_not_the_hidden_states(backend, dtype):
    """The cheaper recipe (DESIGN): linear_logprobs on the packed rows [N, H], then pad the
    [N] log-probs and entropy for the sequence-level loss. It equals linear_policy_loss and
    sequence_logprobs on the padded batch, whose lm_head GEMM also runs on the B T - N
    padding rows."""
    b, tol = Batch(), TOL[dtype]
    hidden, weight = rand(b, dtype, H).requires_grad_(), torch.randn(V, H, dtype=dtype, requires_grad=True)
    labels, old, adv = torch.randint(0, V, (b.N,)), rand(b, dtype) - 3, torch.randn(b.B, dtype=dtype)
    hidden_p, weight_p = b.pad_ref(hidden).requires_grad_(), weight.detach().clone().requires_grad_()
    options = dict(loss_type="grpo", entropy_coef=0.01, clip_high=0.28, backend=backend)

    lp, ent = rk.linear_logprobs(hidden, weight, labels, return_entropy=True, temperature=0.9, backend=backend)
    mask = pad_packed(b.token_mask, b.cu)
    loss, stats = rk.policy_loss(
        pad_packed(lp, b.cu), pad_packed(old, b.cu), adv, mask, entropy=pad_packed(ent, b.cu), **options
    )
    seq = (pad_packed(lp, b.cu) * mask).sum(-1)
    want_loss, want_stats = rk.linear_policy_loss(
        hidden_p,
        weight_p,
        b.pad_ref(labels),
        b.mask,
        old_logprobs=b.pad_ref(old),
        advantages=adv,
        temperature=0.9,
        **options,
    )
    want_seq = rk.sequence_logprobs(hidden_p, weight_p, b.pad_ref(labels), b.mask, temperature=0.9, backend=backend)
    torch.testing.assert_close(loss, want_loss, **tol)
    torch.testing.assert_close(seq, want_seq, **tol)
    assert set(stats) == set(want_stats)
    for k in stats:
        torch.testing.assert_close(stats[k], want_stats[k], **tol, msg=lambda m, k=k: f"{k}: {m}")
    w = torch.randn(b.B, dtype=dtype)
    got = torch.autograd.grad(loss + (w * seq).sum(), (hidden, weight))
    want = torch.autograd.grad(want_loss + (w * want_seq).sum(), (hidden_p, weight_p))
    torch.testing.assert_close(got[0], want[0][b.valid], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)


# ------------------------------------------- the ops that need the padded view (the doc's list)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_packed_row_is_wrong_for_sequence_ops(backend):
    """On [1, N] a reverse scan runs across sequence boundaries, the score lands on the last
    token only, and a per-sequence mean sees one sequence: each differs from the padded result."""
    b = Batch(holes=False)
    r, v, lp, old = (rand(b, torch.float64) for _ in range(4))

    def differs(one_row, padded):
        assert (one_row - padded).abs().max() > 1e-3 * padded.abs().max()

    adv1, ret1 = rk.gae(r[None], v[None], b.token_mask[None], gamma=0.99, lam=0.9, backend=backend)
    adv, ret = rk.gae(b.pad_ref(r), b.pad_ref(v), b.mask, gamma=0.99, lam=0.9, backend=backend)
    differs(adv1[0], adv[b.valid])
    differs(ret1[0], ret[b.valid])
    g1 = rk.discounted_returns(r[None], b.token_mask[None], gamma=0.9, backend=backend)
    differs(g1[0], rk.discounted_returns(b.pad_ref(r), b.mask, gamma=0.9, backend=backend)[b.valid])
    scores = torch.randn(b.B, dtype=torch.float64)
    rw1, _ = rk.kl_shaped_rewards(scores[-1:], lp[None], old[None], b.token_mask[None], kl_coef=0.1, backend=backend)
    rw, _ = rk.kl_shaped_rewards(scores, b.pad_ref(lp), b.pad_ref(old), b.mask, kl_coef=0.1, backend=backend)
    differs(rw1[0], rw[b.valid])

    # Losses: d loss / d logprobs per token (a scalar loss can agree by chance).
    def d_logprobs(view, mask, agg):
        leaf = lp.detach().clone().requires_grad_()
        loss, _ = rk.ppo_policy_loss(view(leaf), view(old), view(r), mask, agg=agg, backend=backend)
        return torch.autograd.grad(loss, leaf)[0]

    def padded(x):
        return pad_packed(x, b.cu, max_len=b.T)

    agg = "seq-mean-token-mean"
    differs(d_logprobs(lambda x: x[None], b.token_mask[None], agg), d_logprobs(padded, b.mask, agg))
    # seq-mean-token-sum-norm divides by T: pad_packed's default T (the longest) is not the padded batch's.
    agg = "seq-mean-token-sum-norm"
    differs(d_logprobs(lambda x: pad_packed(x, b.cu), padding_mask(b.cu), agg), d_logprobs(padded, b.mask, agg))
