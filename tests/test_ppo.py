import itertools

import pytest
import torch

import oracle
import rlhf_kernels as rk
from conftest import backends_of, random_mask, tolist, use_backend
from rlhf_kernels.reference.ppo import AGG_MODES

COMPILED = ("cpu", "triton")


@pytest.fixture(autouse=True, params=backends_of("ppo_policy_loss"))
def backend_name(request, monkeypatch, _fresh_seed):
    """Every test here runs on each backend of the ppo family."""
    return use_backend(request, monkeypatch, "ppo")


POLICY_OPTIONS = [
    dict(clip_low=0.2, clip_high=None, dual_clip=None, log_ratio_clamp=None),
    dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, log_ratio_clamp=None),
    dict(clip_low=0.1, clip_high=0.3, dual_clip=None, log_ratio_clamp=0.5),
    dict(clip_low=0.2, clip_high=0.2, dual_clip=1.5, log_ratio_clamp=20.0),
]


def _batch(B, T, dtype=torch.float32):
    lp = -torch.rand(B, T) * 3
    old = lp + 0.5 * torch.randn(B, T)  # ratios well outside the clip range
    return lp.to(dtype), old.to(dtype), torch.randn(B, T).to(dtype), random_mask(B, T)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("options", POLICY_OPTIONS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 11)])
