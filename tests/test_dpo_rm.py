"""DPO (against TRL 1.16's own DPOTrainer code, tests/trl_dpo.py) and reward-model losses,
on every backend."""

import copy

import framework_refs
import pytest
import torch
import trl_dpo

import oracle
import rlhf_kernels as rk
from conftest import backends_of, tolist
from rlhf_kernels.reference.dpo import BATCH_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCES, LOSS_TYPES

COMPILED = ("cpu", "triton")
PER_PAIR = [t for t in LOSS_TYPES if t not in BATCH_LOSS_TYPES]
# Every loss type at reverse KL, and every other f-divergence where TRL allows one.
LOSS_AND_F = [(t, "reverse_kl") for t in LOSS_TYPES] + [
    (t, f) for t in F_DIVERGENCE_LOSS_TYPES for f in F_DIVERGENCES[1:]
]


@pytest.fixture(autouse=True, params=backends_of("dpo_loss"))
def backend_name(request, monkeypatch, _fresh_seed):
    """Every test here runs on each backend of the dpo and rm families."""
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", f"dpo={request.param},rm={request.param}")
    return request.param


def _logps(B, dtype=torch.float32):
    return [(-torch.rand(B) * 50).to(dtype) for _ in range(4)]


# ------------------------------------------------- TRL's trainer on token log-probs --


class Batch:
    """B preference pairs as TRL's trainer sees them: a completion mask [2B, S + 1]
    (prompt, completion, right padding; chosen rows first) and per-token log-probs
    [2B, S] of the policy (a leaf: the gradients are compared) and the reference, zero
    outside the completion. `exact` draws multiples of 1/16 whose sums every float
    dtype holds exactly, so TRL's low-precision sums equal ours."""

    def __init__(self, B=4, S=7, dtype=torch.float32, exact=False):
        prompt = torch.randint(1, 3, (2 * B, 1))
        length = torch.randint(1, S - 1, (2 * B, 1))
        position = torch.arange(S + 1)
        self.mask = ((position >= prompt) & (position < prompt + length)).long()
        self.B, self.dtype, shift = B, dtype, self.mask[:, 1:]

        def draw():
            x = -torch.randint(0, 32, (2 * B, S)) / 16 if exact else -torch.rand(2 * B, S) * 3
            return (x * shift).to(dtype)

        self.raw, self.ref = draw().requires_grad_(True), draw()
        self.log_sum_sq_probs = -torch.rand(2 * B, S)  # WPO's log sum_v p_v^2 per token

    def policy(self):
        return self.raw * self.mask[:, 1:].to(self.dtype)

    def replaced(self, **fields):
        """A copy with some fields replaced (a sub-batch, another reference)."""
        other = copy.copy(self)
        other.__dict__.update(fields)
        return other

    def trl(self, use_weighting=False, **options):
        """TRL's (loss, chosen rewards, rejected rewards, d loss / d policy tokens)."""
        self.raw.grad = None
        lssp = self.log_sum_sq_probs.to(self.dtype) if use_weighting else None
        loss, chosen, rejected = trl_dpo.trl_dpo(
            self.policy(), self.ref, self.mask, log_sum_sq_probs=lssp, use_weighting=use_weighting, **options
        )
        try:
            loss.backward()
        except RuntimeError as error:  # TRL's WPO multiplies in place what hinge's relu saved
            assert "modified by an inplace operation" in str(error)
        return loss.detach(), chosen, rejected, self.raw.grad

    def rk(self, use_weighting=False, ld_alpha=None, **options):
        """rk.dpo_loss on the reduced per-sequence inputs: (mean loss, rewards, losses, grad)."""
        self.raw.grad = None
        policy, lengths, B = self.policy(), self.mask.sum(1), self.B
        kwargs = dict(chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
        if ld_alpha is not None:
            tails = self.tails(policy), self.tails(self.ref)
            kwargs.update(ld_alpha=ld_alpha, policy_chosen_tail_logps=tails[0][:B],
                          policy_rejected_tail_logps=tails[0][B:], ref_chosen_tail_logps=tails[1][:B],
                          ref_rejected_tail_logps=tails[1][B:])  # fmt: skip
        if use_weighting:
            kwargs["weights"] = self.wpo_weights(policy)
        sums, ref = policy.sum(1), self.ref.sum(1)
        losses, chosen, rejected = rk.dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], **kwargs, **options)
        losses.mean().backward()
        return losses.mean().detach(), chosen, rejected, losses, self.raw.grad

    def tails(self, per_token):
        """LD-DPO: the sums past the shorter response of each pair (TRL's split, checked
        against TRL in test_ld_tails_are_trls_split)."""
        shift = self.mask[:, 1:]
        position, n = shift.cumsum(1), shift.sum(1)
        shared = torch.minimum(n[: self.B], n[self.B :]).repeat(2)
        return (per_token * (position > shared[:, None])).sum(1)

    def wpo_weights(self, per_token):
        """WPO (TRL use_weighting): exp(mean over the completion of logp - log sum p^2),
        the chosen's times the rejected's, without grad."""
        shift = self.mask[:, 1:]
        with torch.no_grad():
            aligned = ((per_token - self.log_sum_sq_probs.to(self.dtype)) * shift).sum(1)
            weight = torch.exp(aligned / shift.sum(1).clamp_min(1))
        return weight[: self.B] * weight[self.B :]


