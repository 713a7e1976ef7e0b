import pytest
import torch

import oracle
import rlhf_kernels as rk
from conftest import backends_of, tolist, use_backend
from rlhf_kernels import backend as backends
from rlhf_kernels.reference import logprobs as ref_logprobs

COMPILED = ("cpu", "triton")


@pytest.fixture(autouse=True, params=backends_of("token_logprobs"))
def backend_name(request, monkeypatch, _fresh_seed):
    """Every test here runs on each backend of the logprobs family (Triton in its
    interpreter here; tests/test_gpu.py runs it on CUDA tensors)."""
    return use_backend(request, monkeypatch, "logprobs")


# bf16 logits carry 8 mantissa bits; fp32 accumulation of the reference then
# agrees with the float64 oracle (fed the same rounded logits) to ~1e-5.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-10}
OPTIONS = [
    {},
    {"temperature": 0.7},
    {"softcap": 5.0},
    {"logit_scale": 0.5, "temperature": 1.3, "softcap": 3.0},
]


def _labels(shape, V, ignore_fraction=0.25, ignore_index=-100):
    labels = torch.randint(0, V, shape)
    return torch.where(torch.rand(shape) < ignore_fraction, torch.full_like(labels, ignore_index), labels)


def _oracle(logits, labels, ignore_index=-100, **opts):
    rows = tolist(logits.reshape(-1, logits.shape[-1]))
    lp, h = oracle.token_logprobs(rows, labels.reshape(-1).tolist(), ignore_index=ignore_index, **opts)
    shape = labels.shape
    return torch.tensor(lp, dtype=torch.float64).reshape(shape), torch.tensor(h, dtype=torch.float64).reshape(shape)


def test_hand_computed_case():
    # softmax([0, ln 2, ln 5]) = [1/8, 2/8, 5/8]
    logits = torch.tensor([[0.0, 0.6931471805599453, 1.6094379124341003]], dtype=torch.float64)
    lp, h = rk.token_logprobs(logits, torch.tensor([1]), return_entropy=True)
    p = torch.tensor([1, 2, 5], dtype=torch.float64) / 8
    torch.testing.assert_close(lp, torch.log(torch.tensor([0.25], dtype=torch.float64)))
    torch.testing.assert_close(h, -(p * p.log()).sum().reshape(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 1, 4)])
def test_token_logprobs_matches_oracle(dtype, opts, shape):
    V = 37  # not a power of two, not a multiple of any block
    logits = (3 * torch.randn(*shape, V)).to(dtype)
    labels = _labels(shape, V)
    lp, h = rk.token_logprobs(logits, labels, return_entropy=True, **opts)
    assert lp.shape == shape and h.shape == shape
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want_lp, want_h = _oracle(logits, labels, **opts)
    torch.testing.assert_close(lp.double(), want_lp, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(h.double(), want_h, atol=TOL[dtype], rtol=TOL[dtype])
    assert (lp <= 0).all()


def test_all_ignored_rows_give_zero_and_zero_grad():
    logits = torch.randn(4, 11, requires_grad=True)
    labels = torch.full((4,), 7)
    labels[1:3] = -1
    lp, h = rk.token_logprobs(logits, labels, ignore_index=-1, return_entropy=True)
    assert lp[1:3].eq(0).all() and h[1:3].eq(0).all()
    (lp.sum() + h.sum()).backward()
    assert logits.grad[1:3].eq(0).all() and logits.grad[0].abs().sum() > 0


@pytest.mark.parametrize("opts", OPTIONS)
def test_token_logprobs_gradcheck(opts):
    logits = torch.randn(3, 2, 9, dtype=torch.float64, requires_grad=True)
    labels = _labels((3, 2), 9)
    labels[0, 0] = 4  # at least one valid row
    torch.autograd.gradcheck(lambda x: rk.token_logprobs(x, labels, return_entropy=True, **opts), (logits,))


def test_chunked_forward_and_backward_match_unchunked(monkeypatch):
    V = 13
    logits = torch.randn(10, V, dtype=torch.float64, requires_grad=True)
    labels = _labels((10,), V)
    grads = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)

    def run():
        logits.grad = None
        lp, h = rk.token_logprobs(logits, labels, return_entropy=True, temperature=0.9)
        torch.autograd.backward([lp, h], list(grads))
        return lp.detach(), h.detach(), logits.grad.clone()

    whole = run()
    monkeypatch.setattr(ref_logprobs, "CHUNK_ELEMENTS", 3 * V)  # 4 chunks, the last one short
    # (the cpu backend chunks only linear_logprobs, so this also checks that it is exact)
    chunked = run()
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


