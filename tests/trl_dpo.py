"""TRL 1.16's own DPO loss as the parity oracle of rk.dpo_loss.

`trl_dpo` runs the real `DPOTrainer._compute_loss` (and `compute_ref_log_probs`)
on given per-token log-probs: the trainer object and the models are stand-ins that
return those log-probs, so every formula, dtype and option (loss types, loss_weights,
f-divergences, ld_alpha, use_weighting) is TRL's code, not a copy of it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from types import SimpleNamespace

import torch

DPOTrainer = __import__("pytest").importorskip("trl.trainer.dpo_trainer").DPOTrainer


class _Model:
    """A causal LM stand-in: returns fixed per-token log-probs [2B, S] (S = T - 1)."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, log_probs, log_sum_sq_probs=None):
        self.log_probs, self.log_sum_sq_probs = log_probs, log_sum_sq_probs

    def __call__(self, **kwargs):
        zeros = torch.zeros(self.log_probs.shape, dtype=torch.float32)
        return SimpleNamespace(
            log_probs=self.log_probs,
            log_sum_sq_probs=self.log_sum_sq_probs,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
        )


def _trainer(policy, ref, options):
    gathered = []

    def gather(x):
        gathered.append(x)
        return x

    trainer = SimpleNamespace(
        model=policy,
        ref_model=ref,
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=gather, autocast=contextlib.nullcontext
        ),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=options.get("discopop_tau", 0.05)),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        beta=options.get("beta", 0.1),
        loss_types=list(options.get("loss_type", ["sigmoid"])),
        loss_weights=list(options.get("loss_weights") or [1.0] * len(options.get("loss_type", ["sigmoid"]))),
        ld_alpha=options.get("ld_alpha"),
        f_divergence_type=options.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=options.get("f_alpha_divergence_coef", 0.5),
        label_smoothing=options.get("label_smoothing", 0.0),
        use_weighting=options.get("use_weighting", False),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    return trainer, gathered


def _inputs(completion_mask):
    ids = torch.zeros(completion_mask.shape, dtype=torch.long)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=completion_mask)


def trl_dpo(log_probs, ref_log_probs, completion_mask, *, log_sum_sq_probs=None, **options):
    """TRL's loss from per-token log-probs [2B, S] (chosen rows first, zero outside the
    completion) and the completion mask [2B, S + 1]. options: DPOConfig's names.

    Returns (loss [], chosen_rewards [B], rejected_rewards [B]) as TRL computes them.
    """
    trainer, gathered = _trainer(_Model(log_probs, log_sum_sq_probs), _Model(ref_log_probs), options)
    loss = DPOTrainer._compute_loss(trainer, trainer.model, _inputs(completion_mask), False)
    return loss, gathered[0], gathered[1]  # TRL gathers chosen, then rejected rewards first


def trl_sequence_logps(log_probs, completion_mask, ld_alpha=None):
    """TRL's per-sequence log-probs (chosen [B], rejected [B]), LD-DPO weighted when
    ld_alpha is set; no grad (TRL's reference path)."""
    model = _Model(log_probs)
    trainer, _ = _trainer(model, None, dict(ld_alpha=ld_alpha))
    return DPOTrainer.compute_ref_log_probs(trainer, model, _inputs(completion_mask))
