"""rlhf-kernels: fused, differentiable PyTorch kernels for the hot spots of RLHF.

Every public function lives in rlhf_kernels.functional and is re-exported here;
each takes ``backend=None`` last (see rlhf_kernels.backend).
"""

from ._batch_invariance import batch_invariant
from ._index_errors import check_index_errors
from .functional import (
    bradley_terry_loss,
    broadcast_advantages,
    discounted_returns,
    dpo_loss,
    gae,
    group_advantages,
    kl_penalty,
    kl_shaped_rewards,
    linear_dpo_loss,
    linear_logprobs,
    linear_policy_loss,
    masked_mean,
    masked_whiten,
    policy_loss,
    ppo_policy_loss,
    ppo_value_loss,
    ranking_loss,
    sequence_logprobs,
    token_logprobs,
)

__version__ = "0.1.0"

__all__ = [
    "batch_invariant",
    "bradley_terry_loss",
    "broadcast_advantages",
    "check_index_errors",
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