def _linear_inputs(N, H, V, dtype=torch.float64, bias=True):
    hidden = torch.randn(N, H, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, H, dtype=dtype) / H**0.5).requires_grad_(True)
    b = torch.randn(V, dtype=dtype, requires_grad=True) if bias else None
    return hidden, weight, b, _labels((N,), V)


@pytest.mark.parametrize("opts", OPTIONS[:2] + OPTIONS[3:])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_logprobs_matches_logits_path(opts, bias, monkeypatch):
    monkeypatch.setattr(ref_logprobs, "CHUNK_ELEMENTS", 2 * 19)  # several token chunks
    hidden, weight, b, labels = _linear_inputs(7, 5, 19, bias=bias)
    grads = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    lp, h = rk.linear_logprobs(hidden, weight, labels, bias=b, return_entropy=True, **opts)
    torch.autograd.backward([lp, h], list(grads))
    got = [lp, h, hidden.grad, weight.grad] + ([b.grad] if bias else [])

    params = [hidden, weight] + ([b] if bias else [])
    for p in params:
        p.grad = None
    logits = torch.nn.functional.linear(hidden, weight, b)
    want_lp, want_h = _oracle(logits, labels, **opts)
    torch.testing.assert_close(lp, want_lp)
    torch.testing.assert_close(h, want_h)
    lp2, h2 = rk.token_logprobs(logits, labels, return_entropy=True, **opts)
    torch.autograd.backward([lp2, h2], list(grads))
    for a, p in zip(got[2:], params):
        torch.testing.assert_close(a, p.grad)


def test_linear_logprobs_gradcheck_any_upstream_gradient():
    hidden, weight, b, labels = _linear_inputs(4, 3, 6)
    labels[0] = 2
    torch.autograd.gradcheck(
        lambda x, w, bb: rk.linear_logprobs(x, w, labels, bias=bb, return_entropy=True, softcap=2.0),
        (hidden, weight, b),
    )


def test_linear_logprobs_frozen_weight_bf16():
    hidden = torch.randn(2, 3, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(29, 16) / 4).to(torch.bfloat16)  # frozen: reference / LoRA policy
    labels = _labels((2, 3), 29)
    lp = rk.linear_logprobs(hidden, weight, labels)
    lp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad is None
    # bf16 logits (rounded as the unfused model rounds them) through the fp64 oracle. A
    # kernel that sums the dot products in another order may round a logit to the
    # neighbouring bf16 value: one ulp (2^-7 relative) on the label logit and on the lse.
    logits = torch.nn.functional.linear(hidden, weight)
    want, _ = _oracle(logits, labels)
    atol = 2 * 2**-7 * logits.abs().max().item()
    torch.testing.assert_close(lp.double(), want, atol=atol, rtol=0)