def _assert_trl(got, want, atol=1e-5, rtol=1e-5):
    loss, chosen, rejected, _, grad = got
    for ours, theirs in zip((loss, chosen, rejected, grad), want):
        if theirs is None:  # no gradient from TRL (see Batch.trl)
            continue
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol)


@pytest.mark.parametrize("loss_type, f_divergence_type", LOSS_AND_F)
def test_dpo_loss_matches_trl(loss_type, f_divergence_type):
    batch = Batch()
    options = dict(beta=0.3, label_smoothing=0.1, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=0.6)
    want = batch.trl(loss_type=[loss_type], **options)
    _assert_trl(batch.rk(loss_type=loss_type, **options), want)


@pytest.mark.parametrize("loss_type", PER_PAIR)
def test_dpo_loss_per_pair_matches_trl_one_pair_at_a_time(loss_type):
    batch = Batch(B=3)
    losses = batch.rk(loss_type=loss_type, label_smoothing=0.2)[3]
    for i in range(3):  # TRL's loss of a batch of the one pair i
        rows = [i, 3 + i]
        raw = batch.raw.detach()[rows].requires_grad_(True)
        single = batch.replaced(B=1, mask=batch.mask[rows], ref=batch.ref[rows], raw=raw)
        torch.testing.assert_close(losses[i].detach(), single.trl(loss_type=[loss_type], label_smoothing=0.2)[0])


OPTION_CASES = {
    "ld_alpha": dict(ld_alpha=0.4),
    "wpo": dict(use_weighting=True),
    "ld_alpha+wpo+alpha_divergence": dict(ld_alpha=0.0, use_weighting=True, f_divergence_type="alpha_divergence"),
}


@pytest.mark.parametrize("option", OPTION_CASES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_loss_options_match_trl(option, loss_type):
    options = dict(OPTION_CASES[option], label_smoothing=0.1)
    if options.get("use_weighting") and loss_type in ("aot", "aot_unpaired", "sft"):
        pytest.skip(
            "TRL: WPO is not implemented for aot; sft with WPO fails in TRL (an in-place multiply of an expand)"
        )
    if options.get("f_divergence_type") and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        pytest.skip("TRL rejects an f-divergence for this loss type")
    batch = Batch()
    _assert_trl(batch.rk(loss_type=loss_type, **options), batch.trl(loss_type=[loss_type], **options))


@pytest.mark.parametrize(
    "loss_type, loss_weights, f_divergence_type",
    [
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], "reverse_kl"),  # MPO, TRL's example
        (["ipo", "hinge", "sigmoid_norm", "sft"], None, "js_divergence"),
        (["aot", "nca_pair", "apo_down", "aot_unpaired"], [1.0, -0.5, 2.0, 0.25], "reverse_kl"),
    ],
)
def test_dpo_loss_several_loss_types_match_trl(loss_type, loss_weights, f_divergence_type):
    batch = Batch()
    options = dict(loss_weights=loss_weights, f_divergence_type=f_divergence_type, label_smoothing=0.05)
    _assert_trl(
        batch.rk(loss_type=loss_type, ld_alpha=0.7, **options), batch.trl(loss_type=loss_type, ld_alpha=0.7, **options)
    )


