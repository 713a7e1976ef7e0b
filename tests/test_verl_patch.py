"""rlhf_kernels.integrations.verl.patch() on verl 0.9.1's own core_algos.

verl cannot be imported here (ray and more at import), so the tests patch the vendored
core_algos (tests/verl_ref.py) through patch(module=...), with the version guard shown
an installed verl 0.9.1. Two copies of verl's file are loaded: `THEIRS` is never
patched (the oracle), `TARGET` is patched. With patch() in place, verl's own lookups
(get_adv_estimator_fn / get_policy_loss_fn, as its trainer and actor make them) return
our adapters, whose values equal verl's own (fp32, tight), losses' gradients and metrics
included, and rlhf_kernels' ops are dispatched (public calls counted by wrapping, the
compiled backends' torch.library ops by a TorchDispatchMode). unpatch() restores
verl's objects exactly; the version guard patches nothing on another verl.
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
import verl_ref
from torch.utils._python_dispatch import TorchDispatchMode
from verl_ref import AlgoConfig, actor_config

import rlhf_kernels as rk
from rlhf_kernels import backend
from rlhf_kernels.integrations import _version
from rlhf_kernels.integrations import verl as rk_verl

THEIRS = verl_ref.core_algos  # verl's file, never patched here
TARGET = verl_ref._load()  # a second copy of the same file, the one patched
THEIR_REGISTRIES = {
    "adv": dict(TARGET.ADV_ESTIMATOR_REGISTRY),
    "loss": dict(TARGET.POLICY_LOSS_REGISTRY),
}


@contextlib.contextmanager
def installed(version):
    """The version guard sees `version` as the installed verl."""
    real = _version.installed_version
    with mock.patch.object(_version, "installed_version", lambda d: version if d == "verl" else real(d)):
        yield


@contextlib.contextmanager
def verl_patched(module=TARGET):
    with installed("0.9.1"):
        assert rk_verl.patch(module) > 0
    try:
        yield
    finally:
        rk_verl.unpatch()


# ------------------------------------------------------------- counting kernels --

PUBLIC_OPS = ("group_advantages", "broadcast_advantages", "policy_loss", "discounted_returns", "gae", "masked_mean",
              "masked_whiten", "kl_penalty", "ppo_policy_loss", "ppo_value_loss")  # fmt: skip


class KernelCount(TorchDispatchMode):
    """Counts the rlhf_kernels ops dispatched (the compiled backends' torch.library ops)."""

    def __init__(self):
        super().__init__()
        self.ops: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rlhf_kernels":
            name = func.__name__.split(".")[0]
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_kernels():
    """(public-function calls, dispatched ops) of rlhf_kernels inside the block."""
    calls: dict = {}
    with contextlib.ExitStack() as stack:
        for name in PUBLIC_OPS:
            original = getattr(rk, name)

            def counted(*args, __name=name, __original=original, **kwargs):
                calls[__name] = calls.get(__name, 0) + 1
                return __original(*args, **kwargs)

            stack.enter_context(mock.patch.object(rk, name, counted))
        dispatched = stack.enter_context(KernelCount())
        yield calls, dispatched.ops


def _compiled(op: str) -> bool:
    return backend.resolve(op, torch.device("cpu"), None) != "reference"


# ------------------------------------------------------------------- inputs ------

B, T = 12, 9
# verl's uids: strings; groups of 3, 2, 4, 1 (a singleton) and 2, in no particular order.
UIDS = np.array(["a", "b", "a", "c", "c", "a", "d", "c", "b", "e", "c", "e"], dtype=object)
PAIRS = np.array(["p", "q", "p", "q", "r", "r", "p", "s", "s", "q", "r", "s"], dtype=object)  # no singleton


def _batch(seed=0, dtype=torch.float32, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[:, 0] = 1
    mask[4, 3:6] = 0  # an observation span
    if empty_row:
        mask[7] = 0
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), (mask * torch.arange(T)).argmax(-1)] = torch.randn(B, generator=g)
    rewards = rewards + 0.05 * torch.randn(B, T, generator=g) * mask  # some token-level reward too
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = (lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.6).clamp(max=-0.01)  # log-probs
    pi = old.exp()
    sum_pi_squared = pi**2 + torch.rand(B, T, generator=g, dtype=torch.float64) * (1 - pi) ** 2
    # Token-level advantages (a sequence's value plus per-token noise), as a critic's GAE gives.
    sequence_advantages = torch.randn(B, 1, generator=g, dtype=torch.float64)
    return dict(
        rewards=rewards.to(dtype),
        mask=mask,
        values=torch.randn(B, T, generator=g).to(dtype),
        baselines=torch.randn(B, generator=g).to(dtype),
        log_prob=lp.to(dtype),
        old_log_prob=old.to(dtype),
        sum_pi_squared=sum_pi_squared.to(dtype),
        is_weights=(torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5).to(dtype),
        advantages=((sequence_advantages + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)) * mask).to(dtype),
    )


