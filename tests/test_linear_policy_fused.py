"""linear_policy_loss's route with the gradient finished in the forward (ops/linear_policy.py,
ops/fused_linear.py): the same loss, statistics and gradients as the unfused route on the
same backend, in one chunk and in chunks of one row, over the loss types and options it
takes; the batch-coupled ones, no-grad calls and a bias take the unfused route; exact
double backward."""

import pytest
import torch

import rlhf_kernels as rk
from conftest import count_calls, random_mask
from rlhf_kernels.ops import linear_policy
from rlhf_kernels.reference import logprobs as reference_logprobs

pytestmark = pytest.mark.skipif(
    "cpu" not in rk.backend.available("linear_policy_loss", "cpu"), reason="needs the C++ extension"
)


def _inputs(B, T, H, V, dtype=torch.float32):
    mask = random_mask(B, T)
    base = -3 * torch.rand(B, T)
    return dict(
        hidden=torch.randn(B, T, H).to(dtype),
        weight=(torch.randn(V, H) / H**0.5).to(dtype),
        labels=torch.randint(0, V, (B, T)),
        mask=mask,
        old_logprobs=base + 0.3 * torch.randn(B, T),
        advantages=torch.randn(B),
        ref_logprobs=base + 0.2 * torch.randn(B, T),
    )


@pytest.fixture
def routes(monkeypatch):
    """Counts the fused route's calls."""
    return count_calls(monkeypatch, linear_policy, "grouped_loss")


def _run(inputs, **options):
    tensors = {k: v.clone().requires_grad_(k in ("hidden", "weight")) for k, v in inputs.items()}
    loss, stats = rk.linear_policy_loss(**tensors, backend="cpu", **options)
    grads = torch.autograd.grad(loss, [tensors["hidden"], tensors["weight"]])
    return loss, stats, grads


CASES = {
    "grpo": dict(loss_type="grpo"),
    "dapo+k3": dict(loss_type="dapo", kl_coef=0.05, kl_estimator="k3"),
    "dr_grpo": dict(loss_type="dr_grpo", horizon=11.0),
    "bnpo-global": dict(loss_type="bnpo", global_tokens=97.0),
    "gspo": dict(loss_type="gspo"),
    "cispo+is": dict(loss_type="cispo", is_weights=True),
    "sapo": dict(loss_type="sapo"),
    "luspo-dual": dict(loss_type="luspo", dual_clip=3.0),
    "vespo": dict(loss_type="vespo"),
    "seq-level": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "rollout-seq": dict(loss_type="grpo", rollout_correction="sequence_truncate", rollout_clip_max=2.0),
}


@pytest.mark.parametrize("rows_per_chunk", [None, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_route_matches_the_unfused_route(routes, monkeypatch, case, rows_per_chunk):
    B, T, H, V = 5, 7, 24, 600
    inputs = _inputs(B, T, H, V)
    options = dict(CASES[case])
    if options.pop("is_weights", False):
        options["is_weights"] = 0.5 + torch.rand(B, T)
    if "rollout_correction" in options:
        options["rollout_logprobs"] = inputs["old_logprobs"] + 0.1 * torch.randn(B, T)
    if rows_per_chunk:
        monkeypatch.setattr(reference_logprobs, "CHUNK_ELEMENTS", T * V * rows_per_chunk)
    loss, stats, grads = _run(inputs, **options)
    assert routes, "the fused route was not taken"
    monkeypatch.setattr(linear_policy, "applies", lambda *a: False)
    want_loss, want_stats, want_grads = _run(inputs, **options)
    # The loss and stats are policy_loss on the same log-probs: the same bits.
    assert torch.equal(loss, want_loss)
    assert stats.keys() == want_stats.keys()
    for name in stats:
        assert torch.equal(stats[name], want_stats[name]), name
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_bfloat16(routes, monkeypatch):
    inputs = _inputs(4, 6, 32, 500, torch.bfloat16)
    loss, _, grads = _run(inputs, loss_type="dapo")
    assert routes
    monkeypatch.setattr(linear_policy, "applies", lambda *a: False)
    want_loss, _, want_grads = _run(inputs, loss_type="dapo")
    assert torch.equal(loss, want_loss)
    for got, want in zip(grads, want_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type="clip_cov"),
        dict(loss_type="grpo", entropy_coef=0.01),
        dict(loss_type="grpo", top_entropy_quantile=0.5),
        dict(loss_type="grpo", bias=True),
    ],
    ids=["clip_cov", "entropy_coef", "top_entropy_quantile", "bias"],
)
def test_batch_coupled_options_take_the_unfused_route(routes, options):
    inputs = _inputs(3, 5, 16, 300)
    options = dict(options)
    if options.pop("bias", False):
        options["bias"] = torch.randn(300, requires_grad=True)
    _run(inputs, **options)
    with torch.no_grad():
        rk.linear_policy_loss(**inputs, backend="cpu")
    assert not routes


def test_empty_batch(routes):
    inputs = _inputs(0, 4, 8, 50)
    loss, stats, (grad_hidden, grad_weight) = _run(inputs)
    assert routes and loss.item() == 0 and grad_weight.abs().sum() == 0 and grad_hidden.shape == (0, 4, 8)


def test_double_backward_is_exact(monkeypatch):
    inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(3, 4, 5, 17).items()}
    second = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(linear_policy, "applies", lambda *a: False)
        hidden = inputs["hidden"].clone().requires_grad_()
        weight = inputs["weight"].clone().requires_grad_()
        # the k3 KL term has curvature where the clipped surrogate may have none
        loss, _ = rk.linear_policy_loss(**{**inputs, "hidden": hidden, "weight": weight}, kl_coef=0.1, backend="cpu")
        (grad_hidden,) = torch.autograd.grad(loss, [hidden], create_graph=True)
        second.append(torch.autograd.grad(grad_hidden.square().sum(), [weight])[0])
    assert second[1].abs().max() > 0
    torch.testing.assert_close(second[0], second[1])
