"""GRPO family: group advantages and the critic-free policy losses.

Parity is against the frameworks' own code: verl 0.9.1's core_algos (vendored,
tests/verl_ref.py) and TRL 1.16's GRPOTrainer._compute_loss (tests/trl_grpo.py).
Every backend of policy_loss is compared with the reference; gradients in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from trl_grpo import trl_grpo_loss
from verl_ref import actor_config, core_algos

import rlhf_kernels as rk

B, T = 6, 7


def _batch(seed=0, dtype=torch.float32, B=B, T=T, empty_row=False):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    mask = (torch.rand(B, T, generator=g) > 0.25).to(dtype)
    mask[:, 0] = 1
    if empty_row:
        mask[-1] = 0
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return lp.to(dtype), old.to(dtype), adv.to(dtype), mask


# ------------------------------------------------------------- advantages --

GROUPS = np.array([3, 3, 7, 7, 7, 1, 1, 1, 1, 5])  # sizes 2, 3, 4 and a singleton


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(GROUPS), generator=g), (torch.rand(len(GROUPS), 9, generator=g) > 0.3).float()


def _verl_adv(name, scores, mask, **kwargs):
    token_rewards = torch.zeros_like(mask)
    token_rewards[:, 0] = scores  # verl sums token rewards; any position works
    out, _ = core_algos.get_adv_estimator_fn(name)(
        token_level_rewards=token_rewards, response_mask=mask, index=GROUPS, **kwargs
    )
    return out


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("grpo", {}),
        ("grpo", {"norm_adv_by_std_in_grpo": False}),
        ("grpo_vectorized", {}),
        ("rloo", {}),
        ("rloo_vectorized", {}),
        ("opo", {}),
        ("gpg", {}),
        ("reinforce_plus_plus_baseline", {}),
        ("gdpo", {}),
    ],
)
def test_group_advantages_match_verl(name, kwargs):
    scores, mask = _scores()
    mask[:, 0] = 1
    expected = _verl_adv(name, scores, mask, **kwargs)
    got = rk.group_advantages(
        scores,
        torch.as_tensor(GROUPS),
        estimator=name,
        norm_by_std=kwargs.get("norm_adv_by_std_in_grpo", True),
        lengths=mask.sum(-1),
    )
    torch.testing.assert_close(rk.broadcast_advantages(got, mask), expected, rtol=1e-5, atol=1e-5)


def test_grpo_passk_matches_verl():
    groups = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    scores = torch.tensor([0.1, 0.9, 0.3, -1.0, 2.0, 0.5, 0.4, 0.6, 0.2])
    mask = torch.ones(9, 4)
    token_rewards = torch.zeros_like(mask)
    token_rewards[:, -1] = scores
    config = {"norm_adv_by_std_in_grpo": True}
    expected, _ = core_algos.compute_grpo_passk_outcome_advantage(token_rewards, mask, groups, config=config)
    got = rk.group_advantages(scores, torch.as_tensor(groups), estimator="grpo_passk")
    torch.testing.assert_close(rk.broadcast_advantages(got, mask), expected)
    with pytest.raises(ValueError, match="at least 2"):
        rk.group_advantages(scores[:4], torch.tensor([0, 0, 0, 1]), estimator="grpo_passk")


def test_token_estimators_match_verl():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(5, 8, generator=g)
    mask = (torch.rand(5, 8, generator=g) > 0.3).float()
    baselines = torch.randn(5, generator=g)
    expected, _ = core_algos.compute_remax_outcome_advantage(rewards, baselines, mask)
    got = rk.group_advantages(None, estimator="remax", token_rewards=rewards, mask=mask, reward_baselines=baselines)
    torch.testing.assert_close(got, expected)
    config = {"gamma": 0.9}
    expected, _ = core_algos.compute_reinforce_plus_plus_outcome_advantage(
        rewards, mask, config=type("C", (dict,), {"gamma": 0.9})(config)
    )
    got = rk.group_advantages(None, estimator="reinforce_plus_plus", token_rewards=rewards, mask=mask, gamma=0.9)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_trl_scale_rewards(scale_rewards):
    # TRL 1.16 _generate_and_score_completions, sum_then_normalize, one reward function.
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(2))
    G = 4
    mean = rewards.view(-1, G).mean(1).repeat_interleave(G)
    std = rewards.view(-1, G).std(1).repeat_interleave(G) if scale_rewards != "batch" else rewards.std().expand(12)
    expected = rewards - mean
    if scale_rewards != "none":
        expected = expected / (std + 1e-4)
    got = rk.group_advantages(rewards, group_size=G, estimator="trl", scale_rewards=scale_rewards, eps=1e-4)
    torch.testing.assert_close(got, expected)


def test_singleton_groups_as_verl():
    scores = torch.tensor([2.0, 1.0, 3.0])
    index = torch.tensor([0, 1, 1])
    assert rk.group_advantages(scores, index)[0] == pytest.approx(2 / (1 + 1e-6))
    assert rk.group_advantages(scores, index, estimator="rloo")[0] == 2.0
    assert rk.group_advantages(scores, index, estimator="rloo_vectorized")[0] == 0.0


# ------------------------------------------------------------ policy loss --


def _verl_loss(name, lp, old, adv_tokens, mask, agg, **config):
    loss, metrics = core_algos.get_policy_loss_fn(name)(
        old_log_prob=old,
        log_prob=lp,
        advantages=adv_tokens,
        response_mask=mask,
        loss_agg_mode=agg,
        config=actor_config(**config),
    )
    return loss, metrics


VERL_CASES = [
    (
        "vanilla",
        "token-mean",
        dict(clip_ratio_high=0.28),
        dict(loss_type="vanilla", clip_high=0.28, dual_clip=3.0, log_ratio_clamp=20.0),
    ),
    ("vanilla", "seq-mean-token-sum-norm", {}, dict(loss_type="vanilla", dual_clip=3.0, log_ratio_clamp=20.0)),
    ("vanilla", "token-sum", {}, dict(loss_type="vanilla", dual_clip=3.0, log_ratio_clamp=20.0)),
    ("gspo", "seq-mean-token-mean", dict(clip_ratio=0.05), dict(loss_type="gspo", clip_low=0.05)),
    ("gspo", "token-mean", dict(clip_ratio=0.05), dict(loss_type="gspo", clip_low=0.05)),
    ("cispo", "token-mean", {}, dict(loss_type="cispo", log_ratio_clamp=20.0)),
    ("sapo", "seq-mean-token-mean", {}, dict(loss_type="sapo", log_ratio_clamp=20.0)),
    ("gpg", "token-mean", {}, dict(loss_type="gpg")),
    ("dro", "token-mean", dict(policy_loss={"dro_beta": 0.5}), dict(loss_type="dro", dro_beta=0.5)),
    ("dppo_tv", "token-mean", {}, dict(loss_type="dppo_tv", dppo_ratio_cap=20.0)),
    ("dppo_kl", "seq-mean-token-mean", {}, dict(loss_type="dppo_kl", dppo_ratio_cap=20.0)),
    ("geo_mean", "token-mean", {}, dict(loss_type="geo_mean")),
]


@pytest.mark.parametrize("name,agg,config,options", VERL_CASES, ids=[f"{c[0]}-{c[1]}" for c in VERL_CASES])
def test_policy_loss_matches_verl(name, agg, config, options):
    lp, old, adv, mask = _batch(dtype=torch.float64, empty_row=name != "geo_mean")
    config = {"clip_ratio_c": 20.0, **config} if name.startswith("dppo") else config
    lp_verl = lp.clone().requires_grad_()
    expected, metrics = _verl_loss(name, lp_verl, old, rk.broadcast_advantages(adv, mask), mask, agg, **config)
    expected.backward()
    lp_rk = lp.clone().requires_grad_()
    got, stats = rk.policy_loss(lp_rk, old, adv, mask, agg=agg, backend="reference", **options)
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(lp_rk.grad, lp_verl.grad)
    if "actor/ppo_kl" in metrics and name != "geo_mean":
        assert stats["ppo_kl"].item() == pytest.approx(metrics["actor/ppo_kl"], abs=1e-6)
    if name == "vanilla":
        assert stats["dual_clipfrac"].item() == pytest.approx(metrics["actor/pg_clipfrac_lower"], abs=1e-6)


TRL_CASES = [
    ("grpo", {}, {}),
    ("grpo", dict(delta=1.3, epsilon_high=0.28), dict(delta=1.3, clip_high=0.28)),
    ("grpo", dict(importance_sampling_level="sequence"), dict(importance_sampling_level="sequence")),
    ("bnpo", {}, {}),
    ("dr_grpo", dict(max_completion_length=16), dict(horizon=16)),
    ("dapo", dict(num_items_in_batch=50), dict(global_tokens=50)),
    ("luspo", dict(importance_sampling_level="sequence"), dict(importance_sampling_level="sequence")),
    ("cispo", dict(epsilon_high=1.1), dict(clip_high=1.1, cispo_clip="upper", agg="token-mean")),
    ("sapo", {}, {}),
    ("vespo", {}, dict(agg="token-mean")),
    ("grpo", dict(beta=0.04), dict(kl_coef=0.04, kl_estimator="k3")),
    ("grpo", dict(beta=0.04, use_bias_correction_kl=True), dict(kl_coef=0.04, kl_is_corrected=True)),
    ("bnpo", dict(entropy_coef=0.01), dict(entropy_coef=0.01, entropy_agg="token-mean")),
    # TRL's bonus is a local token mean whatever the policy normaliser: explicit entropy_agg
    ("dapo", dict(num_items_in_batch=50, entropy_coef=0.01), dict(global_tokens=50, entropy_coef=0.01, entropy_agg="token-mean")),
    ("dapo", dict(importance_sampling_ratio=True), dict()),
]


@pytest.mark.parametrize("loss_type,trl_options,options", TRL_CASES)
def test_policy_loss_matches_trl(loss_type, trl_options, options):
    lp, old, adv, mask = _batch(seed=3, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    ref = lp + 0.2 * torch.randn(lp.shape, generator=g, dtype=lp.dtype)
    entropy = torch.rand(lp.shape, generator=g, dtype=lp.dtype)
    is_ratio = torch.rand(lp.shape, generator=g, dtype=lp.dtype) + 0.5
    trl_options = dict(trl_options)
    if trl_options.pop("importance_sampling_ratio", False):
        trl_options["importance_sampling_ratio"], options = is_ratio, dict(options, is_weights=is_ratio)
    lp_trl, h_trl = lp.clone().requires_grad_(), entropy.clone().requires_grad_()
    expected, metrics = trl_grpo_loss(
        lp_trl, old, adv, mask, loss_type=loss_type, ref_logprobs=ref, entropies=h_trl, **trl_options
    )
    expected.backward()
    lp_rk, h_rk = lp.clone().requires_grad_(), entropy.clone().requires_grad_()
    got, stats = rk.policy_loss(
        lp_rk,
        old,
        adv,
        mask,
        loss_type=loss_type,
        ref_logprobs=ref,
        entropy=h_rk,
        num_sequences=B,
        backend="reference",
        **options,
    )
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(lp_rk.grad, lp_trl.grad)
    if trl_options.get("entropy_coef"):
        torch.testing.assert_close(h_rk.grad, h_trl.grad)
    if "clip_ratio/low_mean" in metrics and options.get("importance_sampling_level") != "sequence":
        assert stats["clipfrac_low"].item() == pytest.approx(metrics["clip_ratio/low_mean"], abs=1e-6)
        assert stats["clipfrac_high"].item() == pytest.approx(metrics["clip_ratio/high_mean"], abs=1e-6)
    assert stats["entropy"].item() == pytest.approx(metrics["entropy"], abs=1e-6)


def test_kl_straight_through_matches_verl():
    lp, _, _, _ = _batch(dtype=torch.float64)
    ref = lp.flip(0)
    for name in ("k1+", "k3+", "low_var_kl+", "low_var_kl"):
        a, b = lp.clone().requires_grad_(), lp.clone().requires_grad_()
        expected = core_algos.kl_penalty(a, ref, name)
        from rlhf_kernels.reference.grpo import kl_term

        got = kl_term(b, ref, name.replace("k3", "low_var_kl") if name.startswith("k3") else name)
        torch.testing.assert_close(got, expected)
        expected.sum().backward()
        got.sum().backward()
        torch.testing.assert_close(b.grad, a.grad)


# ------------------------------------------- clip_cov, kl_cov, bypass_mode --

COV_CONFIG = {"clip_cov_ratio": 0.2, "clip_cov_lb": -1.0, "clip_cov_ub": 1.0, "kl_cov_ratio": 0.2, "ppo_kl_coef": 0.7}
COV_OPTIONS = dict(clip_cov=(0.2, -1.0, 1.0), kl_cov=(0.2, 0.7))
COV_CASES = [
    (name, agg, weighted)
    for name in ("clip_cov", "kl_cov")
    for agg, weighted in [("token-mean", False), ("seq-mean-token-mean", True), ("seq-mean-token-sum-norm", False)]
]


@pytest.mark.parametrize("name,agg,weighted", COV_CASES)
def test_cov_losses_match_verl(name, agg, weighted):
    """clip_cov (random token selection: the same seed gives verl's draw) and kl_cov (a
    batch top-k): loss, gradient and the selected share against verl's own functions."""
    lp, old, adv, mask = _batch(seed=12, dtype=torch.float64, B=8, T=9, empty_row=True)
    adv_tokens = rk.broadcast_advantages(adv, mask)
    isw = (torch.rand(lp.shape, generator=torch.Generator().manual_seed(13), dtype=lp.dtype) + 0.5) if weighted else None
    lp_verl = lp.clone().requires_grad_()
    torch.manual_seed(21)
    expected, metrics = core_algos.get_policy_loss_fn(name)(
        old_log_prob=old, log_prob=lp_verl, advantages=adv_tokens, response_mask=mask, loss_agg_mode=agg,
        config=actor_config(policy_loss=COV_CONFIG), rollout_is_weights=isw,
    )  # fmt: skip
    expected.backward()
    lp_rk = lp.clone().requires_grad_()
    torch.manual_seed(21)
    got, stats = rk.policy_loss(
        lp_rk, old, adv, mask, loss_type=name, agg=agg, is_weights=isw, backend="reference", **COV_OPTIONS
    )
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(lp_rk.grad, lp_verl.grad)
    live = mask > 0
    if name == "clip_cov":
        assert stats["cov_fraction"].item() == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-9)
        assert stats["ppo_kl"].item() == pytest.approx(metrics["actor/ppo_kl"], abs=1e-9)
        assert stats["cov_fraction"].item() == pytest.approx(10 / 50)  # 10 drawn of more candidates
    else:
        assert (lp - old).abs()[live].mean().item() == pytest.approx(metrics["actor/ppo_kl"], abs=1e-9)
        assert stats["cov_fraction"].item() == pytest.approx(int(0.2 * live.sum().item()) / live.sum().item())


