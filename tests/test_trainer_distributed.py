"""The bundled trainer data parallel: 2 gloo processes on CPU against 1 process.

One 2-process group (torch.multiprocessing, spawn; a deadline fails a hang) runs, on
the global batches a 1-process run uses (7 examples: 3 + 4 per rank, so a loss not
normalised by the global count would show): SFT, RM and DPO for 2 steps, whose
losses, gradients (after DDP's all-reduce) and parameter updates must equal the
1-process run's; PPO and GRPO for 2 steps (finite metrics, one row per step, written
by rank 0 only); and a checkpoint written by 1 process, loaded and resumed on 2. This
process then loads and resumes the 2-process checkpoint.
Tolerances (fp32; the ranks sum their shares of the batch in another order and DDP
averages two gradients): a loaded checkpoint holds exactly the saved state (parameters
and AdamW state, rtol = atol = 0); losses rtol 1e-5 (measured <= 1e-7); gradients
1e-5 x the tensor's largest magnitude + 1e-7 (measured <= 3.5e-6 x); parameters after
2 steps within 1e-3 lr of the 1-process ones (measured <= 1.6e-4 lr); 4 steps across
a resume atol 1e-6 (measured 1.2e-7). Then `python -m torch.distributed.run
--standalone --nproc-per-node 2 -m rlhf_trainer train sft` end to end.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from rlhf_trainer import common, distributed, task  # noqa: E402
from rlhf_trainer.dpo import DPOConfig, train_dpo  # noqa: E402
from rlhf_trainer.grpo import GRPOConfig, train_grpo  # noqa: E402
from rlhf_trainer.models import RewardModel, tiny_model  # noqa: E402
from rlhf_trainer.ppo import PPOConfig, train_ppo  # noqa: E402
from rlhf_trainer.rm import RMConfig, train_rm  # noqa: E402
from rlhf_trainer.sft import SFTConfig, train_sft  # noqa: E402
from rlhf_trainer.tokenizer import builtin_tokenizer  # noqa: E402

DEADLINE_S = 400  # a hung group fails instead of blocking the suite (a normal run: ~30-60 s on 2 shared cores)
TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_RTOL = 1e-5  # x the gradient tensor's largest magnitude, + 1e-7
UPDATE_ATOL = 1e-3  # x lr
ADAM_EPS = 1e-3
EXACT = dict(rtol=0, atol=0)
BATCH = 7  # the global batch of SFT, RM and DPO: 3 + 4 on 2 ranks (uneven: the loss scale matters)


# ------------------------------------------------- the runs (1 or 2 ranks) --


class _Capture:
    """The AdamW a stage builds (to compare its state with a loaded checkpoint's), and
    the gradients each of its steps applies (after DDP's all-reduce): Adam's update is
    nearly invariant to the gradient's scale, so only the gradients show that the loss
    is normalised right. Its eps is ADAM_EPS on both sides of a comparison: with torch's
    1e-8, Adam's near-sign step lr g / (|g| + eps) turns rounding noise in a gradient that
    is 0 in one process (the RM's head.bias: Bradley-Terry is shift invariant) and 3e-8
    on two into a 0.7 lr difference."""

    def __enter__(self):
        self.optimizers, original = [], torch.optim.AdamW
        self.original = original
        optimizers = self.optimizers

        class Capturing(original):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, "eps": ADAM_EPS})
                self.grads = []
                optimizers.append(self)

            def step(self, *args, **kwargs):
                params = [p for group in self.param_groups for p in group["params"]]
                self.grads.append([None if p.grad is None else p.grad.detach().clone() for p in params])
                return super().step(*args, **kwargs)

        torch.optim.AdamW = Capturing
        return self

    def __exit__(self, *exc):
        torch.optim.AdamW = self.original


def _log(output: str) -> common.MetricsLog:
    os.makedirs(output, exist_ok=True)
    return common.MetricsLog(os.path.join(output, "metrics.jsonl"))


def _sft(output: str, steps: int = 2, resume: str | None = None):
    tokenizer = builtin_tokenizer()
    with _Capture() as captured:
        policy = train_sft(tiny_model(len(tokenizer), 0), tokenizer, task.sft_records(64, 0),
                           SFTConfig(steps=steps, batch_size=BATCH), _log(output), output=output, resume=resume,
                           show_progress=False)  # fmt: skip
    return policy, captured.optimizers[0]


def _rm(output: str):
    tokenizer = builtin_tokenizer()
    with _Capture() as captured:
        model, accuracy = train_rm(RewardModel(tiny_model(len(tokenizer), 1)), tokenizer,
                                   task.preference_records(64, 2), RMConfig(steps=2, batch_size=BATCH,
                                   eval_fraction=0.25), _log(output), output=output, show_progress=False)  # fmt: skip
    return model, captured.optimizers[0], accuracy


def _dpo(output: str):
    tokenizer = builtin_tokenizer()
    with _Capture() as captured:
        policy = train_dpo(tiny_model(len(tokenizer), 0), tokenizer, task.preference_records(64, 2),
                           DPOConfig(steps=2, batch_size=BATCH), _log(output), output=output,
                           show_progress=False)  # fmt: skip
    return policy, captured.optimizers[0]


def _ppo(output: str):
    tokenizer = builtin_tokenizer()
    config = PPOConfig(steps=2, rollouts=8, minibatch=4, epochs=1, adaptive_kl=True, kl_target=0.01, kl_horizon=10)
    train_ppo(tiny_model(len(tokenizer), 0), RewardModel(tiny_model(len(tokenizer), 1)), tokenizer,
              task.eval_prompts(32, 4), config, _log(output), gold_fn=task.gold_reward, output=output,
              show_progress=False)  # fmt: skip


def _grpo(output: str):
    tokenizer = builtin_tokenizer()
    config = GRPOConfig(steps=2, prompts=4, group_size=4, minibatch=8, reward="gold", kl_coef=0.04,
                        scale_rewards="batch")  # fmt: skip
    train_grpo(tiny_model(len(tokenizer), 0), tokenizer, task.eval_prompts(32, 4), config, _log(output),
               gold_fn=task.gold_reward, output=output, show_progress=False)  # fmt: skip


def _load(checkpoint: str):
    """A fresh policy and AdamW with the SFT checkpoint loaded into them."""
    tokenizer = builtin_tokenizer()
    policy = tiny_model(len(tokenizer), 7)  # other weights than the run's: the load must replace them all
    optimizer = torch.optim.AdamW(policy.parameters(), lr=SFTConfig().lr)
    common.load_checkpoint(checkpoint, stage="sft", models={"model": policy}, optimizer=optimizer,
                           config=SFTConfig(steps=4, batch_size=BATCH))  # fmt: skip
    return policy, optimizer


def _state(policy, optimizer) -> dict:
    return {"params": {k: v.detach().clone() for k, v in policy.state_dict().items()},
            "optimizer": optimizer.state_dict()["state"], "grads": getattr(optimizer, "grads", None)}  # fmt: skip


def _two_rank_runs(out: str) -> None:
    """Everything the 2-process group runs (every rank calls the same stages)."""
    main = distributed.is_main()
    policy, optimizer = _sft(os.path.join(out, "sft2"))
    if main:
        torch.save(_state(policy, optimizer), os.path.join(out, "sft2-state.pt"))
    model, optimizer, accuracy = _rm(os.path.join(out, "rm2"))
    if main:
        torch.save({**_state(model, optimizer), "accuracy": accuracy}, os.path.join(out, "rm2-state.pt"))
    policy, optimizer = _dpo(os.path.join(out, "dpo2"))
    if main:
        torch.save(_state(policy, optimizer), os.path.join(out, "dpo2-state.pt"))
    _ppo(os.path.join(out, "ppo2"))
    _grpo(os.path.join(out, "grpo2"))
    # A checkpoint written by 1 process, loaded on 2 (rank 1 reports what it loaded) and resumed.
    loaded = _state(*_load(os.path.join(out, "sft1")))
    if distributed.rank() == 1:
        torch.save(loaded, os.path.join(out, "sft1-loaded-on-rank1.pt"))
    policy, _ = _sft(os.path.join(out, "sft1to2"), steps=4, resume=os.path.join(out, "sft1"))
    if main:
        torch.save({"params": policy.state_dict()}, os.path.join(out, "sft1to2-state.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    distributed.setup("cpu", timeout_s=120)
    try:
        _two_rank_runs(out)
    finally:
        distributed.shutdown()


def _spawn(fn, world_size: int, *args) -> None:
    context = mp.spawn(fn, args=(world_size, _free_port(), *args), nprocs=world_size, join=False)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world_size}-process group did not finish in {DEADLINE_S} s (a hang?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process checkpoint the group resumes, then the 2-process group."""
    out = str(tmp_path_factory.mktemp("ddp"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 1-process runs too: their sums must be summed as the ranks' are
    try:
        policy, optimizer = _sft(os.path.join(out, "sft1"))
        torch.save(_state(policy, optimizer), os.path.join(out, "sft1-state.pt"))
        start = time.perf_counter()
        _spawn(_rank_main, 2, out)
        print(f"2-process group: {time.perf_counter() - start:.1f} s")
        yield out
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -------------------------------------------------------------- the checks --


def _rows(output: str) -> list[dict]:
    with open(os.path.join(output, "metrics.jsonl")) as lines:
        return [json.loads(line) for line in lines]


def _close_rows(two: list[dict], one: list[dict], keys) -> None:
    two, one = [r for r in two if keys[0] in r], [r for r in one if keys[0] in r]  # not the RM's held-out row
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(two, one):
        for key in keys:
            torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), **TOL, msg=f"step {a['step']} {key}")


def _close_steps(two: dict, model, optimizer, before: dict, lr: float) -> None:
    """The gradients of steps 1 and 2, the parameters and updates after them."""
    assert len(two["grads"]) == len(optimizer.grads) == 2
    for step, (a, b) in enumerate(zip(two["grads"], optimizer.grads), 1):
        for index, (x, y) in enumerate(zip(a, b)):
            assert (x is None) == (y is None), f"step {step}: parameter {index} has a gradient on one side only"
            if x is not None:
                atol = GRAD_RTOL * float(y.abs().max()) + 1e-7
                torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=f"step {step}: gradient of parameter {index}")
    after = model.state_dict()
    assert two["params"].keys() == after.keys()
    for name in after:
        moved = after[name] - before[name]
        torch.testing.assert_close(two["params"][name] - before[name], moved, rtol=0, atol=UPDATE_ATOL * lr,
                                   msg=f"update of {name}")  # fmt: skip


def test_sft_two_ranks_equal_one_on_the_global_batch(runs, tmp_path):
    policy, optimizer = _sft(str(tmp_path / "sft"))
    _close_rows(_rows(os.path.join(runs, "sft2")), _rows(str(tmp_path / "sft")), ["loss"])
    before = tiny_model(len(builtin_tokenizer()), 0).state_dict()
    _close_steps(torch.load(os.path.join(runs, "sft2-state.pt")), policy, optimizer, before, SFTConfig().lr)


def test_rm_two_ranks_equal_one_on_the_global_batch(runs, tmp_path):
    model, optimizer, accuracy = _rm(str(tmp_path / "rm"))
    _close_rows(_rows(os.path.join(runs, "rm2")), _rows(str(tmp_path / "rm")), ["loss"])
    two = torch.load(os.path.join(runs, "rm2-state.pt"))
    before = RewardModel(tiny_model(len(builtin_tokenizer()), 1)).state_dict()
    _close_steps(two, model, optimizer, before, RMConfig().lr)
    assert two["accuracy"] == accuracy  # held-out accuracy: counted on shares, summed


def test_dpo_two_ranks_equal_one_on_the_global_batch(runs, tmp_path):
    policy, optimizer = _dpo(str(tmp_path / "dpo"))
    _close_rows(_rows(os.path.join(runs, "dpo2")), _rows(str(tmp_path / "dpo")),
                ["loss", "reward_accuracy", "reward_margin"])  # fmt: skip
    before = tiny_model(len(builtin_tokenizer()), 0).state_dict()
    _close_steps(torch.load(os.path.join(runs, "dpo2-state.pt")), policy, optimizer, before, DPOConfig().lr)


@pytest.mark.parametrize("stage", ["ppo2", "grpo2"])
def test_sampled_stages_run_on_two_ranks_and_rank_0_logs(runs, stage):
    rows = _rows(os.path.join(runs, stage))
    assert [r["step"] for r in rows] == [1, 2]  # one row per step: rank 0 alone wrote
    for row in rows:
        assert all(math.isfinite(v) for k, v in row.items() if k != "stage"), row
    assert os.listdir(os.path.join(runs, stage, "checkpoint-000002", common.OPTIMIZER))
    assert os.path.isfile(os.path.join(runs, stage, "model", "model.safetensors"))


def _same_state(a: dict, b: dict) -> None:
    for name in a["params"]:
        torch.testing.assert_close(a["params"][name], b["params"][name], **EXACT, msg=name)
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for index, state in a["optimizer"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, b["optimizer"][index][key], **EXACT, msg=f"{index} {key}")


def test_a_two_rank_checkpoint_resumes_on_one_rank(runs, tmp_path):
    saved = torch.load(os.path.join(runs, "sft2-state.pt"))
    _same_state(_state(*_load(os.path.join(runs, "sft2"))), saved)  # exactly what rank 0 held
    files = os.listdir(os.path.join(runs, "sft2", "checkpoint-000002", common.OPTIMIZER))
    assert ".metadata" in files
    resumed, _ = _sft(str(tmp_path / "resumed"), steps=4, resume=os.path.join(runs, "sft2"))
    straight, _ = _sft(str(tmp_path / "straight"), steps=4)
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, **TOL, msg=name)
    assert [r["step"] for r in _rows(str(tmp_path / "resumed"))] == [3, 4]


def test_a_one_rank_checkpoint_resumes_on_two_ranks(runs, tmp_path):
    loaded, saved = (torch.load(os.path.join(runs, name)) for name in ("sft1-loaded-on-rank1.pt", "sft1-state.pt"))
    _same_state(loaded, saved)
    straight, _ = _sft(str(tmp_path / "straight"), steps=4)
    resumed = torch.load(os.path.join(runs, "sft1to2-state.pt"))["params"]
    for name, b in straight.state_dict().items():
        torch.testing.assert_close(resumed[name], b, **TOL, msg=name)
    assert [r["step"] for r in _rows(os.path.join(runs, "sft1to2"))] == [3, 4]


def test_torchrun_trains_sft_on_two_processes(tmp_path):
    out = str(tmp_path / "sft")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "rlhf_trainer", "train", "sft", "--set", "steps=2", "--set", "batch_size=8", "--output", out]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"wrote {out}") == 1  # rank 0 alone reports
    assert [r["step"] for r in _rows(out)] == [1, 2]
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-000002"]
    assert os.path.isfile(os.path.join(out, "model", "model.safetensors"))
