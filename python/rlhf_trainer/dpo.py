"""DPO from the SFT model: the reference log-probs are computed once per dataset
(rlhf_kernels.sequence_logprobs, no grad), then each step is
rlhf_kernels.linear_dpo_loss on the policy's final hidden states and lm_head weight
(chosen rows first, then rejected), never forming the logits. Data parallel
(torchrun): each rank takes a contiguous share of the step's pairs and its loss is
divided by the global pair count."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_kernels as rk

from . import common, distributed
from .data import encode_pairs
from .models import final_hidden, frozen_copy, lm_head_weight, shifted_targets


@dataclass
class DPOConfig:
    steps: int = 150
    batch_size: int = 32
    lr: float = 1e-3
    beta: float = 0.1
    loss_type: str = "sigmoid"
    max_response_tokens: int = 6
    seed: int = 0
    checkpoint_every: int = 0


def _pair_batch(tokenizer, records, max_tokens, device):
    prompts = [r["prompt"] for r in records]
    responses = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    return encode_pairs(tokenizer, prompts * 2, responses, max_tokens).to(device)


@torch.no_grad()
def reference_logps(reference, tokenizer, records, config: DPOConfig, batch_size: int = 256) -> torch.Tensor:
    """[N, 2] sequence log-probs (chosen, rejected) of every record under the reference
    (length-normalised for ipo, as linear_dpo_loss's default)."""
    device = next(reference.parameters()).device
    out = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        batch = _pair_batch(tokenizer, chunk, config.max_response_tokens, device)
        labels, mask = shifted_targets(batch)
        hidden = final_hidden(reference, batch)[:, :-1]
        logps = rk.sequence_logprobs(
            hidden, lm_head_weight(reference).to(hidden.dtype), labels, mask, average=config.loss_type == "ipo"
        )
        out.append(torch.stack([logps[: len(chunk)], logps[len(chunk) :]], 1))
    return torch.cat(out)


def train_dpo(policy, tokenizer, records, config: DPOConfig, log: common.MetricsLog, *, output=None, resume=None,
              show_progress=True, run_options=None):  # fmt: skip
    device = next(policy.parameters()).device
    reference = frozen_copy(policy)  # the starting weights: a resume must start from the same ones
    ref = reference_logps(reference, tokenizer, records, config)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr)
    run = common.StageRun("dpo", config, log, models={"model": policy}, optimizer=optimizer, output=output,
                          resume=resume, show_progress=show_progress, frozen={"reference": reference},
                          run=run_options)  # fmt: skip
    distributed.check_shareable("batch_size", config.batch_size)
    parallel = distributed.DataParallel({"model": policy})

    def dpo_loss(batch, ref_logps):
        labels, mask = shifted_targets(batch)
        hidden = final_hidden(policy, batch)[:, :-1]
        return rk.linear_dpo_loss(
            hidden, lm_head_weight(policy).to(hidden.dtype), labels, mask,
            ref_chosen_logps=ref_logps[:, 0], ref_rejected_logps=ref_logps[:, 1], beta=config.beta,
            loss_type=config.loss_type,
        )  # fmt: skip

    policy.train()
    for step in range(run.start, config.steps):
        index = distributed.shard(common.batch_indices(len(records), config.batch_size, config.seed, step))
        batch = _pair_batch(tokenizer, [records[i] for i in index], config.max_response_tokens, device)
        scale = distributed.loss_scale(len(index), distributed.global_count(len(index), device))
        loss, metrics = parallel.loss(dpo_loss, batch, ref[index])
        optimizer.zero_grad()
        (loss * scale).backward()
        optimizer.step()
        shown = distributed.weighted_means({
            "loss": (loss.item(), len(index)), "reward_accuracy": (metrics["reward_accuracy"].item(), len(index)),
            "reward_margin": (metrics["reward_margin"].item(), len(index)),
        }, device)  # fmt: skip
        run.step_done(step + 1, {"loss": shown["loss"]}, **shown)
    run.finish(tokenizer)
    return policy
