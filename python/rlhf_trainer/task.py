"""The built-in task: a synthetic, deterministic language task with a hidden gold reward.

A prompt is 2 to 4 distinct letters from a-h followed by ":" ("c a f :"). The gold
reward, standing in for the human, scores a response (letters, then <eos>) by how
many prompt letters it covers, minus a penalty for letters not in the prompt and
for repeats:

    gold = covered / len(prompt letters) - 0.25 * wrong - 0.25 * repeated

so the best responses list each prompt letter once (any order) and score 1.0.
Demonstrations are imperfect (a demonstrator that drops, swaps and repeats
letters); preference pairs are labelled by the gold reward through a
Bradley-Terry model with temperature `noise`. Only the evaluation ever calls
gold_reward: the RM, PPO and DPO see the SFT data and the preference labels.
"""

from __future__ import annotations

import math
import random

LETTERS = "abcdefgh"
SEPARATOR = ":"
PAD, EOS = "<pad>", "<eos>"
VOCAB = [PAD, EOS, SEPARATOR, *LETTERS]
MAX_RESPONSE_TOKENS = 6


def prompt_letters(prompt: str) -> list[str]:
    return [token for token in prompt.split() if token in LETTERS]


def gold_reward(prompt: str, response: str) -> float:
    letters = set(prompt_letters(prompt))
    tokens = response.split()
    covered = len(set(tokens) & letters) / max(len(letters), 1)
    wrong = sum(token not in letters for token in tokens)
    repeated = len(tokens) - len(set(tokens))
    return covered - 0.25 * wrong - 0.25 * repeated


def sample_prompt(rng: random.Random) -> str:
    return " ".join(rng.sample(LETTERS, rng.randint(2, 4))) + " " + SEPARATOR


def demonstrate(prompt: str, rng: random.Random, skill: float = 0.6) -> str:
    """An imperfect demonstrator: each prompt letter (in a random order) is written
    with probability `skill`, else dropped, swapped for a random letter or repeated."""
    letters = prompt_letters(prompt)
    rng.shuffle(letters)
    tokens: list[str] = []
    for letter in letters:
        roll = rng.random()
        if roll < skill:
            tokens.append(letter)
        elif roll < skill + (1 - skill) / 3:
            continue
        elif roll < skill + 2 * (1 - skill) / 3:
            tokens.append(rng.choice(LETTERS))
        else:
            tokens += [letter, letter]
    return " ".join(tokens[:MAX_RESPONSE_TOKENS])


def sft_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = sample_prompt(rng)
        records.append({"prompt": prompt, "response": demonstrate(prompt, rng)})
    return records


def preference_records(n: int, seed: int, noise: float = 0.1, length_bias: float = 0.0) -> list[dict]:
    """Pairs of demonstrations of mixed skill for one prompt, labelled by a simulated
    person through Bradley-Terry: P(a preferred) = sigmoid((judged_a - judged_b) / noise)
    with judged = gold + length_bias * number of tokens (noise = 0: always the better
    one; equal: a coin flip). length_bias > 0 is the verbosity bias real labellers show:
    the gold reward does not share it, so a reward model that learns it can be hacked."""
    rng = random.Random(seed)
    records = []
    while len(records) < n:
        prompt = sample_prompt(rng)
        a, b = (demonstrate(prompt, rng, skill=rng.uniform(0.2, 0.9)) for _ in range(2))
        if a == b:
            continue
        gap = gold_reward(prompt, a) - gold_reward(prompt, b) + length_bias * (len(a.split()) - len(b.split()))
        if noise > 0:
            p_a = 1 / (1 + math.exp(-max(min(gap / noise, 50.0), -50.0)))
        else:
            p_a = 1.0 if gap > 0 else 0.0 if gap < 0 else 0.5
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def eval_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [sample_prompt(rng) for _ in range(n)]
