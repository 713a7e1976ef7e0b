"""rk.policy_loss's rollout / train mismatch correction against the frameworks' own code.

TRL 1.16 (installed): the vLLM importance-sampling block and its metrics block of
GRPOTrainer._generate_and_score_completions (their source, cut out and run as is),
get_off_policy_mask, get_high_entropy_mask, and _compute_loss on a stand-in trainer
(as tests/trl_grpo.py). verl 0.9.1: rollout_corr_helper.py (vendored byte for byte,
tests/vendored/verl_0_9_1) feeding core_algos' compute_policy_loss_vanilla.
OpenRLHF 0.11.2: PolicyLoss (the files test_openrlhf.py loads). Random inputs, ragged
masks (right padding, holes, an empty row), fp32 tight, every mode; then bad inputs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import math
import sys
import textwrap
import types
from collections import defaultdict
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from verl_ref import actor_config, core_algos

import rlhf_kernels as rk
from rlhf_kernels.reference import grpo_correction as correction

trl_grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
GRPOTrainer = trl_grpo_trainer.GRPOTrainer

try:  # OpenRLHF 0.11.2's files, as test_openrlhf.py loads them (it skips when they do not load)
    from test_openrlhf import UP as OPENRLHF
except (ImportError, pytest.skip.Exception):
    OPENRLHF = None

B, T = 6, 9
KERNELS = ["reference", "cpu"]
TRL_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _batch(seed: int, *, empty_row: bool = True, dtype=torch.float32):
    """(lp, old, rollout, advantages [B], mask, entropy): log-probs < 0, old = lp + noise,
    rollout = old + noise (ratios on both sides of the bands), right padding with holes,
    one single-token row and (empty_row) one row without a token."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0 if empty_row else 4, 9, 5, 1, 7, 3])
    mask = ((torch.arange(T) < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.2)).float()
    mask[1, 0] = mask[3, 0] = 1.0

    def noise(scale):
        return scale * torch.randn(B, T, generator=g, dtype=dtype)

    lp = -2.0 * torch.rand(B, T, generator=g, dtype=dtype) - 0.05
    old = (lp + noise(0.3)).clamp(max=-0.01)
    rollout = (old + noise(0.3)).clamp(max=-0.01)
    adv = torch.randn(B, generator=g, dtype=dtype)
    entropy = 3.0 * torch.rand(B, T, generator=g, dtype=dtype)
    return lp, old, rollout, adv, mask, entropy


def _grad_of(fn, lp):
    x = lp.clone().requires_grad_()
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


# ------------------------------------------------------------------ TRL 1.16 --


def _trl_block(method, start: str, end: str):
    """A block of a TRL method's source, from the line holding `start` to the one before
    `end`, dedented and compiled: TRL's own code, run on given locals."""
    lines = inspect.getsource(method).splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if start in line)
    last = next(i for i, line in enumerate(lines) if i > first and end in line)
    return compile(textwrap.dedent("".join(lines[first:last])), f"<TRL 1.16 {method.__name__}>", "exec")


_TRL_IS_RATIO = _trl_block(
    GRPOTrainer._generate_and_score_completions,
    "# Compute the importance sampling ratio when using vLLM",
    "# Compute the per-token log probabilities for the reference model",
)
_TRL_IS_METRICS = _trl_block(
    GRPOTrainer._generate_and_score_completions,
    "delta = torch.abs(old_per_token_logps - sampling_per_token_logps)",
    "output = {",
)


def _trl_accelerator():
    return SimpleNamespace(
        num_processes=1,
        sync_gradients=True,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
        pad_across_processes=lambda x, dim=0, pad_index=0: x,
    )


