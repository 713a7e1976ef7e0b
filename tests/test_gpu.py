"""The GPU backends on CUDA tensors against the reference and exact oracles (skipped without CUDA).

The same kernels are checked on CPU tensors everywhere else (Triton's interpreter, the
shared C++ scan); these are the tests the lent GPU machine runs (bench/gpu.py).

Dry run: RLHF_KERNELS_GPU_DRY_RUN=1 runs this file on CPU tensors at tiny sizes (Triton
in its interpreter, torch.compile with the aot_eager backend) and skips what only a GPU
has (streams, CUDA graphs, a second device), so that `python bench/gpu.py --dry-run`
exercises this file's Python in CI. Its results say nothing about a GPU.
"""

import os
from functools import partial

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import backend

DRY_RUN = os.environ.get("RLHF_KERNELS_GPU_DRY_RUN") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"
# conftest skips tests marked cuda when there is no GPU; a dry run must not be skipped.
pytestmark = [] if DRY_RUN else [pytest.mark.cuda]
gpu_only = pytest.mark.skipif(DRY_RUN, reason="needs a real GPU (dry run on CPU tensors)")
FP32, BF16 = torch.float32, torch.bfloat16
DTYPES = [pytest.param(FP32, id="fp32"), pytest.param(BF16, id="bf16")]


def size(gpu: int, tiny: int) -> int:
    """`gpu` on a GPU; `tiny` in a dry run (Triton's interpreter runs kernels in NumPy)."""
    return tiny if DRY_RUN else gpu


def triton_for(op: str):
    return pytest.mark.skipif(
        "triton" not in backend.available(op, DEVICE), reason=f"no triton {op} for {DEVICE} tensors here"
    )


def _labels(N, V):
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[::7] = -100
    return labels


def _randn(*shape, dtype=FP32, scale=1.0):
    return (scale * torch.randn(*shape, device=DEVICE)).to(dtype)


def _close_rel(got, want, tol):
    """Relative Frobenius error: for sums over many rows (d weight), where elementwise
    tolerances are either loose everywhere or flaky somewhere."""
    error = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
    assert error < tol, f"relative error {error:.2e} >= {tol:.0e}"


# ------------------------------------------------------- every GPU kernel vs reference --


@triton_for("token_logprobs")
@pytest.mark.parametrize("dtype,tol", [(FP32, 1e-5), (BF16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("V", [1, size(4099, 37), size(32000, 300)])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_triton_token_logprobs(dtype, tol, V, softcap):
    N = size(67, 9)
    logits = _randn(N, V, dtype=dtype, scale=4).requires_grad_(True)
    labels = _labels(N, V)
    grads = _randn(N), _randn(N)
    outputs = {}
    for name in ("triton", "reference"):
        logits.grad = None
        lp, h = rk.token_logprobs(logits, labels, return_entropy=True, temperature=0.9, softcap=softcap, backend=name)
        torch.autograd.backward([lp, h], list(grads))
        outputs[name] = (lp, h, logits.grad.clone())
    for got, want in zip(outputs["triton"], outputs["reference"]):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@triton_for("linear_logprobs")
@pytest.mark.parametrize("dtype,tol", [(FP32, 1e-4), (BF16, 3e-2)], ids=["fp32", "bf16"])
def test_triton_linear_logprobs(dtype, tol):
    N, H, V = size(300, 9), size(257, 17), size(5003, 61)  # H and V not multiples of any block
    hidden = _randn(N, H, dtype=dtype).requires_grad_(True)
    weight = _randn(V, H, dtype=dtype, scale=H**-0.5).requires_grad_(True)
    labels = _labels(N, V)
    grads = _randn(N), _randn(N)
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
    if kernel not in backend.available("gae", DEVICE):
        pytest.skip(f"no {kernel} gae kernel for {DEVICE} tensors in this build")
    B, T = size(300, 5), size(2570, 40)
    rewards, values = _randn(B, T), _randn(B, T)
    mask = (torch.rand(B, T, device=DEVICE) > 0.2).float()
    got = rk.gae(rewards, values, mask, gamma=0.99, lam=0.95, mask_mode=mode, backend=kernel)
    want = rk.gae(rewards, values, mask, gamma=0.99, lam=0.95, mask_mode=mode, backend="reference")
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-5)


@triton_for("ppo_policy_loss")
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_triton_ppo_losses(agg):
    B, T = size(67, 5), size(1500, 40)
    lp = (-torch.rand(B, T, device=DEVICE) * 3).requires_grad_(True)
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


@triton_for("kl_penalty")
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "low_var_kl"])
def test_triton_kl(estimator):
    B, T = size(33, 5), size(3000, 40)
    lp = (-torch.rand(B, T, device=DEVICE) * 5).requires_grad_(True)
    ref = lp.detach() + 4 * torch.randn_like(lp)
    mask = (torch.rand_like(ref) > 0.2).float()
    scores = _randn(B)
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
    if kernel not in backend.available("gae", DEVICE):
        pytest.skip(f"no {kernel} gae kernel for {DEVICE} tensors in this build")
    T = size(131072, 64) + 3
    rewards, values = _randn(2, T), _randn(2, T)
    mask = (torch.rand(2, T, device=DEVICE) > 0.1).float()
    got = rk.gae(rewards, values, mask, gamma=0.999, lam=0.95, mask_mode=mode, backend=kernel)
    want = rk.gae(rewards.double(), values.double(), mask.double(), gamma=0.999, lam=0.95, mask_mode=mode,
                  backend="reference")  # fmt: skip
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


