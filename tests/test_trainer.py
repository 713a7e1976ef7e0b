"""The bundled trainer on the built-in task: one quick demo run (module fixture) whose
stages must learn, plus resume, data errors, the CLI and proof that the trainer runs
on rlhf_kernels' ops."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import rlhf_kernels  # noqa: E402
from rlhf_trainer import common, task  # noqa: E402
from rlhf_trainer.data import DataError, read_jsonl  # noqa: E402
from rlhf_trainer.demo import DemoConfig, run_demo  # noqa: E402
from rlhf_trainer.models import tiny_model  # noqa: E402
from rlhf_trainer.sft import SFTConfig, train_sft  # noqa: E402
from rlhf_trainer.tokenizer import builtin_tokenizer  # noqa: E402

OPS = ("linear_logprobs", "sequence_logprobs", "masked_mean", "masked_whiten", "kl_shaped_rewards", "gae",
       "ppo_policy_loss", "ppo_value_loss", "bradley_terry_loss", "linear_dpo_loss")  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The quick demo, with every rlhf_kernels op it should use wrapped to count calls."""
    calls = dict.fromkeys(OPS, 0)
    originals = {name: getattr(rlhf_kernels, name) for name in OPS}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return wrapper

    for name in OPS:
        setattr(rlhf_kernels, name, counting(name))
    try:
        torch.manual_seed(0)
        output = str(tmp_path_factory.mktemp("demo"))
        result = run_demo(output, DemoConfig.quick(seed=0), show_progress=False, echo=lambda *_: None)
    finally:
        for name, fn in originals.items():
            setattr(rlhf_kernels, name, fn)
    return {**result, "rows": {row["stage"]: row for row in result["rows"]}, "calls": calls, "output": output}


def test_reward_model_learns_the_preferences(demo):
    assert demo["rm_accuracy"] >= 0.80


def test_ppo_beats_sft_with_bounded_kl(demo):
    sft, ppo = demo["rows"]["sft"], demo["rows"]["ppo"]
    assert ppo["gold_reward"] >= sft["gold_reward"] + 0.05  # the margin: 0.05 gold reward
    assert ppo["kl"] < 10.0  # nats per response (6 tokens)


def test_dpo_beats_sft(demo):
    assert demo["rows"]["dpo"]["gold_reward"] >= demo["rows"]["sft"]["gold_reward"] + 0.05


def test_no_kl_penalty_drifts_much_further(demo):
    assert demo["rows"]["ppo_kl0"]["kl"] >= 2 * demo["rows"]["ppo"]["kl"]


def test_outputs_are_written(demo):
    names = set(os.listdir(demo["output"]))
    assert {"metrics.jsonl", "report.md", "sft.jsonl", "preferences.jsonl"} <= names
    stages = {json.loads(line)["stage"] for line in open(os.path.join(demo["output"], "metrics.jsonl"))}
    assert stages == {"sft", "rm", "ppo", "dpo", "ppo_kl0"}
    report = open(os.path.join(demo["output"], "report.md")).read()
    assert "| ppo |" in report and "What the numbers show" in report
    pytest.importorskip("matplotlib")
    assert "curves.png" in names


def test_the_trainer_runs_on_rlhf_kernels_ops(demo):
    assert all(count > 0 for count in demo["calls"].values()), demo["calls"]


def test_resume_continues_with_the_same_state(tmp_path):
    tokenizer, records = builtin_tokenizer(), task.sft_records(200, 0)

    def run(steps, resume=None, output=None):
        model = tiny_model(len(tokenizer), 0)
        config = SFTConfig(steps=steps, batch_size=8)
        return train_sft(model, tokenizer, records, config, common.MetricsLog(None), output=output, resume=resume,
                         show_progress=False)  # fmt: skip

    straight = run(6)
    run(3, output=str(tmp_path / "half"))
    resumed = run(6, resume=str(tmp_path / "half"))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a :"}', "missing field 'response'"),
        ('{"prompt": "a :", "response": 3}', "field 'response' must be a str"),
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_data_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a b :", "response": "a b"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"data.jsonl:2: .*{message}"):
        read_jsonl(str(path), "sft")


