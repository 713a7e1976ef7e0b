"""Run unchanged TRL code on rlhf_kernels: patch() swaps TRL's log-prob helpers.

python python/examples/trl_patch.py
"""

import torch
from trl.experimental.sdpo.loss_utils import compute_sampled_token_self_distillation_loss
from trl.trainer.utils import selective_log_softmax

from rlhf_kernels.integrations import trl as rk_trl

student = torch.randn(2, 16, 1000, requires_grad=True)
teacher, ids = torch.randn(2, 16, 1000), torch.randint(0, 1000, (2, 16))

baseline = compute_sampled_token_self_distillation_loss(student, teacher, ids, distillation_alpha=1.0).sum()
with rk_trl.patched():  # every trl module that imported selective_log_softmax now calls ours
    patched = compute_sampled_token_self_distillation_loss(student, teacher, ids, distillation_alpha=1.0).sum()
print(f"TRL loss {baseline.item():.6f}, on rlhf_kernels {patched.item():.6f}")
print(
    "drop-in:", rk_trl.selective_log_softmax(student, ids).shape, "== TRL:", selective_log_softmax(student, ids).shape
)
