"""verl 0.9.1's optimal-token-baseline estimators through rk.group_advantages.

Parity is against verl's own compute_optimal_token_baseline_advantage and
compute_multi_turn_optimal_token_baseline_advantage (core_algos vendored,
tests/verl_ref.py), looked up by their registry names, on random inputs: fp32 and
fp64, groups of unequal size, singleton groups, rows with no valid token (alone, in a
group, and a whole group of them), masks with observation spans (multi-turn), with and
without rollout IS weights and handle_zero_tail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from verl_ref import core_algos

import rlhf_kernels as rk

OTB = ("optimal_token_baseline", "tir_optimal_token_baseline")
# Groups of 2, 3, 4 and 1, a singleton whose row is empty, and a group of empty rows.
GROUPS = np.array([3, 3, 7, 7, 7, 2, 5, 5, 5, 5, 8, 6, 6])
EMPTY_ROWS = (4, 10, 11, 12)  # in a group of 3, the singleton 8, two of the group 6 (whole group)
T = 13


def _inputs(seed, dtype, *, B=None, T=T, empty_rows=EMPTY_ROWS):
    B = len(GROUPS) if B is None else B
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    # Multi-turn rows: an observation span inside the response.
    if B > 6:
        mask[1, 3:6] = False
        mask[6, 2:9] = False
    for row in empty_rows:
        mask[row] = False
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    pi = old.exp()
    # sum_pi_squared of a real distribution: pi^2 plus at most (1 - pi)^2 for the rest.
    sum_pi_squared = pi**2 + torch.rand(B, T, generator=g, dtype=torch.float64) * (1 - pi) ** 2
    is_weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 1.5 + 0.25
    return tuple(x.to(dtype) for x in (rewards, mask, old, sum_pi_squared, is_weights))


def _verl(name, rewards, mask, index, old, sum_pi_squared, is_weights=None, **kwargs):
    # By registry name, as verl's trainer finds the estimator (algorithm.adv_estimator).
    return core_algos.get_adv_estimator_fn(name)(
        token_level_rewards=rewards, response_mask=mask, index=index, old_log_probs=old,
        sum_pi_squared=sum_pi_squared, rollout_is_weights=is_weights, **kwargs,
    )  # fmt: skip


def _ours(name, rewards, mask, index, old, sum_pi_squared, is_weights=None, **kwargs):
    return rk.group_advantages(
        None, torch.as_tensor(index), estimator=name, token_rewards=rewards, mask=mask, old_logprobs=old,
        sum_pi_squared=sum_pi_squared, is_weights=is_weights, **kwargs,
    )  # fmt: skip


def _tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("is_weights", [False, True], ids=["no-is", "is"])
@pytest.mark.parametrize("handle_zero_tail", [True, False], ids=["zero-tail", "no-zero-tail"])
@pytest.mark.parametrize("name", OTB)
@pytest.mark.parametrize("seed", [0, 1])
def test_otb_matches_verl(name, handle_zero_tail, is_weights, dtype, seed):
    rewards, mask, old, spp, isw = _inputs(seed, dtype)
    isw = isw if is_weights else None
    expected, _ = _verl(name, rewards, mask, GROUPS, old, spp, isw, handle_zero_tail=handle_zero_tail)
    got = _ours(name, rewards, mask, GROUPS, old, spp, isw, handle_zero_tail=handle_zero_tail)
    assert got.dtype == dtype and got.shape == rewards.shape
    torch.testing.assert_close(got, expected, **_tolerance(dtype))
    for row in EMPTY_ROWS:
        assert torch.all(got[row] == 0)


@pytest.mark.parametrize("name", OTB)
def test_otb_defaults_and_epsilon_match_verl(name):
    """No epsilon / handle_zero_tail given: both sides use verl's defaults (1e-8, True)."""
    rewards, mask, old, spp, _ = _inputs(2, torch.float64)
    expected, _ = _verl(name, rewards, mask, GROUPS, old, spp)
    torch.testing.assert_close(_ours(name, rewards, mask, GROUPS, old, spp), expected, rtol=1e-12, atol=1e-12)
    expected, _ = _verl(name, rewards, mask, GROUPS, old, spp, epsilon=0.5)
    got = _ours(name, rewards, mask, GROUPS, old, spp, eps=0.5)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", OTB)
