import pytest
import torch

import oracle
import rlhf_kernels as rk
from conftest import tolist
from rlhf_kernels.reference.dpo import LOSS_TYPES


def _logps(B, dtype=torch.float32):
    return [(-torch.rand(B) * 50).to(dtype) for _ in range(4)]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reference_free", [False, True])
def test_dpo_loss_matches_oracle(loss_type, label_smoothing, reference_free):
    logps = _logps(6)
    losses, chosen, rejected = rk.dpo_loss(
        *logps, beta=0.3, loss_type=loss_type, label_smoothing=label_smoothing, reference_free=reference_free
    )
    want = [oracle.dpo(*pair, 0.3, loss_type, label_smoothing, reference_free) for pair in zip(*map(tolist, logps))]
    for got, index in ((losses, 0), (chosen, 1), (rejected, 2)):
        torch.testing.assert_close(
            got.double(), torch.tensor([w[index] for w in want], dtype=torch.float64), atol=1e-5, rtol=1e-5
        )


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
