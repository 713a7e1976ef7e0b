"""GRPO (Shao et al. 2024, DeepSeekMath) and its variants, critic-free.

Each step: G completions for each of a batch of prompts; one score per completion,
from a verifiable reward (the built-in task's gold reward) or the reward model;
group-relative advantages by rlhf_kernels.group_advantages (TRL's estimator:
(score - group mean) / group std, or Dr. GRPO's unscaled form); then epochs of
minibatches of rlhf_kernels.linear_policy_loss on the policy's final hidden states
and lm_head weight (the clipped ratio to the sampling policy, optionally plus
kl_coef x k3 KL to the reference model), never forming the logits. No value model.

Data parallel (torchrun): each rank samples the completions of a contiguous share of
the step's prompts (a group stays whole on one rank) with its own generator (seed,
step, rank); the advantages are computed on every rank's scores (gathered), each
minibatch is every rank's k-th slice of its completions and the loss is normalised by
the minibatch's global sequence / token count (and the longest rank's length for Dr.
GRPO's horizon). Loss types that select within the batch (clip_cov, kl_cov) select
within each rank's part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_kernels as rk

from . import common, distributed
from .models import final_hidden, frozen_copy, lm_head_weight, response_logprobs, shifted_targets
from .sampling import decode_responses, sample_responses

REWARDS = ("gold", "rm")


@dataclass
class GRPOConfig:
    steps: int = 60
    prompts: int = 16  # prompts per step
    group_size: int = 8  # completions per prompt (G)
    minibatch: int = 64  # completions per gradient step
    epochs: int = 1  # 1: every update is on-policy (ratio 1 at the first minibatch)
    lr: float = 1e-3
    loss_type: str = "grpo"  # any of rlhf_kernels.policy_loss's loss types
    clip: float = 0.2
    clip_high: float = 0.28  # DAPO's clip-higher (TRL's epsilon_high)
    kl_coef: float = 0.0  # x k3 KL to the reference (TRL's beta; 0: no reference pass)
    scale_rewards: str = "group"  # "group" (GRPO), "batch", "none" (Dr. GRPO)
    reward: str = "rm"  # "gold": the task's verifiable reward; "rm": the reward model
    temperature: float = 1.0
    max_new_tokens: int = 6
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0


def _scores(config, rollout, picked, texts, reward_model, gold_fn) -> torch.Tensor:
    if config.reward == "gold":
        if gold_fn is None:
            raise ValueError("GRPOConfig.reward='gold' needs gold_fn (the built-in task's verifiable reward)")
        return torch.tensor([gold_fn(p, t) for p, t in zip(picked, texts)], device=rollout.input_ids.device)
    if reward_model is None:
        raise ValueError("GRPOConfig.reward='rm' needs a reward model")
    return reward_model(rollout).float()


def train_grpo(policy, tokenizer, prompts: list[str], config: GRPOConfig, log: common.MetricsLog, *,
               reward_model=None, reference=None, gold_fn=None, stage="grpo", output=None, resume=None,
               show_progress=True, run_options=None):  # fmt: skip
    """gold_fn(prompt, response): the reward with reward="gold"; with reward="rm" it is
    only logged (evaluation), never trained on."""
    if config.reward not in REWARDS:
        raise ValueError(f"GRPOConfig.reward must be one of {REWARDS}, got {config.reward!r}")
    device = next(policy.parameters()).device
    reference = frozen_copy(policy) if reference is None else reference
    frozen = {"reference": reference}
    if reward_model is not None:
        reward_model.eval().requires_grad_(False)
        frozen["reward_model"] = reward_model
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr)
    run = common.StageRun(stage, config, log, models={"model": policy}, optimizer=optimizer, output=output,
                          resume=resume, show_progress=show_progress, frozen=frozen, run=run_options)  # fmt: skip
    completions = config.prompts * config.group_size
    distributed.check_minibatches(f"prompts={config.prompts} x group_size={config.group_size}, minibatch="
                                  f"{config.minibatch}", completions, config.minibatch, config.group_size)  # fmt: skip
    parallel = distributed.DataParallel({"model": policy})
    world = distributed.world_size()

    def grpo_loss(sub, labels, mask, old_logprobs, advantages, ref_logprobs, divisors):
        hidden = final_hidden(policy, sub)[:, :-1]
        return rk.linear_policy_loss(
            hidden, lm_head_weight(policy).to(hidden.dtype), labels, mask, old_logprobs=old_logprobs,
            advantages=advantages, ref_logprobs=ref_logprobs, temperature=config.temperature,
            loss_type=config.loss_type, clip_low=config.clip, clip_high=config.clip_high, kl_coef=config.kl_coef,
            **divisors,
        )  # fmt: skip

    for step in range(run.start, config.steps):
        generator = distributed.rank_generator(config.seed, step)
        picked = common.batch_indices(len(prompts), config.prompts, config.seed, step)
        picked = [prompts[i] for i in distributed.shard(picked)]  # this rank's prompts
        picked = [prompt for prompt in picked for _ in range(config.group_size)]  # groups are contiguous
        local = len(picked)
        policy.eval()
        rollout = sample_responses(
            policy, tokenizer, picked, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
            generator=generator,
        )  # fmt: skip
        texts = decode_responses(tokenizer, rollout)
        labels, mask = shifted_targets(rollout)
        mask = mask.float()
        with torch.no_grad():
            scores = _scores(config, rollout, picked, texts, reward_model, gold_fn)
            every_score, offset = distributed.gather_cat(scores)  # "batch" scaling needs every rank's
            advantages = rk.group_advantages(
                every_score, group_size=config.group_size, estimator="trl", scale_rewards=config.scale_rewards
            )[offset : offset + local]
            old_logprobs = response_logprobs(policy, rollout, temperature=config.temperature)
            ref_logprobs = (
                response_logprobs(reference, rollout, temperature=config.temperature) if config.kl_coef else None
            )
        policy.train()
        totals = {"clipfrac": 0.0, "entropy": 0.0, "loss": 0.0}
        updates = 0
        for _ in range(config.epochs):
            order = torch.randperm(local, generator=generator).to(device)
            for begin, end in distributed.minibatches(completions, config.minibatch, local):
                index = order[begin:end]  # this rank's part of the minibatch
                tokens = float(mask[index].sum())
                divisors = {"num_sequences": len(index)}  # TRL's normaliser: every completion counts
                if world > 1:  # the minibatch's global counts: each rank's loss is its share of the global loss
                    sequences, all_tokens = distributed.all_sum([len(index), tokens], device).tolist()
                    horizon = distributed.global_max(labels.shape[1], device)
                    divisors = {"num_sequences": sequences, "global_tokens": all_tokens, "horizon": horizon}
                loss, stats = parallel.loss(
                    grpo_loss, rollout.select(index), labels[index], mask[index], old_logprobs[index],
                    advantages[index], None if ref_logprobs is None else ref_logprobs[index], divisors,
                )  # fmt: skip
                optimizer.zero_grad()
                (loss * world).backward()  # DDP averages the ranks' gradients: world x the share sums them
                torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
                optimizer.step()
                means = distributed.weighted_means({
                    "clipfrac": ((stats["clipfrac_low"] + stats["clipfrac_high"]).item(), tokens),
                    "entropy": (stats["entropy"].item(), tokens), "loss": (loss.item() * world, 1.0),
                }, device)  # fmt: skip
                for name, value in means.items():
                    totals[name] += value
                updates += 1
        sequence_kl = ((old_logprobs - ref_logprobs) * mask).sum(-1).mean().item() if config.kl_coef else 0.0
        gold = sum(gold_fn(p, t) for p, t in zip(picked, texts)) / local if gold_fn is not None else 0.0
        step_means = distributed.weighted_means(
            {"reward": (scores.mean().item(), local), "kl": (sequence_kl, local), "gold_reward": (gold, local)}, device
        )
        metrics = {"reward": step_means["reward"], **{name: total / updates for name, total in totals.items()}}
        if config.kl_coef:
            metrics["kl"] = step_means["kl"]
        if gold_fn is not None:
            metrics["gold_reward"] = step_means["gold_reward"]
        run.step_done(step + 1, {"reward": metrics["reward"]}, **metrics)
    run.finish(tokenizer)
    return policy