def test_policy_loss_matches_oracle(agg, options, shape):
    lp, old, adv, mask = _batch(*shape)
    loss, stats = rk.ppo_policy_loss(lp, old, adv, mask, agg=agg, **options)
    high = options["clip_high"] if options["clip_high"] is not None else options["clip_low"]
    per_token = [
        [
            oracle.ppo_token_loss(a, b, c, options["clip_low"], high, options["dual_clip"], options["log_ratio_clamp"])
            for a, b, c in zip(ra, rb, rc)
        ]
        for ra, rb, rc in zip(tolist(lp), tolist(old), tolist(adv))
    ]
    m = tolist(mask)
    want = oracle.aggregate([[t[0] for t in row] for row in per_token], m, agg)
    torch.testing.assert_close(loss.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    flat_m = sum(m, [])
    clipped = [float(t[1]) for row in per_token for t in row]
    k3 = [t[2] for row in per_token for t in row]
    torch.testing.assert_close(
        stats["clipfrac"].double(), torch.tensor(oracle.masked_mean(clipped, flat_m), dtype=torch.float64)
    )
    torch.testing.assert_close(
        stats["approx_kl"].double(),
        torch.tensor(oracle.masked_mean(k3, flat_m), dtype=torch.float64),
        atol=1e-6,
        rtol=1e-5,
    )


def test_dual_clip_bounds_negative_advantages():
    lp, old = torch.tensor([[2.0]]), torch.tensor([[0.0]])  # ratio e^2 = 7.39
    loss, stats = rk.ppo_policy_loss(lp, old, torch.tensor([[-1.0]]), torch.ones(1, 1), dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0) and stats["dual_clipfrac"].item() == 1.0


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("options", POLICY_OPTIONS[1:3])
def test_policy_loss_gradcheck(agg, options):
    lp, old, adv, mask = (x.double() for x in _batch(3, 4))
    lp.requires_grad_(True)
    torch.autograd.gradcheck(lambda x: rk.ppo_policy_loss(x, old, adv, mask, agg=agg, **options)[0], (lp,))


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_matches_oracle(agg, clip):
    B, T = 4, 7
    values, old, returns, mask = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T), random_mask(B, T)
    loss, stats = rk.ppo_value_loss(values, old, returns, mask, clip=clip, agg=agg)
    per_token = [
        [oracle.value_token_loss(a, b, c, clip) for a, b, c in zip(ra, rb, rc)]
        for ra, rb, rc in zip(tolist(values), tolist(old), tolist(returns))
    ]
    m = tolist(mask)
    want = oracle.aggregate([[t[0] for t in row] for row in per_token], m, agg)
    torch.testing.assert_close(loss.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    clipfrac = oracle.masked_mean([float(t[1]) for row in per_token for t in row], sum(m, []))
    torch.testing.assert_close(stats["vf_clipfrac"].double(), torch.tensor(clipfrac, dtype=torch.float64))


def test_value_loss_gradcheck():
    values, old, returns = (torch.randn(3, 4, dtype=torch.float64) for _ in range(3))
    mask = random_mask(3, 4).double()
    values.requires_grad_(True)
    torch.autograd.gradcheck(lambda v: rk.ppo_value_loss(v, old, returns, mask, clip=0.3)[0], (values,))


def test_all_masked_batch_gives_zero_loss_not_nan():
    lp, old, adv, _ = _batch(2, 3)
    for agg, fn in itertools.product(AGG_MODES, ["policy", "value"]):
        mask = torch.zeros(2, 3)
        if fn == "policy":
            loss, _ = rk.ppo_policy_loss(lp, old, adv, mask, agg=agg)
        else:
            loss, _ = rk.ppo_value_loss(lp, old, adv, mask, agg=agg)
        assert loss.item() == 0.0


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("options", POLICY_OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_and_gradient_match_the_reference(backend_name, agg, options, dtype):
    lp, old, adv, mask = _batch(6, 37, dtype)
    old[0, :5] = lp[0, :5]  # ratio exactly 1: the tie of the max inside the clip range
    lp.requires_grad_(True)
    loss, stats = rk.ppo_policy_loss(lp, old, adv, mask, agg=agg, **options)
    loss.backward()
    got = lp.grad.clone()
    lp.grad = None
    want_loss, want_stats = rk.ppo_policy_loss(lp, old, adv, mask, agg=agg, backend="reference", **options)
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got, lp.grad, atol=1e-7, rtol=1e-5)
    for name, value in want_stats.items():
        torch.testing.assert_close(stats[name], value, atol=1e-6, rtol=1e-5)


# Values exactly on a clamp's bound, on purpose: every backend passes the gradient
# on the closed interval (rlhf_kernels/reference/bounds.py). The expected gradients
# are written out, not taken from torch.clamp, whose rule at the bound changed in
# torch 2.14 (0 there, where torch <= 2.13 gives 1). All inputs are exact in bf16.
BOUND_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _bound_tolerance(dtype):
    return dict(atol=0, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", BOUND_DTYPES)
def test_policy_gradient_at_the_log_ratio_clamp_bound(backend_name, dtype):
    # log ratios on both bounds (+-0.5), inside, and outside; the clip range is wide
    # enough that only log_ratio_clamp acts (ratio clip's max is a tie: full gradient).
    lp = torch.tensor([[0.5, -0.5, 0.25, 0.75, -0.75, 0.5]], dtype=dtype, requires_grad=True)
    old = torch.zeros(1, 6, dtype=dtype)
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, -1.0]], dtype=dtype)
    loss, _ = rk.ppo_policy_loss(lp, old, adv, torch.ones(1, 6), clip_low=0.9, clip_high=10.0, log_ratio_clamp=0.5)
    loss.backward()
    e = torch.tensor([0.5, -0.5, 0.25, 0.5, -0.5, 0.5], dtype=torch.float64).exp()
    passes = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # the bounds pass
    want = (-adv.double() * e * passes / 6).to(dtype)
    torch.testing.assert_close(lp.grad, want, **_bound_tolerance(dtype))
    want_loss = (-adv.double() * e).mean()
    torch.testing.assert_close(loss.double(), want_loss, **_bound_tolerance(dtype))