def test_ld_tails_are_trls_split():
    batch = Batch(B=5)
    shared = trl_dpo.trl_sequence_logps(batch.ref, batch.mask, ld_alpha=0.0)
    full = batch.ref.sum(1)
    torch.testing.assert_close(torch.cat(shared), full - batch.tails(batch.ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type, f_divergence_type", [(t, "reverse_kl") for t in LOSS_TYPES] + [
    ("sigmoid", "alpha_divergence"), ("ipo", "forward_kl")])  # fmt: skip
def test_dpo_loss_16_bit_inputs_as_trl(dtype, loss_type, f_divergence_type):
    """Outputs in TRL's dtype (the inputs' for most losses; float32 for ipo and sigmoid_norm,
    which divide by integer lengths), computed in float32 and rounded once: losses, rewards
    and gradients within 2^-8 relative (two bfloat16 roundings) of TRL run in float32 on the
    same inputs. TRL itself rounds every intermediate to the input dtype."""
    batch = Batch(dtype=dtype, exact=True)
    options = dict(beta=0.2, label_smoothing=0.1, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=-0.5)
    in_dtype = batch.trl(loss_type=[loss_type], **options)
    ours = batch.rk(loss_type=loss_type, **options)
    assert (ours[0].dtype, ours[1].dtype, ours[4].dtype) == tuple(x.dtype for x in in_dtype[:2] + in_dtype[3:])
    batch.dtype, batch.raw, batch.ref = (
        torch.float32,
        batch.raw.detach().float().requires_grad_(True),
        batch.ref.float(),
    )
    exact = batch.trl(loss_type=[loss_type], **options)
    for got, want in zip(ours[:3] + ours[4:], exact):
        torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=2**-8 * float(want.abs().max()) / batch.B)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dpo_loss_alpha_divergence_clamps_as_trl(dtype):
    """TRL clamps (alpha - 1) rho at 11 for float16 (80 otherwise); the gradient stops there."""
    mask = torch.tensor([[0, 1], [0, 1]])
    policy, ref = torch.tensor([[-12.0], [0.0]], dtype=dtype, requires_grad=True), torch.zeros(2, 1, dtype=dtype)
    options = dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.0)  # t = -rho = 12
    want = trl_dpo.trl_dpo(policy, ref, mask, loss_type=["sigmoid"], **options)[0]
    (want_grad,) = torch.autograd.grad(want, policy)
    got = rk.dpo_loss(policy[:1, 0], policy[1:, 0], ref[:1, 0], ref[1:, 0], **options)[0]
    (grad,) = torch.autograd.grad(got.sum(), policy)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got[0], want, rtol=2**-10, atol=0)
    assert torch.equal(grad == 0, want_grad == 0) and (grad[0] == 0) == (dtype == torch.float16)


def test_dpo_loss_cdpo_is_openrlhfs_smoothed_sigmoid():
    logps = [-torch.rand(6) * 30 for _ in range(4)]
    losses, chosen, rejected = rk.dpo_loss(*logps, beta=0.1, label_smoothing=0.2, cdpo=True)
    want = framework_refs.openrlhf_dpo_loss(0.1, 0.2, False, *logps)
    torch.testing.assert_close((losses.mean(), chosen, rejected), want)


