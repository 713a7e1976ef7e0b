"""The CPU kernels' threading policy (csrc/cpu/threading.h): a call's result never
depends on whether it ran on the calling thread or in a parallel region, and the
RLHF_KERNELS_CPU_THREADING override is checked. No timings are asserted."""

import pytest
import torch

from rlhf_kernels import _extension

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason="needs the compiled CPU kernels")

B, T = 37, 1021  # odd sizes: parallel chunks and vector tails fall anywhere


def _calls(offset):
    """(name, thunk) of every CPU kernel on inputs whose data starts `offset` floats past
    an allocation (offset 1: misaligned for the vector loops)."""
    ops = torch.ops.rlhf_kernels
    g = torch.Generator().manual_seed(0)

    def flat(n):
        return torch.randn(n + offset, generator=g)[offset:]

    n = B * T
    x, y, z, w = flat(n), flat(n), flat(n), flat(n)
    mask = (torch.rand(n + offset, generator=g) > 0.3).float()[offset:]
    X, Y, M = x.view(B, T), y.view(B, T), mask.view(B, T)
    scores, row_weight = torch.randn(B, generator=g), torch.full((B,), 1e-3)
    stats = ops.masked_whiten(x, mask, True, True, 1e-8, True)[1]
    logits, labels = torch.randn(48, 1000, generator=g), torch.randint(0, 1000, (48,), generator=g)
    lp = ops.token_logprobs(logits, labels, 1.0, None, 1.0, -100, True, False)
    ranks = torch.argsort(torch.rand(B, 6, generator=g), dim=1).float()
    calls = {
        "masked_whiten": lambda: ops.masked_whiten(x, mask, True, True, 1e-8, True),
        "masked_whiten_backward": lambda: ops.masked_whiten_backward(w, x, mask, stats, True, True),
        "masked_sums rows": lambda: ops.masked_sums(X, M),
        "masked_sums one row": lambda: ops.masked_sums(x.view(1, -1), mask.view(1, -1)),
        "kl_shaped_rewards": lambda: ops.kl_shaped_rewards(scores, X, Y, M, 0.05, "k3", None, None),
        "gae": lambda: ops.gae(X, Y, M, 0.99, 0.95, "carry"),
        "gae one row": lambda: ops.gae(x.view(1, -1), y.view(1, -1), mask.view(1, -1), 0.99, 0.95, "carry"),
        "ppo_policy_loss": lambda: ops.ppo_policy_loss(X, Y, Y * 0.1, M, row_weight, 0.2, 0.28, 3.0, None, True),
        "ppo_value_loss": lambda: ops.ppo_value_loss(X, Y, Y * 0.1, M, row_weight, 0.2, True),
        "token_logprobs": lambda: ops.token_logprobs(logits, labels, 1.0, None, 1.0, -100, True, False),
        "token_logprobs_backward": lambda: ops.token_logprobs_backward(
            lp[0], lp[1], logits, labels, lp[2], lp[1], 1.0, None, 1.0, -100
        ),
        "bradley_terry_loss": lambda: ops.bradley_terry_loss(x, y, None, True),
        "ranking_loss": lambda: ops.ranking_loss(X[:, :6].contiguous(), ranks, True),
        "dpo_loss": lambda: ops.dpo_loss(
            x, y, z, w, None, None, None, 0.1, "sigmoid", 0.0, False, False, "reverse_kl", 1.0, 1e9, 1.0, 0.5, True
        ),
    }
    for estimator in ("k1", "k2", "k3", "abs", "low_var_kl"):
        calls[f"kl_penalty {estimator}"] = (lambda e: lambda: ops.kl_penalty(x, y, e, None, True))(estimator)
    return calls


@pytest.mark.parametrize("offset", [0, 1])
def test_serial_and_parallel_calls_give_the_same_bits(offset, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 3))  # a parallel region even on a 1-core runner
    try:
        results = {}
        for mode in ("never", "always"):
            monkeypatch.setenv("RLHF_KERNELS_CPU_THREADING", mode)
            results[mode] = {name: call() for name, call in _calls(offset).items()}
    finally:
        torch.set_num_threads(threads)
    for name, serial in results["never"].items():
        serial = serial if isinstance(serial, (tuple, list)) else (serial,)
        parallel = results["always"][name]
        parallel = parallel if isinstance(parallel, (tuple, list)) else (parallel,)
        for a, b in zip(serial, parallel):
            assert torch.equal(a, b), name