def _trl_vllm_ratio(old, rollout, mask, mode, clip_min, clip_max):
    """(importance_sampling_ratio, its logged metrics) from TRL's own code."""
    trainer = SimpleNamespace(
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=clip_min,
        vllm_importance_sampling_clip_max=clip_max,
        _metrics={"train": defaultdict(list)},
        accelerator=_trl_accelerator(),
    )
    scope = dict(
        self=trainer, torch=torch, math=math, completion_mask=mask.long(), tool_mask=None,
        old_per_token_logps=old, sampling_per_token_logps=rollout, mode="train", device=old.device,
        nanmin=trl_grpo_trainer.nanmin, nanmax=trl_grpo_trainer.nanmax,
    )  # fmt: skip
    exec(_TRL_IS_RATIO, scope)
    # The metrics block is the body of an `if use_vllm and correction:`; run it as such.
    exec(_TRL_IS_METRICS, scope)
    metrics = {k.rsplit("/", 1)[-1]: v[-1] for k, v in trainer._metrics["train"].items() if "importance" in k}
    return scope["vllm_importance_sampling_ratio"], metrics


def _trl_compute_loss(lp, old, adv, mask, entropy, *, loss_type, ratio, rollout, off_policy, top_entropy):
    """GRPOTrainer._compute_loss (one process, no accumulation) on given log-probs, with the
    vLLM ratio, the off-policy mask and the top-entropy mask as TRL applies them."""
    args = SimpleNamespace(
        delta=None, use_bias_correction_kl=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
        vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, steps_per_generation=1,
    )  # fmt: skip
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, entropy, None),
        top_entropy_quantile=1.0 if top_entropy is None else top_entropy,
        off_policy_mask_threshold=off_policy,
        importance_sampling_level="token",
        beta=0.0,
        args=args,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        use_vllm=ratio is not None,
        vllm_importance_sampling_correction=ratio is not None,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=T,
        accelerator=_trl_accelerator(),
        _entropy_bonus_enabled=False,
        use_adaptive_entropy=False,
        entropy_coef=0.0,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
    )
    trainer.get_high_entropy_mask = partial(GRPOTrainer.get_high_entropy_mask, trainer)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    if ratio is not None:
        inputs["importance_sampling_ratio"] = ratio
    if rollout is not None:
        inputs["sampling_per_token_logps"] = rollout
    return GRPOTrainer._compute_loss(trainer, None, inputs)


# TRL's loss types as policy_loss options (its normalisers; clip_high = epsilon_high).
TRL_LOSSES = {
    "grpo": dict(loss_type="grpo", clip_high=0.28, num_sequences=B),
    "bnpo": dict(loss_type="bnpo", clip_high=0.28),
    "vespo": dict(loss_type="vespo", agg="token-mean"),
}
BANDS = [(0.5, 2.0), (None, 3.0), (0.8, None)]


@pytest.mark.parametrize("mode", TRL_MODES)
@pytest.mark.parametrize("band", BANDS, ids=str)
def test_is_weights_are_trls_vllm_ratio(mode, band):
    """The IS weight of every TRL mode and band is TRL's importance_sampling_ratio, bit for bit."""
    _, old, rollout, _, mask, _ = _batch(seed=1)
    rollout[2, 3] = float("nan")  # a token the engine could not score: ratio 1 (TRL's nan_to_num)
    want, _ = _trl_vllm_ratio(old, rollout, mask, mode, *band)
    got, _ = correction.is_weights(old, rollout, mask, mode=mode, clip_min=band[0], clip_max=band[1])
    assert got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode", TRL_MODES)