def test_dpo_loss_reference_free_drops_the_reference_from_the_scores_only():
    batch = Batch()
    zero_ref = batch.replaced(ref=torch.zeros_like(batch.ref))
    for loss_type in LOSS_TYPES:
        got = batch.rk(loss_type=loss_type, reference_free=True, label_smoothing=0.1)
        # TRL before 1.0: the reference stays in nca_pair, bco_pair, sppo_hard, aot and the rewards
        keeps_ref = loss_type in ("nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "sft")
        want = (batch if keeps_ref else zero_ref).trl(loss_type=[loss_type], label_smoothing=0.1)
        torch.testing.assert_close((got[0], got[4]), (want[0], want[3]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1:3], batch.trl(loss_type=["sigmoid"])[1:3])


def test_dpo_loss_ipo_without_lengths_is_ipo_on_the_scores_given():
    """The pre-1.16 form, and TRL's ipo when the log-probs given are per-token means."""
    batch = Batch()
    lengths, B = batch.mask.sum(1), batch.B
    policy, ref = batch.policy().sum(1) / lengths, batch.ref.sum(1) / lengths
    losses, *_ = rk.dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], loss_type="ipo")
    losses.mean().backward()
    want = batch.trl(loss_type=["ipo"])
    torch.testing.assert_close((losses.mean().detach(), batch.raw.grad), (want[0], want[3]))


def test_dpo_loss_sigmoid_ignores_label_smoothing_without_cdpo():
    logps = _logps(5)
    plain = rk.dpo_loss(*logps)
    torch.testing.assert_close(rk.dpo_loss(*logps, label_smoothing=0.3), plain)
    assert not torch.allclose(rk.dpo_loss(*logps, label_smoothing=0.3, cdpo=True)[0], plain[0])


# ------------------------------------------------------- kernels vs the reference --


def _extras(B, dtype=torch.float32, requires_grad=False):
    """ld_alpha, lengths and WPO weights, with policy tails that may need grad."""
    tails = [(-torch.rand(B) * 5).to(dtype) for _ in range(4)]
    tails[0].requires_grad_(requires_grad)
    tails[1].requires_grad_(requires_grad)
    return dict(
        ld_alpha=0.3, policy_chosen_tail_logps=tails[0], policy_rejected_tail_logps=tails[1],
        ref_chosen_tail_logps=tails[2], ref_rejected_tail_logps=tails[3], chosen_lengths=torch.randint(0, 20, (B,)),
        rejected_lengths=torch.randint(1, 20, (B,)), weights=torch.rand(B, dtype=dtype),
    )  # fmt: skip


def _options(loss_type, f_divergence_type="reverse_kl", extras=None):
    options = dict(loss_type=loss_type, label_smoothing=0.2, f_divergence_type=f_divergence_type, **(extras or {}))
    if loss_type in ("aot", "aot_unpaired"):
        options.pop("weights", None)
    return options


@pytest.mark.parametrize("loss_type, f_divergence_type", LOSS_AND_F)
@pytest.mark.parametrize("reference_free", [False, True])
@pytest.mark.parametrize("with_extras", [False, True])
def test_dpo_loss_gradients_match_the_reference(
    backend_name, loss_type, f_divergence_type, reference_free, with_extras
):
    if backend_name not in COMPILED:
        pytest.skip("the compiled backends against the reference")
    logps = [x / 5 for x in _logps(9)]  # log-ratios within +-10: exp of the f-divergences stays well-conditioned
    lengths = dict(chosen_lengths=torch.randint(1, 9, (9,)), rejected_lengths=torch.randint(1, 9, (9,)))
    extras = _extras(9, requires_grad=True) if with_extras else lengths
    options = _options(loss_type, f_divergence_type, extras)
    results = []
    for backend in (None, "reference"):
        pc, pr = (x.clone().requires_grad_(True) for x in logps[:2])
        losses, chosen, rejected = rk.dpo_loss(pc, pr, *logps[2:], beta=0.5, reference_free=reference_free,
                                               backend=backend, **options)  # fmt: skip
        tails = [extras[name] for name in ("policy_chosen_tail_logps", "policy_rejected_tail_logps") if name in extras]
        leaves = [pc, pr] + tails
        grads = torch.autograd.grad((losses * torch.arange(1.0, 10.0)).sum(), leaves, allow_unused=True)
        results.append((losses.detach(), chosen, rejected, grads))
    # exp in the f-divergences amplifies float32 rounding of the log-ratios (the kernels'
    # closed forms are the closer to float64 there): a tolerance relative to the gradient
    scale = (
        1e-6
        if f_divergence_type == "reverse_kl"
        else 1e-5 * max(float(g.abs().max()) for g in results[1][3] if g is not None)
    )
    torch.testing.assert_close(results[0], results[1], atol=max(scale, 1e-6), rtol=1e-5 if scale == 1e-6 else 1e-4)


