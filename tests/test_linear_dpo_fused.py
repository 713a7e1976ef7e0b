"""linear_dpo_loss's route with the gradient finished in the forward (ops/linear_dpo.py,
ops/fused_linear.py): the same loss, metrics and gradients as the reference backend, in
one chunk and in chunks of single pairs, on the per-pair loss types; taken only when a
backward will follow; exact double backward."""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels.ops import linear_dpo
from rlhf_kernels.reference import logprobs as reference_logprobs

from conftest import count_calls, random_mask

pytestmark = pytest.mark.skipif(
    "cpu" not in rk.backend.available("linear_dpo_loss", "cpu"), reason="needs the C++ extension"
)

# fp32 / bf16 tolerances: the two routes run the same token kernel and the same GEMMs on
# the same chunks; they differ in the order of the sums over pairs and chunks (a few ulp
# of fp32; bf16 inputs are computed in fp32, so the same bound).
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-5, atol=1e-6)}


def _inputs(n_pairs, T, H, V, dtype):
    hidden = torch.randn(2 * n_pairs, T, H).to(dtype).requires_grad_()
    weight = (torch.randn(V, H) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (2 * n_pairs, T))
    mask = random_mask(2 * n_pairs, T).long()
    return hidden, weight, labels, mask


def _loss_and_grads(backend, hidden, weight, labels, mask, **options):
    loss, metrics = rk.linear_dpo_loss(hidden, weight, labels, mask, backend=backend, **options)
    grads = torch.autograd.grad(loss, [hidden, weight])
    return loss, metrics, grads


@pytest.fixture
def routes(monkeypatch):
    """Counts the fused route's calls."""
    return count_calls(monkeypatch, linear_dpo, "grouped_loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pairs_per_chunk", [None, 1])
@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type="sigmoid"),
        dict(loss_type="ipo"),  # average=True: per-token means
        dict(loss_type=["hinge", "robust"], loss_weights=[0.3, 0.7], label_smoothing=0.1),
        dict(loss_type="sigmoid", reference_free=True, temperature=0.7),
        dict(loss_type="apo_zero", weights="per pair"),
    ],
    ids=["sigmoid", "ipo-average", "multi-loss", "reference-free", "wpo-weights"],
)
def test_fused_route_matches_the_reference(routes, monkeypatch, dtype, pairs_per_chunk, options):
    n_pairs, T, H, V = 3, 7, 24, 1000
    hidden, weight, labels, mask = _inputs(n_pairs, T, H, V, dtype)
    if pairs_per_chunk is not None:  # chunks of one pair each: three chunks
        monkeypatch.setattr(reference_logprobs, "CHUNK_ELEMENTS", 2 * T * V * pairs_per_chunk)
    options = dict(options)
    if options.get("weights") == "per pair":
        options["weights"] = torch.rand(n_pairs)
    if not options.get("reference_free"):
        options["ref_hidden"] = torch.randn(2 * n_pairs, T, H).to(dtype)
    loss, metrics, grads = _loss_and_grads("cpu", hidden, weight, labels, mask, **options)
    assert routes, "the fused route was not taken"
    want_loss, want_metrics, want_grads = _loss_and_grads("reference", hidden, weight, labels, mask, **options)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(loss, want_loss, **tol)
    for name in want_metrics:
        torch.testing.assert_close(metrics[name], want_metrics[name], **tol, msg=name)
    for got, want in zip(grads, want_grads):
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_batch_coupled_types_and_no_grad_take_the_unfused_route(routes):
    hidden, weight, labels, mask = _inputs(2, 5, 16, 300, torch.float32)
    rk.linear_dpo_loss(hidden, weight, labels, mask, reference_free=True, loss_type="sft", backend="cpu")
    with torch.no_grad():
        rk.linear_dpo_loss(hidden, weight, labels, mask, reference_free=True, backend="cpu")
    rk.linear_dpo_loss(hidden.detach(), weight.detach(), labels, mask, reference_free=True, backend="cpu")
    assert not routes


def test_no_pairs_gives_zero_loss_and_zero_gradients(routes):
    hidden, weight, labels, mask = _inputs(0, 4, 8, 50, torch.float32)
    loss, metrics, (grad_hidden, grad_weight) = _loss_and_grads(
        "cpu", hidden, weight, labels, mask, reference_free=True
    )
    assert routes and loss.item() == 0 and grad_weight.abs().sum() == 0 and grad_hidden.shape == hidden.shape
    assert all(value.item() == 0 for value in metrics.values())


def test_loss_scale_and_retained_graph():
    """backward of 3 * loss scales the stored gradients; a retained graph gives them twice."""
    hidden, weight, labels, mask = _inputs(2, 5, 16, 300, torch.float32)
    loss, _ = rk.linear_dpo_loss(hidden, weight, labels, mask, reference_free=True, backend="cpu")
    (once,) = torch.autograd.grad(loss, [weight], retain_graph=True)
    (3 * loss).backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(weight.grad, 4 * once)


def test_double_backward_is_exact():
    hidden, weight, labels, mask = _inputs(2, 3, 5, 17, torch.float64)
    options = dict(reference_free=True, loss_type="sigmoid")
    second = {}
    for backend in ("cpu", "reference"):
        loss, _ = rk.linear_dpo_loss(hidden, weight, labels, mask, backend=backend, **options)
        (grad_hidden,) = torch.autograd.grad(loss, [hidden], create_graph=True)
        second[backend] = torch.autograd.grad(grad_hidden.square().sum(), [weight])[0]
    assert second["reference"].abs().max() > 0
    torch.testing.assert_close(second["cpu"], second["reference"])
