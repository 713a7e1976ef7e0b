"""The drop-ins return what upstream returns (dtype) and leave caller tensors alone where
upstream does, checked against the installed TRL and against verl's documented behaviour.
"""

import pytest
import torch

from rlhf_kernels.integrations import trl as rk_trl
from rlhf_kernels.integrations import verl as rk_verl

trl_utils = pytest.importorskip("trl.trainer.utils")


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of x's dtype at |x| (bf16: 8 significant bits, fp16: 11)."""
    bits = 8 if x.dtype == torch.bfloat16 else 11
    return torch.exp2(torch.floor(torch.log2(x.float().abs().clamp_min(1e-30))) - (bits - 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_selective_log_softmax_is_within_one_ulp_of_trl(dtype):
    """TRL's half-precision path is torch's log_softmax of the 16-bit logits, whose CPU
    kernel rounds differently from the correctly rounded value in ~20% of positions
    (torch.float32 log_softmax rounded to 16 bits disagrees with it as often). Ours is
    the fp32 result rounded once: the same dtype, within one ulp of TRL's."""
    logits = torch.randn(4, 32, 1024, dtype=dtype)
    index = torch.randint(0, 1024, (4, 32))
    want = trl_utils.selective_log_softmax(logits, index)
    got = rk_trl.selective_log_softmax(logits, index)
    assert got.dtype == want.dtype == dtype
    assert ((got.float() - want.float()).abs() <= _ulp(want)).all()
    exact = torch.gather(logits.double().log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)
    assert ((got.double() - exact).abs() <= _ulp(got) / 2 + 1e-6).all()  # correctly rounded


def test_selective_log_softmax_and_entropy_matches_trl():
    logits = torch.randn(3, 7, 50, requires_grad=True)
    index = torch.randint(0, 50, (3, 7))
    row_mask = torch.rand(3, 7) > 0.3
    want = trl_utils.selective_log_softmax_and_entropy(logits, index, temperature=0.8, row_mask=row_mask)
    got = rk_trl.selective_log_softmax_and_entropy(logits, index, temperature=0.8, row_mask=row_mask)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_verl_losses_and_kl_return_the_input_dtype():
    lp = torch.randn(4, 9, dtype=torch.bfloat16, requires_grad=True)
    ref = torch.randn(4, 9, dtype=torch.bfloat16)
    mask = (torch.rand(4, 9) > 0.2).float()
    for name in ("k1", "low_var_kl", "low_var_kl+"):
        assert rk_verl.kl_penalty(lp, ref, name).dtype == torch.bfloat16
    outputs = rk_verl.compute_policy_loss(ref, lp, torch.randn(4, 9, dtype=torch.bfloat16), mask, 0.2)
    assert all(x.dtype == torch.bfloat16 for x in outputs)
    assert rk_verl.agg_loss(lp, mask, "seq-mean-token-mean").dtype == torch.bfloat16
    value_loss, clipfrac = rk_verl.compute_value_loss(lp, ref, ref, mask, 0.5)
    assert value_loss.dtype == clipfrac.dtype == torch.bfloat16


def test_verl_logprobs_never_write_into_cpu_logits():
    """verl's CPU path (log_softmax) leaves the logits alone: an entropy taken first on
    the same logits still backpropagates, and the logits are unchanged."""
    leaf = torch.randn(3, 5, 11, requires_grad=True)
    logits = leaf * 1
    before = logits.detach().clone()
    entropy = rk_verl.entropy_from_logits(logits)
    logprobs = rk_verl.logprobs_from_logits(logits, torch.randint(0, 11, (3, 5)))
    (entropy.sum() + logprobs.sum()).backward()
    assert torch.equal(logits.detach(), before)
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