@triton_for("masked_whiten")
@pytest.mark.parametrize("fill_masked", [True, False])
def test_triton_masked_statistics(fill_masked):
    x = (3 * _randn(size(129, 5), size(4099, 40)) + 1).requires_grad_(True)
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


@triton_for("dpo_loss")
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "exo_pair", "nca_pair", "apo_down"])
def test_triton_dpo_and_rm_losses(loss_type):
    n, B = size(1000, 9), size(300, 5)
    logps = [-torch.rand(n, device=DEVICE) * 40 for _ in range(4)]
    rewards, ranks = _randn(B, 7), torch.randint(0, 4, (B, 7), device=DEVICE)
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


# ------------------------------------------------------------- the way trainers call --


@triton_for("linear_logprobs")
@pytest.mark.parametrize("op", ["token_logprobs", "linear_logprobs"])
def test_bf16_autocast(op):
    """fp32 master weights under torch.autocast(bf16): the lm_head's logits are bf16 (the
    token op gets those); linear_logprobs gets the fp32 hidden and weight. Both backends
    must match the unfused model under the same autocast."""
    N, H, V = size(256, 9), size(512, 17), size(4099, 61)
    hidden = _randn(N, H).requires_grad_(True)
    weight = _randn(V, H, scale=H**-0.5).requires_grad_(True)
    labels = _labels(N, V)
    grads = _randn(N), _randn(N)
    with torch.autocast(DEVICE, dtype=BF16):
        model_logits = torch.nn.functional.linear(hidden, weight)
    assert model_logits.dtype == BF16
    z = model_logits.detach().double()
    want = torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0)[:, None])[:, 0].where(labels != -100, 0)
    results = {}
    for name in ("triton", "reference"):
        hidden.grad = weight.grad = None
        with torch.autocast(DEVICE, dtype=BF16):
            if op == "token_logprobs":
                lp, h = rk.token_logprobs(hidden @ weight.T, labels, return_entropy=True, backend=name)
            else:
                lp, h = rk.linear_logprobs(hidden, weight, labels, return_entropy=True, backend=name)
        torch.autograd.backward([lp, h], list(grads))  # outside autocast, as loss.backward() is
        assert lp.dtype == h.dtype == FP32 and hidden.grad.dtype == weight.grad.dtype == FP32
        torch.testing.assert_close(lp.double(), want, atol=3e-2, rtol=3e-2)
        results[name] = (lp, h, hidden.grad.clone(), weight.grad.clone())
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


