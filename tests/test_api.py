"""The public names and signatures are the contract of ../shared/DESIGN.md."""

import inspect

import rlhf_kernels as rk

# The scale-out issue: the vocabulary sharded over a torch.distributed group, and the
# true vocabulary of a padded lm_head.
VOCAB_PARALLEL = dict(process_group=None, vocab_size=None)

# The GRPO issue's rollout / train mismatch correction (reference/grpo_correction.py):
# TRL's vLLM IS modes, verl's rollout_is / rollout_rs, OpenRLHF's is_correction, TRL's
# off-policy and top-entropy masks.
ROLLOUT_CORRECTION = dict(
    rollout_logprobs=None,
    rollout_correction=None,
    rollout_correction_from="old",
    rollout_gate="ratio",
    rollout_clip_min=None,
    rollout_clip_max=None,
    rollout_log_ratio_clamp=None,
    rollout_batch_normalize=False,
    rollout_rejection=None,
    rollout_rejection_threshold=None,
    off_policy_mask_threshold=None,
    top_entropy_quantile=None,
)

# name -> positional parameters, then keyword-only parameters with their defaults
# (backend=None last everywhere).
CONTRACT = {
    "token_logprobs": (
        ["logits", "labels"],
        dict(
            temperature=1.0,
            ignore_index=-100,
            return_entropy=False,
            softcap=None,
            logit_scale=1.0,
            inplace_backward=False,
            **VOCAB_PARALLEL,
        ),
    ),  # inplace_backward: the log-prob kernels issue's opt-in
    "linear_logprobs": (
        ["hidden", "weight", "labels"],
        dict(
            bias=None,
            temperature=1.0,
            ignore_index=-100,
            return_entropy=False,
            softcap=None,
            logit_scale=1.0,
            batch_invariant=None,
            **VOCAB_PARALLEL,
        ),
    ),  # batch_invariant: the batch-invariance issue (None: rlhf_kernels.batch_invariant())
    "kl_penalty": (["logprobs", "ref_logprobs"], dict(estimator="k1", clamp=None)),
    "kl_shaped_rewards": (
        ["scores", "logprobs", "ref_logprobs", "mask"],
        dict(kl_coef=inspect.Parameter.empty, estimator="k1", clamp=None, score_index=None),
    ),
    "gae": (["rewards", "values", "mask"], dict(gamma=1.0, lam=0.95, mask_mode="carry")),
    "discounted_returns": (["rewards", "mask"], dict(gamma=1.0)),
    "masked_mean": (["x", "mask", "dim"], dict()),
    "masked_whiten": (
        ["x", "mask"],
        dict(shift_mean=True, unbiased=True, eps=1e-8, fill_masked=True),
    ),  # fill_masked: the drop-ins issue (TRL and verl leave masked positions whitened)
    "ppo_policy_loss": (
        ["logprobs", "old_logprobs", "advantages", "mask"],
        dict(clip_low=0.2, clip_high=None, dual_clip=None, log_ratio_clamp=None, agg="token-mean"),
    ),
    "ppo_value_loss": (["values", "old_values", "returns", "mask"], dict(clip=0.2, agg="token-mean")),
    "dpo_loss": (
        ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"],
        dict(
            beta=0.1,
            loss_type="sigmoid",
            label_smoothing=0.0,
            reference_free=False,
            cdpo=False,
            loss_weights=None,
            f_divergence_type="reverse_kl",
            f_alpha_divergence_coef=0.5,
            chosen_lengths=None,
            rejected_lengths=None,
            ld_alpha=None,
            policy_chosen_tail_logps=None,
            policy_rejected_tail_logps=None,
            ref_chosen_tail_logps=None,
            ref_rejected_tail_logps=None,
            weights=None,
            discopop_tau=0.05,
        ),
    ),  # TRL 1.16's DPOTrainer options (the drop-ins issue)
    "bradley_terry_loss": (["chosen_rewards", "rejected_rewards"], dict(margin=None)),
    "ranking_loss": (["rewards", "ranks"], dict()),
    "sequence_logprobs": (
        ["hidden", "weight", "labels", "mask"],
        dict(average=False, temperature=1.0, batch_invariant=None, **VOCAB_PARALLEL),
    ),  # batch_invariant: as linear_logprobs (the batch-invariance issue)
    "linear_dpo_loss": (
        ["hidden", "weight", "labels", "mask"],
        dict(
            ref_chosen_logps=None,
            ref_rejected_logps=None,
            ref_hidden=None,
            ref_weight=None,
            beta=0.1,
            loss_type="sigmoid",
            label_smoothing=0.0,
            reference_free=False,
            average=None,
            temperature=1.0,
            cdpo=False,
            loss_weights=None,
            f_divergence_type="reverse_kl",
            f_alpha_divergence_coef=0.5,
            weights=None,
            discopop_tau=0.05,
            batch_invariant=None,
            **VOCAB_PARALLEL,
        ),
    ),  # batch_invariant: as linear_logprobs, for the policy and the ref_hidden pass
    # The GRPO issue, part 1: estimators of verl 0.9.1 and TRL 1.16, the policy-loss zoo.
    "group_advantages": (
        ["scores", "group_index"],
        dict(
            group_size=None,
            estimator="grpo",
            eps=None,
            norm_by_std=True,
            scale_rewards="group",
            lengths=None,
            f_norm=1.0,
            reward_weights=None,
            token_rewards=None,
            mask=None,
            reward_baselines=None,
            gamma=1.0,
            old_logprobs=None,
            sum_pi_squared=None,
            is_weights=None,
            handle_zero_tail=True,
        ),
    ),
    "broadcast_advantages": (["advantages", "mask"], dict()),
    "policy_loss": (
        ["logprobs", "old_logprobs", "advantages", "mask"],
        dict(
            loss_type="grpo",
            clip_low=0.2,
            clip_high=None,
            dual_clip=None,
            delta=None,
            log_ratio_clamp=None,
            importance_sampling_level="token",
            cispo_clip="band",
            sapo_tau_pos=1.0,
            sapo_tau_neg=1.05,
            dro_beta=1.0,
            dppo_ratio_cap=20.0,
            vespo=(2.0, 3.0, 3.0, 2.0),
            clip_cov=(2e-4, 1.0, 5.0),
            kl_cov=(2e-4, 1.0),
            generator=None,
            is_weights=None,
            ref_logprobs=None,
            kl_coef=0.0,
            kl_estimator="k3",
            kl_is_corrected=False,
            entropy=None,
            entropy_coef=0.0,
            entropy_agg=None,
            agg=None,
            global_tokens=None,
            num_sequences=None,
            horizon=None,
            **ROLLOUT_CORRECTION,
        ),
    ),
    # the GRPO family, part 2: every other keyword is policy_loss's (**policy_options)
    "linear_policy_loss": (
        ["hidden", "weight", "labels", "mask"],
        dict(
            old_logprobs=inspect.Parameter.empty,
            advantages=inspect.Parameter.empty,
            ref_logprobs=None,
            bias=None,
            temperature=1.0,
            loss_type="grpo",
            entropy_coef=0.0,
            batch_invariant=None,
            **VOCAB_PARALLEL,
        ),
    ),
}
# Functions that forward the rest of their keywords to another public function.
FORWARDS_KEYWORDS = {"linear_policy_loss": "policy_loss"}


def test_every_contract_function_is_exported():
    # batch_invariant is a mode switch (a context manager), check_index_errors reads the
    # ops' GPU index flags: neither is an op
    assert set(CONTRACT) == set(rk.__all__) - {"batch_invariant", "check_index_errors"}


def test_signatures():
    for name, (positional, keyword) in CONTRACT.items():
        params = list(inspect.signature(getattr(rk, name)).parameters.values())
        if name in FORWARDS_KEYWORDS:
            assert params.pop().kind is inspect.Parameter.VAR_KEYWORD, name
        assert [p.name for p in params[: len(positional)]] == positional, name
        kw = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert params[-1].name == "backend" and params[-1].default is None, name
        kw.pop("backend")
        assert kw == keyword, name


def test_docstrings_state_shapes_and_results():
    for name in CONTRACT:
        doc = inspect.getdoc(getattr(rk, name))
        assert doc and "Returns" in doc and "[" in doc and "float" in doc, name