ALGO = AlgoConfig(gamma=0.9, lam=0.95, norm_adv_by_std_in_grpo=True)


def _estimator_kwargs(name, x, *, index=UIDS, config=ALGO, with_is=True):
    """The keyword arguments verl 0.9.1's ray_trainer.compute_advantage passes."""
    if name == "gae":
        return dict(token_level_rewards=x["rewards"], values=x["values"], response_mask=x["mask"], gamma=0.9, lam=0.95)
    kwargs = dict(token_level_rewards=x["rewards"], response_mask=x["mask"], config=config, index=index)
    if name == "remax":
        kwargs["reward_baselines"] = x["baselines"]
    if name in ("optimal_token_baseline", "tir_optimal_token_baseline"):
        kwargs.update(old_log_probs=x["old_log_prob"], sum_pi_squared=x["sum_pi_squared"])
        kwargs["rollout_is_weights"] = x["is_weights"] if with_is else None
    if name in ("grpo", "grpo_vectorized"):
        kwargs.pop("config")  # their signatures take config, the trainer's GRPO call does not pass it
        kwargs["norm_adv_by_std_in_grpo"] = config.get("norm_adv_by_std_in_grpo", True)
    return kwargs


ESTIMATORS = list(rk_verl.ADV_ESTIMATORS)


# ------------------------------------------------------------- estimators --------


def test_every_registered_estimator_and_loss_is_covered():
    assert set(rk_verl.ADV_ESTIMATORS) == set(THEIRS.ADV_ESTIMATOR_REGISTRY)
    assert set(rk_verl.POLICY_LOSSES) == set(THEIRS.POLICY_LOSS_REGISTRY)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_patched_estimator_equals_verls(name):
    x = _batch()
    index = PAIRS if name == "grpo_passk" else UIDS  # pass@k needs two per group (verl raises)
    expected = THEIRS.get_adv_estimator_fn(name)(**_estimator_kwargs(name, _batch(), index=index))
    with verl_patched(), counting_kernels() as (calls, ops):
        fn = TARGET.get_adv_estimator_fn(name)
        assert fn is rk_verl.ADV_ESTIMATORS[name]
        got = fn(**_estimator_kwargs(name, x, index=index))
    assert isinstance(got, tuple) and len(got) == 2
    for ours, theirs in zip(got, expected):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert sum(calls.values()) > 0, "no rlhf_kernels function ran"
    kernel_ops = {"gae": "gae", "reinforce_plus_plus": "discounted_returns", "remax": "discounted_returns"}
    if name in kernel_ops and _compiled(kernel_ops[name]):
        assert ops, f"no rlhf_kernels op dispatched: {calls}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("with_is", [True, False], ids=["is", "no-is"])
@pytest.mark.parametrize("name", ["optimal_token_baseline", "tir_optimal_token_baseline"])
def test_patched_otb_with_string_uids(name, with_is, dtype):
    x = _batch(seed=1, dtype=dtype)
    kwargs = _estimator_kwargs(name, x, with_is=with_is)
    expected = THEIRS.get_adv_estimator_fn(name)(**kwargs, handle_zero_tail=True)
    with verl_patched():
        got = TARGET.get_adv_estimator_fn(name)(**kwargs, handle_zero_tail=True)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, **tolerance)