def test_clip_cov_generator_gives_verls_draw_and_other_seeds_other_tokens(kernel):
    """generator=torch.Generator().manual_seed(s) draws what torch.manual_seed(s) then verl
    draws; every backend runs the reference's selection (batch-coupled)."""
    lp, old, adv, mask = _batch(seed=14, dtype=torch.float64, B=8, T=9)
    torch.manual_seed(5)
    expected, _ = core_algos.get_policy_loss_fn("clip_cov")(
        old, lp, rk.broadcast_advantages(adv, mask), mask, "token-mean", actor_config(policy_loss=COV_CONFIG)
    )
    run = lambda seed: rk.policy_loss(
        lp, old, adv, mask, loss_type="clip_cov", agg="token-mean", generator=torch.Generator().manual_seed(seed),
        backend=kernel, **COV_OPTIONS,
    )[0]  # fmt: skip
    torch.testing.assert_close(run(5), expected)
    assert any(run(seed).item() != expected.item() for seed in range(6, 12))


def test_cov_losses_add_the_kl_and_entropy_terms_and_check_their_ratio():
    lp, old, adv, mask = _batch(seed=15, dtype=torch.float64, B=4, T=6)
    ref, entropy = lp.flip(0), torch.rand(lp.shape, dtype=lp.dtype)
    for name in ("clip_cov", "kl_cov"):
        options = dict(loss_type=name, backend="reference", **COV_OPTIONS)
        base = rk.policy_loss(lp, old, adv, mask, generator=torch.Generator().manual_seed(0), **options)[0]
        full = rk.policy_loss(
            lp, old, adv, mask, generator=torch.Generator().manual_seed(0), ref_logprobs=ref, kl_coef=0.1,
            entropy=entropy, entropy_coef=0.01, **options,
        )[0]  # fmt: skip
        terms = 0.1 * rk.masked_mean(rk.kl_penalty(lp, ref, estimator="k3"), mask) - 0.01 * rk.masked_mean(entropy, mask)
        torch.testing.assert_close(full, base + terms)
        with pytest.raises(ValueError, match="must be > 0"):
            rk.policy_loss(lp, old, adv, mask, loss_type=name, clip_cov=(0.0, 1.0, 5.0), kl_cov=(0.0, 1.0))


