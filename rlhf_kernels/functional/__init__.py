"""The public API: typed functions that validate, pick a backend and run it, one module per
family (the same names as reference/, ops/, triton/ and csrc/cpu/).

Every function takes ``backend=None`` last (see rlhf_kernels.backend for how
None resolves). Outputs are float32, or float64 when an input is float64;
internal accumulation is float32 (float64 for float64 inputs) whatever the
input dtype. Shapes: B sequences, T positions, V vocabulary, H hidden size.
"""

from .dpo import dpo_loss, linear_dpo_loss
from .gae import discounted_returns, gae
from .grpo import broadcast_advantages, group_advantages, linear_policy_loss, policy_loss
from .kl import kl_penalty, kl_shaped_rewards
from .logprobs import linear_logprobs, sequence_logprobs, token_logprobs
from .masked import masked_mean, masked_whiten
from .ppo import ppo_policy_loss, ppo_value_loss
from .rm import bradley_terry_loss, ranking_loss

__all__ = [
    "bradley_terry_loss",
    "broadcast_advantages",
    "discounted_returns",
    "dpo_loss",
    "gae",
    "group_advantages",
    "kl_penalty",
    "kl_shaped_rewards",
    "linear_dpo_loss",
    "linear_logprobs",
    "linear_policy_loss",
    "masked_mean",
    "masked_whiten",
    "policy_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ranking_loss",
    "sequence_logprobs",
    "token_logprobs",
]
