"""Drop-in parity: each adapter against its framework's own function (TRL installed;
OpenRLHF and verl as transcribed in framework_refs.py), values and gradients, on
random inputs with right padding, interior holes and an all-masked row."""

import itertools

import framework_refs as ref
import pytest
import torch
from conftest import random_mask

from rlhf_kernels.integrations import openrlhf, verl
from rlhf_kernels.integrations import trl as rk_trl

B, T, V = 4, 9, 37


def _grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    first = out[0] if isinstance(out, tuple) else out
    # torch.randn, not randn_like: randn_like takes a generator only from torch 2.7 on
    upstream = torch.randn(first.shape, generator=torch.Generator().manual_seed(1), dtype=first.dtype)
    (first * upstream.to(first.device)).sum().backward()
    return out, [leaf.grad for leaf in leaves]


def _same(ours, theirs, *inputs, atol=1e-5, rtol=1e-5):
    got, got_grads = _grads(ours, *inputs)
    want, want_grads = _grads(theirs, *inputs)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def _logps(*shape):
    return -torch.rand(*shape) * 4, -torch.rand(*shape) * 4


# ---------------------------------------------------------------------- TRL ------
# The drop-ins follow SUPPORTED_VERSIONS only (the test extra pins it; another TRL skips).
from trl_support import needs_trl, trl_utils  # noqa: E402


@needs_trl
@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("row_mask", [False, True])
def test_trl_selective_log_softmax(top_k, temperature, row_mask):
    logits = 3 * torch.randn(B, T, V)
    index = torch.randint(0, V, (B, T) if top_k is None else (B, T, top_k))
    mask = (torch.rand(index.shape) > 0.3).long() if row_mask else None

    def call(fn):
        return lambda x: fn(x, index, temperature, mask)

    _same(call(rk_trl.selective_log_softmax), call(trl_utils.selective_log_softmax), logits)


@needs_trl
def test_trl_selective_log_softmax_keeps_the_logits_dtype():
    logits = torch.randn(3, 5, V, dtype=torch.bfloat16)
    index = torch.randint(0, V, (3, 5))
    got = rk_trl.selective_log_softmax(logits, index)
    want = trl_utils.selective_log_softmax(logits, index)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)  # TRL's own 16-bit arithmetic (test_dropin_semantics.py)


@needs_trl
def test_trl_entropy_from_logits():
    _same(rk_trl.entropy_from_logits, trl_utils.entropy_from_logits, 2 * torch.randn(B, T, V))


ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@needs_trl
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [(1.0, None, 1.0), (0.7, 30.0, 0.5)], ids=["plain", "T-softcap-scale"])
def test_trl_chunked_log_prob_function_every_output(dtype, options):
    """Every output TRL 1.16's ChunkedLogProbFunction computes, with a bias and a chunk
    size small enough that the statistics pass runs one row at a time (its cap), against
    TRL's class; outputs in TRL's dtypes, gradients of log_probs and entropy."""
    temperature, softcap, scale = options
    n, h, v, chunk = 64, 16, 300, 16
    assert rk_trl._stats_chunk_rows(n, v, chunk, dtype, "cpu") == 1
    hidden, weight, bias = torch.randn(n, h).to(dtype), (torch.randn(v, h) / 2).to(dtype), torch.randn(v).to(dtype)
    targets = torch.randint(0, v, (n,))
    from trl.kernels import ChunkedLogProbFunction as theirs

    def run(cls):
        leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias)]
        out = cls.apply(*leaves[:2], leaves[2], targets, temperature, chunk, softcap, scale, ALL_OUTPUTS)
        (out[0].sum() + 0.5 * out[1].sum()).backward()
        return out, [leaf.grad for leaf in leaves]

    (got, got_grads), (want, want_grads) = run(rk_trl.ChunkedLogProbFunction), run(theirs)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    for name, g, w in zip(ALL_OUTPUTS, got, want):
        assert g.dtype == w.dtype, name
        if name == "is_top1":
            # bf16: TRL rounds its logits tile to bf16 (ties), ours are the fp32 GEMM's
            assert (g == w).float().mean() >= (1.0 if dtype == torch.float32 else 0.9), name
        else:
            torch.testing.assert_close(g.float(), w.float(), **tol, msg=name)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(
            g.float(), w.float(), **(tol if dtype == torch.float32 else dict(atol=0.1, rtol=0.05))
        )