def test_is_stats_are_trls_metrics(mode):
    """rollout_is_min / mean / max are TRL's sampling/importance_sampling_ratio/* (every row
    holding a token: TRL's sequence-level statistics also count empty rows, ours do not)."""
    lp, old, rollout, adv, mask, _ = _batch(seed=2, empty_row=False)
    _, metrics = _trl_vllm_ratio(old, rollout, mask, mode, 0.5, 2.0)
    _, stats = rk.policy_loss(
        lp, old, adv, mask, rollout_logprobs=rollout, rollout_correction=mode, rollout_clip_min=0.5,
        rollout_clip_max=2.0,
    )  # fmt: skip
    for name in ("min", "mean", "max"):
        assert stats[f"rollout_is_{name}"].item() == pytest.approx(metrics[name], rel=1e-6), name


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("loss_type", list(TRL_LOSSES))
@pytest.mark.parametrize("mode", TRL_MODES + (None,))
@pytest.mark.parametrize("masks", [False, True], ids=["plain", "off-policy+top-entropy"])
def test_policy_loss_matches_trls_compute_loss(kernel, loss_type, mode, masks):
    """TRL's loss and gradient with the vLLM ratio, the off-policy mask (from the sampling
    log-probs) and the top-entropy mask: policy_loss with rollout_logprobs and the options."""
    if loss_type == "vespo" and (masks or (mode or "").startswith("sequence")):
        pytest.skip("refused for vespo (test_bad_input_errors_name_the_argument)")
    lp, old, rollout, adv, mask, entropy = _batch(seed=3)
    band = (0.5, 2.0)
    ratio = None if mode is None else _trl_vllm_ratio(old, rollout, mask, mode, *band)[0]
    off_policy, top_entropy = (0.02, 0.5) if masks else (None, None)
    want, want_grad = _grad_of(
        lambda x: _trl_compute_loss(
            x, old, adv, mask, entropy, loss_type=loss_type, ratio=ratio, rollout=rollout,
            off_policy=off_policy, top_entropy=top_entropy,
        ),
        lp,
    )  # fmt: skip
    options = dict(TRL_LOSSES[loss_type], rollout_logprobs=rollout, entropy=entropy, backend=kernel)
    if mode is not None:
        options.update(rollout_correction=mode, rollout_clip_min=band[0], rollout_clip_max=band[1])
    if masks:
        options.update(off_policy_mask_threshold=off_policy, top_entropy_quantile=top_entropy)
    got, got_grad = _grad_of(lambda x: rk.policy_loss(x, old, adv, mask, **options)[0], lp)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("token_advantages", [False, True])
def test_off_policy_mask_is_trls(token_advantages):
    lp, _, rollout, adv, mask, _ = _batch(seed=4)
    adv = adv[:, None] * (1 + torch.rand(B, T)) if token_advantages else adv
    for threshold in (-0.05, 0.0, 0.02, 0.1):
        want = GRPOTrainer.get_off_policy_mask(
            advantages=adv if token_advantages else adv[:, None], per_token_logps=lp,
            sampling_per_token_logps=rollout, mask=mask, off_policy_threshold=threshold,
        )  # fmt: skip
        got = correction.off_policy_mask(lp, rollout, adv, mask, threshold=threshold)
        assert torch.equal(got.to(want.dtype), want)


def test_top_entropy_mask_is_trls():
    stand_in = SimpleNamespace(accelerator=_trl_accelerator())
    for seed in range(4):
        _, _, _, _, mask, entropy = _batch(seed=seed)
        for rho in (0.0, 0.2, 0.37, 0.5, 0.8, 0.999):
            want = GRPOTrainer.get_high_entropy_mask(stand_in, entropy, mask, 1 - rho)
            got = correction.top_entropy_mask(entropy, mask, quantile=rho)
            assert torch.equal(got.bool(), want), (seed, rho)
    empty = torch.zeros(B, T)
    assert not correction.top_entropy_mask(entropy, empty, quantile=0.5).any()


# ---------------------------------------------------------------- verl 0.9.1 --


class _DataProto(SimpleNamespace):
    @classmethod
    def from_dict(cls, tensors):
        return cls(batch=dict(tensors))


def _load_rollout_corr_helper():
    """verl 0.9.1's rollout_corr_helper.py on core_algos' torch_functional (its only math
    dependency); DataProto and the config dataclasses are stand-ins."""
    path = Path(__file__).resolve().parent / "vendored/verl_0_9_1/verl/trainer/ppo/rollout_corr_helper.py"

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        m.__path__ = []
        return m

    verl_F = core_algos.verl_F
    stubs = {
        "verl": module("verl"),
        "verl.utils": module("verl.utils", torch_functional=verl_F),
        "verl.utils.torch_functional": verl_F,
        "verl.protocol": module("verl.protocol", DataProto=_DataProto),
        "verl.trainer": module("verl.trainer"),
        "verl.trainer.config": module("verl.trainer.config"),
        "verl.trainer.config.algorithm": module("verl.trainer.config.algorithm", RolloutCorrectionConfig=dict),
        "verl.workers": module("verl.workers"),
        "verl.workers.config": module("verl.workers.config"),
        "verl.workers.config.actor": module("verl.workers.config.actor", PolicyLossConfig=dict),
    }
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("verl_rollout_corr_helper", path)
        helper = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(helper)
        return helper
    finally:
        for name, before in saved.items():
            if before is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = before