def test_missing_and_empty_files_are_clear(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(str(tmp_path / "nope.jsonl"), "preferences")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(str(tmp_path / "empty.jsonl"), "preferences")


def test_train_cli_runs_every_stage(tmp_path):
    from rlhf_kernels import cli

    out = tmp_path
    assert cli.main(["train", "sft", "--output", str(out / "sft"), "--set", "steps=3"]) == 0
    assert cli.main(["train", "rm", "--output", str(out / "rm"), "--set", "steps=3"]) == 0
    config = out / "ppo.json"
    config.write_text(json.dumps({"steps": 2, "rollouts": 8, "minibatch": 4}))
    args = ["--model", str(out / "sft" / "model"), "--reward-model", str(out / "rm" / "reward_model_hf")]
    assert cli.main(["train", "ppo", "--output", str(out / "ppo"), "--config", str(config), *args]) == 0
    assert cli.main(["train", "dpo", "--output", str(out / "dpo"), "--model", str(out / "sft" / "model"),
                     "--set", "steps=2"]) == 0  # fmt: skip
    assert cli.main(["train", "sft", "--output", str(out / "sft"), "--set", "steps=5",
                     "--resume", str(out / "sft")]) == 0  # fmt: skip
    rows = [json.loads(line) for line in open(out / "sft" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # resumed after step 3


def test_adaptive_kl_controller_moves_toward_the_target():
    from rlhf_trainer.ppo import KLController, PPOConfig

    controller = KLController(PPOConfig(kl_coef=0.1, adaptive_kl=True, kl_target=1.0, kl_horizon=100))
    controller.update(kl=3.0, n_rollouts=10)  # KL above target: the error clips at +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    controller.update(kl=0.5, n_rollouts=10)  # below the target: 0.5 / 1 - 1 = -0.5, clipped to -0.2
    assert controller.value == pytest.approx(0.1 * 1.02 * (1 - 0.2 * 0.1))
    fixed = KLController(PPOConfig(kl_coef=0.1))
    fixed.update(kl=3.0, n_rollouts=10)
    assert fixed.value == 0.1


def test_rm_trains_on_k_way_rankings():
    import random

    from rlhf_trainer.models import RewardModel
    from rlhf_trainer.rm import RMConfig, train_rm

    rng = random.Random(0)
    records = []
    for _ in range(300):
        prompt = task.sample_prompt(rng)
        responses = [task.demonstrate(prompt, rng, skill=rng.uniform(0.2, 0.9)) for _ in range(3)]
        gold = [task.gold_reward(prompt, r) for r in responses]
        records.append(
            {"prompt": prompt, "responses": responses, "ranks": [sorted(gold, reverse=True).index(g) for g in gold]}
        )
    tokenizer = builtin_tokenizer()
    log = common.MetricsLog(None)
    train_rm(RewardModel(tiny_model(len(tokenizer), 0)), tokenizer, records, RMConfig(steps=60, lr=1e-3), log,
             kind="rankings", show_progress=False)  # fmt: skip
    losses = [row["loss"] for row in log.rows]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10  # ranking_loss falls


def test_ppo_resume_continues_with_the_same_state(tmp_path):
    from rlhf_trainer.models import RewardModel
    from rlhf_trainer.ppo import PPOConfig, train_ppo

    tokenizer = builtin_tokenizer()
    prompts = task.eval_prompts(50, 0)
    reward_model = RewardModel(tiny_model(len(tokenizer), 1))
    config = {"rollouts": 8, "minibatch": 4, "adaptive_kl": True, "kl_target": 0.01, "kl_horizon": 10}

    def run(steps, resume=None, output=None):
        policy = tiny_model(len(tokenizer), 0)
        log = common.MetricsLog(None)
        trained = train_ppo(policy, reward_model, tokenizer, prompts, PPOConfig(steps=steps, **config), log,
                            output=output, resume=resume, show_progress=False)  # fmt: skip
        return trained, log.rows

    straight, rows = run(4)
    run(2, output=str(tmp_path / "half"))
    resumed, resumed_rows = run(4, resume=str(tmp_path / "half"))
    assert resumed_rows[-1]["kl_coef"] == rows[-1]["kl_coef"] != 0.1  # the adaptive coefficient was restored
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)