def test_dpo_loss_hinge_at_the_kink_has_torch_gradient():
    pc = torch.tensor([1.0, 2.0], requires_grad=True)  # beta h = 1 exactly for the first pair
    losses, *_ = rk.dpo_loss(pc, torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=1.0, loss_type="hinge")
    losses.sum().backward()
    assert pc.grad.tolist() == [0.0, 0.0]  # relu'(0) = 0, as torch


def test_dpo_loss_of_large_margins_is_finite():
    big = torch.tensor([-3000.0, 0.0, 3000.0])
    lengths = torch.ones(3)
    for loss_type in LOSS_TYPES:
        pc = big.clone().requires_grad_(True)
        losses, *_ = rk.dpo_loss(pc, -big, torch.zeros(3), torch.zeros(3), beta=1.0, loss_type=loss_type,
                                 label_smoothing=0.1, chosen_lengths=lengths, rejected_lengths=lengths)  # fmt: skip
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all(), loss_type


@pytest.mark.parametrize("loss_type, f_divergence_type", LOSS_AND_F)
def test_dpo_loss_gradcheck(loss_type, f_divergence_type):
    pc, pr, rc, rr = (x.double() / 10 for x in _logps(3))
    extras = _extras(3, torch.float64, requires_grad=True)
    tc, tr = extras.pop("policy_chosen_tail_logps"), extras.pop("policy_rejected_tail_logps")
    options = _options(loss_type, f_divergence_type, extras)

    def loss(a, b, ta, tb):
        return rk.dpo_loss(a, b, rc, rr, beta=0.7, policy_chosen_tail_logps=ta, policy_rejected_tail_logps=tb,
                           **options)[0]  # fmt: skip

    torch.autograd.gradcheck(loss, (pc.requires_grad_(True), pr.requires_grad_(True), tc, tr))


def test_dpo_loss_writes_no_input():
    logps, extras = _logps(4), _extras(4)
    tensors = logps + [v for v in extras.values() if isinstance(v, torch.Tensor)]
    versions = [t._version for t in tensors]
    for loss_type in LOSS_TYPES:
        rk.dpo_loss(*logps, **_options(loss_type, extras=extras))
    assert [t._version for t in tensors] == versions


