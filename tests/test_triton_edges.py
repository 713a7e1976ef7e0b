"""The Triton log-prob kernels at the edges a GPU run meets first, each a defect found by
reading the GPU path (run here in Triton's interpreter on CPU tensors; tests/test_gpu.py
runs the same cases on CUDA tensors):

- a masked vocabulary (-inf or finfo.min logits, a whole first tile of them): exact
  log-probs and entropy, zero gradient on the masked logits, never NaN;
- logits[:, :-1] of [B, T, V], the way trainers call it: read in place (no [N, V] copy),
  and with inplace_backward the gradient lands in the caller's logits storage;
- a strided bias; an out-of-range label that reaches the kernel (checks skipped):
  NaN, no out-of-bounds read; TF32 following torch's matmul setting; auto never runs
  the reference on CUDA tensors without a warning; value checks never sync a GPU.
"""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _validation, backend

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif("token_logprobs" not in backend.HAS_TRITON, reason="triton not installed")

# 4096 is the forward's tile: 4500 masked columns fill the whole first tile.
V_MASKED = 5000


def _exact_masked(logits, keep, labels, temperature):
    """float64 log-probs / entropy over the kept columns only (a masked logit has
    probability exactly 0)."""
    z = logits.double() / temperature
    z = z.masked_fill(~keep, float("-inf"))
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    entropy = -(p * torch.where(keep, logp, torch.zeros_like(logp))).sum(-1)
    return logp.gather(-1, labels[:, None])[:, 0], entropy


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_masked_vocabulary_is_exact_with_zero_gradient_on_masked_logits(fill, temperature):
    N = 3
    logits = torch.randn(N, V_MASKED)
    keep = torch.ones(N, V_MASKED, dtype=torch.bool)
    keep[:, :4500] = False  # the whole first tile and more
    keep[1, ::3] = False  # and interleaved in another row
    keep[1, 4500:4502] = True
    logits = logits.masked_fill(~keep, fill).requires_grad_(True)
    labels = torch.stack([torch.nonzero(row)[torch.randint(len(torch.nonzero(row)), ())][0] for row in keep])
    lp, h = rk.token_logprobs(logits, labels, return_entropy=True, temperature=temperature, backend="triton")
    want_lp, want_h = _exact_masked(logits.detach(), keep, labels, temperature)
    torch.testing.assert_close(lp.double(), want_lp, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(h.double(), want_h, atol=2e-5, rtol=2e-5)
    (lp.sum() + 0.5 * h.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~keep] == 0).all()


def test_a_label_whose_own_logit_is_minus_inf_gets_minus_inf_only_there():
    logits = torch.randn(2, 300)
    logits[:, 7] = float("-inf")
    lp = rk.token_logprobs(logits, torch.tensor([7, 8]), backend="triton")
    assert lp[0] == float("-inf") and torch.isfinite(lp[1])


