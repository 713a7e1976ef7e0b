"""Plain-PyTorch implementations of the public API: the spec, the parity oracle
of every kernel, and the backend that runs where no kernel exists.

They assume validated inputs (rlhf_kernels.functional checks them) and
accumulate in float32, or float64 when an input is float64.
"""

from .dpo import dpo_loss, linear_dpo_loss
from .gae import discounted_returns, gae
from .kl import kl_penalty, kl_shaped_rewards
from .logprobs import linear_logprobs, sequence_logprobs, token_logprobs
from .masked import masked_mean, masked_whiten
from .ppo import ppo_policy_loss, ppo_value_loss
from .rm import bradley_terry_loss, ranking_loss