def test_trainer_direct_calls_reach_ours():
    """ray_trainer.compute_advantage calls core_algos.compute_gae_advantage_return and
    compute_grpo_outcome_advantage directly for GAE and GRPO."""
    x = _batch(seed=2)
    expected = THEIRS.compute_grpo_outcome_advantage(x["rewards"], x["mask"], UIDS, norm_adv_by_std_in_grpo=False)
    with verl_patched(), counting_kernels() as (calls, _):
        assert TARGET.compute_grpo_outcome_advantage is rk_verl.compute_grpo_outcome_advantage
        assert TARGET.compute_gae_advantage_return is rk_verl.compute_gae_advantage_return
        got = TARGET.compute_grpo_outcome_advantage(x["rewards"], x["mask"], UIDS, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert calls.get("group_advantages")


def test_gdpo_reward_components():
    """GDPO with algorithm.gdpo_reward_keys / weights: one GRPO per component, weighted."""
    x = _batch(seed=3, empty_row=False)
    g = torch.Generator().manual_seed(4)
    prompts = torch.zeros(B, 5, dtype=torch.long)
    attention = torch.cat([torch.ones(B, 5, dtype=torch.long), x["mask"].long()], dim=1)
    x["mask"] = (torch.arange(T) < x["mask"].sum(-1, keepdim=True)).float()  # right-padded responses
    attention[:, 5:] = x["mask"].long()
    components = {
        "format": np.asarray(torch.randint(0, 2, (B,), generator=g).float().numpy()),
        "accuracy": np.asarray(torch.randn(B, generator=g).numpy()),
    }
    config = AlgoConfig(gdpo_reward_keys=["format", "accuracy"], gdpo_reward_weights=[0.3, 1.5])
    kwargs = dict(
        token_level_rewards=x["rewards"], response_mask=x["mask"], index=UIDS, config=config,
        non_tensor_batch=components, batch={"prompts": prompts, "attention_mask": attention},
    )  # fmt: skip
    expected = THEIRS.get_adv_estimator_fn("gdpo")(**kwargs)
    with verl_patched():
        got = TARGET.get_adv_estimator_fn("gdpo")(**kwargs)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------- policy losses -------

GLOBAL = {"dp_size": 2, "batch_num_tokens": 150, "global_batch_size": 20, "loss_scale_factor": 16}
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSS_CASES = [
    ("vanilla", {}),
    ("vanilla", dict(clip_ratio_low=0.1, clip_ratio_high=0.28, clip_ratio_c=2.0)),
    ("dppo_tv", {}),
    ("dppo_tv", dict(clip_ratio_c=20.0, clip_ratio_high=0.1)),
    ("dppo_kl", dict(clip_ratio=0.05)),
    ("gspo", dict(clip_ratio=0.05)),
    ("sapo", dict(tau_pos=1.2, tau_neg=0.9)),
    ("gpg", {}),
    ("geo_mean", dict(clip_ratio=0.3)),
    ("dro", dict(policy_loss={"dro_beta": 0.5})),
    ("cispo", dict(clip_ratio_high=0.1)),
    ("clip_cov", {}),  # verl's defaults: one token drawn
    ("clip_cov", dict(policy_loss={"clip_cov_ratio": 0.2, "clip_cov_lb": -5.0, "clip_cov_ub": 5.0})),
    ("kl_cov", {}),
    ("kl_cov", dict(policy_loss={"kl_cov_ratio": 0.2, "ppo_kl_coef": 0.7})),
]


def _run_loss(fn, x, agg, config, is_weights):
    torch.manual_seed(0)  # clip_cov draws its tokens from the global generator, as verl does
    lp = x["log_prob"].clone().requires_grad_()
    loss, metrics = fn(
        old_log_prob=x["old_log_prob"], log_prob=lp, advantages=x["advantages"], response_mask=x["mask"],
        loss_agg_mode=agg, config=config, rollout_is_weights=x["is_weights"] if is_weights else None,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), lp.grad, metrics


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name,options", LOSS_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(LOSS_CASES)])
def test_patched_policy_loss_equals_verls(name, options, agg):
    x = _batch(seed=5)
    for is_weights, info in ((False, {}), (True, GLOBAL)):
        config = actor_config(**options, global_batch_info=dict(info))
        expected, grad_theirs, metrics_theirs = _run_loss(THEIRS.get_policy_loss_fn(name), x, agg, config, is_weights)
        with verl_patched(), counting_kernels() as (calls, ops):
            fn = TARGET.get_policy_loss_fn(name)
            assert fn is rk_verl.POLICY_LOSSES[name]
            got, grad_ours, metrics_ours = _run_loss(fn, x, agg, config, is_weights)
        assert got.dtype == expected.dtype and got.shape == expected.shape == ()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-7)
        assert set(metrics_ours) == set(metrics_theirs), name
        for key, value in metrics_theirs.items():
            assert isinstance(metrics_ours[key], float)
            assert metrics_ours[key] == pytest.approx(value, abs=1e-6), key
        assert calls.get("policy_loss"), "rk.policy_loss did not run"
        if _compiled("policy_loss") and name in ("vanilla", "sapo", "gpg", "dro", "cispo"):
            assert ops.get("grpo_policy_loss"), f"no rlhf_kernels::grpo_policy_loss: {ops}"