@triton_for("token_logprobs")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 3])  # B = 1: logits[:, :-1] is contiguous, a view the op may write over
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_sliced_logits(dtype, B, inplace_backward):
    """token_logprobs(logits[:, :-1], labels[:, 1:]) of a model's [B, T, V] logits."""
    T, V = size(257, 9), size(32000, 300)
    base = _randn(B, T, V, dtype=dtype, scale=4).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[:, ::5] = -100
    grads = _randn(B, T - 1), _randn(B, T - 1)
    results = {}
    for name in ("triton", "reference"):
        base.grad = None
        logits = base * 1.0  # a model output, not a leaf (what inplace_backward is for)
        lp, h = rk.token_logprobs(
            logits[:, :-1], labels[:, 1:], return_entropy=True, inplace_backward=inplace_backward, backend=name
        )
        torch.autograd.backward([lp, h], list(grads))
        assert (base.grad[:, -1] == 0).all()
        results[name] = (lp, h, base.grad.clone())
    # Against the out-of-place reference too: the in-place path must change nothing.
    base.grad = None
    lp, h = rk.token_logprobs(base[:, :-1], labels[:, 1:], return_entropy=True, backend="reference")
    torch.autograd.backward([lp, h], list(grads))
    tol = 1e-5 if dtype == FP32 else 2e-2
    for name in ("triton", "reference"):
        for got, want in zip(results[name], (lp, h, base.grad)):
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


# ------------------------------------------------------------------- vocabulary sizes --

# (N, V, dtype): Qwen2's and Gemma 3's vocabularies, one row and 64k rows. 64k rows of
# 262144 bf16 logits are 32 GiB, and 64k x 152064 fp32 are 37 GiB: token_logprobs runs
# those with inplace_backward and checks a sample of rows against a float64 oracle.
LARGE = [
    pytest.param(N, size(V, tiny_v), dtype, id=f"N{N}-V{V}-{str(dtype)[6:]}")
    for N, V, tiny_v, dtype in [
        (1, 152064, 300, FP32),
        (1, 262144, 257, FP32),
        (1, 152064, 300, BF16),
        (1, 262144, 257, BF16),
        (65536, 152064, 300, FP32),
        (65536, 262144, 257, BF16),
    ]
]


def _oracle(x, labels, g_lp, g_h, temperature=1.0):
    """Exact float64 log-prob, entropy and d(g_lp lp + g_h H)/dx per row; x == -inf (or a
    float64 value so negative that exp underflows) is a masked column: p = 0, gradient 0."""
    z = x.double() / temperature
    masked = torch.isinf(z)
    lse = torch.logsumexp(z, -1, keepdim=True)
    p = torch.exp(z - lse)
    z_or_0 = torch.where(masked, 0.0, z)
    entropy = lse[:, 0] - (p * z_or_0).sum(-1)
    valid = labels != -100
    safe = labels.clamp_min(0)[:, None]
    lp = torch.where(valid, z.gather(-1, safe)[:, 0] - lse[:, 0], 0.0)
    onehot = torch.zeros_like(z).scatter_(-1, safe, 1.0)
    dz = g_lp.double()[:, None] * (onehot - p) - g_h.double()[:, None] * p * (z_or_0 - (lse - entropy[:, None]))
    dz = torch.where(masked | ~valid[:, None], 0.0, dz) / temperature
    return lp, torch.where(valid, entropy, 0.0), dz


