import pytest
import torch

import oracle
import rlhf_kernels as rk
from conftest import random_mask, tolist
from rlhf_kernels.reference.kl import ESTIMATORS


def _logprobs(B, T, dtype=torch.float32, spread=1.0):
    lp = -torch.rand(B, T) * 5
    return lp.to(dtype), (lp + spread * torch.randn(B, T)).to(dtype)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("clamp", [None, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kl_penalty_matches_oracle(estimator, clamp, dtype):
    lp, ref = _logprobs(3, 17, dtype, spread=8.0)  # spread reaches the low_var_kl clamps
    got = rk.kl_penalty(lp, ref, estimator=estimator, clamp=clamp)
    want = [[oracle.kl(a, b, estimator, clamp) for a, b in zip(ra, rb)] for ra, rb in zip(tolist(lp), tolist(ref))]
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=tol, rtol=tol)


def test_low_var_kl_hits_both_clamps():
    lp = torch.tensor([0.0, 0.0, 0.0])
    ref = torch.tensor([30.0, -30.0, -5.0])
    got = rk.kl_penalty(lp, ref, estimator="low_var_kl")
    assert got[0] == 10.0  # inner clamp to 20: exp(20) - 21, outer clamp to 10
    assert got[1] == 10.0  # inner clamp to -20: exp(-20) + 19, outer clamp to 10
    torch.testing.assert_close(got[2], torch.tensor(-5.0).exp() + 4)  # inside both clamps


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty_gradcheck(estimator):
    lp, ref = (x.double().requires_grad_(True) for x in _logprobs(2, 5))
    torch.autograd.gradcheck(lambda a, b: rk.kl_penalty(a, b, estimator=estimator), (lp, ref))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("explicit_index", [False, True])
def test_kl_shaped_rewards_matches_oracle(estimator, explicit_index):
    B, T = 5, 9
    lp, ref = _logprobs(B, T)
    mask = random_mask(B, T)
    scores = torch.randn(B)
    score_index = torch.randint(0, T, (B,)) if explicit_index else None
    rewards, kl = rk.kl_shaped_rewards(
        scores, lp, ref, mask, kl_coef=0.1, estimator=estimator, score_index=score_index
    )
    for b in range(B):
        m = tolist(mask[b])
        want_kl = [oracle.kl(x, y, estimator) * w for x, y, w in zip(tolist(lp[b]), tolist(ref[b]), m)]
        want = [-0.1 * k for k in want_kl]
        valid = [t for t in range(T) if m[t]]
        where = int(score_index[b]) if explicit_index else (valid[-1] if valid else None)
        if where is not None:
            want[where] += float(scores[b])
        torch.testing.assert_close(kl[b].double(), torch.tensor(want_kl, dtype=torch.float64), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rewards[b].double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=1e-6)


def test_kl_shaped_rewards_all_masked_row_gets_nothing():
    lp, ref = _logprobs(2, 4)
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    rewards, _ = rk.kl_shaped_rewards(torch.tensor([3.0, 5.0]), lp, ref, mask, kl_coef=0.0)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0, 0, 0], [0, 5.0, 0, 0]]))
