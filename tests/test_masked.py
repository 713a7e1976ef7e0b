import pytest
import torch

import oracle
import rlhf_kernels as rk
from conftest import random_mask, tolist


def test_masked_mean_matches_oracle_global_and_per_row():
    x, mask = torch.randn(4, 9), random_mask(4, 9)
    torch.testing.assert_close(
        rk.masked_mean(x, mask).double(),
        torch.tensor(oracle.masked_mean(sum(tolist(x), []), sum(tolist(mask), [])), dtype=torch.float64),
    )
    rows = [oracle.masked_mean(a, m) for a, m in zip(tolist(x), tolist(mask))]
    torch.testing.assert_close(rk.masked_mean(x, mask, dim=-1).double(), torch.tensor(rows, dtype=torch.float64))
    assert rk.masked_mean(x, mask, dim=-1)[0] == 0  # the all-masked row: 0, not NaN


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_whiten_matches_oracle(shift_mean, unbiased):
    x, mask = 3 * torch.randn(5, 8) + 1, random_mask(5, 8)
    got = rk.masked_whiten(x, mask.bool(), shift_mean=shift_mean, unbiased=unbiased)
    want = oracle.masked_whiten(sum(tolist(x), []), sum(tolist(mask), []), shift_mean, unbiased)
    torch.testing.assert_close(got.double().flatten(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("valid", [0, 1])
def test_masked_whiten_degenerate_inputs_are_finite(valid):
    x = torch.randn(3, 4, requires_grad=True)
    mask = torch.zeros(3, 4)
    mask[1, 2] = valid
    out = rk.masked_whiten(x, mask)
    assert torch.equal(out, torch.zeros(3, 4))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_gradcheck():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = random_mask(3, 5).double()
    torch.autograd.gradcheck(lambda a: rk.masked_mean(a, mask, dim=1), (x,))
    torch.autograd.gradcheck(lambda a: rk.masked_whiten(a, mask, shift_mean=False), (x,))