BAD = [
    (dict(loss_type="exo_pair"), "label_smoothing must be > 0 for loss_type 'exo_pair'"),
    (dict(loss_type="sigmoid_norm"), "needs chosen_lengths"),
    (dict(loss_type="sft"), "needs chosen_lengths"),
    (dict(loss_type="sigmoid_norm", chosen_lengths=torch.ones(3)), "needs rejected_lengths"),
    (dict(loss_type="ipo", chosen_lengths=torch.ones(3)), "chosen_lengths and rejected_lengths must be given together"),
    (dict(ld_alpha=0.5), "ld_alpha (LD-DPO) needs policy_chosen_tail_logps"),
    (dict(ref_rejected_tail_logps=torch.zeros(3)), "ref_rejected_tail_logps is only used with ld_alpha"),
    (dict(ld_alpha=1.5), "ld_alpha must be in [0, 1]"),
    (dict(loss_type="nca_pair", f_divergence_type="js_divergence"), "f_divergence_type 'js_divergence' applies only"),
    (dict(f_divergence_type="kl"), "f_divergence_type must be one of"),
    (dict(loss_type="aot", weights=torch.ones(3)), "weights (WPO) cannot be used with loss_type 'aot'"),
    (dict(loss_type="hinge", cdpo=True), "cdpo (cDPO label smoothing) applies to loss_type 'sigmoid'"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights must be a list of one number per"),
    (dict(loss_type=["sigmoid", "kto"]), "loss_type must be one of"),
    (dict(loss_type=[]), "loss_type must be one of"),
    (dict(weights=torch.ones(4)), "weights must have the shape of policy_chosen_logps"),
    (
        dict(loss_type="ipo", chosen_lengths=torch.ones(3, dtype=torch.bool), rejected_lengths=torch.ones(3)),
        "chosen_lengths must have dtype",
    ),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau must be a number > 0"),
]


@pytest.mark.parametrize("options, words", BAD, ids=[w[:40] for _, w in BAD])
def test_dpo_loss_bad_options_raise_naming_the_argument(options, words):
    with pytest.raises((ValueError, TypeError)) as caught:
        rk.dpo_loss(*_logps(3), **options)
    assert words in str(caught.value)


# ----------------------------------------------------------------- linear_dpo_loss --


def _pairs(B, T, H, V):
    hidden = torch.randn(2 * B, T, H, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, H, dtype=torch.float64) / H**0.5).requires_grad_(True)
    labels = torch.randint(0, V, (2 * B, T))
    mask = (torch.arange(T) < torch.randint(1, T + 1, (2 * B, 1))).long()
    return hidden, weight, labels, mask


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_down"])
def test_linear_dpo_loss_matches_naive_path(loss_type):
    B, T, H, V = 3, 5, 4, 23
    hidden, weight, labels, mask = _pairs(B, T, H, V)
    ref_hidden = hidden.detach() + 0.1 * torch.randn_like(hidden)
    loss, metrics = rk.linear_dpo_loss(
        hidden, weight, labels, mask, ref_hidden=ref_hidden, beta=0.1, loss_type=loss_type
    )
    loss.backward()
    got_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    def naive_logps(h):  # logits -> log_softmax -> gather -> masked sum (or mean for ipo)
        lp = torch.log_softmax(h @ weight.T, -1).gather(-1, labels[..., None])[..., 0] * mask
        return lp.sum(-1) / (mask.sum(-1) if loss_type == "ipo" else 1)

    policy = naive_logps(hidden)
    with torch.no_grad():
        ref = naive_logps(ref_hidden)
    losses, chosen, rejected = rk.dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], beta=0.1, loss_type=loss_type)
    losses.mean().backward()
    torch.testing.assert_close(loss, losses.mean())
    torch.testing.assert_close(metrics["reward_accuracy"], (chosen > rejected).double().mean())
    torch.testing.assert_close(got_grads, (hidden.grad, weight.grad))


@pytest.mark.parametrize("loss_type", [["ipo"], ["sigmoid_norm", "sft"], ["discopop", "bco_pair"]])
def test_linear_dpo_loss_with_sums_matches_trl(loss_type):
    """average=False: sums and the mask's lengths, TRL 1.16 exactly (ipo per token in the loss)."""
    B, T, H, V = 3, 6, 4, 19
    hidden, weight, labels, mask = _pairs(B, T, H, V)
    hidden, weight = hidden.detach().float(), weight.detach().float()
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    options = dict(
        beta=0.2,
        loss_type=loss_type,
        f_divergence_type="js_divergence" if "bco_pair" not in loss_type else "reverse_kl",
    )
    loss, metrics = rk.linear_dpo_loss(hidden, weight, labels, mask, ref_hidden=ref_hidden, average=False, **options)

    def per_token(h):
        return torch.log_softmax(h @ weight.T, -1).gather(-1, labels[..., None])[..., 0] * mask

    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), mask], 1)  # a one-token prompt
    want, chosen, rejected = trl_dpo.trl_dpo(per_token(hidden), per_token(ref_hidden), completion_mask, **options)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(metrics["chosen_rewards"], chosen.mean())


