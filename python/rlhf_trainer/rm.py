"""Reward model: Bradley-Terry on preference pairs (rlhf_kernels.bradley_terry_loss,
with an optional per-pair margin) or InstructGPT's K-way loss on rankings
(rlhf_kernels.ranking_loss); held-out accuracy = how often the chosen response
scores higher. Data parallel (torchrun): each rank scores a contiguous share of the
step's pairs (or rankings), the loss is divided by the global count, and the held-out
accuracy is counted on shares and summed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_kernels as rk

from . import common, distributed
from .data import encode_pairs


@dataclass
class RMConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    max_response_tokens: int = 6
    seed: int = 0
    eval_fraction: float = 0.1
    checkpoint_every: int = 0


def _pair_scores(reward_model, tokenizer, records, max_tokens, device) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [r["prompt"] for r in records]
    batch = encode_pairs(
        tokenizer, prompts * 2, [r["chosen"] for r in records] + [r["rejected"] for r in records], max_tokens
    ).to(device)
    scores = reward_model(batch)
    return scores[: len(records)], scores[len(records) :]


def _ranking_scores(reward_model, tokenizer, records, max_tokens, device) -> torch.Tensor:
    K = len(records[0]["responses"])
    if any(len(r["responses"]) != K for r in records):
        raise ValueError("ranking batches need the same number K of responses per prompt")
    prompts = [r["prompt"] for r in records for _ in range(K)]
    responses = [text for r in records for text in r["responses"]]
    return reward_model(encode_pairs(tokenizer, prompts, responses, max_tokens).to(device)).view(len(records), K)


@torch.no_grad()
def accuracy(reward_model, tokenizer, records, max_tokens: int = 6, batch_size: int = 256) -> float:
    """Fraction of pairs whose chosen response scores higher (ties count half). Under
    torchrun each rank scores a share of the records and every rank gets the total."""
    device = next(reward_model.parameters()).device
    reward_model.eval()
    total = len(records)
    records = distributed.shard(records)
    wins = 0.0
    for start in range(0, len(records), batch_size):
        chosen, rejected = _pair_scores(
            reward_model, tokenizer, records[start : start + batch_size], max_tokens, device
        )
        wins += (chosen > rejected).sum().item() + 0.5 * (chosen == rejected).sum().item()
    return float(distributed.all_sum([wins], device)[0]) / max(total, 1)


def rank_tensor(records: list[dict], device="cpu") -> torch.Tensor:
    """The records' integer ranks [N, K] as int64, which ranking_loss compares exactly
    (float32 tied ranks 2^24 apart: 2^25 and 2^25 + 1 were one rank, their pair lost)."""
    return torch.tensor([r["ranks"] for r in records], dtype=torch.int64, device=device)


def split(records: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    n_eval = int(len(records) * eval_fraction)
    return records[n_eval:], records[:n_eval]


def train_rm(reward_model, tokenizer, records, config: RMConfig, log: common.MetricsLog, *, kind="preferences",
             output=None, resume=None, show_progress=True, run_options=None):  # fmt: skip
    """kind: "preferences" (margin from an optional "margin" field) or "rankings"."""
    device = next(reward_model.parameters()).device
    train, held_out = split(records, config.eval_fraction) if kind == "preferences" else (records, [])
    optimizer = torch.optim.AdamW(reward_model.parameters(), lr=config.lr)
    run = common.StageRun("rm", config, log, models={"reward_model": reward_model}, optimizer=optimizer,
                          output=output, resume=resume, show_progress=show_progress, run=run_options)  # fmt: skip
    distributed.check_shareable("batch_size", config.batch_size)
    parallel = distributed.DataParallel({"reward_model": reward_model})

    def pairs_loss(picked, margin):
        chosen, rejected = _pair_scores(reward_model, tokenizer, picked, config.max_response_tokens, device)
        return rk.bradley_terry_loss(chosen, rejected, margin=margin)

    def rankings_loss(picked, ranks):
        rewards = _ranking_scores(reward_model, tokenizer, picked, config.max_response_tokens, device)
        return rk.ranking_loss(rewards, ranks)

    for step in range(run.start, config.steps):
        reward_model.train()
        index = distributed.shard(common.batch_indices(len(train), config.batch_size, config.seed, step))
        picked = [train[i] for i in index]
        if kind == "rankings":
            ranks = rank_tensor(picked, device)
            count = float((ranks.amax(-1) != ranks.amin(-1)).sum())  # ranking_loss: the prompts with a ranked pair
            scale = distributed.loss_scale(count, distributed.global_count(count, device))
            loss = parallel.loss(rankings_loss, picked, ranks)
        else:
            margins = [float(r.get("margin", 0.0)) for r in picked]
            margin = torch.tensor(margins, device=device) if any(margins) else None
            count = float(len(picked))
            scale = distributed.loss_scale(count, distributed.global_count(count, device))
            loss = parallel.loss(pairs_loss, picked, margin)
        optimizer.zero_grad()
        (loss * scale).backward()
        optimizer.step()
        shown = distributed.weighted_means({"loss": (loss.item(), count)}, device)
        run.step_done(step + 1, shown, **shown)
    run.finish()
    held_out_accuracy = accuracy(reward_model, tokenizer, held_out, config.max_response_tokens) if held_out else None
    if held_out_accuracy is not None:
        log.log("rm", config.steps, held_out_accuracy=held_out_accuracy)
    if output and distributed.is_main():

        def fill(folder: str) -> None:
            reward_model.save(folder)
            tokenizer.save_pretrained(folder)

        common.publish(f"{output}/reward_model_hf", fill)
    distributed.barrier()
    return reward_model, held_out_accuracy
