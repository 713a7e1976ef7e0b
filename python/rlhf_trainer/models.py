"""Models of the trainer: the causal LM (any local Hugging Face AutoModelForCausalLM,
or a tiny built-in Llama with random weights), the value head on a shared trunk or a
separate critic, the frozen reference copy and the reward model (backbone + scalar
head). Log-probs always come from rlhf_kernels.linear_logprobs on the final hidden
states and the lm_head weight: the [B, L, V] logits are never formed.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import rlhf_kernels as rk

from .data import Batch


def tiny_model(vocab_size: int, seed: int, hidden: int = 64, layers: int = 2, heads: int = 4) -> LlamaForCausalLM:
    """A 2-layer Llama of ~0.1M parameters with random weights (no hub access)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def load_causal_lm(path: str):
    """(model, tokenizer) from a local directory; a clear error when it is not one."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r}: not a directory holding a Hugging Face model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path), tokenizer


def final_hidden(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The last layer's (normed) hidden states [B, L, H] of a causal LM's trunk."""
    return model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).last_hidden_state


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    return model.get_output_embeddings().weight


def shifted_targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """labels and mask [B, L - 1] of the next-token predictions that are response tokens."""
    return batch.input_ids[:, 1:], batch.response_mask[:, 1:]


def response_logprobs(model, batch: Batch, *, temperature: float = 1.0, return_entropy: bool = False, hidden=None):
    """log p(token) of every next-token position [B, L - 1] (and the entropy), through
    rlhf_kernels.linear_logprobs; `hidden` reuses final_hidden(model, batch)."""
    hidden = final_hidden(model, batch) if hidden is None else hidden
    labels, _ = shifted_targets(batch)
    return rk.linear_logprobs(
        hidden[:, :-1], lm_head_weight(model).to(hidden.dtype), labels, temperature=temperature,
        return_entropy=return_entropy,
    )  # fmt: skip


def frozen_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


class ValueModel(nn.Module):
    """V(s_t) for every next-token position [B, L - 1]: a linear head on the policy's
    own hidden states (critic="shared") or on a separate copy of its trunk ("separate")."""

    def __init__(self, policy: nn.Module, critic: str = "separate"):
        super().__init__()
        if critic not in ("shared", "separate"):
            raise ValueError(f"critic must be 'shared' or 'separate', got {critic!r}")
        self.critic = critic
        self.trunk = copy.deepcopy(policy) if critic == "separate" else None
        self.head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: Batch, policy_hidden: torch.Tensor) -> torch.Tensor:
        hidden = final_hidden(self.trunk, batch) if self.trunk is not None else policy_hidden
        return self.head(hidden[:, :-1].float()).squeeze(-1)


class RewardModel(nn.Module):
    """A causal LM's trunk with a scalar head read at each sequence's last real token."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        hidden = final_hidden(self.backbone, batch)
        last = batch.attention_mask.shape[1] - 1 - batch.attention_mask.flip(-1).argmax(-1)
        return self.head(hidden[torch.arange(hidden.shape[0]), last].float()).squeeze(-1)

    def save(self, directory: str) -> None:
        self.backbone.save_pretrained(directory)
        torch.save(self.head.state_dict(), os.path.join(directory, "reward_head.pt"))

    @classmethod
    def load(cls, directory: str) -> RewardModel:
        model = cls(AutoModelForCausalLM.from_pretrained(directory))
        model.head.load_state_dict(torch.load(os.path.join(directory, "reward_head.pt"), weights_only=True))
        return model