VERL = _load_rollout_corr_helper()


@contextlib.contextmanager
def verl_helper_importable():
    """verl's bypass mode imports its helper at call time (`from
    verl.trainer.ppo.rollout_corr_helper import ...`): inside the block that is VERL."""
    name = "verl.trainer.ppo.rollout_corr_helper"
    saved = sys.modules.get(name)
    sys.modules[name] = VERL
    try:
        yield VERL
    finally:
        sys.modules.pop(name)
        if saved is not None:
            sys.modules[name] = saved


# verl's rollout_is (level, threshold) as (rollout_correction, rollout_clip_min, rollout_clip_max).
VERL_IS = {
    ("token", 2.0): ("token_truncate", None, 2.0),
    ("token", "0.5_2.0"): ("token_mask", 0.5, 2.0),
    ("sequence", 2.0): ("sequence_truncate", None, 2.0),
    ("sequence", "0.5_2.5"): ("sequence_mask", 0.5, 2.5),
    (None, None): (None, None, None),
}
VERL_RS = [
    (None, None),
    ("token_k1", 1.5),
    ("token_k2,token_k3", "0.05"),
    ("seq_sum_k1", "0.6_1.8"),
    ("seq_sum_k2,seq_sum_k3", "0.5,0.4"),
    ("seq_mean_k1,seq_mean_k2", "1.15,0.08"),
    ("seq_mean_k3", 0.05),
    ("seq_max_k2,seq_max_k3", 0.2),
]


def _verl_correction(old, rollout, mask, rollout_is, threshold, normalize, rs, rs_threshold):
    weights, modified_mask, metrics = VERL.compute_rollout_correction_and_rejection_mask(
        old_log_prob=old, rollout_log_prob=rollout, response_mask=mask, rollout_is=rollout_is,
        rollout_is_threshold=threshold, rollout_is_batch_normalize=normalize, rollout_rs=rs,
        rollout_rs_threshold=rs_threshold,
    )  # fmt: skip
    return None if weights is None else weights.batch["rollout_is_weights"], modified_mask, metrics


def _ours_for_verl(is_key, normalize, rs, rs_threshold):
    mode, low, high = VERL_IS[is_key]
    options = dict(rollout_rejection=rs, rollout_rejection_threshold=rs_threshold)
    if mode is not None:
        options.update(
            rollout_correction=mode, rollout_clip_min=low, rollout_clip_max=high, rollout_log_ratio_clamp=20.0,
            rollout_batch_normalize=normalize,
        )  # fmt: skip
    return options


@pytest.mark.parametrize("is_key", list(VERL_IS), ids=str)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("rs,rs_threshold", VERL_RS, ids=str)
def test_weights_and_rejection_are_verls(is_key, normalize, rs, rs_threshold):
    """rollout_is_weights and the modified response_mask of verl's
    compute_rollout_correction_and_rejection_mask, and the metrics both report."""
    if is_key[0] is None and normalize:
        pytest.skip("batch normalisation needs an IS level")
    _, old, rollout, _, mask, _ = _batch(seed=5)
    old[4, :3] -= 25.0  # beyond verl's +-20 safety bound, token and sequence
    want_w, want_mask, metrics = _verl_correction(old, rollout, mask, *is_key, normalize, rs, rs_threshold)
    options = _ours_for_verl(is_key, normalize, rs, rs_threshold)
    mode, low, high = VERL_IS[is_key]
    got = correction.correction(old, old, torch.zeros(B), mask, rollout_logprobs=rollout, **options)
    if want_w is None:
        assert got.weights is None
    else:
        torch.testing.assert_close(got.weights * mask, want_w, rtol=1e-6, atol=0)
    got_mask = mask if got.keep is None else torch.where(got.keep, mask, 0.0)
    assert torch.equal(got_mask, want_mask)
    stats = got.stats
    assert stats["rollout_kl"].item() == pytest.approx(metrics["rollout_corr/kl"], rel=1e-5)
    if rs is not None:
        want = metrics["rollout_corr/rollout_rs_masked_fraction"]
        assert stats["rollout_rejected_frac"].item() == pytest.approx(want, abs=1e-7)
    if is_key[0] == "token":
        assert stats["rollout_is_mean"].item() == pytest.approx(metrics["rollout_corr/rollout_is_mean"], rel=1e-6)
        for name in ("max", "min"):
            assert stats[f"rollout_is_{name}"].item() == pytest.approx(metrics[f"rollout_corr/rollout_is_{name}"])
        high_fraction = metrics["rollout_corr/rollout_is_ratio_fraction_high"]
        assert stats["rollout_is_frac_high"].item() == pytest.approx(high_fraction, abs=1e-7)
        if low is not None:  # verl reports the fraction below 1 / U also where TIS does not apply it
            low_fraction = metrics["rollout_corr/rollout_is_ratio_fraction_low"]
            assert stats["rollout_is_frac_low"].item() == pytest.approx(low_fraction, abs=1e-7)
    if normalize:
        want = metrics["rollout_corr/rollout_is_batch_norm_factor"]
        assert stats["rollout_is_batch_norm_factor"].item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("is_key", list(VERL_IS), ids=str)