def test_a_bad_override_raises(monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS_CPU_THREADING", "sometimes")
    with pytest.raises(RuntimeError, match="RLHF_KERNELS_CPU_THREADING"):
        torch.ops.rlhf_kernels.gae(torch.zeros(2, 3), torch.zeros(2, 3), None, 1.0, 0.95, "carry")


# rlhf_kernels._calling_thread: small CPU calls run their torch code on one thread.


def _threads_seen(n_elements, device="cpu"):
    """The torch thread count inside a wrapped call with an [n_elements] argument, and after it."""
    from rlhf_kernels import _calling_thread

    seen = []
    _calling_thread.small_calls_serial(lambda x: seen.append(torch.get_num_threads()))(
        torch.empty(n_elements, device=device)
    )
    return seen[0], torch.get_num_threads()


def test_small_calls_run_on_one_thread_and_restore_the_count():
    from rlhf_kernels import _calling_thread

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _threads_seen(_calling_thread.SERIAL_BELOW - 1) == (1, 2)
        assert _threads_seen(_calling_thread.SERIAL_BELOW) == (2, 2)
        assert _threads_seen(3, device="meta") == (2, 2)  # not a CPU call

        def raises(x):
            raise ValueError("bad input")

        with pytest.raises(ValueError, match="bad input"):
            _calling_thread.small_calls_serial(raises)(torch.empty(3))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_the_passes_around_a_kernel_run_on_one_thread_at_any_size():
    """one_thread: one torch thread for CPU tensors whatever their size (restored after,
    also on an exception); other devices keep the count."""
    from rlhf_kernels import _calling_thread

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        big = torch.empty(_calling_thread.SERIAL_BELOW)
        assert _calling_thread.one_thread(lambda x: torch.get_num_threads(), big) == 1
        assert _calling_thread.one_thread(lambda x: torch.get_num_threads(), big.to("meta")) == 2
        with pytest.raises(ValueError, match="bad input"):
            _calling_thread.one_thread(lambda x: (_ for _ in ()).throw(ValueError("bad input")), big)
        assert torch.get_num_threads() == 2
        mask = torch.rand(3, 5) > 0.5
        weights, x = _calling_thread.cast_on_one_thread(torch.float32, mask, big)
        assert weights.dtype == torch.float32 and torch.equal(weights, mask.float()) and x is big
    finally:
        torch.set_num_threads(threads)


@torch.library.custom_op("rlhf_kernels_test::scaled", mutates_args=())
def _scaled(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


_BACKWARD_THREADS = []


def _scaled_backward(ctx, grad):
    _BACKWARD_THREADS.append(torch.get_num_threads())
    return 2 * grad


def test_a_small_calls_backward_runs_on_the_calling_thread_too():
    """ops.register_autograd sizes the backward by its gradients and saved tensors."""
    from rlhf_kernels import _calling_thread
    from rlhf_kernels.ops import register_autograd

    register_autograd("rlhf_kernels_test::scaled", _scaled_backward, setup_context=lambda ctx, inputs, output: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    _BACKWARD_THREADS.clear()
    try:
        for n in (64, _calling_thread.SERIAL_BELOW):
            x = torch.randn(n, requires_grad=True)
            _scaled(x).sum().backward()
            assert torch.equal(x.grad, torch.full_like(x, 2.0))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert _BACKWARD_THREADS == [1, 2]


def test_public_ops_give_the_same_bits_on_one_thread_or_the_pool(monkeypatch):
    """The public CPU ops with the calling-thread guard on (every call serial) and off."""
    import rlhf_kernels as rk
    from rlhf_kernels import _calling_thread

    g = torch.Generator().manual_seed(1)
    lp = (torch.randn(B, T, generator=g) - 2).requires_grad_()
    old, adv = lp.detach() + 0.05 * torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    results = []
    try:
        for limit in (1 << 40, 0):
            monkeypatch.setattr(_calling_thread, "SERIAL_BELOW", limit)
            lp.grad = None
            loss, stats = rk.ppo_policy_loss(lp, old, adv, mask, backend="cpu")
            loss.backward()
            results.append(
                (loss.detach(), *stats.values(), lp.grad.clone(), rk.masked_whiten(old, mask, backend="cpu"))
            )
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
