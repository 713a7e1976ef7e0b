"""JSONL datasets of the trainer, and their batching into token tensors.

Formats, one JSON object per line:
  sft          {"prompt": str, "response": str}
  preferences  {"prompt": str, "chosen": str, "rejected": str}  (extra keys allowed)
  rankings     {"prompt": str, "responses": [str, ...], "ranks": [int, ...]} (rank 0 best)
  prompts      {"prompt": str}  (PPO)
A malformed record raises DataError naming the file and line. Preference files
written by `rlhf-kernels label` carry skips ("skipped": true) and ties ("tie": true):
both are left out of training (a tie says nothing about which response is better;
the labelled strength reaches the reward model as "margin").

Sequences are laid out as [left-padded prompt | response <eos> right-padded], so every
prompt ends at the same column and generation appends after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

FIELDS = {
    "sft": {"prompt": str, "response": str},
    "preferences": {"prompt": str, "chosen": str, "rejected": str},
    "rankings": {"prompt": str, "responses": list, "ranks": list},
    "prompts": {"prompt": str},
}


class DataError(ValueError):
    """A malformed or unreadable data file; the message names the file (and line)."""


def _check_record(record, kind: str, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field, kind_type in FIELDS[kind].items():
        if field not in record:
            raise DataError(f"{where}: missing field {field!r} (a {kind} record needs {sorted(FIELDS[kind])})")
        if not isinstance(record[field], kind_type):
            raise DataError(f"{where}: field {field!r} must be a {kind_type.__name__}, got {record[field]!r}")
    if kind == "rankings":
        if len(record["responses"]) != len(record["ranks"]) or len(record["responses"]) < 2:
            raise DataError(f"{where}: 'responses' and 'ranks' must be lists of one length >= 2")
        if not all(isinstance(r, str) for r in record["responses"]):
            raise DataError(f"{where}: 'responses' must be strings")
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in record["ranks"]):
            raise DataError(f"{where}: 'ranks' must be numbers")
    return record


def read_jsonl(path: str, kind: str) -> list[dict]:
    """Records of `kind` ("sft", "preferences", "rankings") from a JSONL file."""
    if kind not in FIELDS:
        raise ValueError(f"kind must be one of {tuple(FIELDS)}, got {kind!r}")
    records = []
    try:
        with open(path) as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{where}: not valid JSON ({error.msg})") from None
                if kind == "preferences" and isinstance(record, dict) and (record.get("skipped") or record.get("tie")):
                    continue
                records.append(_check_record(record, kind, where))
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    if not records:
        raise DataError(f"{path}: no records")
    return records


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")


@dataclass
class Batch:
    """input_ids, attention_mask, position_ids [B, L]; response_mask [B, L] marks the
    response tokens (and <eos>) as prediction targets; prompt_length: the column
    where responses start."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    prompt_length: int

    def select(self, index: torch.Tensor) -> Batch:
        return Batch(
            self.input_ids[index],
            self.attention_mask[index],
            self.position_ids[index],
            self.response_mask[index],
            self.prompt_length,
        )

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.response_mask.to(device),
            self.prompt_length,
        )


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompts(tokenizer, prompts: list[str], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask [B, P]."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros(len(ids), width, dtype=torch.long)
    for row, tokens in enumerate(ids):
        if tokens:
            input_ids[row, width - len(tokens) :] = torch.tensor(tokens)
            attention[row, width - len(tokens) :] = 1
    return input_ids.to(device), attention.to(device)


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_response_tokens: int) -> Batch:
    """Prompt + response + <eos> for each example (responses truncated to the limit)."""
    prompt_ids, prompt_attention = encode_prompts(tokenizer, prompts)
    encoded = [tokenizer(r, add_special_tokens=False)["input_ids"][:max_response_tokens] for r in responses]
    width = max(len(r) for r in encoded) + 1
    B, P = prompt_ids.shape
    response_ids = torch.full((B, width), tokenizer.pad_token_id, dtype=torch.long)
    response_mask = torch.zeros(B, width, dtype=torch.long)
    for row, tokens in enumerate(encoded):
        tokens = [*tokens, tokenizer.eos_token_id]
        response_ids[row, : len(tokens)] = torch.tensor(tokens)
        response_mask[row, : len(tokens)] = 1
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    attention = torch.cat([prompt_attention, response_mask], 1)
    full_response_mask = torch.cat([torch.zeros_like(prompt_attention), response_mask], 1)
    return Batch(input_ids, attention, positions(attention), full_response_mask, P)
