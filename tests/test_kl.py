import pytest
import torch

import oracle
import rlhf_kernels as rk
from conftest import backends_of, random_mask, tolist, use_backend
from rlhf_kernels.reference.kl import ESTIMATORS

COMPILED = ("cpu", "triton")


@pytest.fixture(autouse=True, params=backends_of("kl_penalty"))
def backend_name(request, monkeypatch, _fresh_seed):
    """Every test here runs on each backend of the kl family."""
    return use_backend(request, monkeypatch, "kl")


def _logprobs(B, T, dtype=torch.float32, spread=1.0):
    lp = -torch.rand(B, T) * 5
    return lp.to(dtype), (lp + spread * torch.randn(B, T)).to(dtype)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("clamp", [None, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kl_penalty_matches_oracle(estimator, clamp, dtype):
    lp, ref = _logprobs(3, 17, dtype, spread=8.0)  # spread reaches the low_var_kl clamps
    got = rk.kl_penalty(lp, ref, estimator=estimator, clamp=clamp)
    want = [[oracle.kl(a, b, estimator, clamp) for a, b in zip(ra, rb)] for ra, rb in zip(tolist(lp), tolist(ref))]
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=tol, rtol=tol)


def test_low_var_kl_hits_both_clamps():
    lp = torch.tensor([0.0, 0.0, 0.0])
    ref = torch.tensor([30.0, -30.0, -5.0])
    got = rk.kl_penalty(lp, ref, estimator="low_var_kl")
    assert got[0] == 10.0  # inner clamp to 20: exp(20) - 21, outer clamp to 10
    assert got[1] == 10.0  # inner clamp to -20: exp(-20) + 19, outer clamp to 10
    torch.testing.assert_close(got[2], torch.tensor(-5.0).exp() + 4)  # inside both clamps


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty_gradcheck(estimator):
    lp, ref = (x.double().requires_grad_(True) for x in _logprobs(2, 5))
    torch.autograd.gradcheck(lambda a, b: rk.kl_penalty(a, b, estimator=estimator), (lp, ref))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("explicit_index", [False, True])
def test_kl_shaped_rewards_matches_oracle(estimator, explicit_index):
    B, T = 5, 9
    lp, ref = _logprobs(B, T)
    mask = random_mask(B, T)
    scores = torch.randn(B)
    score_index = torch.randint(0, T, (B,)) if explicit_index else None
    rewards, kl = rk.kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.1, estimator=estimator, score_index=score_index)
    for b in range(B):
        m = tolist(mask[b])
        want_kl = [oracle.kl(x, y, estimator) * w for x, y, w in zip(tolist(lp[b]), tolist(ref[b]), m)]
        want = [-0.1 * k for k in want_kl]
        valid = [t for t in range(T) if m[t]]
        where = int(score_index[b]) if explicit_index else (valid[-1] if valid else None)
        if where is not None:
            want[where] += float(scores[b])
        torch.testing.assert_close(kl[b].double(), torch.tensor(want_kl, dtype=torch.float64), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rewards[b].double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=1e-6)


def test_kl_shaped_rewards_all_masked_row_gets_nothing():
    lp, ref = _logprobs(2, 4)
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    rewards, _ = rk.kl_shaped_rewards(torch.tensor([3.0, 5.0]), lp, ref, mask, kl_coef=0.0)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0, 0, 0], [0, 5.0, 0, 0]]))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("clamp", [None, 0.3])
def test_kl_penalty_gradients_match_the_reference(backend_name, estimator, clamp):
    lp, ref = (x.requires_grad_(True) for x in _logprobs(4, 33, spread=8.0))
    lp.data[0, :3] = ref.data[0, :3]  # d = 0 exactly: abs's sign(0) = 0
    g = torch.randn(4, 33)
    rk.kl_penalty(lp, ref, estimator=estimator, clamp=clamp).backward(g)
    got = lp.grad.clone(), ref.grad.clone()
    lp.grad = ref.grad = None
    rk.kl_penalty(lp, ref, estimator=estimator, clamp=clamp, backend="reference").backward(g)
    torch.testing.assert_close(got, (lp.grad, ref.grad), atol=1e-6, rtol=1e-5)