@pytest.mark.parametrize("dtype", BOUND_DTYPES)
def test_policy_gradient_at_the_ratio_clip_bounds(backend_name, dtype):
    # The clip range is set from the ratios themselves, so that the reference's ratios
    # lie exactly on 1 - clip_low and 1 + clip_high. There the clipped and unclipped
    # terms tie, each takes half the gradient and the clip passes its half: -A ratio
    # in all. The tokens are the ones whose gradient is -A ratio on either side of
    # the bound too (A > 0 on the lower bound, A < 0 on the upper), so a kernel whose
    # exp differs from torch.exp in the last bit gives the same gradient.
    lp = torch.tensor([[-0.125, 0.125]], dtype=dtype, requires_grad=True)
    adv = torch.tensor([[2.0, -2.0]], dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ratio = lp.detach().to(acc).exp()
    clip_low, clip_high = 1 - ratio[0, 0].item(), ratio[0, 1].item() - 1  # exact in float64
    loss, stats = rk.ppo_policy_loss(
        lp, torch.zeros(1, 2, dtype=dtype), adv, torch.ones(1, 2), clip_low=clip_low, clip_high=clip_high
    )
    loss.backward()
    want = -adv.double() * ratio.double() / 2
    torch.testing.assert_close(lp.grad, want.to(dtype), **_bound_tolerance(dtype))
    assert stats["clipfrac"].item() == 0.0


@pytest.mark.parametrize("dtype", BOUND_DTYPES)
def test_value_gradient_at_the_clip_band_bound(backend_name, dtype):
    # old = 0, clip 0.5: v on the band's upper and lower edges, inside, and outside with
    # the clipped error the larger (so the loss is the clipped one and the clamp blocks).
    v = torch.tensor([[0.5, -0.5, 0.25, 0.75]], dtype=dtype, requires_grad=True)
    returns = torch.tensor([[2.0, -2.0, 1.0, 2.0]], dtype=dtype)
    loss, stats = rk.ppo_value_loss(v, torch.zeros(1, 4, dtype=dtype), returns, torch.ones(1, 4), clip=0.5)
    loss.backward()
    want = torch.tensor([[-1.5, 1.5, -0.75, 0.0]], dtype=torch.float64) / 4  # (v - R), 0 outside
    torch.testing.assert_close(v.grad, want.to(dtype), **_bound_tolerance(dtype))
    assert stats["vf_clipfrac"].item() == 0.25


@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_value_loss_gradient_matches_the_reference(backend_name, clip, agg):
    values, old, returns, mask = torch.randn(5, 23), torch.randn(5, 23), torch.randn(5, 23), random_mask(5, 23)
    values.requires_grad_(True)
    loss, stats = rk.ppo_value_loss(values, old, returns, mask, clip=clip, agg=agg)
    loss.backward()
    got = values.grad.clone()
    values.grad = None
    want_loss, want_stats = rk.ppo_value_loss(values, old, returns, mask, clip=clip, agg=agg, backend="reference")
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(got, values.grad)
    torch.testing.assert_close(stats["vf_clipfrac"], want_stats["vf_clipfrac"])


def test_no_gradient_buffer_without_autograd(backend_name):
    lp, old, adv, mask = _batch(3, 8)
    with torch.no_grad():
        loss, _ = rk.ppo_policy_loss(lp.requires_grad_(True), old, adv, mask)
    assert not loss.requires_grad


@pytest.mark.parametrize("options", POLICY_OPTIONS[1:3])
def test_opcheck(backend_name, options):
    if backend_name not in COMPILED:
        pytest.skip("opcheck is for the compiled ops")
    from rlhf_kernels.ops import ppo as ppo_ops

    policy = {"cpu": torch.ops.rlhf_kernels.ppo_policy_loss, "triton": torch.ops.rlhf_kernels.ppo_policy_loss_triton}
    value = {"cpu": torch.ops.rlhf_kernels.ppo_value_loss, "triton": torch.ops.rlhf_kernels.ppo_value_loss_triton}
    lp, old, adv, mask = _batch(4, 9)
    weight = ppo_ops.row_weights(mask.sum(-1), mask.shape[1], "seq-mean-token-mean")
    for need_grad in (False, True):
        torch.library.opcheck(
            policy[backend_name].default,
            (
                lp.clone().requires_grad_(need_grad),
                old,
                adv,
                mask,
                weight,
                options["clip_low"],
                options["clip_high"],
                options["dual_clip"],
                options["log_ratio_clamp"],
                need_grad,
            ),
        )
        torch.library.opcheck(
            value[backend_name].default, (lp.clone().requires_grad_(need_grad), old, adv, mask, weight, 0.2, need_grad)
        )


def test_torch_compile_fullgraph(backend_name):
    if backend_name not in COMPILED:
        pytest.skip("the compiled ops")
    lp, old, adv, mask = _batch(4, 11)
    values = torch.randn(4, 11, requires_grad=True)
    lp.requires_grad_(True)

    def step(lp, values):
        policy, stats = rk.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-mean")
        value, _ = rk.ppo_value_loss(values, old, adv, mask)
        return policy + 0.5 * value + 0 * stats["clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(lp, values).backward()
    got = lp.grad.clone(), values.grad.clone()
    lp.grad = values.grad = None
    step(lp, values).backward()
    torch.testing.assert_close(got, (lp.grad, values.grad))