def test_policy_loss_clipping_is_exercised():
    """The parity above is not vacuous: clipping and the dual clip bind on these inputs."""
    x = _batch(seed=5)
    _, _, metrics = _run_loss(THEIRS.get_policy_loss_fn("vanilla"), x, "token-mean", actor_config(), True)
    assert metrics["actor/pg_clipfrac"] > 0.05 and metrics["actor/pg_clipfrac_lower"] > 0
    _, _, metrics = _run_loss(THEIRS.get_policy_loss_fn("dppo_tv"), x, "token-mean", actor_config(), True)
    assert 0 < metrics["actor/pg_clipfrac"] < 1 and metrics["actor/pg_clipfrac_lower"] > 0


def test_policy_loss_errors_are_verls():
    x = _batch()
    with verl_patched():
        for module in (THEIRS, TARGET):
            with pytest.raises(ValueError, match="dro_beta must be a positive value"):
                module.get_policy_loss_fn("dro")(
                    x["old_log_prob"], x["log_prob"], x["advantages"], x["mask"], "token-mean",
                    actor_config(policy_loss={"dro_beta": None}),
                )  # fmt: skip
            config = actor_config(global_batch_info={"dp_size": 2})
            with pytest.raises(ValueError, match="batch_num_tokens is required when dp_size > 1"):
                module.get_policy_loss_fn("vanilla")(
                    x["old_log_prob"], x["log_prob"], x["advantages"], x["mask"], "token-mean", config
                )
            with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
                module.get_policy_loss_fn("gpg")(
                    x["old_log_prob"], x["log_prob"], x["advantages"], x["mask"], "seq-sum", actor_config()
                )
            with pytest.raises(AssertionError):
                module.get_policy_loss_fn("vanilla")(
                    x["old_log_prob"], x["log_prob"], x["advantages"], x["mask"], "token-mean",
                    actor_config(clip_ratio_c=1.0),
                )  # fmt: skip


# (loss_type, rollout_is, rollout_is_threshold, rollout_rs, rollout_rs_threshold): TIS and
# IcePop, token and sequence IS, no IS, and every rollout_rs option, alone or chained.
BYPASS_CASES = [
    ("reinforce", "token", 2.0, None, None),
    ("reinforce", "token", "0.5_2.0", "token_k1", 1.5),
    ("reinforce", "sequence", 2.0, "seq_mean_k3", 0.3),
    ("reinforce", "sequence", "0.2_5.0", "seq_sum_k1,seq_max_k2", "0.1_10.0,1.0"),
    ("reinforce", None, 2.0, "token_k2,token_k3", "0.3"),
    ("ppo_clip", "token", 2.0, None, None),
    ("ppo_clip", "token", "0.5_2.0", "seq_sum_k2,seq_sum_k3", "2.0,1.5"),
    ("ppo_clip", "sequence", 3.0, "seq_mean_k1,seq_mean_k2", "1.3,0.3"),
    ("ppo_clip", None, 2.0, "token_k1", 1.5),
    ("ppo_clip", "token", 2.0, "seq_max_k3", 1.0),
]


