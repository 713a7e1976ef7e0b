"""Evaluation of a policy on fixed prompts: mean gold reward (the hidden judge), mean
reward-model score, KL to the reference per sequence, and the win rate against
baseline responses (e.g. the SFT model's) judged by the gold reward. Under torchrun
rank 0 evaluates (one sampling stream over every prompt, as in one process) and the
other ranks skip it (NaN metrics, responses None)."""

from __future__ import annotations

import torch

from . import distributed
from .models import response_logprobs, shifted_targets
from .sampling import decode_responses, sample_responses


@torch.no_grad()
def evaluate(policy, reference, reward_model, tokenizer, prompts, *, gold_fn, baseline=None, max_new_tokens=6,
             temperature=1.0, seed=12345) -> dict:  # fmt: skip
    """baseline: the responses to compare with (same prompts), or None. Returns the
    metrics and the responses ("responses"); on a rank other than 0 under torchrun,
    NaN metrics and responses None, without evaluating."""
    if not distributed.is_main():
        nan = float("nan")
        return {"gold_reward": nan, "rm_reward": nan, "kl": nan, "responses": None,
                **({"win_rate": nan} if baseline is not None else {})}  # fmt: skip
    policy.eval()
    batch = sample_responses(
        policy, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    texts = decode_responses(tokenizer, batch)
    gold = [gold_fn(p, t) for p, t in zip(prompts, texts)]
    _, mask = shifted_targets(batch)
    kl = (response_logprobs(policy, batch, temperature=temperature)
          - response_logprobs(reference, batch, temperature=temperature)) * mask  # fmt: skip
    result = {
        "gold_reward": sum(gold) / len(gold),
        "rm_reward": reward_model(batch).mean().item() if reward_model is not None else float("nan"),
        "kl": kl.sum(-1).mean().item(),
        "responses": texts,
    }
    if baseline is not None:
        base = [gold_fn(p, t) for p, t in zip(prompts, baseline)]
        result["win_rate"] = sum(1.0 if g > b else 0.5 if g == b else 0.0 for g, b in zip(gold, base)) / len(gold)
    return result