def test_sequence_logprobs_sum_and_mean():
    hidden, weight, _, _ = _linear_inputs(6, 4, 11)
    hidden3 = hidden.detach().reshape(2, 3, 4)
    labels = torch.randint(0, 11, (2, 3))
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    labels[0, 2] = 999  # masked positions are never read
    total = rk.sequence_logprobs(hidden3, weight, labels, mask)
    mean = rk.sequence_logprobs(hidden3, weight, labels, mask, average=True)
    lp, _ = _oracle(torch.nn.functional.linear(hidden3[0, :2], weight), labels[0, :2])
    torch.testing.assert_close(total, torch.stack([lp.sum(), torch.zeros((), dtype=lp.dtype)]))
    torch.testing.assert_close(mean, torch.stack([lp.mean(), torch.zeros((), dtype=lp.dtype)]))


def test_backend_is_the_one_asked_for(backend_name):
    assert backends.resolve("token_logprobs", "cpu") == backend_name
    assert backends.resolve("linear_logprobs", "cpu") == backend_name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_the_reference(backend_name, dtype):
    # d logits = (g_lp (onehot - p) - g_H p (z - sum p z)) dz/dx: same math, fp32 in
    # both, so the backends agree to fp32 rounding (bf16 output rounding for bf16).
    logits = (4 * torch.randn(6, 45)).to(dtype).requires_grad_(True)
    labels = _labels((6,), 45)
    grads = torch.randn(6), torch.randn(6)
    options = dict(return_entropy=True, softcap=8.0, temperature=0.8)
    lp, h = rk.token_logprobs(logits, labels, **options)
    torch.autograd.backward([lp, h], list(grads))
    got = logits.grad.clone()
    logits.grad = None
    lp_ref, h_ref = rk.token_logprobs(logits, labels, backend="reference", **options)
    torch.autograd.backward([lp_ref, h_ref], list(grads))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, logits.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_opcheck(backend_name, softcap):
    if backend_name not in COMPILED:
        pytest.skip("opcheck is for the compiled ops")
    token_op = {"cpu": torch.ops.rlhf_kernels.token_logprobs, "triton": torch.ops.rlhf_kernels.token_logprobs_triton}
    logits, labels = torch.randn(5, 19, requires_grad=True), _labels((5,), 19)
    for inplace in (False, True):
        torch.library.opcheck(token_op[backend_name].default, (logits, labels, 0.9, softcap, 1.0, -100, True, inplace))
    inplace_op = {
        "cpu": torch.ops.rlhf_kernels.token_logprobs_backward_,
        "triton": torch.ops.rlhf_kernels.token_logprobs_triton_backward_,
    }[backend_name]
    _, entropy, lse = token_op[backend_name](logits.detach(), labels, 0.9, softcap, 1.0, -100, True, False)
    torch.library.opcheck(
        inplace_op.default,
        (logits.detach().clone(), torch.randn(5), torch.randn(5), labels, lse, entropy, 0.9, softcap, 1.0, -100),
    )
    hidden, weight, bias, labels = _linear_inputs(5, 3, 19, dtype=torch.float32)
    for batch_invariant in (False, True):
        torch.library.opcheck(
            torch.ops.rlhf_kernels.linear_logprobs.default,
            (hidden, weight, bias, labels, 0.9, softcap, 1.0, -100, True, backend_name, batch_invariant),
        )