def _bypass_config(loss_type, rollout_is, threshold, rs, rs_threshold, normalize=False, **info):
    correction = dict(
        loss_type=loss_type, rollout_is=rollout_is, rollout_is_threshold=threshold,
        rollout_is_batch_normalize=normalize, rollout_rs=rs, rollout_rs_threshold=rs_threshold,
    )  # fmt: skip
    return actor_config(policy_loss={"rollout_correction": correction}, global_batch_info=dict(info))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("case", BYPASS_CASES, ids=lambda c: "-".join(map(str, c)))
def test_patched_bypass_mode_equals_verls(case, normalize, agg):
    """bypass_mode (old_log_prob = rollout_log_prob) through verl's registry: loss, its
    gradient and every metric (rollout_corr/* and actor/*) equal verl's own function's;
    rollout_is_weights is ignored, as verl ignores it."""
    from test_grpo_correction import verl_helper_importable

    if case[1] is None and normalize:
        pytest.skip("batch normalisation needs an IS level")
    x = _batch(seed=8)
    for is_weights, info in ((False, {}), (True, GLOBAL)):
        config = _bypass_config(*case, normalize=normalize, **info)
        with verl_helper_importable():
            fn = THEIRS.get_policy_loss_fn("bypass_mode")
            expected, grad_theirs, metrics_theirs = _run_loss(fn, x, agg, config, is_weights)
            with verl_patched(), counting_kernels() as (calls, ops):
                fn = TARGET.get_policy_loss_fn("bypass_mode")
                assert fn is rk_verl.compute_policy_loss_bypass_mode
                got, grad_ours, metrics_ours = _run_loss(fn, x, agg, config, is_weights)
        assert got.dtype == expected.dtype and got.shape == expected.shape == ()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-7)
        assert list(metrics_ours) == list(metrics_theirs)
        for key, value in metrics_theirs.items():
            assert isinstance(metrics_ours[key], float)
            assert metrics_ours[key] == pytest.approx(value, abs=1e-6), key
        if case[3] is not None:  # not vacuous: some tokens rejected, some kept
            assert 0 < metrics_theirs["rollout_corr/rollout_rs_masked_fraction"] < 1
        assert calls.get("policy_loss") == 1
        if _compiled("policy_loss"):
            assert ops.get("grpo_policy_loss"), f"no rlhf_kernels::grpo_policy_loss: {ops}"


BYPASS_ERRORS = [
    (None, AssertionError, "config is required"),
    (actor_config(policy_loss={}), ValueError, "rollout_correction config not found"),
    (_bypass_config("ppo", "token", 2.0, None, None), ValueError, "Invalid loss_type"),
    (_bypass_config("reinforce", "tokens", 2.0, None, None), ValueError, "Invalid rollout_is"),
    (_bypass_config("reinforce", "token", True, None, None), TypeError, "not a boolean"),
    (_bypass_config("reinforce", "token", "2.0_0.5", None, None), ValueError, "lower bound must be <= upper"),
    (_bypass_config("ppo_clip", None, 2.0, "token_k4", 1.5), ValueError, "Invalid rollout_rs option"),
    (_bypass_config("ppo_clip", None, 2.0, "token_k2", None), ValueError, "rollout_rs_threshold must be"),
    (_bypass_config("ppo_clip", None, 2.0, "token_k2", "0.5_2.0"), ValueError, "single upper bound"),
    (_bypass_config("ppo_clip", None, 2.0, "token_k1,token_k2", "1,2,3"), ValueError, "expects either one"),
]


@pytest.mark.parametrize("config,error,match", BYPASS_ERRORS)
def test_bypass_mode_errors_are_verls(config, error, match):
    from test_grpo_correction import verl_helper_importable

    x = _batch(seed=9)
    args = (x["old_log_prob"], x["log_prob"], x["advantages"], x["mask"], "token-mean", config)
    with verl_helper_importable(), verl_patched():
        for fn in (THEIRS.get_policy_loss_fn("bypass_mode"), TARGET.get_policy_loss_fn("bypass_mode")):
            with pytest.raises(error, match=match):
                fn(*args)


