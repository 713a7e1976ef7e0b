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


@pytest.mark.parametrize("kernel", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["ignore", "carry"])
def test_gpu_gae_few_long_rows(kernel, mode):
    # B = 2 rows of 128k: the CUDA kernel cuts each row into chained chunks.
    if kernel not in backend.available("gae", "cuda"):
        pytest.skip(f"no {kernel} gae kernel in this build")
    T = 131072 + 3
    rewards, values = torch.randn(2, T, device="cuda"), torch.randn(2, T, device="cuda")
    mask = (torch.rand(2, T, device="cuda") > 0.1).float()
    got = rk.gae(rewards, values, mask, gamma=0.999, lam=0.95, mask_mode=mode, backend=kernel)
    want = rk.gae(rewards.double(), values.double(), mask.double(), gamma=0.999, lam=0.95, mask_mode=mode,
                  backend="reference")  # fmt: skip
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif("masked_whiten" not in backend.HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("fill_masked", [True, False])
def test_triton_masked_statistics(fill_masked):
    x = (3 * torch.randn(129, 4099, device="cuda") + 1).requires_grad_(True)
    mask = (torch.rand_like(x) > 0.3).float()
    upstream = torch.randn_like(x)
    results = {}
    for name in ("triton", "reference"):
        x.grad = None
        out = rk.masked_whiten(x, mask, shift_mean=False, fill_masked=fill_masked, backend=name)
        rows = rk.masked_mean(x, mask, dim=1, backend=name)
        ((out * upstream).sum() + rows.sum()).backward()
        results[name] = (out, rows, x.grad.clone())
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif("dpo_loss" not in backend.HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "exo_pair", "nca_pair", "apo_down"])
def test_triton_dpo_and_rm_losses(loss_type):
    logps = [-torch.rand(1000, device="cuda") * 40 for _ in range(4)]
    rewards, ranks = torch.randn(300, 7, device="cuda"), torch.randint(0, 4, (300, 7), device="cuda")
    results = {}
    for name in ("triton", "reference"):
        pc, pr = (x.clone().requires_grad_(True) for x in logps[:2])
        r = rewards.clone().requires_grad_(True)
        losses, chosen, rejected = rk.dpo_loss(pc, pr, *logps[2:], loss_type=loss_type, label_smoothing=0.1,
                                               backend=name)  # fmt: skip
        rm = rk.ranking_loss(r, ranks, backend=name) + rk.bradley_terry_loss(r[:, 0], r[:, 1], margin=0.5, backend=name)
        (losses.sum() + rm).backward()
        results[name] = (losses, chosen, rejected, rm, pc.grad, pr.grad, r.grad)
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
