"""Every public function rejects bad input with an error naming the argument."""

import pytest
import torch

import rlhf_kernels as rk


def _valid():
    B, T, V, H = 2, 3, 5, 4
    lp = -torch.rand(B, T)
    return {
        "token_logprobs": (rk.token_logprobs, dict(logits=torch.randn(B, T, V), labels=torch.randint(0, V, (B, T)))),
        "linear_logprobs": (
            rk.linear_logprobs,
            dict(hidden=torch.randn(B, T, H), weight=torch.randn(V, H), labels=torch.randint(0, V, (B, T))),
        ),
        "sequence_logprobs": (
            rk.sequence_logprobs,
            dict(
                hidden=torch.randn(B, T, H),
                weight=torch.randn(V, H),
                labels=torch.randint(0, V, (B, T)),
                mask=torch.ones(B, T),
            ),
        ),
        "kl_penalty": (rk.kl_penalty, dict(logprobs=lp, ref_logprobs=lp.clone())),
        "kl_shaped_rewards": (
            rk.kl_shaped_rewards,
            dict(scores=torch.randn(B), logprobs=lp, ref_logprobs=lp.clone(), mask=torch.ones(B, T), kl_coef=0.1),
        ),
        "gae": (rk.gae, dict(rewards=torch.randn(B, T), values=torch.randn(B, T), mask=torch.ones(B, T))),
        "discounted_returns": (rk.discounted_returns, dict(rewards=torch.randn(B, T), mask=torch.ones(B, T))),
        "masked_mean": (rk.masked_mean, dict(x=torch.randn(B, T), mask=torch.ones(B, T))),
        "masked_whiten": (rk.masked_whiten, dict(x=torch.randn(B, T), mask=torch.ones(B, T))),
        "ppo_policy_loss": (
            rk.ppo_policy_loss,
            dict(logprobs=lp, old_logprobs=lp.clone(), advantages=torch.randn(B, T), mask=torch.ones(B, T)),
        ),
        "group_advantages": (rk.group_advantages, dict(scores=torch.randn(4), group_index=torch.tensor([0, 0, 1, 1]))),
        "broadcast_advantages": (rk.broadcast_advantages, dict(advantages=torch.randn(B), mask=torch.ones(B, T))),
        "policy_loss": (
            rk.policy_loss,
            dict(logprobs=lp, old_logprobs=lp.clone(), advantages=torch.randn(B), mask=torch.ones(B, T)),
        ),
        "linear_policy_loss": (
            rk.linear_policy_loss,
            dict(
                hidden=torch.randn(B, T, H),
                weight=torch.randn(V, H),
                labels=torch.randint(0, V, (B, T)),
                mask=torch.ones(B, T),
                old_logprobs=lp,
                advantages=torch.randn(B),
            ),
        ),
        "ppo_value_loss": (
            rk.ppo_value_loss,
            dict(
                values=torch.randn(B, T), old_values=torch.randn(B, T), returns=torch.randn(B, T), mask=torch.ones(B, T)
            ),
        ),
        "dpo_loss": (
            rk.dpo_loss,
            dict(
                policy_chosen_logps=torch.randn(B),
                policy_rejected_logps=torch.randn(B),
                ref_chosen_logps=torch.randn(B),
                ref_rejected_logps=torch.randn(B),
            ),
        ),
        "linear_dpo_loss": (
            rk.linear_dpo_loss,
            dict(
                hidden=torch.randn(2 * B, T, H),
                weight=torch.randn(V, H),
                labels=torch.randint(0, V, (2 * B, T)),
                mask=torch.ones(2 * B, T),
                ref_chosen_logps=torch.randn(B),
                ref_rejected_logps=torch.randn(B),
            ),
        ),
        "bradley_terry_loss": (
            rk.bradley_terry_loss,
            dict(chosen_rewards=torch.randn(B), rejected_rewards=torch.randn(B)),
        ),
        "ranking_loss": (rk.ranking_loss, dict(rewards=torch.randn(B, 4), ranks=torch.randint(0, 4, (B, 4)))),
    }


