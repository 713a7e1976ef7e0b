"""TRL 1.16's own DPOTrainer and GRPOTrainer (tiny random Llama, CPU, 2 steps) with
rlhf_kernels.integrations.trl.patch(): rlhf_kernels ops are dispatched (counted) and the
logged losses and gradient norms equal the unpatched run; and GRPOTrainer._compute_loss
itself, patched vs unpatched, on a prepared batch for every TRL 1.16 loss type and option.

Tolerances. Full-trainer runs: TRL's configs default to bf16=True, so on the CPU both
paths run the fused LM head's projection under bf16 autocast and round its tiles
differently (in fp32 the log-probs agree to ~1e-7 relative per token:
test_fused_lm_head_gradients_match_trl). DPO's loss gradient is a difference of the
chosen and rejected log-prob gradients, which magnifies that to ~1e-4 relative in the
gradient norm, and a second step moves along a slightly different gradient: 1e-3.
_compute_loss tests: bf16=False, so both paths are fp32 end to end; the losses agree to
~1e-6 relative (the kernels sum in another order), the gradients to ~1e-6 of their
largest entry and the metrics to ~1e-8: asserted at 1e-5, 1e-5 and 1e-6.
"""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("rlhf_trainer")

import rlhf_kernels as rk  # noqa: E402
from rlhf_kernels.integrations import trl as rk_trl  # noqa: E402
from trl_support import skip_module_unless_supported  # noqa: E402

skip_module_unless_supported()
from rlhf_trainer.models import tiny_model  # noqa: E402
from rlhf_trainer.tokenizer import builtin_tokenizer  # noqa: E402


POLICY_OP = "rlhf_kernels::grpo_policy_loss"  # the compiled policy loss (cpu kernel)


class _CountOps(TorchDispatchMode):
    """Counts the rlhf_kernels ops that reach the dispatcher, in all and by name."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rlhf_kernels":
            self.count += 1
            self.ops[func.name()] += 1
        return func(*args, **(kwargs or {}))


class _SpyPolicyLoss:
    """Counts the calls of rk.policy_loss (its reference code dispatches no op)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.original = rk.policy_loss
        monkeypatch.setattr(rk, "policy_loss", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


def _train(make_trainer, patch: bool, ops=None):
    trainer = make_trainer()
    counter = _CountOps()
    if patch:
        assert rk_trl.patch() > 0
    try:
        with counter:
            trainer.train()
    finally:
        rk_trl.unpatch()
    logs = [(row["loss"], row["grad_norm"]) for row in trainer.state.log_history if "loss" in row]
    if ops is not None:
        ops.update(counter.ops)
    return logs, counter.count


def _common(tmp_path, name):
    # SGD, not Adam: Adam's normalisation turns gradient noise of 1e-9 into full steps.
    return dict(
        output_dir=str(tmp_path / name),
        max_steps=2,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        learning_rate=0.1,
        optim="sgd",
    )


def _assert_same_training(unpatched, patched, first_step_rtol, later_rtol):
    (want, zero), (got, count) = unpatched, patched
    assert zero == 0 and count > 0, (zero, count)
    assert len(got) == len(want) == 2
    for step, ((loss, norm), (want_loss, want_norm)) in enumerate(zip(got, want)):
        rtol = first_step_rtol if step == 0 else later_rtol
        assert loss == pytest.approx(want_loss, rel=rtol, abs=1e-6), (step, got, want)
        assert norm == pytest.approx(want_norm, rel=rtol), (step, got, want)


def test_dpo_trainer_runs_on_our_kernels(tmp_path):
    tokenizer = builtin_tokenizer()
    pairs = [
        {"prompt": "a b :", "chosen": " a b <eos>", "rejected": " c c <eos>"},
        {"prompt": "c d e :", "chosen": " c d e <eos>", "rejected": " a <eos>"},
    ] * 4

    def make():
        return trl.DPOTrainer(
            model=tiny_model(len(tokenizer), seed=0),
            ref_model=tiny_model(len(tokenizer), seed=0),
            args=trl.DPOConfig(per_device_train_batch_size=2, **_common(tmp_path, "dpo")),
            train_dataset=datasets.Dataset.from_list(pairs),
            processing_class=tokenizer,
        )

    _assert_same_training(_train(make, False), _train(make, True), 1e-3, 1e-3)


GRPO_RUNS = [
    # TRL 1.16's default loss (dapo) at the token level: the compiled policy-loss kernel runs.
    pytest.param({}, True, id="dapo"),
    # grpo at the sequence level, KL to a reference model, two iterations per batch (the
    # old log-probs differ from the policy's at step 2): rk.policy_loss's torch code runs.
    pytest.param(dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, num_iterations=2), False,
                 id="grpo-sequence-beta"),
]  # fmt: skip