@needs_trl
def test_trl_chunked_log_prob_function_computes_only_what_is_asked(monkeypatch):
    """outputs=("log_probs",) (what TRL's head asks of a reference model): no entropy,
    no statistics pass; ("log_probs", "entropy") (GRPO): the entropy, still no pass."""
    import rlhf_kernels as rk

    calls = {"entropy": [], "stats": 0}
    linear_logprobs, statistics = rk.linear_logprobs, rk_trl._logit_statistics

    def spy_linear(*args, **kwargs):
        calls["entropy"].append(kwargs["return_entropy"])
        return linear_logprobs(*args, **kwargs)

    def spy_statistics(*args, **kwargs):
        calls["stats"] += 1
        return statistics(*args, **kwargs)

    monkeypatch.setattr(rk, "linear_logprobs", spy_linear)
    monkeypatch.setattr(rk_trl, "_logit_statistics", spy_statistics)
    hidden, weight, targets = torch.randn(6, 8), torch.randn(20, 8), torch.randint(0, 20, (6,))
    out = rk_trl.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs",))
    assert out[0].shape == (6,) and all(x is None for x in out[1:])
    out = rk_trl.ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs", "entropy")
    )
    assert out[1].shape == (6,) and all(x is None for x in out[2:])
    assert calls == {"entropy": [False, True], "stats": 0}
    out = rk_trl.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ALL_OUTPUTS)
    assert calls["stats"] == 1 and all(x is not None for x in out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("n,v,chunk", [(16384, 128256, 32768), (8192, 152064, 32768), (100, 32000, 32768),
                                       (3, 50000, 32768), (1, 262144, 32768), (64, 300, 16)])  # fmt: skip
def test_trl_statistics_pass_holds_no_more_than_trls_tile(dtype, device, n, v, chunk):
    """The no-grad statistics pass (mean_logits, is_top1, log_sum_sq_probs) holds at most
    _stats_bytes_per_logit bytes per logit of its [rows, V] chunk (the GEMM output and its
    fp32 copy, or the fp32 logits and logsumexp's temporary); its rows keep that within
    TRL's own [min(N, 4096), chunk_size] tile in the compute dtype (the CUDA chunks of
    the other chunked paths are >= 2048 rows x V fp32: 1 GiB at V = 128k), one row at
    least. The chunk size is computed, not allocated: CPU-testable for CUDA too."""
    rows = rk_trl._stats_chunk_rows(n, v, chunk, dtype, torch.device(device))
    tile = min(n, rk_trl.TRL_TOKEN_TILE) * chunk * dtype.itemsize
    assert 1 <= rows <= n
    per_logit = rk_trl._stats_bytes_per_logit(dtype)
    assert per_logit >= 4 + (dtype.itemsize if dtype != torch.float32 else 0) and per_logit >= 8
    assert rows == 1 or rows * v * per_logit <= tile
    if device == "cuda" and v >= 128256 and dtype == torch.bfloat16:
        assert rows * v * per_logit <= 256 * 2**20  # TRL's 4096 x 32768 bf16 tile


@needs_trl
def test_trl_chunked_log_prob_function_without_tokens():
    """No valid label in a micro-batch (TRL's compact head passes N = 0): empty outputs,
    as TRL's, and a zero gradient."""
    hidden, weight = torch.randn(0, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    out = rk_trl.ChunkedLogProbFunction.apply(hidden, weight, None, torch.zeros(0, dtype=torch.long), 1.0, 32768)
    assert [x.shape for x in out] == [(0,)] * 5 and out[4].dtype == torch.bool
    out[0].sum().backward()
    assert weight.grad is not None and not weight.grad.any()


@pytest.mark.parametrize("shift_mean", [True, False])
def test_trl_masked_statistics(shift_mean):
    x, mask = torch.randn(B, T).double(), random_mask(B, T).double()
    _same(lambda v: rk_trl.masked_mean(v, mask), lambda v: ref.trl_masked_mean(v, mask), x)
    full = random_mask(B, T, all_masked_row=False).double()  # TRL: 0/0 for a row without a token
    _same(lambda v: rk_trl.masked_mean(v, full, 1), lambda v: ref.trl_masked_mean(v, full, 1), x)
    for unbiased in (True, False):
        _same(lambda v: rk_trl.masked_var(v, mask, unbiased), lambda v: ref.trl_masked_var(v, mask, unbiased), x)
    _same(lambda v: rk_trl.masked_whiten(v, mask, shift_mean), lambda v: ref.trl_masked_whiten(v, mask, shift_mean), x)


@needs_trl
def test_trl_patch_runs_unchanged_trl_code_on_our_kernels():
    loss_utils = pytest.importorskip("trl.experimental.sdpo.loss_utils")
    student, teacher = torch.randn(B, T, V), torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))

    def trl_loss(s):
        return loss_utils.compute_sampled_token_self_distillation_loss(s, teacher, ids, distillation_alpha=1.0)

    want, want_grads = _grads(trl_loss, student)
    calls = []
    original = rk_trl.DROP_INS["selective_log_softmax"]
    with rk_trl.patched():
        assert loss_utils.selective_log_softmax is rk_trl.selective_log_softmax
        assert trl_utils.selective_log_softmax is rk_trl.selective_log_softmax
        rk_trl.DROP_INS["selective_log_softmax"] = original
        loss_utils.selective_log_softmax = lambda *a, **k: calls.append(1) or original(*a, **k)
        got, got_grads = _grads(trl_loss, student)
        loss_utils.selective_log_softmax = original
    assert calls, "the patched TRL function did not run our kernel"
    assert loss_utils.selective_log_softmax is not rk_trl.selective_log_softmax  # unpatched
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grads, want_grads, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- OpenRLHF ------
# OpenRLHF 0.11.0 (transcribed): the legacy drop-ins patch() installs for 0.11.0 / 0.11.1.
# OpenRLHF 0.11.2's drop-ins are compared against its own files in test_openrlhf.py.


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_openrlhf_compute_approx_kl(estimator):
    lp, base = _logps(B, T)
    base = base - 8 * torch.rand(B, T)  # reaches the +-10 clamp
    _same(
        lambda a: openrlhf.compute_approx_kl_v0110(a, base, estimator),
        lambda a: ref.openrlhf_compute_approx_kl(a, base, estimator),
        lp,
    )


