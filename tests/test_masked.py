import pytest
import torch

import oracle
import rlhf_kernels as rk
from conftest import backends_of, random_mask, tolist, use_backend

COMPILED = ("cpu", "triton")


@pytest.fixture(autouse=True, params=backends_of("masked_whiten"))
def backend_name(request, monkeypatch, _fresh_seed):
    """Every test here runs on each backend of masked_mean / masked_whiten."""
    return use_backend(request, monkeypatch, "gae")


def _flat(t):
    return sum(tolist(t), [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masked_mean_matches_oracle_global_and_per_row(dtype):
    x, mask = torch.randn(4, 9).to(dtype), random_mask(4, 9)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else None
    got = rk.masked_mean(x, mask)
    assert got.dtype == dtype and got.shape == ()
    want = torch.tensor(oracle.masked_mean(_flat(x), _flat(mask)), dtype=torch.float64).to(dtype)
    torch.testing.assert_close(got, want, **(tol or {}))
    rows = torch.tensor([oracle.masked_mean(a, m) for a, m in zip(tolist(x), tolist(mask))], dtype=torch.float64)
    got_rows = rk.masked_mean(x, mask, dim=-1)
    torch.testing.assert_close(got_rows, rows.to(dtype), **(tol or {}))
    assert got_rows[0] == 0  # the all-masked row: 0, not NaN


@pytest.mark.parametrize("dim", [0, 1, (0, 2), (-1, 1)])
def test_masked_mean_over_any_dims_matches_the_reference(dim):
    x, mask = torch.randn(3, 5, 7), (torch.rand(3, 5, 7) > 0.4)
    got = rk.masked_mean(x, mask, dim=dim)
    want = rk.masked_mean(x, mask, dim=dim, backend="reference")
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


def test_masked_mean_on_a_long_row_splits_the_reduction():
    x, mask = torch.randn(2, 40_000), random_mask(2, 40_000, all_masked_row=False)
    torch.testing.assert_close(
        rk.masked_mean(x, mask, dim=1), rk.masked_mean(x.double(), mask, dim=1, backend="reference").float()
    )


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("fill_masked", [True, False])
def test_masked_whiten_matches_oracle(shift_mean, unbiased, mask_dtype, fill_masked):
    x, mask = 3 * torch.randn(5, 8) + 1, random_mask(5, 8)
    got = rk.masked_whiten(x, mask.to(mask_dtype), shift_mean=shift_mean, unbiased=unbiased, fill_masked=fill_masked)
    want = oracle.masked_whiten(_flat(x), _flat(mask), shift_mean, unbiased, fill_masked=fill_masked)
    torch.testing.assert_close(got.double().flatten(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_masked_whiten_dtypes(dtype):
    x, mask = (2 * torch.randn(6, 33) - 1).to(dtype), random_mask(6, 33)
    got = rk.masked_whiten(x, mask)
    assert got.dtype == dtype
    want = torch.tensor(oracle.masked_whiten(_flat(x), _flat(mask)), dtype=torch.float64).view(6, 33)
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    else:  # one bf16 rounding of the result (8 bits of mantissa: 2^-8 relative)
        torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=2**-8)


def test_masked_whiten_of_a_large_tensor_matches_float64():
    # 3 x 16k-element splits on triton; a mean of 100 stresses the centred pass.
    x, mask = torch.randn(8, 6000) + 100, random_mask(8, 6000)
    want = rk.masked_whiten(x.double(), mask, backend="reference")
    torch.testing.assert_close(rk.masked_whiten(x, mask).double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("valid", [0, 1])
def test_masked_whiten_degenerate_inputs_are_finite(valid):
    x = torch.randn(3, 4, requires_grad=True)
    mask = torch.zeros(3, 4)
    mask[1, 2] = valid
    out = rk.masked_whiten(x, mask)
    assert torch.equal(out, torch.zeros(3, 4))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("fill_masked", [True, False])
def test_gradients_match_the_reference(shift_mean, unbiased, fill_masked):
    x, mask, upstream = torch.randn(4, 11), random_mask(4, 11), torch.randn(4, 11)
    grads = []
    for backend in (None, "reference"):
        leaf = x.clone().requires_grad_(True)
        out = rk.masked_whiten(
            leaf, mask, shift_mean=shift_mean, unbiased=unbiased, fill_masked=fill_masked, backend=backend
        )
        mean = rk.masked_mean(leaf, mask, dim=1, backend=backend)
        ((out * upstream).sum() + (mean * upstream[:, 0]).sum()).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_gradcheck(shift_mean):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = random_mask(3, 5).double()
    torch.autograd.gradcheck(lambda a: rk.masked_mean(a, mask, dim=1), (x,))
    torch.autograd.gradcheck(lambda a: rk.masked_mean(a, mask), (x,))
    torch.autograd.gradcheck(lambda a: rk.masked_whiten(a, mask, shift_mean=shift_mean), (x,))
    torch.autograd.gradcheck(lambda a: rk.masked_whiten(a, mask, shift_mean=shift_mean, fill_masked=False), (x,))


def test_opcheck(backend_name):
    if backend_name not in COMPILED:
        pytest.skip("opcheck is for the compiled ops")
    suffix = "_triton" if backend_name == "triton" else ""
    ops = torch.ops.rlhf_kernels
    x, mask = torch.randn(4, 7), random_mask(4, 7)
    torch.library.opcheck(getattr(ops, "masked_sums" + suffix).default, (x.clone().requires_grad_(True), mask))
    whiten = getattr(ops, "masked_whiten" + suffix).default
    for shift_mean, unbiased, fill in ((True, True, True), (False, False, False)):
        torch.library.opcheck(whiten, (x.clone().requires_grad_(True), mask, shift_mean, unbiased, 1e-8, fill))
    _, stats = whiten(x, mask, True, True, 1e-8, True)
    backward = getattr(ops, "masked_whiten_backward" + suffix).default
    torch.library.opcheck(backward, (torch.randn(4, 7), x, mask, stats, False, True))


def test_torch_compile_fullgraph(backend_name):
    if backend_name not in COMPILED:
        pytest.skip("the compiled ops")
    x, mask = torch.randn(3, 12, requires_grad=True), random_mask(3, 12)

    def step(x):
        return (rk.masked_whiten(x, mask) ** 2).sum() + rk.masked_mean(x, mask, dim=1).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(x).backward()
    got = x.grad.clone()
    x.grad = None
    step(x).backward()
    torch.testing.assert_close(got, x.grad)
