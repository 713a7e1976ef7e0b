import pytest
import torch

import oracle
import rlhf_kernels as rk
from conftest import backends_of, random_mask, tolist
from rlhf_kernels import backend
from rlhf_kernels.reference.gae import MASK_MODES

needs_cpu_kernel = pytest.mark.skipif("gae" not in backend.HAS_CPU, reason="rlhf_kernels._C not built")


def _rollout(B, T, dtype=torch.float32):
    return torch.randn(B, T, dtype=dtype), torch.randn(B, T, dtype=dtype), random_mask(B, T).to(dtype)


def _oracle(rewards, values, mask, gamma, lam, mode):
    rows = [oracle.gae_row(r, v, m, gamma, lam, mode) for r, v, m in zip(tolist(rewards), tolist(values), tolist(mask))]
    return (
        torch.tensor([a for a, _ in rows], dtype=torch.float64),
        torch.tensor([r for _, r in rows], dtype=torch.float64),
    )


def test_hand_computed_case():
    # gamma = 0.5, lam = 1: A_1 = r_1 - V_1 = 1 - 2 = -1; A_0 = r_0 + 0.5 V_1 - V_0 + 0.5 A_1 = 1.
    adv, ret = rk.gae(
        torch.tensor([[1.0, 1.0]]),
        torch.tensor([[0.5, 2.0]]),
        gamma=0.5,
        lam=1.0,
        mask_mode="ignore",
        backend="reference",
    )
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.5, 1.0]]))


@pytest.mark.parametrize("backend_name", backends_of("gae"))
@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (5, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gae_matches_oracle(backend_name, mode, shape, dtype):
    rewards, values, mask = _rollout(*shape, dtype)
    gamma, lam = 0.99, 0.9
    adv, ret = rk.gae(rewards, values, mask, gamma=gamma, lam=lam, mask_mode=mode, backend=backend_name)
    assert adv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want_adv, want_ret = _oracle(rewards, values, mask, gamma, lam, mode)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(adv.double(), want_adv, atol=tol, rtol=tol)
    torch.testing.assert_close(ret.double(), want_ret, atol=tol, rtol=tol)


@pytest.mark.parametrize("mode", ["ignore", "multiply"])
def test_no_mask_means_all_ones(mode):
    rewards, values, _ = _rollout(3, 6)
    a = rk.gae(rewards, values, None, mask_mode=mode)
    b = rk.gae(rewards, values, torch.ones(3, 6), mask_mode=mode)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend_name", backends_of("gae")[1:])
@pytest.mark.parametrize("mode", MASK_MODES)
def test_compiled_kernels_match_the_reference_on_a_large_batch(backend_name, mode):
    # C++: more rows than one parallel_for grain; Triton: T = 2500 spans three blocks
    # (5 rows: each row is its own program; 67 took the interpreter 70 s for 3 modes)
    rewards, values, mask = _rollout(67 if backend_name == "cpu" else 5, 2500)
    got = rk.gae(rewards, values, mask, gamma=0.97, lam=0.93, mask_mode=mode, backend=backend_name)
    want = rk.gae(rewards, values, mask, gamma=0.97, lam=0.93, mask_mode=mode, backend="reference")
    # C++ scans in float64: one fp32 rounding of the output. Triton's fp32 tree scan
    # rounds at each of log2(1024) = 10 levels: 10 ulps of |A| <= ~20 is 2.4e-5.
    tol = 1e-6 if backend_name == "cpu" else 3e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=1e-6)