@pytest.mark.parametrize("clip", [None, (-0.5, 0.5)])
def test_openrlhf_compute_reward(clip):
    kl, mask, r = torch.randn(B, T), random_mask(B, T), 2 * torch.randn(B)
    got = openrlhf.compute_reward(r, 0.05, kl, mask, clip)
    torch.testing.assert_close(got, ref.openrlhf_compute_reward(r, 0.05, kl, mask, clip))  # row 0: no valid token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_openrlhf_log_probs_from_logits_divides_in_place(dtype):
    logits, labels = (3 * torch.randn(B, T, V)).to(dtype), torch.randint(0, V, (B, T))
    ours_logits, theirs_logits = logits.clone(), logits.clone()
    got = openrlhf.log_probs_from_logits(ours_logits, labels, 0.8)
    want = ref.openrlhf_log_probs_from_logits(theirs_logits, labels, 0.8)
    assert got.dtype == want.dtype
    torch.testing.assert_close(ours_logits, theirs_logits)
    tol = {} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    torch.testing.assert_close(got.float(), want.float(), **tol)


OPENRLHF_0110_IS = [
    {},
    {"enable_vllm_is_correction": True, "vllm_is_truncated_threshold": [0.5, 2.0], "vllm_is_correction_type": "tis"},
    {"enable_vllm_is_correction": True, "vllm_is_truncated_threshold": [0.5, 2.0], "vllm_is_correction_type": "icepop"},
    {"enable_vllm_is_correction": True, "vllm_is_truncated_threshold": [0.7, 1.5],
     "vllm_is_correction_type": "seq-mask-tis"},
]  # fmt: skip


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("agg", [{}, {"dp_size": 2, "batch_num_tokens": 50.0, "global_batch_size": 6.0}])
@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
@pytest.mark.parametrize("correction", range(len(OPENRLHF_0110_IS)))
def test_openrlhf_0110_policy_and_value_loss(dual_clip, token_level_loss, agg, policy_loss_type, correction):
    lp, old = _logps(B, T)
    adv, mask = torch.randn(B, T), random_mask(B, T)
    rollout = old + torch.randn(B, T)
    options = dict(policy_loss_type=policy_loss_type, **OPENRLHF_0110_IS[correction])
    policy = openrlhf.PolicyLossV0110(0.2, 0.28, dual_clip, token_level_loss, **options)
    got = policy(lp.clone().requires_grad_(True), old, adv, mask, rollout, **agg)
    assert len(got) == 4  # 0.11.0: no is_filter_ratio
    assert (got[3] is None) == (correction == 0 or policy_loss_type == "gspo")
    _same(
        lambda a: tuple(x for x in policy(a, old, adv, mask, rollout, **agg) if x is not None),
        lambda a: tuple(
            x
            for x in ref.openrlhf_policy_loss(
                a, old, adv, mask, 0.2, 0.28, dual_clip, token_level_loss, rollout_log_probs=rollout, **options, **agg
            )
            if x is not None
        ),
        lp,
    )
    values, old_values, returns = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    for clip in (None, 0.2):
        value = openrlhf.ValueLoss(clip, token_level_loss)
        _same(
            lambda v: value(v, old_values, returns, mask, **agg),
            lambda v: ref.openrlhf_value_loss(v, old_values, returns, mask, clip, token_level_loss, **agg),
            values,
        )


def test_openrlhf_0110_policy_loss_rejects_an_unknown_correction_type():
    with pytest.raises(ValueError, match="vllm_is_correction_type"):
        openrlhf.PolicyLossV0110(vllm_is_correction_type="geo")