@pytest.mark.parametrize("rs,rs_threshold", [VERL_RS[0], VERL_RS[1], VERL_RS[6]], ids=str)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_matches_verl_vanilla_with_rollout_correction(kernel, is_key, rs, rs_threshold, agg):
    """verl's actor: the correction on (old, rollout), then compute_policy_loss_vanilla with
    rollout_is_weights and the rejected response_mask; the same from one policy_loss call."""
    lp, old, rollout, adv, mask, _ = _batch(seed=6)
    weights, modified_mask, _ = _verl_correction(old, rollout, mask, *is_key, False, rs, rs_threshold)

    def verl_loss(x):
        loss, _ = core_algos.compute_policy_loss_vanilla(
            old_log_prob=old, log_prob=x, advantages=adv[:, None] * mask, response_mask=modified_mask,
            loss_agg_mode=agg, config=actor_config(clip_ratio_high=0.28), rollout_is_weights=weights,
        )  # fmt: skip
        return loss

    options = dict(loss_type="vanilla", clip_high=0.28, dual_clip=3.0, log_ratio_clamp=20.0, agg=agg)
    options.update(_ours_for_verl(is_key, False, rs, rs_threshold), rollout_logprobs=rollout, backend=kernel)
    want, want_grad = _grad_of(verl_loss, lp)
    got, got_grad = _grad_of(lambda x: rk.policy_loss(x, old, adv, mask, **options)[0], lp)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("is_key", list(VERL_IS), ids=str)
@pytest.mark.parametrize("rs,rs_threshold", [VERL_RS[0], VERL_RS[1], VERL_RS[5]], ids=str)
def test_correction_from_current_reads_sg_logprobs(is_key, rs, rs_threshold):
    """rollout_correction_from="current": weights, rejection and stats of the correction
    with sg(logprobs) in old_logprobs' place (verl's bypass mode: its helper on
    (log_prob, rollout)), no gradient through them; "old" stays the default."""
    if is_key[0] is None and rs is None:
        pytest.skip("nothing to correct")
    lp, old, rollout, adv, mask, _ = _batch(seed=7)
    lp = lp.requires_grad_()
    options = dict(_ours_for_verl(is_key, True, rs, rs_threshold), rollout_logprobs=rollout)
    current = correction.correction(lp, old, adv, mask, rollout_correction_from="current", **options)
    want = correction.correction(lp, lp.detach(), adv, mask, **options)
    default = correction.correction(lp, old, adv, mask, **options)
    for got, expected, other in zip(current[:2], want[:2], default[:2]):
        assert (got is None) == (expected is None)
        if got is not None:
            assert not got.requires_grad
            assert torch.equal(got, expected) and not torch.equal(got, other)
    assert current.stats.keys() == want.stats.keys()
    for key, value in want.stats.items():
        assert torch.equal(current.stats[key], value), key
    weights, modified_mask, metrics = _verl_correction(lp.detach(), rollout, mask, *is_key, True, rs, rs_threshold)
    assert current.stats["rollout_kl"].item() == pytest.approx(metrics["rollout_corr/kl"], rel=1e-5)
    if weights is not None:
        torch.testing.assert_close(current.weights * mask, weights, rtol=1e-6, atol=0)
    assert torch.equal(mask if current.keep is None else torch.where(current.keep, mask, 0.0), modified_mask)