BYPASS_CASES = [
    ("reinforce", ("token", 2.0), None, None),
    ("reinforce", ("token", "0.5_2.0"), "token_k1", 1.5),
    ("reinforce", ("sequence", 2.0), "seq_mean_k3", 0.05),
    ("reinforce", (None, None), "token_k2,token_k3", "0.05"),
    ("ppo_clip", ("token", 2.0), None, None),
    ("ppo_clip", ("token", "0.5_2.0"), "token_k1", 1.5),
    ("ppo_clip", ("sequence", 2.0), "seq_mean_k3", 0.05),
    ("ppo_clip", (None, None), "token_k2,token_k3", "0.05"),
]


@pytest.mark.parametrize("loss,is_key,rs,rs_threshold", BYPASS_CASES, ids=str)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_bypass_mode_is_one_policy_loss_call(kernel, loss, is_key, rs, rs_threshold, agg):
    """verl's compute_policy_loss_bypass_mode (old_log_prob = rollout_log_prob; its
    rollout correction computed from the current log-probs, sg(log_prob) - rollout) is one
    call with old_logprobs = rollout_logprobs and rollout_correction_from="current":
    "reinforce" is gpg with the correction keywords, "ppo_clip" vanilla with the rejection
    alone (its IS weights only feed metrics). Every backend: the correction runs in torch
    before the kernels."""
    from test_grpo_correction import _ours_for_verl, verl_helper_importable

    lp, rollout, adv, mask = _batch(seed=16, dtype=torch.float32, B=6, T=8, empty_row=True)
    rollout = rollout.clone()
    rollout[2, :3] += 1.5  # some tokens and rows off the rollout policy
    bypass = {"loss_type": loss, "rollout_is": is_key[0], "rollout_is_threshold": is_key[1],
              "rollout_rs": rs, "rollout_rs_threshold": rs_threshold}  # fmt: skip
    a = lp.clone().requires_grad_()
    with verl_helper_importable():
        expected, metrics = core_algos.compute_policy_loss_bypass_mode(
            rollout, a, rk.broadcast_advantages(adv, mask), mask, loss_agg_mode=agg,
            config=actor_config(policy_loss={"rollout_correction": bypass}),
        )  # fmt: skip
    expected.backward()
    b = lp.clone().requires_grad_()
    options = dict(rollout_logprobs=rollout, rollout_correction_from="current", agg=agg, backend=kernel)
    if loss == "reinforce":
        options.update(loss_type="gpg", **_ours_for_verl(is_key, False, rs, rs_threshold))
    else:
        options.update(loss_type="vanilla", dual_clip=3.0, log_ratio_clamp=20.0, rollout_rejection=rs,
                       rollout_rejection_threshold=rs_threshold)  # fmt: skip
    got, stats = rk.policy_loss(b, rollout, adv, mask, **options)
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(b.grad, a.grad)
    assert stats["rollout_kl"].item() == pytest.approx(metrics["rollout_corr/kl"], rel=1e-5)
    if rs is not None:
        rejected = metrics["rollout_corr/rollout_rs_masked_fraction"]
        assert 0 < rejected < 1 and stats["rollout_rejected_frac"].item() == pytest.approx(rejected, abs=1e-7)