@pytest.mark.parametrize("ipo, label_smoothing", [(False, 0.0), (False, 0.1), (True, 0.0)])
def test_openrlhf_dpo_loss(ipo, label_smoothing):
    pc, pr, rc, rr = (-torch.rand(6) * 30 for _ in range(4))
    loss = openrlhf.DPOLoss(0.1, label_smoothing, ipo)
    _same(
        lambda a, b: loss(a, b, rc, rr), lambda a, b: ref.openrlhf_dpo_loss(0.1, label_smoothing, ipo, a, b, rc, rr),
        pc, pr,
    )  # fmt: skip


def test_openrlhf_advantages_and_cumulative_returns():
    values, rewards, mask = torch.randn(B, T), torch.randn(B, T), random_mask(B, T)
    got = openrlhf.get_advantages_and_returns(values, rewards, mask, 0.99, 0.95)
    torch.testing.assert_close(got, ref.openrlhf_get_advantages_and_returns(values, rewards, mask, 0.99, 0.95))
    got = openrlhf.get_cumulative_returns(rewards, mask, 0.9)
    torch.testing.assert_close(got, ref.openrlhf_get_cumulative_returns(rewards, mask, 0.9))


# --------------------------------------------------------------------- verl ------


def test_verl_logprobs_and_entropy():
    logits, labels = 2 * torch.randn(B, T, V), torch.randint(0, V, (B, T))
    _same(lambda x: verl.logprobs_from_logits(x, labels, inplace_backward=False),
          lambda x: torch.log_softmax(x, -1).gather(-1, labels[..., None])[..., 0], logits)  # fmt: skip
    _same(verl.entropy_from_logits, ref.verl_entropy_from_logits, logits)


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+", "low_var_kl+", "abs+"])
def test_verl_kl_penalty(name):
    lp, ref_lp = _logps(B, T)
    ref_lp = ref_lp - 10 * torch.rand(B, T)  # reaches the low_var_kl clamps
    _same(lambda a: verl.kl_penalty(a, ref_lp, name), lambda a: ref.verl_kl_penalty(a, ref_lp, name), lp)


def test_verl_gae_with_whitening():
    rewards, values, mask = torch.randn(B, T), torch.randn(B, T), random_mask(B, T)
    got = verl.compute_gae_advantage_return(rewards, values, mask, 1.0, 0.95)
    torch.testing.assert_close(got, ref.verl_compute_gae_advantage_return(rewards, values, mask, 1.0, 0.95))


AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize(
    "extra", [{}, {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 7, "loss_scale_factor": 16}]
)
def test_verl_agg_loss(mode, extra):
    mask = random_mask(B, T)
    _same(lambda x: verl.agg_loss(x, mask, mode, **extra), lambda x: ref.verl_agg_loss(x, mask, mode, **extra),
          torch.randn(B, T))  # fmt: skip


@pytest.mark.parametrize("mode, clip", list(itertools.product(AGG_MODES, [(0.2, None, None), (None, 0.1, 0.3)])))
def test_verl_policy_and_value_loss(mode, clip):
    lp, old = _logps(B, T)
    adv, mask = 2 * torch.randn(B, T), random_mask(B, T)
    _same(
        lambda a: verl.compute_policy_loss(old, a, adv, mask, *clip, clip_ratio_c=2.5, loss_agg_mode=mode),
        lambda a: ref.verl_compute_policy_loss(old, a, adv, mask, *clip, clip_ratio_c=2.5, loss_agg_mode=mode),
        lp,
    )
    returns, old_values = torch.randn(B, T), torch.randn(B, T)
    _same(
        lambda v: verl.compute_value_loss(v, returns, old_values, mask, 0.5, mode),
        lambda v: ref.verl_compute_value_loss(v, returns, old_values, mask, 0.5, mode),
        torch.randn(B, T),
    )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_verl_linear_cross_entropy(reduction):
    hidden, weight = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(V, 16, dtype=torch.float64) / 4
    labels = torch.randint(0, V, (2, 5))

    def naive(h, w):
        logits = (h @ w.T).reshape(-1, V) / 0.9
        logprobs = torch.log_softmax(logits, -1).gather(-1, labels.reshape(-1, 1))[:, 0]
        reduced = {"none": logprobs, "sum": logprobs.sum(), "mean": logprobs.mean()}[reduction]
        return reduced, ref.verl_entropy_from_logits(logits)

    _same(lambda h, w: verl.linear_cross_entropy(h, w, labels, 0.9, reduction), naive, hidden, weight)


@pytest.mark.parametrize("script", ["trl_patch.py", "openrlhf_dropin.py", "verl_dropin.py"])
def test_example_scripts_run(script):
    import os
    import subprocess
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "python", "examples", script)
    result = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loss" in result.stdout