# ----------------------------------------------------------- OpenRLHF 0.11.2 --

# (level, mode, gating, threshold) -> rollout_correction
OPENRLHF_CASES = [
    ("token", "clip", "ratio", (0.5, 2.0), "token_truncate"),
    ("token", "mask", "ratio", (0.5, 2.0), "token_mask"),
    ("seq", "mask", "ratio", (0.8, 1.25), "geometric_mask"),
    ("token", "mask", "binary_kl", (0.0, 0.02), "token_mask"),
    ("seq", "mask", "binary_kl", (-1.0, 0.01), "geometric_mask"),
    ("token", "mask", "tv", (0.0, 0.05), "token_mask"),
    ("seq", "mask", "tv", (0.0, 0.04), "geometric_mask"),
]


@pytest.mark.skipif(OPENRLHF is None, reason="OpenRLHF 0.11.2's files did not load")
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("level,mode,gating,threshold,ours", OPENRLHF_CASES, ids=str)
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_matches_openrlhf_is_correction(
    kernel, level, mode, gating, threshold, ours, token_level_loss, dual_clip
):
    """OpenRLHF's PolicyLoss (ppo) with every is_correction level / mode / gating: its loss,
    gradient, vllm_kl and is_filter_ratio."""
    lp, old, rollout, adv, mask, _ = _batch(seed=7)
    theirs = OPENRLHF.PolicyLoss(
        clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level_loss,
        policy_loss_type="ppo", is_correction_level=level, is_correction_mode=mode, is_correction_gating=gating,
        is_correction_threshold=threshold,
    )  # fmt: skip
    outputs = {}

    def openrlhf_loss(x):
        loss, _, _, outputs["vllm_kl"], outputs["filtered"] = theirs(
            x, old, adv[:, None].expand(B, T), mask, rollout_log_probs=rollout
        )
        return loss

    want, want_grad = _grad_of(openrlhf_loss, lp)
    options = dict(
        loss_type="ppo", clip_high=0.28, dual_clip=dual_clip, log_ratio_clamp=20.0,
        agg="token-mean" if token_level_loss else "seq-mean-token-mean", rollout_logprobs=rollout,
        rollout_correction=ours, rollout_gate=gating, rollout_clip_min=threshold[0], rollout_clip_max=threshold[1],
        backend=kernel,
    )  # fmt: skip
    stats = {}

    def ours_loss(x):
        loss, out = rk.policy_loss(x, old, adv, mask, **options)
        stats.update(out)
        return loss

    got, got_grad = _grad_of(ours_loss, lp)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    assert stats["rollout_kl"].item() == pytest.approx(outputs["vllm_kl"].item(), rel=1e-6)
    filtered = stats["rollout_is_frac_low"] + stats["rollout_is_frac_high"]
    if level == "seq":  # OpenRLHF's over all B rows, a row without a token counting as filtered
        rows, empty = (mask.sum(-1) > 0).sum(), (mask.sum(-1) == 0).sum()
        filtered = (filtered * rows + empty) / B
    assert filtered.item() == pytest.approx(outputs["filtered"].item(), abs=1e-6)


# ------------------------------------------------------------- the public path --