@triton_for("token_logprobs")
@pytest.mark.parametrize("N,V,dtype", LARGE)
def test_large_token_logprobs(N, V, dtype):
    N = size(N, min(N, 8))
    x = torch.empty(N, V, device=DEVICE, dtype=dtype).normal_(0, 4)
    labels = _labels(N, V)
    rows = torch.unique(torch.cat([torch.tensor([0, N // 2, N - 1]), torch.randint(0, N, (16,))])).to(DEVICE)
    sample = x[rows].clone()
    grads = _randn(N), _randn(N)
    logits = x.requires_grad_(True)
    inplace = N > 1  # no second [N, V] buffer
    lp, h = rk.token_logprobs(logits, labels, return_entropy=True, inplace_backward=inplace, backend="triton")
    (grad,) = torch.autograd.grad([lp, h], [logits], list(grads))
    want_lp, want_h, want_grad = _oracle(sample, labels[rows], grads[0][rows], grads[1][rows])
    torch.testing.assert_close(lp[rows].double(), want_lp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h[rows].double(), want_h, atol=1e-4, rtol=1e-4)
    tol = 1e-5 if dtype == FP32 else 2e-2
    torch.testing.assert_close(grad[rows].double(), want_grad, atol=tol, rtol=tol)


@triton_for("linear_logprobs")
@pytest.mark.parametrize("N,V,dtype", LARGE)
def test_large_linear_logprobs(N, V, dtype):
    # One row: H = 8256 makes the weight V x H > 2^31 elements (int32 offsets overflow).
    # 64k rows: fp32 dots run in IEEE fp32 (no tensor cores), so a smaller H for them.
    N = size(N, min(N, 8))
    H = size(8256 if N == 1 else 256 if dtype == FP32 else 1024, 16)
    hidden = _randn(N, H, dtype=dtype).requires_grad_(True)
    weight = _randn(V, H, dtype=dtype, scale=H**-0.5).requires_grad_(True)
    labels = _labels(N, V)
    grads = _randn(N), _randn(N)
    results = {}
    for name in ("triton", "reference"):
        hidden.grad = weight.grad = None
        lp, h = rk.linear_logprobs(hidden, weight, labels, return_entropy=True, backend=name)
        torch.autograd.backward([lp, h], list(grads))
        results[name] = (lp, h, hidden.grad, weight.grad)
    tol = 1e-4 if dtype == FP32 else 3e-2
    for got, want in zip(results["triton"][:3], results["reference"][:3]):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    _close_rel(results["triton"][3], results["reference"][3], 1e-4 if dtype == FP32 else 1e-2)


# ---------------------------------------------------------------- masked vocabularies --


MASK_ROWS = ("first tile masked", "every third masked", "none masked", "ignored label")


def _bad_rows(flags):
    """The test_masked_vocabulary rows where `flags` is set, by name, for messages."""
    return [MASK_ROWS[row] for row in flags.reshape(len(MASK_ROWS), -1).any(-1).nonzero().flatten().tolist()]


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fill", ["-inf", "finfo.min"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_masked_vocabulary(backend_name, dtype, fill, temperature):
    """Masked columns (HF logits processors write -inf or finfo.min): log-prob and
    entropy exact over the rest, never NaN, and exactly zero gradient on them. Row 0's
    first 4096-column tile (the forward's whole first tile) is all masked."""
    if backend_name not in backend.available("token_logprobs", DEVICE):
        pytest.skip(f"no {backend_name} token_logprobs for {DEVICE} tensors here")
    V = size(32000, 4133)  # > 4096 in a dry run too, so row 0 has a masked first tile
    value = float("-inf") if fill == "-inf" else torch.finfo(dtype).min
    x = _randn(4, V, dtype=dtype, scale=4)
    cols = torch.arange(V, device=DEVICE)
    masks = torch.stack([cols < 4096, (cols % 3 == 0) | (cols < 11), cols < 0, cols % 2 == 0])
    x = x.masked_fill(masks, value)
    labels = torch.tensor([4100, 13, 5, -100], device=DEVICE)  # never a masked column
    grads = _randn(4), _randn(4)
    logits = x.clone().requires_grad_(True)
    lp, h = rk.token_logprobs(logits, labels, return_entropy=True, temperature=temperature, backend=backend_name)
    torch.autograd.backward([lp, h], list(grads))
    oracle_input = x.double().masked_fill(masks, float("-inf"))  # finfo.min is a mask, not a logit
    want_lp, want_h, want_grad = _oracle(oracle_input, labels, *grads, temperature=temperature)
    for name, out in (("log-prob", lp), ("entropy", h), ("d logits", logits.grad)):
        bad = _bad_rows(~torch.isfinite(out))
        assert not bad, f"NaN/inf {name} in rows {bad}"
    nonzero = (logits.grad != 0) & masks
    assert not _bad_rows(nonzero), f"nonzero gradient on masked logits in rows {_bad_rows(nonzero)}"
    torch.testing.assert_close(lp.double(), want_lp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h.double(), want_h, atol=1e-4, rtol=1e-4)
    tol = 1e-5 if dtype == FP32 else 2e-2
    torch.testing.assert_close(logits.grad.double(), want_grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("fill", ["-inf", "finfo.min"])
def test_masked_vocabulary_through_bias(backend_name, fill):
    """linear_logprobs with a bias that masks columns, the first V tile all of them."""
    if backend_name not in backend.available("linear_logprobs", DEVICE):
        pytest.skip(f"no {backend_name} linear_logprobs for {DEVICE} tensors here")
    N, H, V = size(64, 5), size(128, 16), size(1000, 70)
    cols = torch.arange(V, device=DEVICE)
    masked = (cols < size(300, 40)) | (cols % 5 == 0)
    bias = torch.zeros(V, device=DEVICE).masked_fill(masked, float("-inf") if fill == "-inf" else torch.finfo().min)
    bias.requires_grad_(True)
    hidden = _randn(N, H).requires_grad_(True)
    weight = _randn(V, H, scale=H**-0.5).requires_grad_(True)
    free = cols[~masked]
    labels = free[torch.randint(0, len(free), (N,), device=DEVICE)]  # never a masked column
    grads = _randn(N), _randn(N)
    lp, h = rk.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, backend=backend_name)
    torch.autograd.backward([lp, h], list(grads))
    logits = (hidden.detach().double() @ weight.detach().double().T).masked_fill(masked, float("-inf"))
    want_lp, want_h, want_dz = _oracle(logits, labels, *grads)
    for name, out in (("log-prob", lp), ("entropy", h), ("d hidden", hidden.grad), ("d weight", weight.grad)):
        assert torch.isfinite(out).all(), f"NaN/inf {name}"
    assert torch.isfinite(bias.grad).all(), "NaN/inf d bias"
    assert (bias.grad[masked] == 0).all() and (weight.grad[masked] == 0).all(), "gradient on masked columns"
    torch.testing.assert_close(lp.double(), want_lp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h.double(), want_h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bias.grad.double(), want_dz.sum(0), atol=1e-4, rtol=1e-4)


@triton_for("linear_logprobs")
def test_strided_bias():
    """A bias that is a strided view (every other element of a buffer)."""
    N, H, V = size(300, 9), size(256, 16), size(5003, 61)
    hidden = _randn(N, H).requires_grad_(True)
    weight = _randn(V, H, scale=H**-0.5).requires_grad_(True)
    storage = _randn(2 * V).requires_grad_(True)
    labels = _labels(N, V)
    grads = _randn(N), _randn(N)
    results = {}
    for name in ("triton", "reference"):
        hidden.grad = weight.grad = storage.grad = None
        bias = storage[::2]
        assert not bias.is_contiguous()
        lp, h = rk.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, backend=name)
        torch.autograd.backward([lp, h], list(grads))
        results[name] = (lp, h, hidden.grad.clone(), weight.grad.clone(), storage.grad.clone())
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------- torch.compile --


def _compile_case(op):
    """(function of tensors -> outputs, inputs, indices of the differentiable inputs)."""
    N, H, V = size(512, 9), size(256, 16), size(4099, 61)
    if op == "token_logprobs":
        fn = partial(rk.token_logprobs, return_entropy=True, temperature=0.7, backend="triton")
        return fn, [_randn(N, V, scale=4), _labels(N, V)], (0,)
    if op == "linear_logprobs":
        fn = partial(rk.linear_logprobs, return_entropy=True, backend="triton")
        return fn, [_randn(N, H), _randn(V, H, scale=H**-0.5), _labels(N, V)], (0, 1)
    B, T = size(64, 5), size(1024, 40)
    lp = -torch.rand(B, T, device=DEVICE) * 3

    def policy(lp, old, adv, mask):
        loss, stats = rk.ppo_policy_loss(lp, old, adv, mask, clip_high=0.28, dual_clip=3.0, backend="triton")
        return (loss, *stats.values())

    mask = (torch.rand(B, T, device=DEVICE) > 0.2).float()
    return policy, [lp, lp + 0.3 * torch.randn_like(lp), torch.randn_like(lp), mask], (0,)


@pytest.mark.parametrize("op", ["token_logprobs", "linear_logprobs", "ppo_policy_loss"])
def test_compile_fullgraph(op):
    if "triton" not in backend.available(op, DEVICE):
        pytest.skip(f"no triton {op} for {DEVICE} tensors here")
    torch._dynamo.reset()
    fn, inputs, differentiable = _compile_case(op)
    # A dry run checks that Dynamo traces one graph (aot_eager); a GPU runs inductor too.
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if DRY_RUN else "inductor")
    results = []
    for run in (fn, compiled):
        leaves = [x.clone().requires_grad_(i in differentiable) for i, x in enumerate(inputs)]
        outputs = run(*leaves)
        sum(o.sum() for o in outputs if o.requires_grad).backward()
        results.append([*outputs, *(leaves[i].grad for i in differentiable)])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------- streams, graphs, other devices --
# Last in the file: a kernel that launches on the wrong device or stream can leave the
# CUDA context broken for every test after it.

STREAM_OPS = ["token_logprobs", "linear_logprobs", "gae", "masked_whiten", "ppo_policy_loss", "kl_penalty"]


def _stream_case(op, device):
    """(function of tensors -> output tensors, inputs, indices of the differentiable inputs)."""
    N, H, V, B, T = 1024, 512, 32000, 64, 4096
    labels = torch.randint(0, V, (N,), device=device)
    lp = -torch.rand(B, T, device=device) * 3
    mask = (torch.rand(B, T, device=device) > 0.2).float()
    cases = {
        "token_logprobs": (lambda x, y: rk.token_logprobs(x, y, return_entropy=True),
                           [4 * torch.randn(N, V, device=device), labels], (0,)),
        "linear_logprobs": (lambda h, w, y: rk.linear_logprobs(h, w, y, return_entropy=True),
                            [torch.randn(N, H, device=device), torch.randn(V, H, device=device) / H**0.5, labels],
                            (0, 1)),
        "gae": (lambda r, v, m: rk.gae(r, v, m, gamma=0.99, lam=0.95), [torch.randn_like(lp), lp, mask], ()),
        "masked_whiten": (lambda x, m: (rk.masked_whiten(x, m),), [torch.randn_like(lp), mask], (0,)),
        "ppo_policy_loss": (lambda a, b, c, m: rk.ppo_policy_loss(a, b, c, m, clip_high=0.28)[:1],
                            [lp, lp + 0.3 * torch.randn_like(lp), torch.randn_like(lp), mask], (0,)),
        "kl_penalty": (lambda a, b: (rk.kl_penalty(a, b, estimator="k3"),), [lp, lp + torch.randn_like(lp)], (0, 1)),
    }  # fmt: skip
    return cases[op]


def _forward_backward(fn, inputs, differentiable):
    leaves = [x.detach().clone().requires_grad_(i in differentiable) for i, x in enumerate(inputs)]
    outputs = fn(*leaves)
    if differentiable:
        sum(o.sum() for o in outputs if o.requires_grad).backward()
    return [*(o.detach() for o in outputs), *(leaves[i].grad for i in differentiable)]


@gpu_only
@pytest.mark.parametrize("op", STREAM_OPS)
def test_side_stream(op):
    """The op on a side stream while the default stream sleeps: a kernel launched on the
    default (or legacy) stream instead of the current one would run after the sleep, so
    the side stream's copy of its results would read unwritten memory."""
    fn, inputs, differentiable = _stream_case(op, "cuda")
    want = _forward_backward(fn, inputs, differentiable)  # also compiles every kernel first
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda._sleep(200_000_000)  # ~0.1 s of the default stream
    with torch.cuda.stream(side):
        got = [x.clone() for x in _forward_backward(fn, inputs, differentiable)]
    side.synchronize()  # not the default stream: it is still asleep
    torch.cuda.synchronize()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def _ppo_step(scores, lp, ref, old, values, old_values, mask):
    rewards, kl = rk.kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.05, estimator="k3")
    advantages, returns = rk.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    advantages = rk.masked_whiten(advantages, mask)
    policy, stats = rk.ppo_policy_loss(lp, old, advantages, mask, clip_high=0.28)
    value, value_stats = rk.ppo_value_loss(values, old_values, returns, mask)
    return rewards, kl, advantages, returns, policy, value, *stats.values(), *value_stats.values()


def _ppo_inputs(B, T, device="cuda"):
    lp = -torch.rand(B, T, device=device) * 3
    mask = (torch.arange(T, device=device) < torch.randint(1, T + 1, (B, 1), device=device)).float()
    return [torch.randn(B, device=device), lp, lp + torch.randn_like(lp), lp + 0.2 * torch.randn_like(lp),
            torch.randn_like(lp), torch.randn_like(lp), mask]  # fmt: skip


@gpu_only
@torch.no_grad()
def test_cuda_graph_ppo_step():
    """The PPO step's math (forward) captured in a CUDA graph and replayed on new inputs.
    Any host sync (a .item() in input validation) makes the capture fail."""
    static = _ppo_inputs(64, 1024)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: kernel compiles, allocator
        for _ in range(2):
            _ppo_step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _ppo_step(*static)
    fresh = _ppo_inputs(64, 1024)
    for target, source in zip(static, fresh):
        target.copy_(source)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(static_out, _ppo_step(*fresh)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@gpu_only
@pytest.mark.skipif(DRY_RUN or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("op", STREAM_OPS)
def test_tensors_on_second_gpu(op, monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current: kernels must launch on the tensors' device."""
    torch.cuda.set_device(0)
    fn, inputs, differentiable = _stream_case(op, "cuda:1")
    got = _forward_backward(fn, inputs, differentiable)
    assert torch.cuda.current_device() == 0
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    want = _forward_backward(fn, inputs, differentiable)
    for g, w in zip(got, want):
        assert g.device == torch.device("cuda:1")
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@gpu_only
@triton_for("linear_logprobs")
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_invariant_linear_logprobs(dtype):
    """rk.batch_invariant(): a row's log-prob, entropy and d hidden bitwise equal alone,
    inside 300 rows, and permuted (row position inside an MMA tile: not checkable in
    the interpreter, see tests/test_batch_invariance.py)."""
    N, H, V = 300, 896, 32000
    hidden, weight = _randn(N, H, dtype=dtype), _randn(V, H, dtype=dtype, scale=H**-0.5)
    labels = torch.randint(0, V, (N,), device=DEVICE)

    def rows(index):
        h = hidden[index].detach().requires_grad_(True)
        lp, ent = rk.linear_logprobs(h, weight, labels[index], return_entropy=True, backend="triton")
        (lp.sum() + 0.5 * ent.sum()).backward()
        return lp.detach(), ent.detach(), h.grad

    permutation = torch.randperm(N, device=DEVICE)
    with rk.batch_invariant():
        batch, alone, permuted = rows(slice(None)), rows(slice(0, 7)), rows(permutation)
    for got_alone, got_permuted, want in zip(alone, permuted, batch):
        assert torch.equal(got_alone, want[:7])
        assert torch.equal(got_permuted, want[permutation])
