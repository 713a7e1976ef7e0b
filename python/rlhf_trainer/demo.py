"""`rlhf-kernels demo`: the whole pipeline on the built-in task, on a CPU in minutes.

SFT on imperfect demonstrations -> a reward model on Bradley-Terry-labelled pairs ->
PPO against it with a KL penalty to the SFT model, DPO from the same SFT model on
the same pairs, GRPO against the same reward model (group advantages, no critic), and
a reward-hacking run (PPO with kl_coef = 0, longer). Each policy
is judged on held-out prompts by the hidden gold reward. Writes to the output folder:
sft.jsonl and preferences.jsonl (the data), metrics.jsonl, curves.png and report.md,
demo_config.json and one checkpoint folder per stage (sft/, rm/, ppo/, dpo/, grpo/, ppo_kl0/).

Run again on the same folder with the same options, the demo resumes: a stage with a
final checkpoint is loaded instead of trained (the data and every stage are
deterministic in the seed, so the results are the uninterrupted run's), and a stage
that was interrupted starts over. Other options start the whole demo over.

Under torchrun (`torchrun --nproc-per-node N -m rlhf_trainer demo ...`) every stage runs
data parallel on the N processes (CPU, gloo); rank 0 evaluates, prints and writes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time

import torch

from . import common, distributed, task
from .data import write_jsonl
from .dpo import DPOConfig, train_dpo
from .evaluate import evaluate
from .grpo import GRPOConfig, train_grpo
from .models import RewardModel, frozen_copy, tiny_model
from .ppo import PPOConfig, train_ppo
from .report import plot_curves, stage_table, write_report
from .rm import RMConfig, train_rm
from .sft import SFTConfig, train_sft
from .tokenizer import builtin_tokenizer


@dataclasses.dataclass
class DemoConfig:
    seed: int = 0
    noise: float = 0.05  # Bradley-Terry temperature of the simulated labeller
    length_bias: float = 0.0  # the labeller's verbosity bias per token (task.preference_records)
    sft_examples: int = 4000
    preference_pairs: int = 4000
    eval_prompts: int = 256
    sft: SFTConfig = dataclasses.field(default_factory=lambda: SFTConfig(steps=2000))
    rm: RMConfig = dataclasses.field(default_factory=lambda: RMConfig(steps=2000, lr=1e-3))
    ppo: PPOConfig = dataclasses.field(default_factory=lambda: PPOConfig(steps=100, kl_coef=0.5))
    hacking_steps: int = 400  # PPO with kl_coef = 0 runs this long
    # DPO: beta 0.5 and lr 3e-4 (DPOConfig's 0.1 and 1e-3 drift far from SFT here). Measured
    # on seeds 0, 1, 2 (each seed's SFT model and pairs, 1 thread; gold reward / KL to SFT in nats):
    #   beta 0.1, lr 1e-3, 400 steps (before): 0.354 / 20.4, 0.578 / 12.9, 0.846 / 5.1
    #     (SFT 0.536, 0.520, 0.572): it collapses into ":" responses, on seed 0 after
    #     0.829 / 3.7 at step 200, so whether it beats SFT hangs on float rounding;
    #   beta 0.5, lr 3e-4, 400 steps: 0.874 / 1.11, 0.851 / 1.19, 0.859 / 1.04 (win rate
    #     0.80, 0.77, 0.76), rising monotonically from step 50; 800 steps: 0.904 / 1.77,
    #     0.844 / 2.42, 0.886 / 1.72, so the setting tolerates twice the epochs;
    #   also tried: beta 0.1, lr 1e-4 (0.806 / 0.97 and 0.754 / 1.22 at 400 on seeds 0, 1),
    #     beta 1.0, lr 3e-4 (0.821 / 0.59, 0.814 / 0.64, 0.811 / 0.64 at 400: slower),
    #     beta 0.5, lr 1e-3 (0.862 / 2.25, 0.882 / 2.24, 0.870 / 2.22 at 400: twice the KL).
    # PPO with kl_coef 0 drifts 4.2, 7.5 and 13.0 nats on these seeds; PPO with the penalty 1.4-1.7.
    dpo: DPOConfig = dataclasses.field(default_factory=lambda: DPOConfig(steps=400, lr=3e-4, beta=0.5))
    # torch's intra-op threads while the demo runs (0: leave torch's setting). The results
    # depend on the thread count (300 SFT steps end 6e-6 apart with 1 and 2 threads, and
    # training amplifies it), so the demo pins it: its numbers are then the same on any
    # core count. The tiny model gains nothing from more threads (those 300 steps: 4.3 s on
    # 1 thread, 27 s on 2 on this project's 2-core machine while other jobs shared it).
    threads: int = 1
    # 16 prompts x 8 completions per step against the RM, TRL's beta 0.04 (k3 KL to SFT)
    grpo: GRPOConfig = dataclasses.field(default_factory=lambda: GRPOConfig(steps=60, kl_coef=0.04))

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        """A smaller run for tests and smoke checks (~1 minute on 2 cores)."""
        return cls(
            seed=seed, eval_prompts=128, sft=SFTConfig(steps=1000), rm=RMConfig(steps=1500, lr=1e-3),
            ppo=PPOConfig(steps=40, kl_coef=0.5), hacking_steps=150,
            dpo=DPOConfig(steps=200, lr=3e-4, beta=0.5),
            grpo=GRPOConfig(steps=25, kl_coef=0.04),
        )  # fmt: skip


STAGES = ("sft", "rm", "ppo", "dpo", "grpo", "ppo_kl0")


def _start_or_resume(output: str, config: DemoConfig, echo) -> None:
    """Keeps the stages' checkpoints when output holds a demo with these options;
    otherwise clears them (and the metrics) and records the options."""
    options_path = os.path.join(output, "demo_config.json")
    options = json.loads(json.dumps(dataclasses.asdict(config)))
    try:
        with open(options_path) as source:
            previous = json.load(source)
    except (OSError, ValueError):
        previous = None
    if previous == options:
        return
    if previous is not None:
        echo(f"{output} holds a demo run with other options: starting over")
    for name in STAGES:
        shutil.rmtree(os.path.join(output, name), ignore_errors=True)
    metrics_path = os.path.join(output, "metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    with open(options_path + ".tmp", "w") as out:
        json.dump(options, out, indent=1)
    os.replace(options_path + ".tmp", options_path)


def run_demo(output: str, config: DemoConfig | None = None, *, show_progress: bool = True, echo=print) -> dict:
    """Runs (or resumes) every stage; returns {"rows": stage table rows, "rm_accuracy": ..., "paths": ...}.
    torch's thread count is config.threads while it runs, and restored after."""
    config = config or DemoConfig()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    resuming = {}  # the stage whose checkpoint is being loaded, and its folder
    try:
        return _run_demo(output, config, show_progress, echo, resuming)
    except common.CheckpointError as error:
        if not resuming:
            raise
        folder = resuming["folder"]
        raise common.CheckpointError(
            f"the {resuming['stage']} stage's checkpoint in {folder} cannot be resumed ({error}); to retrain that "
            f"stage, delete {folder} (rm -r {folder}) and run the demo again: the stages before it are kept"
        ) from None
    finally:
        torch.set_num_threads(threads)