def test_linear_policy_loss_forwards_the_correction():
    """linear_policy_loss takes the correction keywords (its entropy feeds the top-entropy mask)."""
    g = torch.Generator().manual_seed(8)
    _, old, rollout, adv, mask, _ = _batch(seed=8)
    hidden, weight = torch.randn(B, T, 5, generator=g), torch.randn(11, 5, generator=g)
    labels = torch.randint(0, 11, (B, T), generator=g)
    options = dict(
        rollout_logprobs=rollout, rollout_correction="sequence_mask", rollout_clip_min=0.5, rollout_clip_max=2.0,
        off_policy_mask_threshold=0.02, top_entropy_quantile=0.4, rollout_rejection="token_k2",
        rollout_rejection_threshold=0.1,
    )  # fmt: skip
    got, stats = rk.linear_policy_loss(hidden, weight, labels, mask, old_logprobs=old, advantages=adv, **options)
    lp, entropy = rk.token_logprobs(hidden @ weight.T, torch.where(mask != 0, labels, -100), return_entropy=True)
    want, want_stats = rk.policy_loss(lp, old, adv, mask, entropy=entropy, **options)
    torch.testing.assert_close(got, want)
    assert sorted(stats) == sorted(want_stats)
    assert {"rollout_is_mean", "off_policy_masked_frac", "top_entropy_masked_frac", "rollout_rejected_frac"} <= set(
        stats
    )


def test_correction_composes_with_is_weights_and_no_gradient_flows():
    """The correction multiplies given is_weights; rollout_logprobs and old_logprobs get no
    gradient, and nothing is written into the inputs."""
    lp, old, rollout, adv, mask, entropy = _batch(seed=9)
    extra = torch.rand(B, T) + 0.5
    options = dict(rollout_correction="token_mask", rollout_clip_min=0.5, rollout_clip_max=2.0)
    w, _ = correction.is_weights(old, rollout, mask, mode="token_mask", clip_min=0.5, clip_max=2.0)
    want = rk.policy_loss(lp, old, adv, mask, is_weights=extra * w)[0]
    roll, before = rollout.clone().requires_grad_(), rollout.clone()
    got = rk.policy_loss(lp.requires_grad_(), old, adv, mask, is_weights=extra, rollout_logprobs=roll, **options)[0]
    torch.testing.assert_close(got, want)
    assert torch.autograd.grad(got, roll, allow_unused=True)[0] is None
    assert torch.equal(rollout, before)


def test_compiles_without_graph_breaks():
    lp, old, rollout, adv, mask, entropy = _batch(seed=10)
    options = dict(
        rollout_logprobs=rollout, rollout_correction="geometric_mask", rollout_clip_min=0.8, rollout_clip_max=1.25,
        off_policy_mask_threshold=0.02, top_entropy_quantile=0.3, entropy=entropy, rollout_rejection="seq_max_k3",
        rollout_rejection_threshold=0.5, rollout_batch_normalize=True, backend="cpu",
    )  # fmt: skip

    def step(x):
        return rk.policy_loss(x, old, adv, mask, **options)[0]

    want = step(lp)
    got = torch.compile(step, fullgraph=True, backend="eager")(lp)
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- bad inputs --

