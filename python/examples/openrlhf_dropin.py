"""OpenRLHF's PPO math with rlhf_kernels' drop-ins (same signatures as openrlhf.models).

python python/examples/openrlhf_dropin.py
"""

import torch

from rlhf_kernels.integrations.openrlhf import (
    PolicyLoss,
    ValueLoss,
    compute_approx_kl,
    compute_reward,
    get_advantages_and_returns,
    log_probs_from_logits,
)

B, T, V = 4, 32, 1000
logits, actions = torch.randn(B, T, V, requires_grad=True), torch.randint(0, V, (B, T))
action_mask = (torch.arange(T) < torch.randint(T // 2, T + 1, (B, 1))).float()
log_probs = log_probs_from_logits(logits, actions)
base_log_probs = log_probs.detach() + 0.1 * torch.randn(B, T)
kl = compute_approx_kl(log_probs.detach(), base_log_probs, kl_estimator="k3") * action_mask
rewards = compute_reward(torch.randn(B), 0.05, kl, action_mask)
values = torch.randn(B, T, requires_grad=True)
advantages, returns = get_advantages_and_returns(values.detach(), rewards, action_mask, gamma=1.0, lambd=0.95)
loss, clip_ratio, ppo_kl, _, _ = PolicyLoss(0.2, 0.28)(log_probs, log_probs.detach(), advantages, action_mask)
value_loss = ValueLoss(0.2)(values, values.detach(), returns, action_mask)
(loss + value_loss).backward()
print(f"policy loss {loss.item():.4f} (clip ratio {clip_ratio.item():.3f}), value loss {value_loss.item():.4f}")