def test_linear_dpo_loss_with_given_reference_logps():
    hidden, weight, labels, mask = _pairs(2, 3, 4, 7)
    ref = -torch.rand(2, dtype=torch.float64) * 5, -torch.rand(2, dtype=torch.float64) * 5
    loss, _ = rk.linear_dpo_loss(hidden, weight, labels, mask, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1])
    policy = rk.sequence_logprobs(hidden, weight, labels, mask)
    torch.testing.assert_close(loss, rk.dpo_loss(policy[:2], policy[2:], *ref)[0].mean())


def test_linear_dpo_loss_average_needs_sums_for_sft():
    hidden, weight, labels, mask = _pairs(2, 3, 4, 7)
    with pytest.raises(ValueError, match="sigmoid_norm and sft need sums"):
        rk.linear_dpo_loss(hidden, weight, labels, mask, reference_free=True, loss_type="sft", average=True)


# ---------------------------------------------------------------------- rm --


@pytest.mark.parametrize("margin", [None, 0.5, "tensor"])
def test_bradley_terry_matches_oracle(margin):
    chosen, rejected = torch.randn(7), torch.randn(7)
    m = torch.rand(7) if margin == "tensor" else margin
    got = rk.bradley_terry_loss(chosen, rejected, margin=m)
    margins = tolist(m) if margin == "tensor" else [margin or 0.0] * 7
    want = sum(-oracle.log_sigmoid(c - r - g) for c, r, g in zip(tolist(chosen), tolist(rejected), margins)) / 7
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64))


def test_ranking_loss_matches_oracle_with_ties_and_all_tied_rows():
    rewards = torch.randn(4, 5)
    ranks = torch.randint(0, 3, (4, 5))  # ties
    ranks[2] = 1  # all tied: no pair, left out of the mean
    got = rk.ranking_loss(rewards, ranks)
    per_prompt = [oracle.ranking(r, k) for r, k in zip(tolist(rewards), ranks.tolist())]
    valid = [p for p in per_prompt if p is not None]
    torch.testing.assert_close(got.double(), torch.tensor(sum(valid) / len(valid), dtype=torch.float64))
    assert rk.ranking_loss(rewards, torch.zeros(4, 5)).item() == 0.0