_OK = dict(rollout_correction="token_truncate", rollout_clip_max=2.0)
BAD = [
    (dict(_OK, rollout_correction="token_clip"), ValueError, "rollout_correction"),
    (dict(_OK, rollout_logprobs=None), ValueError, "rollout_logprobs"),
    (dict(_OK, rollout_logprobs="shape"), ValueError, "rollout_logprobs"),
    (dict(_OK, rollout_logprobs="int"), TypeError, "rollout_logprobs"),
    (dict(_OK, rollout_logprobs="device"), ValueError, "rollout_logprobs"),
    (dict(_OK, rollout_clip_max=None), ValueError, "rollout_clip_min or rollout_clip_max"),
    (dict(_OK, rollout_clip_min=3.0), ValueError, "rollout_clip_min must be <= rollout_clip_max"),
    (dict(_OK, rollout_clip_max=-1.0), ValueError, "rollout_clip_max"),
    (dict(_OK, rollout_clip_min=float("nan")), ValueError, "rollout_clip_min"),
    (dict(_OK, rollout_clip_max="2"), ValueError, "rollout_clip_max"),
    (dict(_OK, rollout_gate="kl"), ValueError, "rollout_gate"),
    (dict(_OK, rollout_gate="binary_kl"), ValueError, "rollout_gate"),
    (
        dict(rollout_correction="token_mask", rollout_gate="tv", rollout_clip_min=0.1, rollout_clip_max=0.2),
        ValueError,
        "rollout_clip_min",
    ),
    (dict(_OK, rollout_log_ratio_clamp=0.0), ValueError, "rollout_log_ratio_clamp"),
    (dict(_OK, rollout_batch_normalize=1), TypeError, "rollout_batch_normalize"),
    (dict(rollout_batch_normalize=True), ValueError, "rollout_batch_normalize"),
    (dict(rollout_rejection="token_k4", rollout_rejection_threshold=1.0), ValueError, "rollout_rejection"),
    (dict(rollout_rejection=3, rollout_rejection_threshold=1.0), TypeError, "rollout_rejection"),
    (dict(rollout_rejection=" , ", rollout_rejection_threshold=1.0), ValueError, "rollout_rejection"),
    (dict(rollout_rejection="token_k2"), ValueError, "rollout_rejection_threshold"),
    (dict(rollout_rejection="token_k2", rollout_rejection_threshold=-1.0), ValueError, "rollout_rejection_threshold"),
    (
        dict(rollout_rejection="token_k2", rollout_rejection_threshold=(0.5, 2.0)),
        ValueError,
        "rollout_rejection_threshold",
    ),
    (
        dict(rollout_rejection="token_k1", rollout_rejection_threshold=(2.0, 0.5)),
        ValueError,
        "rollout_rejection_threshold",
    ),
    (
        dict(rollout_rejection="token_k1,token_k2", rollout_rejection_threshold="1,2,3"),
        ValueError,
        "rollout_rejection_threshold",
    ),
    (dict(rollout_rejection="token_k1", rollout_rejection_threshold="a_b"), ValueError, "rollout_rejection_threshold"),
    (
        dict(rollout_rejection="token_k1", rollout_rejection_threshold={"token_k2": 1.0}),
        ValueError,
        "rollout_rejection_threshold",
    ),
    (dict(rollout_rejection="seq_sum_k1", rollout_rejection_threshold=0.5), ValueError, "rollout_rejection_threshold"),
    (dict(rollout_rejection_threshold=1.0), ValueError, "rollout_rejection_threshold needs rollout_rejection"),
    (
        dict(rollout_rejection="token_k2", rollout_rejection_threshold=1.0, rollout_correction_from="new"),
        ValueError,
        "rollout_correction_from must be one of",
    ),  # fmt: skip
    (
        dict(rollout_correction_from="current", rollout_logprobs=None),
        ValueError,
        "rollout_correction_from='current' needs rollout_logprobs",
    ),  # fmt: skip
    (
        dict(rollout_rejection="token_k2", rollout_rejection_threshold=1.0, rollout_logprobs=None),
        ValueError,
        "rollout_logprobs",
    ),
    (dict(off_policy_mask_threshold=float("nan")), ValueError, "off_policy_mask_threshold"),
    (dict(off_policy_mask_threshold="0.1"), ValueError, "off_policy_mask_threshold"),
    (dict(top_entropy_quantile=1.5), ValueError, "top_entropy_quantile"),
    (dict(top_entropy_quantile=0.5, entropy=None), ValueError, "top_entropy_quantile needs entropy"),
    (dict(_OK, rollout_correction="sequence_mask", loss_type="vespo"), ValueError, "vespo"),
    (dict(off_policy_mask_threshold=0.1, loss_type="vespo"), ValueError, "off_policy_mask_threshold"),
    (dict(top_entropy_quantile=0.5, loss_type="geo_mean"), ValueError, "top_entropy_quantile"),
]


@pytest.mark.parametrize("options,error,match", BAD, ids=lambda x: str(x)[:60] if isinstance(x, dict) else None)
def test_bad_input_errors_name_the_argument(options, error, match):
    lp, old, rollout, adv, mask, entropy = _batch(seed=11)
    options = dict(options)
    special = {
        "shape": rollout[:, :-1],
        "int": rollout.long(),
        "device": rollout.to("meta"),
    }
    roll = options.pop("rollout_logprobs", rollout)
    roll = special.get(roll, roll) if isinstance(roll, str) else roll
    options.setdefault("entropy", entropy)
    with pytest.raises(error, match=match):
        rk.policy_loss(lp, old, adv, mask, rollout_logprobs=roll, **options)