@pytest.mark.parametrize("config,kernel", GRPO_RUNS)
def test_grpo_trainer_runs_on_our_kernels(tmp_path, monkeypatch, config, kernel):
    tokenizer = builtin_tokenizer()
    prompts = [{"prompt": "a b :"}, {"prompt": "c d e :"}] * 8
    path = None
    if config.get("beta"):  # TRL builds the reference model from the policy's path
        path = str(tmp_path / "model")
        tiny_model(len(tokenizer), seed=0).save_pretrained(path)

    def reward(completions, **kwargs):
        return [completion.count("a") + 0.1 * len(completion) for completion in completions]

    def make():
        return trl.GRPOTrainer(
            model=tiny_model(len(tokenizer), seed=0) if path is None else path,
            reward_funcs=reward,
            args=trl.GRPOConfig(
                per_device_train_batch_size=4,
                num_generations=4,
                max_completion_length=5,
                **config,
                **_common(tmp_path, "grpo"),
            ),
            train_dataset=datasets.Dataset.from_list(prompts),
            processing_class=tokenizer,
        )

    unpatched = _train(make, False)
    spy, ops = _SpyPolicyLoss(monkeypatch), collections.Counter()
    patched = _train(make, True, ops)
    assert spy.calls == 2, spy.calls  # one _compute_loss a step
    assert (ops[POLICY_OP] == 2) == kernel, ops
    # TRL's GRPOConfig trains in bf16 autocast on the CPU too: the head's logits are bf16,
    # rounded from GEMMs blocked differently (TRL's tiles, our chunks), so the first step's
    # grad norm differs by what a flipped bf16 rounding moves it: measured 1.3e-4 and
    # 1.4e-4 relative on an AVX2-only VM (under 1e-4 with AVX-512), the losses equal.
    _assert_same_training(unpatched, patched, 1e-3, 3e-3)


# ------------------------------------------------ GRPOTrainer._compute_loss --

B, PROMPT, T = 6, 3, 7


@pytest.fixture(scope="module")
def grpo(tmp_path_factory):
    """(trainer, batch): a real GRPOTrainer (bf16=False: no autocast) and a prepared
    batch whose old, reference and vLLM-sampling log-probs are the policy's plus noise,
    so ratios are clipped on both sides; one completion has a single token."""
    tokenizer = builtin_tokenizer()
    trainer = trl.GRPOTrainer(
        model=tiny_model(len(tokenizer), seed=0),
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=trl.GRPOConfig(
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=T + 3,
            bf16=False,
            output_dir=str(tmp_path_factory.mktemp("grpo_loss")),
            report_to="none",
            use_cpu=True,
            save_strategy="no",
        ),
        train_dataset=datasets.Dataset.from_list([{"prompt": "a b :"}] * 4),
        processing_class=tokenizer,
    )
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(T) < torch.tensor([7, 5, 3, 7, 1, 6])[:, None]).long()
    batch = {
        "prompt_ids": torch.randint(2, len(tokenizer), (B, PROMPT), generator=g),
        "prompt_mask": torch.ones(B, PROMPT, dtype=torch.long),
        "completion_ids": torch.randint(2, len(tokenizer), (B, T), generator=g),
        "completion_mask": mask,
        "advantages": torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.2]),
        "num_items_in_batch": mask.sum() * 2,  # the generation batch: two micro-batches
    }
    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, torch.cat([batch["prompt_mask"], mask], 1), T
        )

    def noise(scale):
        return scale * torch.randn(B, T, generator=g)

    batch["old_per_token_logps"] = logps + noise(0.3)
    batch["ref_per_token_logps"] = logps + noise(0.2)
    batch["sampling_per_token_logps"] = batch["old_per_token_logps"] + noise(0.3)
    extra = {
        "tool_mask": (torch.rand(B, T, generator=g) > 0.2).long(),
        "token_advantages": batch["advantages"][:, None] * (1 + torch.rand(B, T, generator=g)),
    }
    return trainer, batch, extra