@pytest.mark.parametrize("backend_name", backends_of("gae")[1:])
def test_long_row_keeps_fp32_precision(backend_name):
    # T = 32768 with gamma = lam = 1: A_0 sums 32k terms. The C++ kernel scans in
    # float64 (rtol 1e-6 of the exact recursion). Triton's fp32 scan must do no worse
    # than the sequential fp32 recursion does (or 8 ulps of the largest |A|).
    T = 32768
    rewards, values = torch.randn(2, T), torch.randn(2, T)
    adv, _ = rk.gae(rewards, values, gamma=1.0, lam=1.0, mask_mode="ignore", backend=backend_name)
    exact = torch.flip(torch.cumsum(torch.flip(rewards.double(), [1]), 1), [1]) - values.double()
    if backend_name == "cpu":
        torch.testing.assert_close(adv.double(), exact, atol=0, rtol=1e-6)
        return
    running, sequential_fp32 = torch.zeros(2), torch.empty(2, T)
    for t in range(T - 1, -1, -1):  # the frameworks' loop, in fp32 (torch.cumsum is not sequential)
        running = rewards[:, t] + running
        sequential_fp32[:, t] = running - values[:, t]
    bound = max(
        (sequential_fp32.double() - exact).abs().max().item(),
        8 * torch.finfo(torch.float32).eps * exact.abs().max().item(),
    )
    assert (adv.double() - exact).abs().max().item() <= bound


@pytest.mark.parametrize("backend_name", backends_of("gae")[1:])
@pytest.mark.parametrize("mode", MASK_MODES)
def test_few_long_rows_scan_in_chained_chunks(backend_name, mode, monkeypatch):
    # Fewer rows than threads: the C++ kernel cuts each row into chunks of >= 4096
    # reduced to affine maps and chained (4 threads: 3 chunks of this row). A row this
    # short runs on one thread under the measured policy (csrc/cpu/threading.h), so
    # the parallel path is forced.
    monkeypatch.setenv("RLHF_KERNELS_CPU_THREADING", "always")
    T = 3 * 4096 + 5
    rewards, values, mask = torch.randn(1, T), torch.randn(1, T), random_mask(1, T, all_masked_row=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        got = rk.gae(
            rewards.double(),
            values.double(),
            mask.double(),
            gamma=0.999,
            lam=0.97,
            mask_mode=mode,
            backend=backend_name,
        )
    finally:
        torch.set_num_threads(threads)
    want = rk.gae(
        rewards.double(), values.double(), mask.double(), gamma=0.999, lam=0.97, mask_mode=mode, backend="reference"
    )
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_auto_uses_the_cpu_kernel_when_built():
    assert backend.resolve("gae", "cpu") == ("cpu" if "gae" in backend.HAS_CPU else "reference")


@pytest.mark.parametrize("backend_name", backends_of("gae"))
def test_discounted_returns(backend_name):
    rewards, _, mask = _rollout(4, 7)
    got = rk.discounted_returns(rewards, mask, gamma=0.9, backend=backend_name)
    want, _ = _oracle(rewards, torch.zeros_like(rewards), mask, 0.9, 1.0, "carry")
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    # without a mask: the plain discounted sum
    got = rk.discounted_returns(rewards[:1], gamma=0.5, backend=backend_name)
    r = tolist(rewards[0])
    want = [sum(0.5 ** (k - t) * r[k] for k in range(t, len(r))) for t in range(len(r))]
    torch.testing.assert_close(got[0].double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=1e-6)


def test_inputs_requiring_grad_are_constants():
    rewards, values, mask = _rollout(2, 5)
    values.requires_grad_(True)
    adv, ret = rk.gae(rewards, values, mask)
    assert not adv.requires_grad and not ret.requires_grad


@pytest.mark.parametrize("backend_name", backends_of("gae")[1:])
@pytest.mark.parametrize("mode", MASK_MODES)
def test_opcheck(backend_name, mode):
    op = {"cpu": torch.ops.rlhf_kernels.gae, "triton": torch.ops.rlhf_kernels.gae_triton}[backend_name]
    rewards, values, mask = _rollout(3, 8)
    torch.library.opcheck(op.default, (rewards, values, mask, 0.99, 0.95, mode))
    torch.library.opcheck(op.default, (rewards.double(), values.double(), None, 1.0, 0.9, mode))


@needs_cpu_kernel
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    def step(rewards, values, mask):
        adv, ret = rk.gae(rewards, values, mask, gamma=0.99, lam=0.95)
        return rk.masked_whiten(adv, mask), ret

    rewards, values, mask = _rollout(4, 10)
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    torch.testing.assert_close(compiled(rewards, values, mask), step(rewards, values, mask))