# ---------------------------------------------------------- the kernels --

from conftest import backends_of, random_mask

from rlhf_kernels.ops import grpo as grpo_ops

COMPILED = ("cpu", "triton")
KERNEL_CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="vanilla", clip_high=0.28, dual_clip=3.0, log_ratio_clamp=0.4, agg="seq-mean-token-sum-norm"),
    dict(loss_type="dapo", delta=1.2, global_tokens=40, ref_logprobs=True, kl_coef=0.1, kl_estimator="low_var_kl+"),
    dict(loss_type="dr_grpo", horizon=16, ref_logprobs=True, kl_coef=0.05, kl_estimator="k3", is_weights=True),
    dict(loss_type="cispo", agg="token-sum", entropy=True, entropy_coef=0.01),
    dict(loss_type="cispo", cispo_clip="upper", clip_high=1.1, ref_logprobs=True, kl_coef=0.1, kl_estimator="k1+"),
    dict(loss_type="sapo", log_ratio_clamp=0.3, ref_logprobs=True, kl_coef=0.1, kl_estimator="abs"),
    dict(loss_type="dro", dro_beta=0.5, agg="seq-mean-token-sum", ref_logprobs=True, kl_coef=0.2, kl_estimator="k2"),
    dict(loss_type="gpg", is_weights=True),
    # TRL's beta with use_bias_correction_kl (kl r), on every loss code and with the log-ratio clamp
    dict(loss_type="grpo", ref_logprobs=True, kl_coef=0.04, kl_estimator="k3", kl_is_corrected=True),
    dict(loss_type="dapo", log_ratio_clamp=0.3, ref_logprobs=True, kl_coef=0.1, kl_estimator="low_var_kl+",
         kl_is_corrected=True, is_weights=True),  # fmt: skip
    dict(loss_type="cispo", ref_logprobs=True, kl_coef=0.1, kl_estimator="k2", kl_is_corrected=True),
    dict(loss_type="sapo", log_ratio_clamp=0.3, ref_logprobs=True, kl_coef=0.1, kl_estimator="abs", kl_is_corrected=True),
    dict(loss_type="gpg", ref_logprobs=True, kl_coef=0.1, kl_estimator="k1+", kl_is_corrected=True),
    # the entropy term with global_tokens: the policy term's divisor (entropy_agg None) or local
    dict(loss_type="dapo", global_tokens=40, entropy=True, entropy_coef=0.01),
    dict(loss_type="dapo", global_tokens=40, entropy=True, entropy_coef=0.01, entropy_agg="token-mean"),
]