def _vllm_is_ratio(inputs, mode, clip_min=0.5, clip_max=2.0):
    """TRL 1.16's importance_sampling_ratio in `mode` (its _generate_and_score_completions)."""
    mask = inputs["completion_mask"]
    diff = torch.nan_to_num((inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"]) * mask, nan=0.0)
    ratio = torch.exp(diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    return ratio.masked_fill((ratio < clip_min) | (ratio > clip_max), 0.0)


BONUS = dict(entropy_coef=0.01, _entropy_bonus_enabled=True, current_gradient_accumulation_steps=2)
ADAPTIVE = dict(use_adaptive_entropy=True, _entropy_bonus_enabled=True, _last_world_entropy=0.0, entropy_coef=0.01)
# case: (trainer attributes, args attributes, batch: vllm mode / tool_mask / token_advantages / eval)
LOSS_CASES = {
    "grpo": (dict(loss_type="grpo"), {}, {}),
    "dr_grpo": (dict(loss_type="dr_grpo"), {}, {}),
    "dapo": (dict(loss_type="dapo"), {}, {}),
    "bnpo": (dict(loss_type="bnpo"), {}, {}),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.1), {}, {}),
    "sapo": (dict(loss_type="sapo"), dict(sapo_temperature_pos=0.9, sapo_temperature_neg=1.2), {}),
    "luspo-sequence": (dict(loss_type="luspo", importance_sampling_level="sequence"), {}, {}),
    "vespo": (dict(loss_type="vespo"), {}, {}),
    "grpo-sequence": (dict(loss_type="grpo", importance_sampling_level="sequence"), {}, {}),
    "cispo-sequence": (dict(loss_type="cispo", importance_sampling_level="sequence", epsilon_high=1.05), {}, {}),
    "sapo-sequence-beta": (dict(loss_type="sapo", importance_sampling_level="sequence", beta=0.04), {}, {}),
    "grpo-beta-delta": (dict(loss_type="grpo", beta=0.04, epsilon_high=0.28), dict(delta=1.3), {}),
    "dr_grpo-beta": (dict(loss_type="dr_grpo", beta=0.1), {}, {}),
    "bnpo-beta-uncorrected": (dict(loss_type="bnpo", beta=0.04), dict(use_bias_correction_kl=False), {}),
    "luspo-token-beta": (dict(loss_type="luspo", beta=0.04), {}, {}),
    "vespo-sequence-beta": (dict(loss_type="vespo", importance_sampling_level="sequence", beta=0.04), {}, {}),
    "grpo-entropy-accumulated": (dict(loss_type="grpo", **BONUS), {}, {}),
    "dapo-entropy-accumulated": (dict(loss_type="dapo", **BONUS), dict(steps_per_generation=2), {}),
    "bnpo-top-entropy": (dict(loss_type="bnpo", top_entropy_quantile=0.5), {}, {}),
    "cispo-top-entropy-bonus": (dict(loss_type="cispo", epsilon_high=1.1, top_entropy_quantile=0.4, **BONUS), {}, {}),
    "vespo-top-entropy-off-policy": (
        dict(loss_type="vespo", top_entropy_quantile=0.5, off_policy_mask_threshold=0.01), {}, {}
    ),
    "grpo-off-policy": (dict(loss_type="grpo", off_policy_mask_threshold=0.01), {}, {}),
    "dapo-adaptive-entropy-on": (dict(loss_type="dapo", **ADAPTIVE), dict(entropy_target=5.0), {}),
    "sapo-adaptive-entropy-off": (dict(loss_type="sapo", **ADAPTIVE), dict(entropy_target=0.1), {}),
    "dapo-vllm-token_truncate": (dict(loss_type="dapo"), {}, dict(vllm="token_truncate")),
    "grpo-vllm-token_mask-beta": (dict(loss_type="grpo", beta=0.04), {}, dict(vllm="token_mask")),
    "bnpo-vllm-sequence_truncate": (dict(loss_type="bnpo"), {}, dict(vllm="sequence_truncate")),
    "luspo-vllm-sequence_mask": (
        dict(loss_type="luspo", importance_sampling_level="sequence"), {}, dict(vllm="sequence_mask")
    ),
    "vespo-vllm-token_truncate": (dict(loss_type="vespo"), {}, dict(vllm="token_truncate")),
    "grpo-vllm-off-policy-top-entropy": (
        dict(loss_type="grpo", off_policy_mask_threshold=0.01, top_entropy_quantile=0.6), {}, dict(vllm="token_mask")
    ),
    "bnpo-tool-mask-beta": (dict(loss_type="bnpo", beta=0.04), {}, dict(tool_mask=True)),
    "grpo-token-advantages": (dict(loss_type="grpo"), {}, dict(token_advantages=True)),
    "vespo-token-advantages": (dict(loss_type="vespo"), {}, dict(token_advantages=True)),
    "dapo-eval-beta": (dict(loss_type="dapo", beta=0.04, current_gradient_accumulation_steps=2), {}, dict(eval=True)),
}  # fmt: skip
_STATE = ("entropy_coef", "_last_world_entropy")  # the adaptive entropy controller's


def _run_compute_loss(trainer, inputs, attributes):
    """GRPOTrainer._compute_loss as the class holds it now, from the same trainer state:
    (loss, parameter gradients, the last value of each logged metric, controller state)."""
    for name, value in attributes.items():
        setattr(trainer, name, value)
    trainer._entropy_window_stats = None
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters()]
    metrics = {name: values[-1] for mode in trainer._metrics.values() for name, values in mode.items()}
    return loss.detach(), grads, metrics, [getattr(trainer, name) for name in _STATE]


