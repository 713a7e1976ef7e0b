"""Sampling responses from a causal LM (rollouts and evaluation)."""

from __future__ import annotations

import torch

from .data import Batch, encode_prompts, positions


@torch.no_grad()
def sample_responses(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
    generator: torch.Generator | None = None, greedy: bool = False,
) -> Batch:  # fmt: skip
    """Appends up to max_new_tokens sampled tokens, then <eos>, after the left-padded
    prompts. Only the next token's logits are computed per step (logits_to_keep=1).
    An <eos> forced after max_new_tokens is context, not an action the policy took:
    it is attended to (the reward model reads it) but left out of response_mask, so
    PPO neither trains on it nor counts its log-prob in the KL."""
    device = next(model.parameters()).device
    ids, attention = encode_prompts(tokenizer, prompts, device)
    prompt_length = ids.shape[1]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    actions = []
    for step in range(max_new_tokens + 1):
        logits = (
            model(input_ids=ids, attention_mask=attention, position_ids=positions(attention), logits_to_keep=1)
            .logits[:, -1]
            .float()
        )
        if step == max_new_tokens:
            token = torch.full_like(finished, tokenizer.eos_token_id, dtype=torch.long)
        elif greedy:
            token = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, -1).cpu()
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(device)
        token = torch.where(finished, torch.full_like(token, tokenizer.pad_token_id), token)
        ids = torch.cat([ids, token[:, None]], 1)
        attention = torch.cat([attention, (~finished).long()[:, None]], 1)
        actions.append(torch.zeros_like(finished) if step == max_new_tokens else ~finished)
        finished |= token == tokenizer.eos_token_id
        if finished.all():
            break
    response_mask = torch.cat([torch.zeros_like(ids[:, :prompt_length]), torch.stack(actions, 1).long()], 1)
    return Batch(ids, attention, positions(attention), response_mask, prompt_length)


def decode_responses(tokenizer, batch: Batch) -> list[str]:
    """The response texts (without <eos> and padding)."""
    texts = []
    for ids, mask in zip(batch.input_ids[:, batch.prompt_length :], batch.response_mask[:, batch.prompt_length :]):
        tokens = [t for t, m in zip(ids.tolist(), mask.tolist()) if m and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return texts