def test_cov_losses_select_tokens_and_other_seeds_draw_others():
    """The clip_cov / kl_cov parity above is not vacuous: tokens are selected, and
    clip_cov's draw follows the global generator as verl's does."""
    x = _batch(seed=6)
    config = actor_config(policy_loss={"clip_cov_ratio": 0.2, "clip_cov_lb": -5.0, "clip_cov_ub": 5.0})
    with verl_patched():
        fn = TARGET.get_policy_loss_fn("clip_cov")
        _, _, metrics = _run_loss(fn, x, "token-mean", config, False)
        assert metrics["actor/pg_clipfrac"] > 0.1
        losses = set()
        for seed in range(4):
            torch.manual_seed(seed)
            losses.add(fn(x["old_log_prob"], x["log_prob"], x["advantages"], x["mask"], "token-mean", config)[0].item())
        assert len(losses) > 1


# ------------------------------------------------ the other core_algos functions --


@pytest.mark.parametrize("agg", AGG_MODES)
def test_patched_module_functions_equal_verls(agg):
    """agg_loss, kl_penalty (dp_actor imports both), compute_value_loss, compute_policy_loss."""
    x = _batch(seed=7)
    ref = x["old_log_prob"].flip(0)
    with verl_patched(), counting_kernels() as (calls, _):
        for info in ({}, GLOBAL):
            loss_mat = x["log_prob"] * x["rewards"]
            torch.testing.assert_close(
                TARGET.agg_loss(loss_mat, x["mask"], agg, **info), THEIRS.agg_loss(loss_mat, x["mask"], agg, **info),
                rtol=1e-5, atol=1e-6,
            )  # fmt: skip
            args = (x["values"] + 0.3, x["rewards"], x["values"], x["mask"], 0.2, agg)
            for ours, theirs in zip(TARGET.compute_value_loss(*args, **info), THEIRS.compute_value_loss(*args, **info)):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        for name in ("kl", "abs", "mse", "k3", "low_var_kl", "k1+", "k3+", "k2+"):
            torch.testing.assert_close(
                TARGET.kl_penalty(x["log_prob"], ref, name), THEIRS.kl_penalty(x["log_prob"], ref, name),
                rtol=1e-5, atol=1e-6,
            )  # fmt: skip
        args = (x["old_log_prob"], x["log_prob"], x["advantages"], x["mask"], 0.2, 0.1, 0.3, 2.5, agg)
        for ours, theirs in zip(TARGET.compute_policy_loss(*args), THEIRS.compute_policy_loss(*args)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert calls.get("masked_mean") and calls.get("kl_penalty") and calls.get("ppo_value_loss")


# ---------------------------------------------------- patch(), unpatch(), guard --


def test_patch_replaces_and_unpatch_restores_exactly():
    registries = {"adv": TARGET.ADV_ESTIMATOR_REGISTRY, "loss": TARGET.POLICY_LOSS_REGISTRY}
    attributes = dict(vars(TARGET))

    def custom(**kwargs):  # a user's registration
        return None

    TARGET.POLICY_LOSS_REGISTRY["vanilla_user"] = custom
    try:
        with verl_patched():
            for name, ours in rk_verl.ADV_ESTIMATORS.items():
                assert registries["adv"][name] is ours
            for name, ours in rk_verl.POLICY_LOSSES.items():
                assert registries["loss"][name] is ours
            assert TARGET.POLICY_LOSS_REGISTRY["vanilla_user"] is custom
            for name in ("agg_loss", "kl_penalty", "compute_value_loss", "compute_policy_loss",
                         "compute_policy_loss_vanilla", "compute_policy_loss_bypass_mode",
                         "compute_rloo_outcome_advantage"):  # fmt: skip
                assert getattr(TARGET, name) is getattr(rk_verl, name), name
            with installed("0.9.1"):
                assert rk_verl.patch(TARGET) == 0  # already patched
            late = types.ModuleType("verl.late_import")  # a verl module importing while patched
            late.agg_loss, late.loss_fn = TARGET.agg_loss, TARGET.get_policy_loss_fn("gspo")
            sys.modules[late.__name__] = late
        try:
            assert late.agg_loss is attributes["agg_loss"]
            assert late.loss_fn is THEIR_REGISTRIES["loss"]["gspo"]
        finally:
            del sys.modules[late.__name__]
    finally:
        del TARGET.POLICY_LOSS_REGISTRY["vanilla_user"]
    assert dict(TARGET.ADV_ESTIMATOR_REGISTRY) == THEIR_REGISTRIES["adv"]
    assert dict(TARGET.POLICY_LOSS_REGISTRY) == THEIR_REGISTRIES["loss"]
    for name, value in attributes.items():
        assert vars(TARGET)[name] is value, name


def test_patch_default_module_and_verl_modules_holding_its_functions():
    """patch() imports verl.trainer.ppo.core_algos itself and patches every loaded verl
    module that imported from it (dp_actor: agg_loss, kl_penalty, get_policy_loss_fn)."""
    target = verl_ref._load()
    actor = types.ModuleType("verl.workers.actor.dp_actor")
    actor.agg_loss, actor.kl_penalty = target.agg_loss, target.kl_penalty
    actor.get_policy_loss_fn = target.get_policy_loss_fn
    originals = (target.agg_loss, target.kl_penalty)
    stubs = {"verl.trainer.ppo.core_algos": target, actor.__name__: actor}
    with mock.patch.dict(sys.modules, stubs), installed("0.9.1"):
        with rk_verl.patched() as count:
            assert count > 0
            assert target.ADV_ESTIMATOR_REGISTRY["grpo"] is rk_verl.compute_grpo_outcome_advantage
            assert actor.agg_loss is rk_verl.agg_loss and actor.kl_penalty is rk_verl.kl_penalty
            assert actor.get_policy_loss_fn is target.get_policy_loss_fn  # not a drop-in: untouched
            assert actor.get_policy_loss_fn("cispo") is rk_verl.compute_policy_loss_cispo
        assert (actor.agg_loss, actor.kl_penalty) == originals
        assert target.ADV_ESTIMATOR_REGISTRY["grpo"] is target.compute_grpo_outcome_advantage


def test_patched_block_inside_a_patch_leaves_it():
    with verl_patched():
        with installed("0.9.1"), rk_verl.patched(TARGET) as count:
            assert count == 0
        assert TARGET.get_policy_loss_fn("vanilla") is rk_verl.compute_policy_loss_vanilla
    assert TARGET.get_policy_loss_fn("vanilla") is THEIR_REGISTRIES["loss"]["vanilla"]


@pytest.mark.parametrize("version", ["0.9.0", "0.10.0", "0.9.1rc1", None])
def test_patch_warns_and_patches_nothing_on_another_version(version):
    before = (dict(TARGET.ADV_ESTIMATOR_REGISTRY), dict(TARGET.POLICY_LOSS_REGISTRY), TARGET.agg_loss)
    with installed(version):
        with pytest.warns(_version.UnsupportedVersionWarning) as record:
            assert rk_verl.patch(TARGET) == 0
        with pytest.warns(_version.UnsupportedVersionWarning):
            assert rk_verl.patch() == 0  # checked before importing verl (which cannot import here)
    message = str(record[0].message)
    assert ("not installed" in message) if version is None else (f"verl {version} is installed" in message)
    assert "0.9.1" in message and "Nothing was patched" in message
    assert (dict(TARGET.ADV_ESTIMATOR_REGISTRY), dict(TARGET.POLICY_LOSS_REGISTRY), TARGET.agg_loss) == before
    rk_verl.unpatch()  # a no-op


def test_supported_version_with_a_local_suffix():
    with installed("0.9.1+cu128"), warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            assert rk_verl.patch(TARGET) > 0
        finally:
            rk_verl.unpatch()
    assert dict(TARGET.POLICY_LOSS_REGISTRY) == THEIR_REGISTRIES["loss"]