@pytest.mark.parametrize("inplace", [False, True])
def test_sliced_logits_are_read_in_place_and_the_gradient_lands_in_the_callers_storage(inplace):
    B, T, V = 3, 6, 301
    leaf = torch.randn(B, T, V, requires_grad=True)
    logits = leaf * 2  # a model's output
    labels = torch.randint(0, V, (B, T - 1))
    lp, h = rk.token_logprobs(logits[:, :-1], labels, return_entropy=True, inplace_backward=inplace, backend="triton")
    want_lp, want_h = rk.token_logprobs(logits[:, :-1].detach(), labels, return_entropy=True, backend="reference")
    torch.testing.assert_close(lp, want_lp, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(h, want_h, atol=2e-5, rtol=2e-5)
    grads = torch.randn(B, T - 1), torch.randn(B, T - 1)
    torch.autograd.backward([lp, h], list(grads))
    reference_leaf = leaf.detach().clone().requires_grad_(True)
    ref_lp, ref_h = rk.token_logprobs((reference_leaf * 2)[:, :-1], labels, return_entropy=True, backend="reference")
    torch.autograd.backward([ref_lp, ref_h], list(grads))
    torch.testing.assert_close(leaf.grad, reference_leaf.grad, atol=1e-5, rtol=1e-5)
    if inplace:
        # no copy was made: d logits was written over the caller's sliced logits
        torch.testing.assert_close(logits[:, :-1].detach(), reference_leaf.grad[:, :-1] / 2, atol=1e-5, rtol=1e-5)


def test_the_kernel_gets_a_strided_view_not_a_copy():
    from rlhf_kernels.ops.logprobs import _kernel_logits

    logits = torch.randn(2, 5, 7)
    sliced = logits[:, :-1]
    assert _kernel_logits(sliced, "triton").data_ptr() == logits.data_ptr()
    assert _kernel_logits(torch.randn(2, 3, 4, 7)[:, :, :-1], "triton").shape == (6, 3, 7)


def test_strided_bias_is_read_with_its_stride():
    N, H, V = 9, 24, 70
    hidden, weight = torch.randn(N, H), torch.randn(V, H) / 5
    bias = torch.randn(2 * V)[::2]  # every other element of a larger buffer
    labels = torch.randint(0, V, (N,))
    got = rk.linear_logprobs(hidden, weight, labels, bias=bias, backend="triton")
    want = rk.linear_logprobs(hidden, weight, labels, bias=bias.contiguous(), backend="reference")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_an_out_of_range_label_that_reaches_the_kernel_gives_nan_not_a_wild_read():
    from rlhf_kernels.triton import logprobs as kernels

    logits = torch.randn(4, 50)
    labels = torch.tensor([3, 1_000_000, -5, -100])
    lp, _, _ = kernels.token_logprobs_forward(logits, labels, 1.0, None, 1.0, -100, False)
    assert torch.isfinite(lp[0]) and lp[1].isnan() and lp[2].isnan() and lp[3] == 0
    hidden, weight = torch.randn(4, 16), torch.randn(50, 16)
    lp, _, _ = kernels.linear_logprobs_forward(hidden, weight, None, labels, 1.0, None, 1.0, -100, False)
    assert torch.isfinite(lp[0]) and lp[1].isnan() and lp[2].isnan() and lp[3] == 0


def test_fp32_dot_precision_follows_torchs_matmul_setting():
    from rlhf_kernels.triton.logprobs import _dot_precision

    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert _dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert _dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(saved)


def test_auto_warns_once_when_a_cuda_tensor_would_run_the_reference(monkeypatch):
    monkeypatch.setattr(backend, "HAS_TRITON", frozenset())
    monkeypatch.setattr(backend, "HAS_CUDA", frozenset())
    monkeypatch.setattr(backend, "_WARNED_REFERENCE_ON_CUDA", set())
    with pytest.warns(RuntimeWarning, match="token_logprobs on CUDA tensors runs the plain-PyTorch reference"):
        assert backend.resolve("token_logprobs", "cuda") == "reference"
    with _no_warning():  # once per op
        backend.resolve("token_logprobs", "cuda")


class _no_warning:
    def __enter__(self):
        import warnings

        self.catcher = warnings.catch_warnings(record=True)
        self.records = self.catcher.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self.catcher.__exit__(*exc)
        assert not self.records, [str(r.message) for r in self.records]


def test_value_checks_run_on_cpu_tensors_and_never_on_meta_ones(monkeypatch):
    assert _validation.values_checked(torch.zeros(3))
    assert not _validation.values_checked(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="labels must be in"):
        rk.token_logprobs(torch.randn(2, 5), torch.tensor([1, 9]))
    # meta inputs (torch.compile's fakes, FSDP's meta init) go through without reading values
    out = rk.token_logprobs(torch.empty(2, 5, device="meta"), torch.empty(2, dtype=torch.int64, device="meta"))
    assert out.shape == (2,) and out.device.type == "meta"