@pytest.fixture(params=backends_of("policy_loss"))
def kernel(request):
    return request.param


def _options(case, lp):
    g = torch.Generator().manual_seed(7)
    extra = {
        "ref_logprobs": lp.detach() + 0.3 * torch.randn(lp.shape, generator=g).to(lp.dtype),
        "is_weights": (torch.rand(lp.shape, generator=g) + 0.5).to(lp.dtype),
        "entropy": torch.rand(lp.shape, generator=g).to(lp.dtype).requires_grad_(),
    }
    return {k: (extra[k] if v is True and k in extra else v) for k, v in case.items()}


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c["loss_type"] + str(i) for i, c in enumerate(KERNEL_CASES)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_the_reference(kernel, case, dtype):
    lp, old, adv, _ = _batch(seed=5, dtype=dtype, B=5, T=37)
    mask = random_mask(5, 37).to(dtype)
    old[0, :5] = lp[0, :5]  # ratio exactly 1: ties of the clip's max
    adv_tokens = adv[:, None] * torch.ones(5, 37, dtype=dtype)  # [B, T] advantages too
    options = _options(case, lp)
    results = []
    for backend_name in ("reference", kernel):
        x = lp.clone().requires_grad_()
        entropy = options.get("entropy")
        if entropy is not None:
            entropy.grad = None
        loss, stats = rk.policy_loss(x, old, adv_tokens, mask, backend=backend_name, **options)
        loss.backward()
        results.append((loss, x.grad, stats, None if entropy is None else entropy.grad.clone()))
    (want, want_grad, want_stats, want_h), (got, got_grad, got_stats, got_h) = results
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    if kernel == "triton" and dtype == torch.float64:
        tol = dict(atol=1e-7, rtol=1e-6)  # Triton takes the float options (tau, clip bounds) as fp32 scalars
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_grad, want_grad, **tol)
    if want_h is not None:
        torch.testing.assert_close(got_h, want_h, **tol)
    for name, value in want_stats.items():
        if name != "dual_clipfrac" or case.get("dual_clip"):
            torch.testing.assert_close(got_stats[name], value, **tol, msg=name)


