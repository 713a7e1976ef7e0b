"""TRL 1.16's own DPOTrainer and GRPOTrainer (tiny random Llama, CPU, 2 steps) with
rlhf_kernels.integrations.trl.patch(): rlhf_kernels ops are dispatched (counted) and the
logged losses and gradient norms equal the unpatched run.

Tolerances: both paths are fp32 with fp32 accumulators; per token they agree to ~1e-7
relative (test_fused_lm_head_gradients_match_trl). DPO's loss gradient is a difference
of the chosen and rejected log-prob gradients, which magnifies that to ~1e-4 relative in
the gradient norm, and a second step moves along a slightly different gradient: 1e-3.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("rlhf_trainer")

from rlhf_kernels.integrations import trl as rk_trl  # noqa: E402
from rlhf_trainer.models import tiny_model  # noqa: E402
from rlhf_trainer.tokenizer import builtin_tokenizer  # noqa: E402


class _CountOps(TorchDispatchMode):
    """Counts the rlhf_kernels ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rlhf_kernels":
            self.count += 1
        return func(*args, **(kwargs or {}))


def _train(make_trainer, patch: bool):
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


def test_grpo_trainer_runs_on_our_kernels(tmp_path):
    tokenizer = builtin_tokenizer()
    prompts = [{"prompt": "a b :"}, {"prompt": "c d e :"}] * 8

    def reward(completions, **kwargs):
        return [completion.count("a") + 0.1 * len(completion) for completion in completions]

    def make():
        return trl.GRPOTrainer(
            model=tiny_model(len(tokenizer), seed=0),
            reward_funcs=reward,
            args=trl.GRPOConfig(
                per_device_train_batch_size=4,
                num_generations=4,
                max_completion_length=5,
                **_common(tmp_path, "grpo"),
            ),
            train_dataset=datasets.Dataset.from_list(prompts),
            processing_class=tokenizer,
        )

    _assert_same_training(_train(make, False), _train(make, True), 1e-4, 3e-3)


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