def _run_demo(output: str, config: DemoConfig, show_progress: bool, echo, resuming: dict) -> dict:
    distributed.setup("cpu")  # under torchrun: join the other processes (the demo's models are on the CPU)
    main = distributed.is_main()
    if not main:
        show_progress, echo = False, lambda *_: None
    os.makedirs(output, exist_ok=True)
    if main:
        _start_or_resume(output, config, echo)
    distributed.barrier()
    metrics_path = os.path.join(output, "metrics.jsonl")
    log = common.MetricsLog(metrics_path)

    def files(name: str) -> dict:
        """A stage's checkpoint folder, and what to resume from."""
        folder = os.path.join(output, name)
        resume = folder if common.has_checkpoint(folder) else None
        resuming.clear()
        if resume:
            echo(f"      resuming {name} from its checkpoint in {folder}")
            resuming.update(stage=name, folder=folder)
        return {"output": folder, "resume": resume}

    common.seed_everything(config.seed)
    tokenizer = builtin_tokenizer()
    sft_data = task.sft_records(config.sft_examples, config.seed + 1)
    preferences = task.preference_records(
        config.preference_pairs, config.seed + 2, noise=config.noise, length_bias=config.length_bias
    )
    if main:
        write_jsonl(os.path.join(output, "sft.jsonl"), sft_data)
        write_jsonl(os.path.join(output, "preferences.jsonl"), preferences)
    prompts = task.eval_prompts(config.eval_prompts, config.seed + 3)
    train_prompts = task.eval_prompts(4000, config.seed + 4)
    rows, timings = [], {}

    echo("[1/6] SFT on imperfect demonstrations")
    start = time.perf_counter()
    policy = train_sft(tiny_model(len(tokenizer), config.seed), tokenizer, sft_data, config.sft, log,
                       show_progress=show_progress, **files("sft"))  # fmt: skip
    timings["sft"] = time.perf_counter() - start
    reference = frozen_copy(policy)

    echo("[2/6] reward model on Bradley-Terry preferences")
    start = time.perf_counter()
    reward_model, rm_accuracy = train_rm(
        RewardModel(tiny_model(len(tokenizer), config.seed + 100)), tokenizer, preferences, config.rm, log,
        show_progress=show_progress, **files("rm"),
    )  # fmt: skip
    timings["rm"] = time.perf_counter() - start
    reward_model.eval().requires_grad_(False)

    judged = dict(gold_fn=task.gold_reward, max_new_tokens=config.ppo.max_new_tokens, seed=config.seed + 5)
    sft_eval = evaluate(policy, reference, reward_model, tokenizer, prompts, **judged)
    rows.append({"stage": "sft", **sft_eval, "win_rate": 0.5, "seconds": timings["sft"]})
    baseline = sft_eval["responses"]

    def ppo_run(name: str, ppo_config: PPOConfig, step: str):
        echo(step)
        begin = time.perf_counter()
        trained = train_ppo(copy.deepcopy(policy), reward_model, tokenizer, train_prompts, ppo_config, log,
                            reference=reference, gold_fn=task.gold_reward, stage=name, show_progress=show_progress,
                            **files(name))  # fmt: skip
        result = evaluate(trained, reference, reward_model, tokenizer, prompts, baseline=baseline, **judged)
        rows.append({"stage": name, **result, "seconds": time.perf_counter() - begin})

    ppo_run("ppo", config.ppo, f"[3/6] PPO with a KL penalty (kl_coef={config.ppo.kl_coef})")
    echo("[4/6] DPO from the SFT model on the same preferences")
    start = time.perf_counter()
    dpo_policy = train_dpo(copy.deepcopy(policy), tokenizer, preferences, config.dpo, log, show_progress=show_progress,
                           **files("dpo"))  # fmt: skip
    rows.append({"stage": "dpo", **evaluate(dpo_policy, reference, reward_model, tokenizer, prompts,
                                            baseline=baseline, **judged), "seconds": time.perf_counter() - start})  # fmt: skip
    echo(f"[5/6] GRPO against the reward model ({config.grpo.prompts} prompts x {config.grpo.group_size} "
         f"completions, kl_coef={config.grpo.kl_coef})")  # fmt: skip
    start = time.perf_counter()
    grpo_policy = train_grpo(copy.deepcopy(policy), tokenizer, train_prompts, config.grpo, log,
                             reward_model=reward_model, reference=reference, gold_fn=task.gold_reward,
                             show_progress=show_progress, **files("grpo"))  # fmt: skip
    rows.append({"stage": "grpo", **evaluate(grpo_policy, reference, reward_model, tokenizer, prompts,
                                             baseline=baseline, **judged), "seconds": time.perf_counter() - start})  # fmt: skip
    hacking = dataclasses.replace(config.ppo, kl_coef=0.0, adaptive_kl=False, steps=config.hacking_steps)
    ppo_run("ppo_kl0", hacking, f"[6/6] reward hacking: PPO with kl_coef=0 for {config.hacking_steps} steps")

    if not main:  # evaluate() ran on rank 0 only
        return {"rows": rows, "rm_accuracy": rm_accuracy, "paths": []}
    table = stage_table(rows, rm_accuracy)
    plot_path = plot_curves(log.rows, os.path.join(output, "curves.png"))
    report_path = write_report(os.path.join(output, "report.md"), rows, rm_accuracy, table, plot_path, config)
    echo(table)
    echo(f"wrote {metrics_path}, {plot_path or '(no plot: matplotlib missing)'}, {report_path}")
    return {"rows": rows, "rm_accuracy": rm_accuracy, "paths": [metrics_path, plot_path, report_path]}