def test_kernel_gradcheck_float64(kernel):
    lp, old, adv, mask = _batch(seed=6, dtype=torch.float64, B=3, T=5)
    ref = lp + 0.2
    for case in (
        dict(loss_type="grpo", dual_clip=3.0),
        dict(loss_type="sapo", ref_logprobs=ref, kl_coef=0.1),
        dict(loss_type="dapo", ref_logprobs=ref, kl_coef=0.1, kl_is_corrected=True),
    ):
        torch.autograd.gradcheck(
            lambda x: rk.policy_loss(x, old, adv, mask, backend=kernel, **case)[0], (lp.clone().requires_grad_(),)
        )


def test_opcheck_and_compile(kernel):
    if kernel not in COMPILED:
        pytest.skip("opcheck is for the compiled ops")
    op = {"cpu": torch.ops.rlhf_kernels.grpo_policy_loss, "triton": torch.ops.rlhf_kernels.grpo_policy_loss_triton}
    lp, old, adv, mask = _batch(seed=8, B=4, T=9)
    adv = adv[:, None].expand(4, 9).contiguous()
    weight = grpo_ops.row_weights(mask, "seq-mean-token-mean", None, None, None)
    params = [0.8, 1.2, 3.0, 1.5, float("inf"), 1.0, 1.05, 0.0, 0.8, 1.2, 0.1, 0.0]
    for need_grad in (False, True):
        args = (lp.clone().requires_grad_(need_grad), old, adv, mask, lp.new_empty(0), lp + 0.1, weight, 0, 3, params)
        torch.library.opcheck(op[kernel].default, args + (need_grad,))

    x = lp.clone().requires_grad_()

    def step(x):
        loss, stats = rk.policy_loss(x, old, adv, mask, loss_type="dapo", ref_logprobs=old, kl_coef=0.1, backend=kernel)
        return loss + 0 * stats["clipfrac_high"]

    torch.compile(step, fullgraph=True, backend="aot_eager")(x).backward()
    got = x.grad.clone()
    x.grad = None
    step(x).backward()
    torch.testing.assert_close(got, x.grad)