def test_torch_compile_fullgraph_forward_and_backward(backend_name):
    if backend_name not in COMPILED:
        pytest.skip("the compiled ops")
    hidden, weight, bias, labels = _linear_inputs(6, 4, 21, dtype=torch.float32)
    logits = torch.randn(6, 21, requires_grad=True)

    def step(hidden, weight, bias, logits):
        lp, h = rk.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
        return (lp + 0.1 * h).sum() + rk.token_logprobs(logits, labels, temperature=0.7).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inputs = (hidden, weight, bias, logits)
    torch.autograd.backward(compiled(*inputs))
    got = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    torch.autograd.backward(step(*inputs))
    torch.testing.assert_close(got, [x.grad for x in inputs])


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_logits_stay_finite_and_non_positive(backend_name, scale):
    logits = torch.randn(4, 33)
    logits[:, 5] = scale  # one-hot-like rows, or one hugely negative logit
    logits[1] = scale * torch.sign(torch.randn(33))
    labels = torch.tensor([5, 0, 7, -100])
    lp, h = rk.token_logprobs(logits.requires_grad_(True), labels, return_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(h).all() and (lp <= 0).all() and (h >= -1e-6).all()
    want_lp, want_h = _oracle(logits, labels)
    # log-probs down to -2e4 are fp32 numbers with an ulp of 2e-3 there.
    torch.testing.assert_close(lp.double(), want_lp, atol=2 * torch.finfo(torch.float32).eps * 2e4, rtol=1e-5)
    (lp.sum() + h.sum()).backward()
    assert torch.isfinite(logits.grad).all()


def test_vocabulary_of_one_and_hidden_of_one(backend_name):
    lp, h = rk.token_logprobs(torch.randn(3, 1), torch.zeros(3, dtype=torch.long), return_entropy=True)
    assert lp.abs().max() < 1e-6 and h.abs().max() < 1e-6  # p = 1
    hidden, weight, b, labels = _linear_inputs(5, 1, 7)  # H = 1
    lp = rk.linear_logprobs(hidden, weight, labels, bias=b)
    want, _ = _oracle(torch.nn.functional.linear(hidden, weight, b), labels)
    torch.testing.assert_close(lp, want)


def test_all_labels_ignored(backend_name):
    hidden, weight, b, _ = _linear_inputs(4, 3, 9)
    lp, h = rk.linear_logprobs(hidden, weight, torch.full((4,), -100), bias=b, return_entropy=True)
    (lp.sum() + h.sum()).backward()
    assert lp.eq(0).all() and h.eq(0).all()
    assert hidden.grad.eq(0).all() and weight.grad.eq(0).all() and b.grad.eq(0).all()


def test_linear_path_extra_memory_is_one_chunk(backend_name, monkeypatch):
    """Forward and backward of N = 4096 tokens over V = 2048 with 64-row chunks: the
    peak of the tracked allocations stays far below one [N, V] fp32 buffer (32 MiB)."""
    if backend_name == "triton":
        pytest.skip("the interpreter is too slow for this size; the chunking is shared with cpu")
    from torch.profiler import ProfilerActivity, profile

    N, H, V = 4096, 32, 2048
    monkeypatch.setattr(ref_logprobs, "CHUNK_ELEMENTS", 64 * V)  # 512 KiB fp32 per chunk
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        lp, h = rk.linear_logprobs(hidden, weight, labels, return_entropy=True)
        (lp.sum() + h.sum()).backward()
    largest = max(event.cpu_memory_usage for event in prof.events())
    # the biggest single allocation: d weight (V x H fp32, 256 KiB) or one chunk's buffers
    assert largest <= 4 * 64 * V * 4, largest


@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 19, 53), (40, 48, 97)])
@pytest.mark.parametrize("opts", OPTIONS)
def test_linear_logprobs_fp32_odd_shapes_values_and_gradients(backend_name, shape, opts):
    """fp32 runs the fused Triton forward (float64 runs chunks): N, H, V not multiples
    of any tile; values against the oracle, gradients against the reference."""
    N, H, V = shape
    hidden, weight, b, labels = _linear_inputs(N, H, V, dtype=torch.float32)
    grads = torch.randn(N), torch.randn(N)
    lp, h = rk.linear_logprobs(hidden, weight, labels, bias=b, return_entropy=True, **opts)
    torch.autograd.backward([lp, h], list(grads))
    got = [hidden.grad, weight.grad, b.grad]
    want_lp, want_h = _oracle(torch.nn.functional.linear(hidden, weight, b), labels, **opts)
    torch.testing.assert_close(lp.double(), want_lp, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(h.double(), want_h, atol=2e-5, rtol=2e-5)
    params = [hidden, weight, b]
    for p in params:
        p.grad = None
    lp_ref, h_ref = rk.linear_logprobs(hidden, weight, labels, bias=b, return_entropy=True, backend="reference", **opts)
    torch.autograd.backward([lp_ref, h_ref], list(grads))
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprobs_no_grad_equals_grad_bit_for_bit(backend_name, dtype):
    """PPO's old log-probs (no_grad) and the trained ones must agree exactly at step 0."""
    hidden = torch.randn(21, 24).to(dtype)
    weight = (torch.randn(70, 24) / 5).to(dtype)
    labels = _labels((21,), 70)
    with torch.no_grad():
        old = rk.linear_logprobs(hidden, weight, labels)
    new = rk.linear_logprobs(hidden.requires_grad_(True), weight, labels)
    assert torch.equal(old, new.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_the_same_gradient_in_the_logits_memory(backend_name, dtype):
    base = (3 * torch.randn(6, 41)).to(dtype).requires_grad_(True)
    labels = _labels((6,), 41)
    grads = torch.randn(6), torch.randn(6)
    results = []
    for inplace in (False, True):
        base.grad = None
        logits = base * 1  # a model's output: a non-leaf the caller does not keep
        lp, h = rk.token_logprobs(logits, labels, return_entropy=True, softcap=6.0, inplace_backward=inplace)
        torch.autograd.backward([lp, h], list(grads))
        results.append((lp.detach(), base.grad.clone(), logits.detach().clone()))
    (lp_a, grad_a, logits_a), (lp_b, grad_b, logits_b) = results
    assert torch.equal(lp_a, lp_b)
    torch.testing.assert_close(grad_a, grad_b, atol=0, rtol=0)
    assert torch.equal(logits_b, grad_b)  # the gradient was written over the logits
    assert not torch.equal(logits_a, grad_a)


def test_inplace_backward_refuses_logits_another_node_still_needs(backend_name):
    """Autograd's version check turns a clash into an error, never a wrong gradient."""
    logits = torch.randn(4, 9, requires_grad=True) * 1
    labels = _labels((4,), 9)
    squares = (logits * logits).sum()  # mul saves `logits` for its own backward...
    lp = rk.token_logprobs(logits, labels, inplace_backward=True)  # ...which runs after this one's
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + squares).backward()


@pytest.mark.parametrize("softcap", [None, 6.0])
def test_bf16_logits_give_the_fp32_computation_of_their_values(backend_name, softcap):
    """bf16 logits are staged as fp32 exactly, and the fp32 gradient is rounded as torch
    rounds (nearest even, NaN kept): bit for bit the fp32 run on the same values. V is
    not a multiple of the 16 lanes; one row has a NaN, one a -inf (masked) logit."""
    if backend_name != "cpu":
        pytest.skip("the C++ kernel's vectorised bf16 rows (Triton blocks bf16 and fp32 rows differently)")
    logits = (4 * torch.randn(9, 1007)).to(torch.bfloat16)
    logits[2, 5], logits[4, :300] = float("nan"), float("-inf")
    labels = _labels((9,), 1007)
    labels[2], labels[4] = 0, 400  # live labels: the NaN row and a live label in the masked row
    grads = torch.randn(9), torch.randn(9)
    results = []
    for x in (logits, logits.float()):
        x = x.clone().requires_grad_(True)
        lp, h = rk.token_logprobs(x, labels, return_entropy=True, softcap=softcap)
        torch.autograd.backward([lp, h], list(grads))
        results.append((lp.detach(), h.detach(), x.grad))
    (lp16, h16, grad16), (lp32, h32, grad32) = results
    assert grad16.dtype == torch.bfloat16 and grad16[2].isnan().all()
    # NaN as NaN (torch's vectorised cast keeps a NaN's sign bit, c10's scalar one does not)
    for got, want in ((lp16, lp32), (h16, h32), (grad16, grad32.to(torch.bfloat16))):
        assert got.isnan().equal(want.isnan()) and got.nan_to_num().equal(want.nan_to_num())
