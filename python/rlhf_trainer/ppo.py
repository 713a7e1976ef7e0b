"""PPO with a KL penalty to the reference policy (Ziegler et al. 2019; InstructGPT).

Each step: sample responses to a batch of prompts; score them with the reward model;
per-token rewards = rlhf_kernels.kl_shaped_rewards (-kl_coef * KL to the reference,
plus the score at the last response token); advantages and returns by
rlhf_kernels.gae, whitened by masked_whiten; then epochs of minibatches of
ppo_policy_loss + vf_coef * ppo_value_loss. The KL coefficient is fixed or adapted
toward a target KL per sequence (Ziegler et al.'s controller).

Data parallel (torchrun): each rank samples its contiguous share of the step's prompts
with its own generator (seed, step, rank); the advantages are whitened with the mean
and variance over every rank's tokens, the KL controller sees the global mean KL, each
minibatch is every rank's k-th slice of its rollouts and its token-mean losses are
divided by the minibatch's global token count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_kernels as rk

from . import common, distributed
from .models import ValueModel, final_hidden, frozen_copy, response_logprobs, shifted_targets
from .sampling import decode_responses, sample_responses


@dataclass
class PPOConfig:
    steps: int = 40
    rollouts: int = 64  # prompts per step
    minibatch: int = 32
    epochs: int = 2
    lr: float = 1e-3
    kl_coef: float = 0.1
    adaptive_kl: bool = False
    kl_target: float = 1.0  # nats per sequence, for the adaptive controller
    kl_horizon: int = 2000  # rollouts over which the controller closes the gap
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    temperature: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    max_new_tokens: int = 6
    critic: str = "separate"  # or "shared": the value head on the policy's trunk
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0


class KLController:
    """Fixed, or adaptive (Ziegler et al.): coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, config: PPOConfig, value: float | None = None):
        self.config = config
        self.value = config.kl_coef if value is None else value

    def update(self, kl: float, n_rollouts: int) -> None:
        if self.config.adaptive_kl:
            error = min(max(kl / self.config.kl_target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_rollouts / self.config.kl_horizon


def train_ppo(policy, reward_model, tokenizer, prompts: list[str], config: PPOConfig, log: common.MetricsLog, *,
              reference=None, gold_fn=None, stage="ppo", output=None, resume=None, show_progress=True,
              run_options=None):  # fmt: skip
    """gold_fn(prompt, response), when given, is only logged (evaluation), never trained on."""
    device = next(policy.parameters()).device
    reference = frozen_copy(policy) if reference is None else reference
    reward_model.eval().requires_grad_(False)
    value_model = ValueModel(policy, config.critic).to(device)
    parameters = list(policy.parameters()) + list(value_model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr)
    models = {"model": policy, "value_model": value_model}
    frozen = {"reference": reference, "reward_model": reward_model}  # a resume against others is refused
    run = common.StageRun(stage, config, log, models=models, optimizer=optimizer, output=output, resume=resume,
                          show_progress=show_progress, frozen=frozen, run=run_options)  # fmt: skip
    # The restored (possibly adapted) coefficient, unless this run sets another kl_coef.
    controller = KLController(config, None if "kl_coef" in run.changed else run.state.get("kl_coef"))
    distributed.check_minibatches(f"rollouts={config.rollouts}, minibatch={config.minibatch}", config.rollouts,
                                  config.minibatch)  # fmt: skip
    parallel = distributed.DataParallel(models)

    def ppo_loss(sub, old_logprobs, advantages, mask, old_values, returns):
        hidden = final_hidden(policy, sub)
        logprobs, entropy = response_logprobs(
            policy, sub, temperature=config.temperature, return_entropy=True, hidden=hidden
        )
        values = value_model(sub, hidden)
        policy_loss, stats = rk.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=config.clip)
        value_loss, _ = rk.ppo_value_loss(values, old_values, returns, mask, clip=config.value_clip)
        return policy_loss + config.vf_coef * value_loss, value_loss, stats, entropy

    for step in range(run.start, config.steps):
        generator = distributed.rank_generator(config.seed, step)
        global_index = common.batch_indices(len(prompts), config.rollouts, config.seed, step)
        picked = [prompts[i] for i in distributed.shard(global_index)]
        local = len(picked)
        policy.eval()
        rollout = sample_responses(
            policy, tokenizer, picked, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
            generator=generator,
        )  # fmt: skip
        _, mask = shifted_targets(rollout)
        mask = mask.float()
        with torch.no_grad():
            hidden = final_hidden(policy, rollout)
            old_logprobs = response_logprobs(policy, rollout, temperature=config.temperature, hidden=hidden)
            ref_logprobs = response_logprobs(reference, rollout, temperature=config.temperature)
            old_values = value_model(rollout, hidden)
            scores = reward_model(rollout)
            rewards, kl = rk.kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef=controller.value)
            advantages, returns = rk.gae(rewards, old_values, mask, gamma=config.gamma, lam=config.lam)
            advantages = distributed.masked_whiten(advantages, mask)  # rk.masked_whiten in one process
        policy.train()
        totals = {"clipfrac": 0.0, "value_loss": 0.0, "entropy": 0.0}
        updates = 0
        for _ in range(config.epochs):
            order = torch.randperm(local, generator=generator).to(device)
            for begin, end in distributed.minibatches(config.rollouts, config.minibatch, local):
                index = order[begin:end]  # this rank's part of the minibatch
                sub = rollout.select(index)
                tokens = float(mask[index].sum())
                scale = distributed.loss_scale(tokens, distributed.global_count(tokens, device))
                old = (old_logprobs[index], advantages[index], mask[index], old_values[index], returns[index])
                loss, value_loss, stats, entropy = parallel.loss(ppo_loss, sub, *old)
                optimizer.zero_grad()
                (loss * scale).backward()
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                means = distributed.weighted_means({
                    "clipfrac": (stats["clipfrac"].item(), tokens), "value_loss": (value_loss.item(), tokens),
                    "entropy": (rk.masked_mean(entropy.detach(), mask[index]).item(), tokens),
                }, device)  # fmt: skip
                for name, value in means.items():
                    totals[name] += value
                updates += 1
        means = {"kl": (kl.sum(-1).mean().item(), local), "rm_reward": (scores.mean().item(), local)}
        if gold_fn is not None:
            texts = decode_responses(tokenizer, rollout)
            means["gold_reward"] = (sum(gold_fn(p, t) for p, t in zip(picked, texts)) / local, local)
        step_means = distributed.weighted_means(means, device)  # over every rank's rollouts
        sequence_kl = step_means["kl"]
        metrics = {
            "rm_reward": step_means["rm_reward"],
            "kl": sequence_kl,
            "kl_coef": controller.value,
            **{name: total / updates for name, total in totals.items()},
        }
        if gold_fn is not None:
            metrics["gold_reward"] = step_means["gold_reward"]
        controller.update(sequence_kl, config.rollouts)
        shown = {"rm": metrics["rm_reward"], "kl": sequence_kl}
        run.step_done(step + 1, shown, state={"kl_coef": controller.value}, **metrics)
    run.finish(tokenizer, state={"kl_coef": controller.value})
    return policy