def test_backward_hands_out_the_kernel_gradient_once(kernel):
    """The first backward returns the kernel's gradient buffer (scaled in place); a second
    backward of the same graph recomputes it, so retain_graph, a scaled loss and x.grad
    edited in place between backwards all give the reference's gradients."""
    lp, old, adv, mask = _batch(seed=20, dtype=torch.float64, B=4, T=9)
    options = dict(loss_type="dapo", dual_clip=3.0, ref_logprobs=lp.flip(0), kl_coef=0.1)
    y = lp.clone().requires_grad_()
    (want,) = torch.autograd.grad(rk.policy_loss(y, old, adv, mask, backend="reference", **options)[0], y)
    x = lp.clone().requires_grad_()
    loss = rk.policy_loss(x, old, adv, mask, backend=kernel, **options)[0]
    (2 * loss).backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 2 * want)
    x.grad.zero_()  # x.grad may share the buffer the first backward handed out
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, want)
    (again,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(again, want)


def test_kl_is_corrected_runs_compiled(kernel, monkeypatch):
    """TRL's default beta > 0 with use_bias_correction_kl runs the kernels (it ran the
    reference's torch code): the reference is never called."""
    if kernel not in COMPILED:
        pytest.skip("the compiled backends")
    lp, old, adv, mask = _batch(seed=18, dtype=torch.float64, B=3, T=6)
    want = rk.policy_loss(lp, old, adv, mask, ref_logprobs=lp.flip(0), kl_coef=0.04, kl_is_corrected=True)[0]

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(grpo_ops._reference, "policy_loss", forbidden)
    got = rk.policy_loss(lp, old, adv, mask, ref_logprobs=lp.flip(0), kl_coef=0.04, kl_is_corrected=True, backend=kernel)
    torch.testing.assert_close(got[0], want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "gspo"])
def test_entropy_divisors_agree_on_every_backend(kernel, loss_type):
    """entropy_agg None aggregates the entropy as the policy term, global_tokens included
    (verl's actor: agg_loss(entropy, ..., **global_batch_info)); an explicit entropy_agg is
    over this batch alone (TRL's bonus: the local active tokens). The compiled path
    divided by global_tokens in both cases, the reference by sum(mask) in both."""
    lp, old, adv, mask = _batch(seed=17, dtype=torch.float64, B=5, T=8)
    entropy = torch.rand(lp.shape, dtype=lp.dtype, generator=torch.Generator().manual_seed(1))
    base = dict(loss_type=loss_type, agg="token-mean", global_tokens=80.0, backend=kernel)
    policy = rk.policy_loss(lp, old, adv, mask, **base)[0]
    verl = core_algos.agg_loss(entropy, mask, "token-mean", batch_num_tokens=80.0)
    local = core_algos.agg_loss(entropy, mask, "token-mean")
    for entropy_agg, want in ((None, verl), ("token-mean", local)):
        h = entropy.clone().requires_grad_()
        got = rk.policy_loss(lp, old, adv, mask, entropy=h, entropy_coef=0.01, entropy_agg=entropy_agg, **base)[0]
        torch.testing.assert_close(got, policy - 0.01 * want)
        got.backward()
        divisor = 80.0 if entropy_agg is None else mask.sum()
        torch.testing.assert_close(h.grad, -0.01 * mask / divisor)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_geo_mean_applies_the_kl_and_entropy_terms(kernel, agg):
    """geo_mean returned before the KL and entropy terms (kl_coef / entropy_coef were
    ignored): now verl's actor's sum, geo_mean + kl_coef agg(kl) - entropy_coeff agg(H),
    both aggregated with loss_agg_mode."""
    lp, old, adv, mask = _batch(seed=19, dtype=torch.float64, B=5, T=7)
    ref = lp + 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(2), dtype=lp.dtype)
    entropy = torch.rand(lp.shape, dtype=lp.dtype, generator=torch.Generator().manual_seed(3))
    a, h_a = lp.clone().requires_grad_(), entropy.clone().requires_grad_()
    pg, _ = _verl_loss("geo_mean", a, old, rk.broadcast_advantages(adv, mask), mask, agg)
    kl = core_algos.kl_penalty(a, ref, "low_var_kl")
    expected = pg + 0.1 * core_algos.agg_loss(kl, mask, agg) - 0.01 * core_algos.agg_loss(h_a, mask, agg)
    expected.backward()
    b, h_b = lp.clone().requires_grad_(), entropy.clone().requires_grad_()
    got, stats = rk.policy_loss(
        b, old, adv, mask, loss_type="geo_mean", agg=agg, ref_logprobs=ref, kl_coef=0.1, kl_estimator="low_var_kl",
        entropy=h_b, entropy_coef=0.01, backend=kernel,
    )  # fmt: skip
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(b.grad, a.grad)
    torch.testing.assert_close(h_b.grad, h_a.grad)
    assert stats["entropy"].item() == pytest.approx(rk.masked_mean(entropy, mask).item())