def _configure(grpo, monkeypatch, attributes, args, extra):
    """(trainer, inputs, trainer attributes to set); everything is restored after the test."""
    trainer, batch, tensors = grpo
    attributes = {"current_gradient_accumulation_steps": 1, **{n: getattr(trainer, n) for n in _STATE}, **attributes}
    inputs = dict(batch)
    if extra.get("tool_mask"):
        inputs["tool_mask"] = tensors["tool_mask"]
    if extra.get("token_advantages"):
        inputs["advantages"] = tensors["token_advantages"]
    if extra.get("vllm"):
        attributes.update(use_vllm=True, vllm_importance_sampling_correction=True)
        attributes["vllm_importance_sampling_mode"] = extra["vllm"]
        inputs["importance_sampling_ratio"] = _vllm_is_ratio(inputs, extra["vllm"])
    for name, value in args.items():
        monkeypatch.setattr(trainer.args, name, value)
    for name in attributes:
        monkeypatch.setattr(trainer, name, getattr(trainer, name, None), raising=False)
    return trainer, inputs, attributes


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_grpo_compute_loss_runs_policy_loss(grpo, monkeypatch, case):
    """Patched, GRPOTrainer._compute_loss calls rk.policy_loss once (the compiled kernel
    for token-level ratios, the KL's importance correction included, its reference code
    otherwise) and gives TRL's loss, gradients, metrics and entropy-controller state."""
    attributes, args, extra = LOSS_CASES[case]
    trainer, inputs, attributes = _configure(grpo, monkeypatch, attributes, args, extra)
    trainer.model.train(not extra.get("eval"))
    try:
        want = _run_compute_loss(trainer, inputs, attributes)
        spy, counter = _SpyPolicyLoss(monkeypatch), _CountOps()
        with rk_trl.patched(), counter:
            assert rk_trl.trl_grpo.fallback_reason(trainer) is None
            got = _run_compute_loss(trainer, inputs, attributes)
    finally:
        trainer.model.train()
    assert spy.calls == 1
    # TRL 1.16 multiplies the KL by the ratio by default (use_bias_correction_kl=True): compiled too.
    kernel = trainer.importance_sampling_level == "token"
    assert counter.ops[POLICY_OP] == (1 if kernel else 0), counter.ops
    (loss, grads, metrics, state), (want_loss, want_grads, want_metrics, want_state) = got, want
    assert loss.dtype == want_loss.dtype
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5, abs=1e-7)
    for got_grad, want_grad in zip(grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())
    assert sorted(metrics) == sorted(want_metrics)
    for name, value in want_metrics.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6, nan_ok=True), name
    assert state == pytest.approx(want_state)


def test_grpo_compute_loss_falls_back_to_trl(grpo, monkeypatch):
    """A configuration rk.policy_loss cannot take (epsilon = 0: its clip_low must be
    positive) runs TRL's own code: TRL's loss, and rk.policy_loss is not called."""
    trainer, inputs, attributes = _configure(grpo, monkeypatch, dict(loss_type="grpo", epsilon_low=0.0), {}, {})
    want = _run_compute_loss(trainer, inputs, attributes)
    spy = _SpyPolicyLoss(monkeypatch)
    with rk_trl.patched():
        assert "epsilon" in rk_trl.trl_grpo.fallback_reason(trainer)
        got = _run_compute_loss(trainer, inputs, attributes)
    assert spy.calls == 0
    assert got[0].item() == want[0].item()
    assert got[2] == want[2]