def test_zero_tail_is_exercised(name):
    """A group whose longest sequence is strictly the longest: the two settings differ
    there (so the parity above covers the tail), and agree with verl on each."""
    index = np.array([0, 0, 0, 1, 1])
    rewards, _, old, spp, _ = _inputs(3, torch.float64, B=5, T=8, empty_rows=())
    mask = torch.zeros(5, 8, dtype=torch.float64)
    for row, length in enumerate([8, 5, 3, 4, 4]):  # group 0: a unique longest; group 1: a tie
        mask[row, :length] = 1
    on = _ours(name, rewards, mask, index, old, spp, handle_zero_tail=True)
    off = _ours(name, rewards, mask, index, old, spp, handle_zero_tail=False)
    assert not torch.equal(on[0, 5:], off[0, 5:]) and torch.equal(on[0, :5], off[0, :5])
    assert torch.equal(on[1:], off[1:])
    # With the tail zeroed, the longest sequence's advantage there is its own return.
    torch.testing.assert_close(on[0, 5:], (rewards[0] * mask[0]).flip(-1).cumsum(-1).flip(-1)[5:])
    for setting, got in ((True, on), (False, off)):
        expected, _ = _verl(name, rewards, mask, index, old, spp, handle_zero_tail=setting)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_tir_aligns_by_valid_token_and_otb_by_position():
    """Two sequences, the second shifted by an observation span: tir compares the k-th
    valid tokens, optimal_token_baseline the same positions."""
    index = np.array([0, 0])
    rewards, _, old, spp, _ = _inputs(4, torch.float64, B=2, T=6, empty_rows=())
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.float64)
    for name in OTB:
        expected, _ = _verl(name, rewards, mask, index, old, spp)
        torch.testing.assert_close(_ours(name, rewards, mask, index, old, spp), expected, rtol=1e-12, atol=1e-12)
    tir = _ours("tir_optimal_token_baseline", rewards, mask, index, old, spp)
    otb = _ours("optimal_token_baseline", rewards, mask, index, old, spp)
    # By position nothing overlaps, so each sequence is its own baseline up to eps: A ~ 0.
    assert otb.abs().max() < 1e-3
    assert tir.abs().max() > 1e-2


def test_group_size_layout_and_bool_mask():
    rewards, mask, old, spp, isw = _inputs(5, torch.float32, B=12, empty_rows=(3,))
    index = np.repeat(np.arange(4), 3)
    for name in OTB:
        expected, _ = _verl(name, rewards, mask, index, old, spp, isw)
        got = rk.group_advantages(
            None, group_size=3, estimator=name, token_rewards=rewards, mask=mask.bool(), old_logprobs=old,
            sum_pi_squared=spp, is_weights=isw,
        )  # fmt: skip
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_one_group_by_default_and_all_singletons():
    rewards, mask, old, spp, _ = _inputs(6, torch.float64, B=4, empty_rows=(2,))
    for name in OTB:
        expected, _ = _verl(name, rewards, mask, np.zeros(4), old, spp)
        got = rk.group_advantages(
            None, estimator=name, token_rewards=rewards, mask=mask, old_logprobs=old, sum_pi_squared=spp
        )
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        # Every sequence alone: no baseline, A = returns to go on valid tokens.
        expected, _ = _verl(name, rewards, mask, np.arange(4), old, spp)
        got = _ours(name, rewards, mask, np.arange(4), old, spp)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, (rewards * mask).flip(-1).cumsum(-1).flip(-1) * mask)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(old_logprobs=None), TypeError, r"old_logprobs must be a torch.Tensor \[B, T\]"),
        (dict(sum_pi_squared=None), TypeError, r"sum_pi_squared must be a torch.Tensor \[B, T\]"),
        (dict(sum_pi_squared=torch.rand(4, 5)), ValueError, "sum_pi_squared"),
        (dict(old_logprobs=torch.rand(4)), ValueError, r"old_logprobs must have 2 dims \[B, T\]"),
        (dict(is_weights=torch.rand(4, 6, 1)), ValueError, r"is_weights must have 2 dims \[B, T\]"),
        (dict(is_weights=torch.rand(3, 6)), ValueError, "is_weights"),
        (dict(old_logprobs=torch.zeros(4, 6, dtype=torch.long)), TypeError, "old_logprobs must have dtype"),
        (dict(group_index=torch.tensor([0, 1])), ValueError, r"group_index must have shape \[B\]"),
        (dict(group_size=3), ValueError, "group_size must be an int >= 1 dividing B"),
        (dict(mask=None), TypeError, "mask must be a torch.Tensor"),
        (dict(handle_zero_tail="yes"), TypeError, "handle_zero_tail must be a bool"),
        (dict(backend="cpu"), ValueError, "reference backend only"),
    ],
)
def test_otb_bad_input(change, error, match):
    options = dict(
        group_index=torch.tensor([0, 0, 1, 1]), token_rewards=torch.randn(4, 6), mask=torch.ones(4, 6),
        old_logprobs=-torch.rand(4, 6), sum_pi_squared=torch.rand(4, 6),
    )  # fmt: skip
    options.update(change)
    for name in OTB:
        with pytest.raises(error, match=match):
            rk.group_advantages(None, estimator=name, **options)
