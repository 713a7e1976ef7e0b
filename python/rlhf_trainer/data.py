"""JSONL datasets of the trainer, and their batching into token tensors.

Formats, one JSON object per line:
  sft          {"prompt": str, "response": str}
  preferences  {"prompt": str, "chosen": str, "rejected": str}  (extra keys allowed)
  rankings     {"prompt": str, "responses": [str, ...], "ranks": [int, ...]} (rank 0 best; integers,
               1.0-style integral floats read as ints; equal ranks tie)
  prompts      {"prompt": str}  (PPO)
A malformed record raises DataError naming the file, line and field: invalid UTF-8
or JSON, a missing or wrong-typed field, a number that is not finite in float32 (a
NaN, inf or 1e300 margin would make the loss NaN or inf). Preference files written by
`rlhf-kernels label` carry skips ("skipped": true) and ties ("tie": true), which must
be booleans: both are left out of training (a tie says nothing about which response
is better; the labelled strength reaches the reward model as "margin", a number).

Sequences are laid out as [left-padded prompt | response <eos> right-padded], so every
prompt ends at the same column and generation appends after it.
"""

from __future__ import annotations

import json
import math
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


FLOAT32_MAX = 3.4028234663852886e38
TEXT_FIELDS = {"sft": ("prompt", "response"), "preferences": ("prompt", "chosen", "rejected"),
               "rankings": ("prompt",), "prompts": ("prompt",)}  # fmt: skip


def _finite(value) -> bool:
    """A JSON number (not a bool) that float32, the loss's precision, holds finitely."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and abs(float(value)) <= FLOAT32_MAX
    except OverflowError:  # an int too large for a float
        return False


INT64_MAX = 2**63 - 1
FLOAT_EXACT = 2**53  # floats are integers exactly up to here


def _rank(value):
    """A rank as an int: a JSON integer in int64, or an integral float below 2^53; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -INT64_MAX - 1 <= value <= INT64_MAX else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) <= FLOAT_EXACT:
        return int(value)
    return None


def _check_flags(record: dict, where: str) -> None:
    """skipped / tie decide whether a record trains: "false" (a string, truthy) must not drop it."""
    for flag in ("skipped", "tie"):
        if flag in record and not isinstance(record[flag], bool):
            raise DataError(f"{where}: field {flag!r} must be true or false, got {record[flag]!r}")


def _check_record(record, kind: str, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field, kind_type in FIELDS[kind].items():
        if field not in record:
            raise DataError(f"{where}: missing field {field!r} (a {kind} record needs {sorted(FIELDS[kind])})")
        if not isinstance(record[field], kind_type):
            raise DataError(f"{where}: field {field!r} must be a {kind_type.__name__}, got {record[field]!r}")
    if kind == "preferences" and "margin" in record and not _finite(record["margin"]):
        raise DataError(f"{where}: field 'margin' must be a finite number (in float32, the loss's precision), "
                        f"got {record['margin']!r}")  # fmt: skip
    if kind == "rankings":
        if len(record["responses"]) != len(record["ranks"]) or len(record["responses"]) < 2:
            raise DataError(f"{where}: 'responses' and 'ranks' must be lists of one length >= 2")
        if not all(isinstance(r, str) for r in record["responses"]):
            raise DataError(f"{where}: field 'responses' must be strings")
        ranks = [_rank(r) for r in record["ranks"]]
        if any(r is None for r in ranks):
            raise DataError(f"{where}: field 'ranks' must be integers (rank 0 best; int64), got {record['ranks']!r}")
        record["ranks"] = ranks
    return record


def _check_vocabulary(record: dict, kind: str, vocabulary: set, where: str) -> None:
    texts = [(field, record[field]) for field in TEXT_FIELDS[kind]]
    texts += [("responses", text) for text in record.get("responses", [])] if kind == "rankings" else []
    for field, text in texts:
        unknown = [word for word in text.split() if word not in vocabulary]
        if unknown:
            raise DataError(
                f"{where}: field {field!r}: {unknown[0]!r} is not in the built-in tokenizer's vocabulary "
                f"({' '.join(sorted(vocabulary))}), which would read it as <pad>; to train on your own data "
                "pass --model (a Hugging Face model folder with its tokenizer)"
            )


def read_jsonl(path: str, kind: str, vocabulary: set | None = None) -> list[dict]:
    """Records of `kind` ("sft", "preferences", "rankings", "prompts") from a JSONL
    file. vocabulary: the words the tokenizer knows (the built-in one maps any other
    word to <pad>, so its chosen and rejected would read the same); a record with
    another word is refused."""
    if kind not in FIELDS:
        raise ValueError(f"kind must be one of {tuple(FIELDS)}, got {kind!r}")
    records = []
    try:
        with open(path, "rb") as lines:
            for number, raw in enumerate(lines, 1):
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(f"{where}: not valid UTF-8 (byte {raw[error.start]:#04x} at column "
                                    f"{error.start + 1})") from None  # fmt: skip
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{where}: not valid JSON ({error.msg})") from None
                if kind == "preferences" and isinstance(record, dict):
                    _check_flags(record, where)
                    if record.get("skipped") or record.get("tie"):
                        continue
                records.append(_check_record(record, kind, where))
                if vocabulary is not None:
                    _check_vocabulary(record, kind, vocabulary, where)
                if kind == "rankings" and len(record["responses"]) != len(records[0]["responses"]):
                    raise DataError(f"{where}: {len(record['responses'])} responses where the first record has "
                                    f"{len(records[0]['responses'])} (every ranking needs the same K)")  # fmt: skip
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
    # One batched call (the Rust tokenizer encodes the list at once): per-string calls were
    # 20% of the quick demo's time, 315k of them.
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
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
    encoded = [r[:max_response_tokens] for r in tokenizer(list(responses), add_special_tokens=False)["input_ids"]]
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