def test_sequence_level_types_run_the_reference_on_every_backend(kernel):
    lp, old, adv, mask = _batch(seed=9, dtype=torch.float64)
    for case in (dict(loss_type="gspo"), dict(loss_type="grpo", importance_sampling_level="sequence")):
        got, _ = rk.policy_loss(lp, old, adv, mask, backend=kernel, **case)
        want, _ = rk.policy_loss(lp, old, adv, mask, backend="reference", **case)
        torch.testing.assert_close(got, want)


def test_vespo_reads_the_advantage_at_the_first_valid_position(kernel):
    """Left padding: vespo's per-sequence advantage (its phi's k and lambda) is the first
    valid position's; column 0, masked here and of the other sign, was read."""
    lp, old, adv, _ = _batch(seed=10, dtype=torch.float64, B=4, T=6)
    mask = torch.ones(4, 6, dtype=torch.float64)
    mask[:, :2] = 0
    padded = (adv[:, None] * torch.ones(4, 6, dtype=torch.float64)).clone()
    padded[:, :2] = -adv[:, None]
    for agg in ("token-mean", "seq-mean-token-sum"):
        got = rk.policy_loss(lp, old, padded, mask, loss_type="vespo", agg=agg, backend=kernel)[0]
        want = rk.policy_loss(lp, old, adv, mask, loss_type="vespo", agg=agg, backend="reference")[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_gpg_never_reads_old_logprobs(kernel):
    """gpg's loss is -A lp: old_logprobs = -inf at a valid position leaves loss and gradient
    as they are (cpu and triton computed it as dro with beta 0: 0 x inf = NaN)."""
    lp, old, adv, mask = _batch(seed=11, dtype=torch.float64, B=3, T=5)
    unlikely = old.clone()
    unlikely[1, 0] = -math.inf  # position 0 is valid in every row
    results = []
    for old_value in (old, unlikely):
        x = lp.clone().requires_grad_()
        loss, _ = rk.policy_loss(x, old_value, adv, mask, loss_type="gpg", backend=kernel)
        loss.backward()
        results.append((loss, x.grad))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type="grpo", clip_low=0.2, clip_high=0.28, dual_clip=3.0, delta=1.4, log_ratio_clamp=20.0),
        dict(loss_type="cispo", cispo_clip="upper", clip_high=5.0, kl_coef=0.1, kl_estimator="low_var_kl+"),
        dict(loss_type="cispo", clip_low=0.3, kl_coef=0.2, kl_estimator="abs"),
        dict(loss_type="sapo", sapo_tau_pos=0.9, sapo_tau_neg=1.2, kl_coef=0.1, kl_estimator="k3"),
        dict(loss_type="dro", dro_beta=0.7),
        dict(loss_type="gpg", dro_beta=0.7),
        dict(loss_type="dapo", kl_coef=0.04, kl_estimator="k3", kl_is_corrected=True),
        dict(loss_type="sapo", kl_coef=0.1, kl_estimator="low_var_kl+", kl_is_corrected=True),
    ],
)
def test_kernel_params_encode_the_reference_options(options):
    """The compiled ops' double backward rebuilds the reference's options from the kernels'
    numbers: every field the token-level types read comes back unchanged."""
    defaults = dict(
        clip_low=0.2, clip_high=None, dual_clip=None, delta=None, log_ratio_clamp=None, cispo_clip="band",
        sapo_tau_pos=1.0, sapo_tau_neg=1.05, dro_beta=1.0, kl_coef=0.0, kl_estimator="k3", kl_is_corrected=False,
        dppo_ratio_cap=20.0, vespo=(2.0, 3.0, 3.0, 2.0),
    )  # fmt: skip
    options = {**defaults, **options}
    want = rk.reference.grpo.token_options(**options)
    got = grpo_ops._token_options(
        grpo_ops._LOSS_CODES[options["loss_type"]], grpo_ops._kl_code(options), grpo_ops._params(options)
    )
    fields = ("low", "high", "dual_clip", "delta", "log_ratio_clamp", "w_low", "w_high", "tau_pos", "tau_neg")
    assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields]
    if options["kl_coef"]:
        assert (got.kl_coef, got.kl_estimator, got.kl_is_corrected) == (want.kl_coef, want.kl_estimator, want.kl_is_corrected)
    assert got.dro_beta == (want.dro_beta if options["loss_type"] == "dro" else 0.0)  # gpg: dro with beta 0
