import pytest
import torch

import oracle
import rlhf_kernels as rk
from conftest import backends_of, tolist
from rlhf_kernels.reference.dpo import LOSS_TYPES

COMPILED = ("cpu", "triton")


@pytest.fixture(autouse=True, params=backends_of("dpo_loss"))
def backend_name(request, monkeypatch, _fresh_seed):
    """Every test here runs on each backend of the dpo and rm families."""
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", f"dpo={request.param},rm={request.param}")
    return request.param


def _logps(B, dtype=torch.float32):
    return [(-torch.rand(B) * 50).to(dtype) for _ in range(4)]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reference_free", [False, True])
@pytest.mark.parametrize("B", [1, 6])
def test_dpo_loss_matches_oracle(loss_type, label_smoothing, reference_free, B):
    logps = _logps(B)
    losses, chosen, rejected = rk.dpo_loss(
        *logps, beta=0.3, loss_type=loss_type, label_smoothing=label_smoothing, reference_free=reference_free
    )
    want = [oracle.dpo(*pair, 0.3, loss_type, label_smoothing, reference_free) for pair in zip(*map(tolist, logps))]
    for got, index in ((losses, 0), (chosen, 1), (rejected, 2)):
        torch.testing.assert_close(
            got.double(), torch.tensor([w[index] for w in want], dtype=torch.float64), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reference_free", [False, True])
def test_dpo_loss_gradients_match_the_reference(loss_type, reference_free):
    logps = _logps(9)
    grads = []
    for backend in (None, "reference"):
        pc, pr = (x.clone().requires_grad_(True) for x in logps[:2])
        losses, *_ = rk.dpo_loss(
            pc,
            pr,
            *logps[2:],
            beta=0.5,
            loss_type=loss_type,
            label_smoothing=0.2,
            reference_free=reference_free,
            backend=backend,
        )
        (losses * torch.arange(1.0, 10.0)).sum().backward()
        grads.append((pc.grad, pr.grad))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_dpo_loss_hinge_at_the_kink_has_torch_gradient():
    pc = torch.tensor([1.0, 2.0], requires_grad=True)  # beta h = 1 exactly for the first pair
    losses, *_ = rk.dpo_loss(pc, torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=1.0, loss_type="hinge")
    losses.sum().backward()
    assert pc.grad.tolist() == [0.0, 0.0]  # relu'(0) = 0, as torch


def test_dpo_loss_of_large_margins_is_finite():
    big = torch.tensor([-3000.0, 0.0])
    for loss_type in LOSS_TYPES:
        losses, *_ = rk.dpo_loss(big, -big, torch.zeros(2), torch.zeros(2), beta=1.0, loss_type=loss_type)
        assert torch.isfinite(losses).all(), loss_type


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_loss_gradcheck(loss_type):
    pc, pr, rc, rr = (x.double() for x in _logps(3))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda a, b: rk.dpo_loss(a, b, rc, rr, beta=0.2, loss_type=loss_type, label_smoothing=0.1)[0], (pc, pr)
    )


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


def test_linear_dpo_loss_with_given_reference_logps():
    hidden, weight, labels, mask = _pairs(2, 3, 4, 7)
    ref = -torch.rand(2, dtype=torch.float64) * 5, -torch.rand(2, dtype=torch.float64) * 5
    loss, _ = rk.linear_dpo_loss(hidden, weight, labels, mask, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1])
    policy = rk.sequence_logprobs(hidden, weight, labels, mask)
    torch.testing.assert_close(loss, rk.dpo_loss(policy[:2], policy[2:], *ref)[0].mean())


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


def test_opcheck(backend_name):
    if backend_name not in COMPILED:
        pytest.skip("opcheck is for the compiled ops")
    suffix = "_triton" if backend_name == "triton" else ""
    ops = torch.ops.rlhf_kernels
    logps = _logps(5)
    for need_grad in (False, True):
        pc = logps[0].clone().requires_grad_(need_grad)
        args = (pc, logps[1], logps[2], logps[3], 0.1, "exo_pair", 0.1, False, need_grad)
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
