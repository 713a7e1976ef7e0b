"""The compiled GPU backends on CUDA tensors against the reference (skipped without CUDA).

The same kernels are checked on CPU tensors everywhere else (Triton's interpreter, the
shared C++ scan); these tests are the ones the lent GPU machine runs.
"""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import backend

pytestmark = pytest.mark.cuda


def _labels(N, V):
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[::7] = -100
    return labels


@pytest.mark.skipif("token_logprobs" not in backend.HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("V", [1, 4099, 32000])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_triton_token_logprobs(dtype, tol, V, softcap):
    logits = (4 * torch.randn(67, V, device="cuda")).to(dtype).requires_grad_(True)
    labels = _labels(67, V)
    grads = torch.randn(67, device="cuda"), torch.randn(67, device="cuda")
    outputs = {}
    for name in ("triton", "reference"):
        logits.grad = None
        lp, h = rk.token_logprobs(logits, labels, return_entropy=True, temperature=0.9, softcap=softcap, backend=name)
        torch.autograd.backward([lp, h], list(grads))
        outputs[name] = (lp, h, logits.grad.clone())
    for got, want in zip(outputs["triton"], outputs["reference"]):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.skipif("linear_logprobs" not in backend.HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_triton_linear_logprobs(dtype, tol):
    N, H, V = 300, 257, 5003  # H and V not multiples of any block
    hidden = torch.randn(N, H, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, H, device="cuda") / H**0.5).to(dtype).requires_grad_(True)
    labels = _labels(N, V)
    grads = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    outputs = {}
    for name in ("triton", "reference"):
        hidden.grad = weight.grad = None
        lp, h = rk.linear_logprobs(hidden, weight, labels, return_entropy=True, backend=name)
        torch.autograd.backward([lp, h], list(grads))
        outputs[name] = (lp, h, hidden.grad.clone(), weight.grad.clone())
    for got, want in zip(outputs["triton"], outputs["reference"]):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("kernel", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["ignore", "multiply", "carry"])
def test_gpu_gae(kernel, mode):
    if kernel not in backend.available("gae", "cuda"):
        pytest.skip(f"no {kernel} gae kernel in this build")
    rewards, values = torch.randn(300, 2570, device="cuda"), torch.randn(300, 2570, device="cuda")
    mask = (torch.rand(300, 2570, device="cuda") > 0.2).float()
    got = rk.gae(rewards, values, mask, gamma=0.99, lam=0.95, mask_mode=mode, backend=kernel)
    want = rk.gae(rewards, values, mask, gamma=0.99, lam=0.95, mask_mode=mode, backend="reference")
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-5)


@pytest.mark.skipif("ppo_policy_loss" not in backend.HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_triton_ppo_losses(agg):
    lp = (-torch.rand(67, 1500, device="cuda") * 3).requires_grad_(True)
    old = lp.detach() + 0.3 * torch.randn_like(lp)
    adv = torch.randn_like(old)
    mask = (torch.rand_like(old) > 0.2).float()
    results = {}
    for name in ("triton", "reference"):
        lp.grad = None
        loss, stats = rk.ppo_policy_loss(lp, old, adv, mask, clip_high=0.28, dual_clip=3.0, agg=agg, backend=name)
        value_loss, value_stats = rk.ppo_value_loss(lp, old, adv, mask, agg=agg, backend=name)
        (loss + value_loss).backward()
        results[name] = (loss, value_loss, lp.grad.clone(), *stats.values(), *value_stats.values())
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif("kl_penalty" not in backend.HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "low_var_kl"])
def test_triton_kl(estimator):
    lp = (-torch.rand(33, 3000, device="cuda") * 5).requires_grad_(True)
    ref = lp.detach() + 4 * torch.randn_like(lp)
    mask = (torch.rand_like(ref) > 0.2).float()
    scores = torch.randn(33, device="cuda")
    results = {}
    for name in ("triton", "reference"):
        lp.grad = None
        rk.kl_penalty(lp, ref, estimator=estimator, clamp=8.0, backend=name).sum().backward()
        rewards, kl = rk.kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.1, estimator=estimator, backend=name)
        results[name] = (lp.grad.clone(), rewards, kl)
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