@pytest.mark.parametrize("K", [2, 7, 33])
def test_ranking_loss_gradients_match_the_reference(K):
    rewards, ranks = torch.randn(5, K), torch.randint(0, K // 2 + 1, (5, K))
    ranks[0] = 0  # an all-tied prompt
    grads = []
    for backend in (None, "reference"):
        leaf = rewards.clone().requires_grad_(True)
        loss = rk.ranking_loss(leaf, ranks, backend=backend)
        loss.backward()
        grads.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_bradley_terry_gradients_match_the_reference():
    chosen, rejected, margin = torch.randn(3, 4), torch.randn(3, 4), torch.rand(3, 4)
    grads = []
    for backend in (None, "reference"):
        c, r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
        loss = rk.bradley_terry_loss(c, r, margin=margin, backend=backend)
        loss.backward()
        grads.append((loss.detach(), c.grad, r.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_ranking_loss_with_two_responses_is_bradley_terry():
    chosen, rejected = torch.randn(6), torch.randn(6)
    got = rk.ranking_loss(torch.stack([chosen, rejected], 1), torch.tensor([[0, 1]] * 6))
    torch.testing.assert_close(got, rk.bradley_terry_loss(chosen, rejected))


def test_rm_gradcheck():
    chosen, rejected, margin = (torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.autograd.gradcheck(lambda a, b: rk.bradley_terry_loss(a, b, margin=margin.detach()), (chosen, rejected))
    rewards = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ranks = torch.randint(0, 4, (3, 4))
    torch.autograd.gradcheck(lambda r: rk.ranking_loss(r, ranks), (rewards,))


OPCHECK_CASES = [  # (loss_type, f_divergence_type, tails, lengths, weights)
    ("exo_pair", "reverse_kl", False, False, False),
    ("discopop", "alpha_divergence", True, False, True),
    ("sigmoid_norm", "js_divergence", True, True, True),
    ("bco_pair", "reverse_kl", False, True, True),
]


def test_opcheck(backend_name):
    if backend_name not in COMPILED:
        pytest.skip("opcheck is for the compiled ops")
    suffix = "_triton" if backend_name == "triton" else ""
    ops = torch.ops.rlhf_kernels
    logps = _logps(5)
    for need_grad in (False, True):
        pc = logps[0].clone().requires_grad_(need_grad)
        for loss_type, f_divergence_type, tails, lengths, weights in OPCHECK_CASES:
            optional = (
                torch.randn(4, 5, requires_grad=need_grad) if tails else None,
                torch.randint(0, 9, (2, 5)).float() if lengths else None,
                torch.rand(5) if weights else None,
            )
            args = (pc, *logps[1:], *optional, 0.1, loss_type, 0.1, False, True, f_divergence_type, 0.4, 80.0, 0.3,
                    0.05, need_grad)  # fmt: skip
            torch.library.opcheck(getattr(ops, "dpo_loss" + suffix).default, args)
        c = torch.randn(6, requires_grad=need_grad)
        torch.library.opcheck(getattr(ops, "bradley_terry_loss" + suffix).default, (c, torch.randn(6), None, need_grad))
        torch.library.opcheck(
            getattr(ops, "bradley_terry_loss" + suffix).default, (c, torch.randn(6), torch.rand(6), need_grad)
        )
        r = torch.randn(3, 4, requires_grad=need_grad)
        ranks = torch.randint(0, 4, (3, 4)).float()
        torch.library.opcheck(getattr(ops, "ranking_loss" + suffix).default, (r, ranks, need_grad))


def test_torch_compile_fullgraph(backend_name):
    if backend_name not in COMPILED:
        pytest.skip("the compiled ops")
    logps = _logps(4)
    pc = logps[0].clone().requires_grad_(True)
    rewards, ranks = torch.randn(3, 4), torch.randint(0, 4, (3, 4))

    def step(pc):
        losses, chosen, _ = rk.dpo_loss(pc, *logps[1:], loss_type="sigmoid")
        rm = rk.ranking_loss(rewards + pc[:3, None], ranks) + rk.bradley_terry_loss(pc, logps[1], margin=0.5)
        return losses.sum() + chosen.sum() + rm

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(pc).backward()
    got = pc.grad.clone()
    pc.grad = None
    step(pc).backward()
    torch.testing.assert_close(got, pc.grad)


@pytest.mark.parametrize("loss_type", ["bco_pair", "discopop", "sigmoid_norm", "aot", "aot_unpaired", "sft",
                                       ["sigmoid", "bco_pair", "sft"]])  # fmt: skip
def test_dpo_loss_torch_compile_fullgraph_every_new_loss_type(backend_name, loss_type):
    if backend_name not in COMPILED:
        pytest.skip("the compiled ops")
    logps, extras = _logps(4), _extras(4, requires_grad=True)
    options = _options(loss_type, "js_divergence" if loss_type in F_DIVERGENCE_LOSS_TYPES else "reverse_kl", extras)
    if isinstance(loss_type, list):
        options["loss_weights"] = [0.8, 0.2, 1.0]
    pc = logps[0].clone().requires_grad_(True)

    def step(pc):
        losses, chosen, rejected = rk.dpo_loss(pc, *logps[1:], **options)
        return (losses * torch.arange(1.0, 5.0)).sum() + chosen.sum() - rejected.sum()

    torch.compiler.reset()  # one code object compiled per case: no recompile limit across cases
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    tail = extras["policy_chosen_tail_logps"]
    got = torch.autograd.grad(compiled(pc), (pc, tail), allow_unused=True)
    want = torch.autograd.grad(step(pc), (pc, tail), allow_unused=True)
    torch.testing.assert_close(got, want)