def test_grpo_compute_loss_falls_back_on_16_bit_logprobs(grpo, monkeypatch):
    """bfloat16 log-probs (TRL's fused head never gives them) would be computed in float32
    by rk.policy_loss: TRL's code runs on the forward's outputs, the model once."""
    trainer, inputs, attributes = _configure(grpo, monkeypatch, dict(loss_type="bnpo"), {}, {})
    forward = trainer._get_per_token_logps_and_entropies
    calls = []

    def bf16_forward(*args, **kwargs):
        calls.append(1)
        logps, entropies, aux = forward(*args, **kwargs)
        return logps.bfloat16(), entropies.bfloat16(), aux

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", bf16_forward)
    inputs = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
    want = _run_compute_loss(trainer, inputs, attributes)
    spy = _SpyPolicyLoss(monkeypatch)
    with rk_trl.patched():
        got = _run_compute_loss(trainer, inputs, attributes)
    assert spy.calls == 0 and len(calls) == 2
    assert got[0].dtype == want[0].dtype and got[0].item() == want[0].item()
    assert trainer._get_per_token_logps_and_entropies is bf16_forward  # restored after the fallback


def test_patch_installs_and_removes_the_grpo_loss():
    from trl.trainer.grpo_trainer import GRPOTrainer

    theirs = GRPOTrainer._compute_loss
    with rk_trl.patched():
        assert GRPOTrainer._compute_loss is rk_trl.trl_grpo.compute_loss
    assert GRPOTrainer._compute_loss is theirs


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy", "mean_logits", "is_top1")])
def test_fused_lm_head_gradients_match_trl(outputs):
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_model(11, seed=0)
    add_fused_lm_head(model, temperature=0.8, outputs=outputs)
    ids = torch.randint(2, 11, (4, 9))
    labels = ids.masked_fill(torch.arange(9) < 3, -100)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + (0 if out.entropy is None else out.entropy.sum())).backward()
        fields = [getattr(out, name) for name in outputs]
        return fields, [p.grad.clone() for p in model.parameters()]

    want_fields, want_grads = run()
    with rk_trl.patched():
        got_fields, got_grads = run()
    for got, want in zip(got_fields, want_fields):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, atol=5e-6, rtol=2e-6)


def test_patch_refuses_an_unsupported_trl_version(monkeypatch):
    from rlhf_kernels.integrations import _version

    monkeypatch.setattr(_version, "installed_version", lambda distribution: "0.9.0")
    with pytest.warns(_version.UnsupportedVersionWarning, match="trl 0.9.0 is installed"):
        assert rk_trl.patch() == 0
    import trl.trainer.utils as trl_utils

    assert trl_utils._ChunkedLogProbFunction is not rk_trl.ChunkedLogProbFunction
    from trl.trainer.grpo_trainer import GRPOTrainer

    assert GRPOTrainer._compute_loss is not rk_trl.trl_grpo.compute_loss


def test_patched_block_inside_a_patch_keeps_it():
    """patch(); with patched(): ... leaves TRL patched (the block patched nothing, so it
    unpatches nothing); the outer unpatch() restores TRL."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.grpo_trainer import GRPOTrainer

    theirs = trl_utils._ChunkedLogProbFunction
    try:
        assert rk_trl.patch() > 0
        with rk_trl.patched() as count:
            assert count == 0
        assert trl_utils._ChunkedLogProbFunction is rk_trl.ChunkedLogProbFunction
        assert trl_utils.selective_log_softmax is rk_trl.selective_log_softmax
        assert GRPOTrainer._compute_loss is rk_trl.trl_grpo.compute_loss
    finally:
        rk_trl.unpatch()
    assert trl_utils._ChunkedLogProbFunction is theirs
    assert GRPOTrainer._compute_loss is not rk_trl.trl_grpo.compute_loss


def test_patch_replaces_trls_objects_only_under_their_names():
    """trl.kernels' Triton selective_log_softmax_and_entropy (another function, another
    signature) and the public trl.kernels.ChunkedLogProbFunction stay TRL's; what the
    trainers call (trl.trainer.utils and its importers) is replaced."""
    import trl.kernels
    import trl.trainer.utils as trl_utils

    kernels_before = dict(vars(trl.kernels))
    with rk_trl.patched():
        assert trl.kernels.ChunkedLogProbFunction is not rk_trl.ChunkedLogProbFunction
        assert trl_utils._ChunkedLogProbFunction is rk_trl.ChunkedLogProbFunction
        assert trl_utils.selective_log_softmax_and_entropy is rk_trl.selective_log_softmax_and_entropy
        for name, value in vars(trl.kernels).items():
            assert kernels_before.get(name) is value, name
