"""`rlhf-kernels demo|train|label` (with the library's info and step): the command line.

train options come from flags or a JSON/YAML config file (flags win); a stage's
config keys are its dataclass fields (SFTConfig, RMConfig, PPOConfig, DPOConfig,
GRPOConfig). Without --model a tiny built-in model is used, without --data the built-in
task's data; on a CUDA machine the device is cuda and, with --bf16, weights are bf16.
Under torchrun (`torchrun --nproc-per-node N -m rlhf_trainer train ...`) the stage runs
data parallel on N processes (rlhf_trainer.distributed); rank 0 writes the outputs.
The `rlhf-kernels` script enters through rlhf_trainer.entry, which falls back to the
library's commands when the trainer's dependencies are missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from rlhf_kernels import cli as library_cli

from . import common, distributed, label, task
from .data import DataError, read_jsonl, write_jsonl
from .dpo import DPOConfig, train_dpo
from .grpo import GRPOConfig, train_grpo
from .models import RewardModel, load_causal_lm, tiny_model
from .ppo import PPOConfig, train_ppo
from .rm import RMConfig, train_rm
from .sft import SFTConfig, train_sft
from .tokenizer import builtin_tokenizer

CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig, "grpo": GRPOConfig}


def _read_config(path: str | None) -> dict:
    if path is None:
        return {}
    with open(path) as source:
        text = source.read()
    if path.endswith((".yaml", ".yml")):
        import yaml  # pyyaml comes with transformers

        loaded = yaml.safe_load(text)
    else:
        loaded = json.loads(text)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: the config must be a mapping of option names to values")
    return loaded


def _stage_config(stage: str, file_options: dict, overrides: list[str]) -> object:
    cls = CONFIGS[stage]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in file_options.items():
        if key not in fields:
            raise ValueError(f"unknown {stage} option {key!r}; known: {sorted(fields)}")
        values[key] = value
    for item in overrides:
        key, _, raw = item.partition("=")
        if key not in fields:
            raise ValueError(f"--set {item!r}: unknown {stage} option {key!r}; known: {sorted(fields)}")
        default = fields[key].default
        values[key] = raw.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(raw)
    return cls(**values)


def add_train_parser(commands) -> None:
    train = commands.add_parser("train", help="train one stage: sft, rm, ppo, dpo or grpo")
    train.add_argument("stage", choices=tuple(CONFIGS))
    train.add_argument("--config", help="JSON or YAML file of the stage's options")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one option (repeatable)")
    train.add_argument("--model", help="local Hugging Face causal LM (default: a tiny built-in model)")
    train.add_argument("--reward-model", help="ppo, grpo: a reward model saved by `train rm` (its reward_model_hf "
                       "folder); grpo on the built-in task can use its verifiable reward instead: --set reward=gold")  # fmt: skip
    train.add_argument("--data", help="JSONL data (sft: prompt/response; rm, dpo: prompt/chosen/rejected; "
                       "rm --rankings: prompt/responses/ranks; ppo, grpo: prompt)")  # fmt: skip
    train.add_argument("--rankings", action="store_true", help="rm: K-way ranking data")
    train.add_argument("--output", required=True, help="folder for the checkpoint and metrics.jsonl")
    train.add_argument("--resume", help="a checkpoint folder written by an earlier run of this stage")
    train.add_argument("--device", default="auto")
    train.add_argument("--bf16", action="store_true", help="bf16 weights (GPU)")
    train.add_argument("--seed", type=int, default=0)


def _builtin_data(stage: str, seed: int, output: str) -> list[dict]:
    if stage == "sft":
        records = task.sft_records(4000, seed + 1)
    elif stage in ("rm", "dpo"):
        records = task.preference_records(4000, seed + 2)
    else:
        records = [{"prompt": p} for p in task.eval_prompts(4000, seed + 4)]
    if distributed.is_main():
        write_jsonl(os.path.join(output, f"builtin-{stage}.jsonl"), records)
    return records


def _run_options(args, device: torch.device) -> dict:
    """common.RUN_OPTIONS of this command line (and the data file's path, for messages)."""
    return {
        "data": os.path.abspath(args.data) if args.data else None,
        "data_sha256": common.file_digest(args.data) if args.data else None,
        "bf16": bool(args.bf16),
        "rankings": bool(args.rankings),
        "device": torch.device(device).type,
    }


def run_train(args) -> int:
    """A bad data record or a checkpoint that cannot be resumed is a one-line error
    (exit status 2), not a traceback."""
    try:
        return _run_train(args)
    except (DataError, common.CheckpointError) as error:  # under torchrun every rank meets it; rank 0 says it
        if distributed.is_main():
            print(f"rlhf-kernels train: error: {error}", file=sys.stderr)
        return 2


def _run_train(args) -> int:
    stage = args.stage
    config = _stage_config(stage, _read_config(args.config), args.set)
    config.seed = args.seed
    device = distributed.setup(args.device)  # joins torchrun's processes, if any
    os.makedirs(args.output, exist_ok=True)
    common.seed_everything(args.seed)
    if args.model:
        model, tokenizer = load_causal_lm(args.model)
    else:
        tokenizer = builtin_tokenizer()
        model = tiny_model(len(tokenizer), args.seed)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = model.to(device=device, dtype=dtype)
    if args.data:
        kinds = {"sft": "sft", "rm": "rankings" if args.rankings else "preferences", "dpo": "preferences"}
        # The built-in tokenizer knows only the built-in task's words (others become <pad>).
        vocabulary = None if args.model else set(task.VOCAB)
        records = read_jsonl(args.data, kinds.get(stage, "prompts"), vocabulary)
    else:
        records = _builtin_data(stage, args.seed, args.output)
    log = common.MetricsLog(os.path.join(args.output, "metrics.jsonl"))
    # The options outside the stage config that shape the run: each checkpoint records
    # them, and a resume that changes one is refused (common.RUN_OPTIONS).
    run = {"run_options": _run_options(args, device)}
    if stage == "sft":
        train_sft(model, tokenizer, records, config, log, output=args.output, resume=args.resume, **run)
    elif stage == "rm":
        _, accuracy = train_rm(RewardModel(model), tokenizer, records, config, log, output=args.output,
                               resume=args.resume, kind="rankings" if args.rankings else "preferences",
                               **run)  # fmt: skip
        if accuracy is not None and distributed.is_main():
            print(f"held-out accuracy {accuracy:.1%}")
    elif stage == "dpo":
        train_dpo(model, tokenizer, records, config, log, output=args.output, resume=args.resume, **run)
    elif stage == "grpo":
        if config.reward == "gold" and args.data:
            raise ValueError("--set reward=gold is the built-in task's reward: without --data, or use --reward-model")
        if config.reward == "rm" and not args.reward_model:
            raise ValueError("train grpo needs --reward-model (the reward_model_hf folder `train rm` writes), "
                             "or --set reward=gold on the built-in task")  # fmt: skip
        reward_model = RewardModel.load(args.reward_model).to(device=device, dtype=dtype) if args.reward_model else None
        train_grpo(model, tokenizer, [r["prompt"] for r in records], config, log, reward_model=reward_model,
                   gold_fn=None if args.data else task.gold_reward, output=args.output, resume=args.resume,
                   **run)  # fmt: skip
    else:
        if not args.reward_model:
            raise ValueError("train ppo needs --reward-model (the reward_model_hf folder `train rm` writes)")
        reward_model = RewardModel.load(args.reward_model).to(device=device, dtype=dtype)
        train_ppo(model, reward_model, tokenizer, [r["prompt"] for r in records], config, log,
                  gold_fn=None if args.data else task.gold_reward, output=args.output, resume=args.resume,
                  **run)  # fmt: skip
    if distributed.is_main():
        print(f"wrote {args.output}")
    return 0


def add_demo_parser(commands) -> None:
    demo = commands.add_parser("demo", help="SFT -> RM -> PPO, DPO, GRPO and reward hacking on the built-in task")
    demo.add_argument("--output", default="rlhf-demo", help="folder for the data, metrics, plots and report")
    demo.add_argument("--quick", action="store_true", help="a smaller run (about a minute)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--noise", type=float, default=0.05, help="Bradley-Terry noise of the simulated labeller")
    demo.add_argument(
        "--length-bias", type=float, default=0.0, help="the simulated labeller's verbosity bias per token (e.g. 0.15)"
    )


def run_demo_command(args) -> int:
    """A stage checkpoint that cannot be resumed (corrupted, or from another version) is a
    one-line error naming its folder and how to retrain that stage (exit status 2)."""
    from .demo import DemoConfig, run_demo

    config = DemoConfig.quick(args.seed) if args.quick else DemoConfig(seed=args.seed)
    config.noise, config.length_bias = args.noise, args.length_bias
    try:
        run_demo(args.output, config)
    except common.CheckpointError as error:
        if distributed.is_main():
            print(f"rlhf-kernels demo: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-kernels", description="rlhf-kernels: the kernels and the bundled trainer")
    commands = parser.add_subparsers(dest="command", required=True)
    library_cli.add_commands(commands)
    add_demo_parser(commands)
    add_train_parser(commands)
    label.add_label_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo_command(args)
    if args.command == "train":
        return run_train(args)
    if args.command == "label":
        return label.run_label(args)
    return library_cli.run(args)