# (function, argument, bad value (a callable of the valid kwargs), error type, words the message must hold)
CASES = [
    ("token_logprobs", "logits", lambda k: k["logits"].long(), TypeError, "logits must have dtype"),
    ("token_logprobs", "labels", lambda k: k["labels"][:, :2], ValueError, "labels must have shape"),
    ("token_logprobs", "labels", lambda k: k["labels"].float(), TypeError, "labels must have dtype"),
    ("token_logprobs", "labels", lambda k: k["labels"] + 5, ValueError, "labels must be in [0, 5)"),
    ("token_logprobs", "labels", lambda k: k["labels"] - 7, ValueError, "ignore_index=-100"),
    ("token_logprobs", "logits", lambda k: torch.randn(2, 3, 0), ValueError, "V >= 1"),
    ("linear_logprobs", "weight", lambda k: torch.randn(0, 4), ValueError, "V >= 1"),
    ("token_logprobs", "temperature", lambda k: 0.0, ValueError, "temperature must be a number > 0"),
    ("token_logprobs", "softcap", lambda k: -1.0, ValueError, "softcap"),
    ("token_logprobs", "logits", lambda k: [[1.0]], TypeError, "logits must be a torch.Tensor"),
    (
        "linear_logprobs",
        "weight",
        lambda k: k["weight"][:, :3],
        ValueError,
        "weight must be [V, H] with H = hidden.shape[-1] = 4",
    ),
    ("linear_logprobs", "weight", lambda k: k["weight"].double(), TypeError, "weight must have hidden's dtype"),
    ("linear_logprobs", "bias", lambda k: torch.randn(4), ValueError, "bias must have shape [V]"),
    ("linear_logprobs", "labels", lambda k: k["labels"].T, ValueError, "labels must have shape hidden.shape[:-1]"),
    ("sequence_logprobs", "mask", lambda k: k["mask"][:1], ValueError, "mask must have the shape of labels"),
    ("sequence_logprobs", "hidden", lambda k: k["hidden"][0], ValueError, "hidden must have 3 dims [B, T, H]"),
    (
        "kl_penalty",
        "ref_logprobs",
        lambda k: k["ref_logprobs"][:1],
        ValueError,
        "ref_logprobs must have the shape of logprobs",
    ),
    ("kl_penalty", "estimator", lambda k: "k4", ValueError, "estimator must be one of"),
    ("kl_penalty", "clamp", lambda k: 0, ValueError, "clamp must be a number > 0"),
    ("kl_shaped_rewards", "scores", lambda k: torch.randn(3), ValueError, "scores must have shape [B]"),
    ("kl_shaped_rewards", "score_index", lambda k: torch.tensor([0, 3]), ValueError, "score_index must be in [0, 3)"),
    ("kl_shaped_rewards", "score_index", lambda k: torch.tensor([0.0, 1.0]), TypeError, "score_index must have dtype"),
    ("kl_shaped_rewards", "mask", lambda k: torch.ones(2, 3, dtype=torch.complex64), TypeError, "mask must have dtype"),
    ("gae", "values", lambda k: k["values"][:, :2], ValueError, "values must have the shape of rewards"),
    ("gae", "rewards", lambda k: k["rewards"][0], ValueError, "rewards must have 2 dims [B, T]"),
    ("gae", "mask_mode", lambda k: "skip", ValueError, "mask_mode must be one of ('ignore', 'multiply', 'carry')"),
    ("gae", "gamma", lambda k: 1.5, ValueError, "gamma must be in [0, 1]"),
    ("gae", "lam", lambda k: -0.1, ValueError, "lam must be in [0, 1]"),
    ("gae", "values", lambda k: k["values"].to("meta"), ValueError, "values must be on rewards's device"),
    ("discounted_returns", "mask", lambda k: k["mask"].T, ValueError, "mask must have the shape of rewards"),
    ("masked_mean", "mask", lambda k: k["mask"][0], ValueError, "mask must have the shape of x"),
    ("masked_whiten", "eps", lambda k: 0.0, ValueError, "eps must be a number > 0"),
    (
        "ppo_policy_loss",
        "advantages",
        lambda k: k["advantages"][:, :1],
        ValueError,
        "advantages must have the shape of logprobs",
    ),
    ("ppo_policy_loss", "agg", lambda k: "mean", ValueError, "agg must be one of"),
    ("ppo_policy_loss", "dual_clip", lambda k: 0.5, ValueError, "dual_clip must be > 1"),
    ("ppo_policy_loss", "clip_low", lambda k: -0.2, ValueError, "clip_low must be a number > 0"),
    ("group_advantages", "group_index", lambda k: torch.tensor([0, 1]), ValueError, "group_index must have shape [B]"),
    ("group_advantages", "estimator", lambda k: "ppo", ValueError, "estimator must be one of"),
    ("group_advantages", "group_size", lambda k: 3, ValueError, "group_size must be an int >= 1 dividing B"),
    ("broadcast_advantages", "advantages", lambda k: torch.randn(2, 3), ValueError, "advantages must have 1 dims"),
    ("policy_loss", "advantages", lambda k: torch.randn(3), ValueError, "advantages must be [B] or [B, T]"),
    ("policy_loss", "loss_type", lambda k: "kto", ValueError, "loss_type must be one of"),
    ("policy_loss", "dual_clip", lambda k: 0.5, ValueError, "dual_clip must be > 1"),
    ("policy_loss", "ref_logprobs", lambda k: torch.randn(2, 2), ValueError, "ref_logprobs must have the shape"),
    ("policy_loss", "kl_coef", lambda k: float("nan"), ValueError, "kl_coef must be a finite number"),
    ("linear_policy_loss", "labels", lambda k: torch.full((2, 3), 5), ValueError, "labels must be in [0, 5)"),
    ("linear_policy_loss", "old_logprobs", lambda k: torch.randn(2, 4), ValueError, "old_logprobs must have the shape"),
    ("linear_policy_loss", "weight", lambda k: torch.randn(5, 3), ValueError, "weight must be [V, H] with H"),
    ("ppo_value_loss", "returns", lambda k: k["returns"][None], ValueError, "returns must have 2 dims [B, T]"),
    ("dpo_loss", "loss_type", lambda k: "kto", ValueError, "loss_type must be one of"),
    ("dpo_loss", "ref_rejected_logps", lambda k: torch.randn(3), ValueError, "ref_rejected_logps must have the shape"),
    ("dpo_loss", "label_smoothing", lambda k: 0.5, ValueError, "label_smoothing must be in [0, 0.5)"),
    ("dpo_loss", "beta", lambda k: 0, ValueError, "beta must be a number > 0"),
    ("linear_dpo_loss", "hidden", lambda k: k["hidden"][:3], ValueError, "odd number of rows"),
    ("linear_dpo_loss", "ref_rejected_logps", lambda k: None, ValueError, "must be given together"),
    (
        "linear_dpo_loss",
        "ref_chosen_logps",
        lambda k: torch.randn(4),
        ValueError,
        "ref_chosen_logps must have shape [B]",
    ),
    (
        "bradley_terry_loss",
        "rejected_rewards",
        lambda k: torch.randn(3),
        ValueError,
        "rejected_rewards must have the shape",
    ),
    ("bradley_terry_loss", "margin", lambda k: torch.randn(5), ValueError, "margin must have the shape"),
    ("ranking_loss", "rewards", lambda k: torch.randn(2, 1), ValueError, "K >= 2"),
    ("ranking_loss", "ranks", lambda k: torch.zeros(2, 3), ValueError, "ranks must have the shape of rewards"),
]


