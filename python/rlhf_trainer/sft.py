"""SFT: the masked next-token loss on the response tokens (prompt tokens are context).

loss = -masked_mean(log p(response token)), log-probs from rlhf_kernels.linear_logprobs.
Data parallel (torchrun): each rank takes a contiguous share of the step's batch and
its loss is divided by the global token count, so the step equals the one-process step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_kernels as rk

from . import common, distributed
from .data import encode_pairs
from .models import response_logprobs, shifted_targets


@dataclass
class SFTConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    max_response_tokens: int = 6
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end (when an output directory is given)


def train_sft(policy, tokenizer, records, config: SFTConfig, log: common.MetricsLog, *, output=None, resume=None,
              show_progress=True, run_options=None):  # fmt: skip
    device = next(policy.parameters()).device
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr)
    run = common.StageRun("sft", config, log, models={"model": policy}, optimizer=optimizer, output=output,
                          resume=resume, show_progress=show_progress, run=run_options)  # fmt: skip
    distributed.check_shareable("batch_size", config.batch_size)
    parallel = distributed.DataParallel({"model": policy})

    def sft_loss(batch, mask):
        return -rk.masked_mean(response_logprobs(policy, batch), mask)

    policy.train()
    for step in range(run.start, config.steps):
        index = distributed.shard(common.batch_indices(len(records), config.batch_size, config.seed, step))
        picked = [records[i] for i in index]
        batch = encode_pairs(
            tokenizer, [r["prompt"] for r in picked], [r["response"] for r in picked], config.max_response_tokens
        ).to(device)
        _, mask = shifted_targets(batch)
        tokens = float(mask.sum())
        scale = distributed.loss_scale(tokens, distributed.global_count(tokens, device))
        loss = parallel.loss(sft_loss, batch, mask)
        optimizer.zero_grad()
        (loss * scale).backward()
        optimizer.step()
        shown = distributed.weighted_means({"loss": (loss.item(), tokens)}, device)
        run.step_done(step + 1, shown, **shown)
    run.finish(tokenizer)
    return policy
