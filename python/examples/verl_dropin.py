"""verl's PPO math with rlhf_kernels' drop-ins (same signatures as verl's core_algos),
log-probs and entropy from hidden states without the logits (linear_cross_entropy).

    python python/examples/verl_dropin.py
"""

import torch

from rlhf_kernels.integrations import verl

B, T, H, V = 4, 32, 64, 1000
hidden, lm_head = torch.randn(B, T, H), (torch.randn(V, H) / H**0.5).requires_grad_(True)
responses = torch.randint(0, V, (B, T))
response_mask = (torch.arange(T) < torch.randint(T // 2, T + 1, (B, 1))).float()
log_prob, entropy = verl.linear_cross_entropy(hidden, lm_head, responses, 1.0, "none")
log_prob, entropy = log_prob.view(B, T), entropy.view(B, T)
ref_log_prob = log_prob.detach() + 0.1 * torch.randn(B, T)
kl = verl.kl_penalty(log_prob.detach(), ref_log_prob, "low_var_kl")
rewards = -0.001 * kl * response_mask
rewards[torch.arange(B), response_mask.sum(-1).long() - 1] += torch.randn(B)
advantages, returns = verl.compute_gae_advantage_return(rewards, torch.randn(B, T), response_mask, 1.0, 0.95)
pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower = verl.compute_policy_loss(
    log_prob.detach() + 0.05, log_prob, advantages, response_mask, cliprange=0.2, loss_agg_mode="token-mean"
)
entropy_loss = verl.agg_loss(entropy, response_mask, "token-mean")
(pg_loss - 0.001 * entropy_loss).backward()
print(f"pg_loss {pg_loss.item():.4f} clipfrac {pg_clipfrac.item():.3f} ppo_kl {ppo_kl.item():.4f}")