@pytest.mark.parametrize(
    "name,argument,bad,error,words", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_input_names_the_argument(name, argument, bad, error, words):
    fn, kwargs = _valid()[name]
    fn(**kwargs)  # the valid call works
    kwargs[argument] = bad(kwargs)
    with pytest.raises(error) as caught:
        fn(**kwargs)
    assert argument in str(caught.value) and words in str(caught.value)


def test_every_public_function_has_a_bad_input_case():
    # batch_invariant is a mode switch (a context manager), check_index_errors reads the
    # ops' GPU index flags (tests/test_hostile.py): neither is an op
    assert {c[0] for c in CASES} == set(rk.__all__) - {"batch_invariant", "check_index_errors"}


def test_linear_dpo_loss_needs_a_reference():
    _, kwargs = _valid()["linear_dpo_loss"]
    del kwargs["ref_chosen_logps"], kwargs["ref_rejected_logps"]
    with pytest.raises(ValueError, match="ref_chosen_logps and ref_rejected_logps, or ref_hidden, or reference_free"):
        rk.linear_dpo_loss(**kwargs)
    rk.linear_dpo_loss(**kwargs, reference_free=True)


def test_kl_shaped_rewards_needs_a_position_for_the_score():
    empty = torch.zeros(2, 0)
    with pytest.raises(ValueError, match=r"logprobs must be \[B, T\] with T >= 1"):
        rk.kl_shaped_rewards(torch.randn(2), empty, empty, empty, kl_coef=0.1)