def test_kl_penalty_backward_hands_out_the_slope_once(backend_name):
    """The first backward scales the kernel's slope buffer in place and hands it out; a
    second backward of the same graph recomputes it: retain_graph, a scaled output and
    grads edited in place between backwards all give the reference's gradients, and
    only the inputs that ask for a gradient get one."""
    lp, ref = _logprobs(3, 17, dtype=torch.float64, spread=2.0)
    g = torch.randn(3, 17, dtype=torch.float64)
    x, y = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    want = torch.autograd.grad(rk.kl_penalty(x, y, estimator="k3", backend="reference"), [x, y], g)
    kl = rk.kl_penalty(x, y, estimator="k3")
    kl.backward(2 * g, retain_graph=True)
    torch.testing.assert_close((x.grad, y.grad), (2 * want[0], 2 * want[1]))
    x.grad.zero_()  # x.grad may share the buffer the first backward handed out
    y.grad.zero_()
    kl.backward(g, retain_graph=True)
    torch.testing.assert_close((x.grad, y.grad), want)
    torch.testing.assert_close(torch.autograd.grad(kl, [x, y], g), want)
    only_ref = rk.kl_penalty(lp, y, estimator="k3")
    (got,) = torch.autograd.grad(only_ref, [y], g)
    torch.testing.assert_close(got, want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kl_penalty_gradient_at_the_clamp_bound(backend_name, dtype):
    # Estimates exactly on the clamp's bounds, on purpose: the clamp passes the gradient
    # on its closed interval on every backend (rlhf_kernels/reference/bounds.py), not
    # torch.clamp's rule at the bound (which changed in torch 2.14). Exact in bf16.
    lp = torch.tensor([[0.5, -0.5, 0.25, 0.75, 1.0, -1.0]], dtype=dtype, requires_grad=True)
    ref = torch.zeros(1, 6, dtype=dtype)
    rk.kl_penalty(lp[:, :4], ref[:, :4], estimator="k1", clamp=0.5).sum().backward()
    # k2 = d^2 / 2 is 0.5 exactly at d = +-1: on the bound, so d passes
    rk.kl_penalty(lp[:, 4:], ref[:, 4:], estimator="k2", clamp=0.5).sum().backward()
    want = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, -1.0]], dtype=dtype)
    torch.testing.assert_close(lp.grad, want, atol=0, rtol=0)


@pytest.mark.parametrize("estimator", ["k3", "low_var_kl"])
def test_kl_shaped_rewards_matches_the_reference_with_holes_and_given_index(backend_name, estimator):
    lp, ref = _logprobs(7, 45, spread=3.0)
    mask = random_mask(7, 45)
    scores = torch.randn(7)
    for index in (None, torch.randint(0, 45, (7,))):
        got = rk.kl_shaped_rewards(
            scores, lp, ref, mask, kl_coef=0.05, estimator=estimator, clamp=5.0, score_index=index
        )
        want = rk.kl_shaped_rewards(
            scores, lp, ref, mask, kl_coef=0.05, estimator=estimator, clamp=5.0, score_index=index, backend="reference"
        )
        torch.testing.assert_close(got, want)


def test_opcheck(backend_name):
    if backend_name not in COMPILED:
        pytest.skip("opcheck is for the compiled ops")
    ops = {
        "cpu": (torch.ops.rlhf_kernels.kl_penalty, torch.ops.rlhf_kernels.kl_shaped_rewards),
        "triton": (torch.ops.rlhf_kernels.kl_penalty_triton, torch.ops.rlhf_kernels.kl_shaped_rewards_triton),
    }
    penalty, rewards = ops[backend_name]
    lp, ref = _logprobs(3, 10)
    for need_grad in (False, True):
        torch.library.opcheck(
            penalty.default, (lp.clone().requires_grad_(need_grad), ref, "low_var_kl", 2.0, need_grad)
        )
    mask = random_mask(3, 10)
    torch.library.opcheck(rewards.default, (torch.randn(3), lp, ref, mask, 0.1, "k3", None, None))
    torch.library.opcheck(rewards.default, (torch.randn(3), lp, ref, mask, 0.1, "k1", 1.0, torch.tensor([0, 9, 4])))


def test_torch_compile_fullgraph(backend_name):
    if backend_name not in COMPILED:
        pytest.skip("the compiled ops")
    lp, ref = _logprobs(3, 12)
    lp.requires_grad_(True)
    mask = random_mask(3, 12)

    def step(lp):
        rewards, _ = rk.kl_shaped_rewards(torch.ones(3), lp.detach(), ref, mask, kl_coef=0.1)
        return rk.kl_penalty(lp, ref, estimator="k3").sum() + rewards.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(lp).backward()
    got = lp.grad.clone()
    lp.grad = None
    step(lp).backward()
    torch.testing.assert_close(got, lp.grad)
