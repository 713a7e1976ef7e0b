"""TRL 1.16's own GRPO loss as the parity oracle of rk.policy_loss.

`trl_grpo_loss` runs the real `GRPOTrainer._compute_loss` on given per-token
log-probs and entropies: the trainer object is a stand-in whose
`_get_per_token_logps_and_entropies` returns them, so every loss type, normaliser,
clip, KL and entropy term is TRL's code. One process, no gradient accumulation.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch

GRPOTrainer = __import__("pytest").importorskip("trl.trainer.grpo_trainer").GRPOTrainer


def _accelerator():
    return SimpleNamespace(
        num_processes=1,
        sync_gradients=True,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
    )


def trl_grpo_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    loss_type="grpo",
    epsilon_low=0.2,
    epsilon_high=0.2,
    delta=None,
    importance_sampling_level="token",
    beta=0.0,
    ref_logprobs=None,
    use_bias_correction_kl=False,
    entropies=None,
    entropy_coef=0.0,
    max_completion_length=None,
    num_items_in_batch=None,
    importance_sampling_ratio=None,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo=(2.0, 3.0, 3.0, 2.0),
):
    """(loss, metrics) of GRPOTrainer._compute_loss; gradients reach `logprobs` (and `entropies`)."""
    B, T = logprobs.shape
    entropies = torch.zeros_like(logprobs) if entropies is None else entropies
    args = SimpleNamespace(
        delta=delta,
        use_bias_correction_kl=use_bias_correction_kl,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo[0],
        vespo_lambda_pos=vespo[1],
        vespo_k_neg=vespo[2],
        vespo_lambda_neg=vespo[3],
        steps_per_generation=1,
    )
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, entropies, None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level,
        beta=beta,
        args=args,
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        use_vllm=importance_sampling_ratio is not None,
        vllm_importance_sampling_correction=importance_sampling_ratio is not None,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=T if max_completion_length is None else max_completion_length,
        accelerator=_accelerator(),
        _entropy_bonus_enabled=entropy_coef != 0.0,
        use_adaptive_entropy=False,
        entropy_coef=entropy_coef,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old_logprobs,
        "num_items_in_batch": torch.tensor(float(mask.sum() if num_items_in_batch is None else num_items_in_batch)),
    }
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref_logprobs
    if importance_sampling_ratio is not None:
        inputs["importance_sampling_ratio"] = importance_sampling_ratio
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}
