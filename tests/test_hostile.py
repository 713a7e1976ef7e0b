"""Hostile inputs, every public op, every backend (the reliability issue, items 1-5).

Every public op (rk.__all__'s callables but the batch_invariant switch) meets every
class of input below, or is exempt from a class with its reason (CLASS_COVERAGE,
NOT_APPLICABLE; test_every_public_op_is_swept). Each class of input must give a correct
value or a clear error, never a silent wrong answer, a crash or an out-of-bounds access:

- out-of-range indices (labels, score_index) where the Python check is skipped: under
  torch.compile and in direct kernel calls (item 1; the segfault case in a subprocess);
- masked vocabularies (-inf / finfo.min logits): exact log-probs and entropy, zero
  gradient on masked logits, -inf only for a label whose own logit is -inf (item 2);
- NaN at a valid position is never hidden; NaN / inf at a mask-0 position never reaches a
  valid output (item 3);
- double backward: exact second derivatives on every backend (item 4);
- empty batches, meta tensors and the other edge cases of item 5.

Triton runs in its interpreter on CPU tensors (tests/conftest.py). On a machine with
CUDA the sweep also runs compiled triton and cuda (conftest.backends_of(gpu=True)): the
_on_the_gpu fixture moves every tensor an op gets to the GPU and its results back.
group_advantages and broadcast_advantages run on the reference only (on every device).
Shapes are tiny.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import rlhf_kernels as rk
from conftest import backends_of
from rlhf_kernels import backend as _backend

NAN, INF = float("nan"), float("inf")
F32_MIN = torch.finfo(torch.float32).min
PER_PAIR_LOSSES = rk.reference.dpo.PAIR_LOSS_TYPES
ESTIMATORS = ("k1", "k2", "k3", "abs", "low_var_kl")
POLICY_LOSS_TYPES = rk.reference.grpo.LOSS_TYPES
POLICY_AGGS = rk.reference.grpo.AGG_MODES
POLICY_TENSORS = ("logprobs", "old_logprobs", "advantages", "is_weights", "ref_logprobs", "entropy")


def _policy_inputs(B: int, T: int, generator=None, dtype=torch.float32) -> dict:
    """policy_loss's tensors (POLICY_TENSORS), [B, T] each; importance weights and entropies positive."""
    lp, old, adv, isw, ref, entropy = (torch.randn(B, T, generator=generator, dtype=dtype) for _ in POLICY_TENSORS)
    return dict(
        logprobs=-lp.abs(), old_logprobs=-old.abs(), advantages=adv, is_weights=isw.abs() + 0.5,
        ref_logprobs=-ref.abs(), entropy=entropy.abs(),
    )  # fmt: skip


def _policy_loss(x: dict, mask, backend, *, is_weights=False, kl_coef=0.0, entropy_coef=0.0, **options):
    """rk.policy_loss on the tensors `x`; is_weights, ref_logprobs (with a KL term) and
    entropy (with a bonus) only where the options turn them on."""
    return rk.policy_loss(
        x["logprobs"], x["old_logprobs"], x["advantages"], mask, is_weights=x["is_weights"] if is_weights else None,
        ref_logprobs=x["ref_logprobs"] if kl_coef else None, kl_coef=kl_coef,
        entropy=x["entropy"] if entropy_coef else None, entropy_coef=entropy_coef, backend=backend, **options,
    )  # fmt: skip


def _linear_policy_inputs(B: int, T: int, H: int, V: int, generator=None, dtype=torch.float32) -> dict:
    """linear_policy_loss's tensors: policy_loss's [B, T] ones (its logprobs and entropy
    unused: they come from hidden and weight), hidden [B, T, H], weight [V, H], bias [V],
    labels [B, T] in [0, V)."""
    x = _policy_inputs(B, T, generator, dtype)
    return dict(
        x, hidden=torch.randn(B, T, H, generator=generator, dtype=dtype),
        weight=torch.randn(V, H, generator=generator, dtype=dtype) / H**0.5,
        bias=0.1 * torch.randn(V, generator=generator, dtype=dtype),
        labels=torch.randint(0, V, (B, T), generator=generator),
    )  # fmt: skip


def _linear_policy_loss(x: dict, mask, backend, *, is_weights=False, kl_coef=0.0, **options):
    """rk.linear_policy_loss on the tensors `x` (bias where x has one); is_weights and
    ref_logprobs (with a KL term) only where the options turn them on."""
    return rk.linear_policy_loss(
        x["hidden"], x["weight"], x["labels"], mask, old_logprobs=x["old_logprobs"], advantages=x["advantages"],
        ref_logprobs=x["ref_logprobs"] if kl_coef else None, bias=x.get("bias"),
        is_weights=x["is_weights"] if is_weights else None, kl_coef=kl_coef, backend=backend, **options,
    )  # fmt: skip


# Public ops that run on the reference backend only, on every device (the functional
# layer refuses another backend: group statistics over B scores are too small for a kernel).
REFERENCE_ONLY = ("group_advantages", "broadcast_advantages")


def _backends(op: str):
    return ["reference"] if op in REFERENCE_ONLY else backends_of(op, gpu=True)


def _on_gpu(x):
    """Tensors (in tuples, lists and dicts too) to the GPU; meta tensors and the rest stay."""
    if isinstance(x, torch.Tensor):
        return x.cuda() if x.device.type == "cpu" else x
    if isinstance(x, (list, tuple)):
        return type(x)(_on_gpu(v) for v in x)
    if isinstance(x, dict):
        return {k: _on_gpu(v) for k, v in x.items()}
    return x


def _on_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu() if x.device.type == "cuda" else x
    if isinstance(x, (list, tuple)):
        return type(x)(_on_cpu(v) for v in x)
    if isinstance(x, dict):
        return {k: _on_cpu(v) for k, v in x.items()}
    return x


@pytest.fixture(autouse=True)
def _on_the_gpu(request, monkeypatch):
    """A GPU backend's case (cuda, or compiled triton on a CUDA machine) builds CPU tensors
    as every other case; each public op then gets them on the GPU and gives its results
    back on the CPU (.cuda() and .cpu() are differentiable: gradients, double backward
    included, reach the CPU leaves), so every assertion reads the same tensors."""
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("backend_name") if callspec else None
    if name not in ("cuda", "triton") or not torch.cuda.is_available():
        return

    def moved(fn):
        return lambda *args, **kwargs: _on_cpu(fn(*_on_gpu(args), **_on_gpu(kwargs)))

    for op in PUBLIC_OPS:
        monkeypatch.setattr(rk, op, moved(getattr(rk, op)))


def _sweep(ops):
    """(op, backend) params, each with its skip marks."""
    return [
        pytest.param(op, param.values[0] if hasattr(param, "values") else param, marks=getattr(param, "marks", ()))
        for op in ops
        for param in _backends(op)
    ]


def _mask(B: int, T: int) -> torch.Tensor:
    """Right padding and an interior hole; every row keeps its first position."""
    mask = torch.ones(B, T)
    if T > 2:
        mask[:, -1] = 0
        mask[0, 1] = 0
    return mask


GA = rk.reference.grpo_advantages
# group_advantages' variants: every estimator, and TRL's other two scalings.
GA_CASES = [(e, {}) for e in GA.ESTIMATORS] + [("trl", dict(scale_rewards=s)) for s in ("batch", "none")]
GA_GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])  # rows 0-2 and 3-5
WHITENED = ("reinforce_plus_plus", "reinforce_plus_plus_baseline", "gdpo")  # need >= 2 valid tokens


def _advantage_inputs(estimator: str, options: dict, B: int = 6, T: int = 5, mask=None, generator=None) -> dict:
    """group_advantages' keyword arguments for `estimator` (scores included): B rows in
    the groups GA_GROUPS (B = 6), mask _mask(B, T); fresh random values."""
    g = generator
    mask = _mask(B, T) if mask is None else mask
    kw = dict(options, estimator=estimator, group_index=GA_GROUPS[:B] if B == 6 else torch.arange(B) // 3)
    if estimator in GA.TOKEN_ESTIMATORS:
        kw.update(scores=None, token_rewards=torch.randn(B, T, generator=g), mask=mask)
        if estimator == "remax":
            kw["reward_baselines"] = torch.randn(B, generator=g)
        if estimator == "reinforce_plus_plus":
            kw["gamma"] = 0.9
        if estimator in GA.OTB_ESTIMATORS:
            kw.update(old_logprobs=-torch.rand(B, T, generator=g) * 2, sum_pi_squared=torch.rand(B, T, generator=g),
                      is_weights=torch.rand(B, T, generator=g) + 0.5)  # fmt: skip
    else:
        kw["scores"] = torch.randn(B, 2, generator=g) if estimator == "gdpo" else torch.randn(B, generator=g)
        if estimator in ("opo", "reinforce_plus_plus_baseline", "gdpo"):
            kw["lengths"] = mask.sum(-1)
    return kw


def _advantages(kw: dict, backend=None):
    kw = dict(kw)
    return rk.group_advantages(kw.pop("scores"), **kw, backend=backend)


# --------------------------------------------------------------- coverage --

# rk.__all__'s callables that are not ops, and why.
NOT_OPS = {
    "batch_invariant": "a mode switch (context manager / decorator around op calls): no tensors in or out "
    "(tests/test_batch_invariance.py)",
    "check_index_errors": "reads the index flags the ops set on GPU tensors (test_index_errors_on_gpu_tensors_are_flags)",
}
PUBLIC_OPS = tuple(sorted(name for name in rk.__all__ if callable(getattr(rk, name)) and name not in NOT_OPS))
SWEPT_OPS = set(PUBLIC_OPS)

# Ops not swept yet, and why: each is a known gap, not an oversight.
NOT_YET_SWEPT: dict[str, str] = {}

_NO_INDEX = "no index argument: every input is a value (a float, a mask or an option)"
_NO_VOCABULARY = "no vocabulary: no logits, lm_head weight or bias input"
_NOT_DIFFERENTIABLE = (
    "not differentiable (documented): its outputs carry no graph (test_non_differentiable_ops_carry_no_graph)"
)
_NO_MASK = "no mask: one value per element / pair, every input is read"
# Per class of hostile input, the public ops it cannot apply to, and why.
_INDEX_FREE = (
    "kl_penalty", "gae", "discounted_returns", "masked_whiten", "ppo_policy_loss", "ppo_value_loss", "dpo_loss",
    "bradley_terry_loss", "policy_loss", "broadcast_advantages",
)  # fmt: skip
_VOCABULARY_FREE = (
    "kl_penalty", "kl_shaped_rewards", "gae", "discounted_returns", "masked_mean", "masked_whiten", "ppo_policy_loss",
    "ppo_value_loss", "dpo_loss", "bradley_terry_loss", "ranking_loss", "policy_loss", "group_advantages",
    "broadcast_advantages",
)  # fmt: skip
NOT_APPLICABLE: dict[str, dict[str, str]] = {
    "indices": {
        **dict.fromkeys(_INDEX_FREE, _NO_INDEX),
        "ranking_loss": "ranks are compared, never used as indices: any value is a rank (test_ranking_loss_"
        "compares_int64_ranks_exactly; a NaN rank is in no pair: the masked-position case)",
    },
    "masked vocabulary": {
        **dict.fromkeys(_VOCABULARY_FREE, _NO_VOCABULARY),
        **dict.fromkeys(
            ("sequence_logprobs", "linear_dpo_loss"),
            "no logits or bias argument to mask a vocabulary with; it runs linear_logprobs' kernels, whose masked "
            "vocabularies (through the bias) are test_masked_vocabulary_linear_logprobs'",
        ),
    },
    "NaN at a valid position": {},
    "NaN / inf at a masked position": dict.fromkeys(("kl_penalty", "dpo_loss", "bradley_terry_loss"), _NO_MASK),
    "empty batches": {},
    "meta tensors": {},
    "double backward": dict.fromkeys(
        ("gae", "discounted_returns", "kl_shaped_rewards", "group_advantages"), _NOT_DIFFERENTIABLE
    ),
}


def test_every_public_op_is_swept():
    """A new op needs its hostile cases here (indices, masks, NaN, empty, meta, double
    backward), or its exemption from a class with the reason in NOT_APPLICABLE; the ops
    are rk.__all__'s, not a list kept by hand."""
    assert set(_backend.OP_FAMILY) <= set(PUBLIC_OPS)
    assert set(PUBLIC_OPS) - set(_backend.OP_FAMILY) == set(REFERENCE_ONLY), "a public op with no backend entry"
    for name, covered in CLASS_COVERAGE.items():
        exempt = NOT_APPLICABLE[name]
        left = set(PUBLIC_OPS) - covered - set(exempt) - set(NOT_YET_SWEPT)
        assert not left, f"class {name!r}: add {sorted(left)} to tests/test_hostile.py, or exempt them with a reason"
        assert not covered & set(exempt), f"class {name!r}: {sorted(covered & set(exempt))} both swept and exempt"
        assert set(covered) <= set(PUBLIC_OPS)


def test_reference_only_ops_refuse_another_backend():
    """group_advantages and broadcast_advantages name the backend they run on."""
    for backend_name in ("cpu", "triton", "cuda"):
        with pytest.raises(ValueError, match="reference backend only"):
            rk.group_advantages(torch.randn(4), group_size=2, backend=backend_name)
        with pytest.raises(ValueError, match="reference backend only"):
            rk.broadcast_advantages(torch.randn(2), torch.ones(2, 3), backend=backend_name)


# ------------------------------------------- 1. out-of-range indices --

INDEX_OPS = (
    "token_logprobs", "linear_logprobs", "sequence_logprobs", "linear_dpo_loss", "linear_policy_loss",
    "kl_shaped_rewards",
)  # fmt: skip


def _index_case(op: str):
    """(fn(index tensor, backend) -> output, clean index, bad index, the output entries the
    bad indices touch): 4 rows of 3 positions, V (just past the end) in row 1 and -5 in row
    2 (neither is ignore_index). Far-out indices, which crashed the process, are the
    subprocess test's."""
    B, T, V, H = 4, 3, 11, 8
    labels = torch.randint(0, V, (B, T))
    bad = labels.clone()
    bad[1, 0], bad[2, 1] = V, -5
    touched = bad != labels
    if op == "token_logprobs":
        logits = torch.randn(B, T, V)
        return (lambda y, b: rk.token_logprobs(logits, y, backend=b)), labels, bad, touched
    hidden, weight, mask = torch.randn(B, T, H), torch.randn(V, H), torch.ones(B, T)
    if op == "linear_logprobs":
        return (lambda y, b: rk.linear_logprobs(hidden, weight, y, backend=b)), labels, bad, touched
    if op == "sequence_logprobs":
        return (lambda y, b: rk.sequence_logprobs(hidden, weight, y, mask, backend=b)), labels, bad, touched.any(-1)
    if op == "linear_dpo_loss":
        ref = torch.randn(B // 2), torch.randn(B // 2)

        def loss(y, b):
            return rk.linear_dpo_loss(hidden, weight, y, mask, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1],
                                      backend=b)[0]  # fmt: skip

        return loss, labels, bad, torch.tensor(True)
    if op == "linear_policy_loss":
        old, adv = -torch.rand(B, T), torch.randn(B)

        def policy(y, b):
            return rk.linear_policy_loss(hidden, weight, y, mask, old_logprobs=old, advantages=adv, backend=b)[0]

        return policy, labels, bad, torch.tensor(True)
    scores, lp, ref_lp = torch.randn(B), -torch.rand(B, T), -torch.rand(B, T)
    index = torch.tensor([0, 2, 1, 2])
    bad_index = torch.tensor([0, T, -5, 2])

    def rewards(i, b):
        return rk.kl_shaped_rewards(scores, lp, ref_lp, mask, kl_coef=0.1, score_index=i, backend=b)[0]

    return rewards, index, bad_index, (bad_index != index)[:, None].expand(B, T)


def _assert_error_or_nan(run, clean, touched):
    """Either a clear error naming the index, or the touched entries NaN and the rest as clean."""
    try:
        got = run()
    except (ValueError, RuntimeError) as error:
        assert "labels" in str(error) or "score_index" in str(error), str(error)
        return "raised"
    assert torch.isnan(got[touched]).all(), got
    torch.testing.assert_close(got[~touched], clean[~touched])
    return "nan"


@pytest.mark.parametrize("op,backend_name", _sweep(INDEX_OPS))
def test_out_of_range_index_under_torch_compile(op, backend_name):
    """The Python range check is skipped while torch.compile traces; the kernels check
    themselves (C++: a ValueError before any row is read or written; reference and
    Triton: that row is NaN, nothing read or written out of range)."""
    torch._dynamo.reset()  # one lambda for every case: stay below the recompile limit
    fn, index, bad, touched = _index_case(op)
    clean = fn(index, backend_name)
    compiled = torch.compile(lambda i: fn(i, backend_name), fullgraph=True, backend="aot_eager")
    outcome = _assert_error_or_nan(lambda: compiled(bad), clean, touched)
    if backend_name == "cpu":  # the C++ kernels check: a clear error, nothing touched
        assert outcome == "raised"


@pytest.mark.parametrize("op", INDEX_OPS)
def test_eager_range_checks_still_raise_first(op):
    fn, _, bad, _ = _index_case(op)
    with pytest.raises(ValueError, match="must be in"):
        fn(bad, "reference")


def _case_id(estimator, options):
    return estimator + "".join(f"-{k}={v}" for k, v in options.items())


GROUPED = [(e, o) for e, o in GA_CASES if e not in ("remax", "reinforce_plus_plus")]  # the others take no groups


@pytest.mark.parametrize("estimator,options", GROUPED, ids=[_case_id(*c) for c in GROUPED])
def test_group_advantages_take_any_integer_labels(estimator, options):
    """group_index holds labels, not indices (nothing to be out of range): negative, int64
    extremes and interleaved groups give what the dense labels 0..G-1 give."""
    kw = _advantage_inputs(estimator, options)
    interleaved = torch.tensor([0, 1, 0, 1, 0, 1])
    want = _advantages(dict(kw, group_index=interleaved))
    for labels in ([-7, 2**62, -7, 2**62, -7, 2**62], [-(2**63), 5, -(2**63), 5, -(2**63), 5]):
        got = _advantages(dict(kw, group_index=torch.tensor(labels)))
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=False)
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("backend_name", _backends("linear_policy_loss"))
def test_linear_policy_loss_never_reads_labels_at_mask_0_positions(backend_name):
    """Labels at mask-0 positions (padding: any value, out of the vocabulary too) are never
    read, eager or compiled (where the range check is skipped): the loss and statistics are
    those of in-range labels there, and the cpu kernels raise nothing."""
    torch._dynamo.reset()
    B, T, H, V = 3, 5, 4, 7
    mask = _mask(B, T)
    x = _linear_policy_inputs(B, T, H, V, torch.Generator().manual_seed(6))

    def fn(labels):
        loss, stats = _linear_policy_loss(dict(x, labels=labels), mask, backend_name, kl_coef=0.1, entropy_coef=0.01)
        return loss, stats["ratio_mean"], stats["entropy"]

    clean = fn(x["labels"])
    assert all(torch.isfinite(out) for out in clean)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for fill in (V, -5, 10**6, -100):
        labels = torch.where(mask != 0, x["labels"], torch.full_like(x["labels"], fill))
        for run in (fn, compiled):
            torch.testing.assert_close(run(labels), clean, rtol=1e-6, atol=1e-6, msg=lambda m, f=fill: f"{f}: {m}")


@pytest.mark.skipif("token_logprobs" not in _backend.HAS_CPU, reason="rlhf_kernels._C not built")
def test_cpu_kernels_check_labels_and_score_index_themselves():
    """Direct op calls (what a compiled graph runs): forward, backward and in-place
    backward refuse an out-of-range label before touching memory (the backward wrote at
    z[label] unchecked); kl_shaped_rewards refuses an out-of-range score_index."""
    ops = torch.ops.rlhf_kernels
    logits = torch.randn(3, 7)
    labels = torch.tensor([1, 7, -100])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\)"):
        ops.token_logprobs(logits, labels, 1.0, None, 1.0, -100, True, False)
    _, entropy, lse = ops.token_logprobs(logits, torch.tensor([1, 2, -100]), 1.0, None, 1.0, -100, True, False)
    grad = torch.ones(3)
    for bad in (torch.tensor([1, 7, -100]), torch.tensor([-100, -5, 1])):  # row 1: in the buffer if unchecked
        with pytest.raises(ValueError, match="labels must be in"):
            ops.token_logprobs_backward(grad, grad, logits, bad, lse, entropy, 1.0, None, 1.0, -100)
        target = logits.clone()
        with pytest.raises(ValueError, match="labels must be in"):
            ops.token_logprobs_backward_(target, grad, grad, bad, lse, entropy, 1.0, None, 1.0, -100)
        assert torch.equal(target, logits)  # nothing written
    lp = -torch.rand(2, 4)
    for index in ([0, 4], [-1, 0]):
        with pytest.raises(ValueError, match=r"score_index must be in \[0, 4\)"):
            ops.kl_shaped_rewards(torch.ones(2), lp, lp, torch.ones(2, 4), 0.1, "k1", None, torch.tensor(index))


def test_index_errors_on_gpu_tensors_are_flags(monkeypatch):
    """On a GPU the range checks would be host syncs: they become device flags instead
    (no sync), the row is NaN, and rk.check_index_errors() raises naming the op and the
    argument, then clears. Here CPU tensors stand in for GPU ones (values_checked off,
    deferred on), on the reference backend: the flags are torch ops on the input."""
    from rlhf_kernels import _index_errors, _validation

    monkeypatch.setattr(_validation, "values_checked", lambda x: False)
    monkeypatch.setattr(_index_errors, "deferred", lambda x: x.numel() > 0 and not torch.compiler.is_compiling())
    monkeypatch.setattr(_index_errors, "_FLAGS", {})
    V, T = 11, 4
    logits, good = torch.randn(3, V), torch.randint(0, V, (3,))
    rk.token_logprobs(logits, good, backend="reference")
    rk.check_index_errors()  # in range: nothing to report
    bad = good.clone()
    bad[1] = V + 5
    logprobs = rk.token_logprobs(logits, bad, backend="reference")
    assert torch.isnan(logprobs[1]) and torch.isfinite(logprobs[[0, 2]]).all()
    lp = torch.randn(2, T)
    scores, index = torch.ones(2), torch.tensor([0, T])
    rk.kl_shaped_rewards(scores, lp, lp, torch.ones(2, T), kl_coef=0.1, score_index=index, backend="reference")
    with pytest.raises(ValueError, match=r"token_logprobs \(labels, cpu\).*kl_shaped_rewards \(score_index, cpu\)"):
        rk.check_index_errors()
    rk.check_index_errors()  # cleared
    hidden, weight = torch.randn(2, T, 5), torch.randn(V, 5)
    labels, mask = torch.randint(0, V, (2, T)), torch.ones(2, T)
    labels[0, 1] = -3
    rk.linear_dpo_loss(hidden, weight, labels, mask, reference_free=True, backend="reference")
    with pytest.raises(ValueError, match="linear_dpo_loss"):
        rk.check_index_errors()
    mask[0, 1] = 0  # masked: that label is never read
    rk.linear_dpo_loss(hidden, weight, labels, mask, reference_free=True, backend="reference")
    rk.check_index_errors()


def test_the_segfault_case_in_a_subprocess():
    """The issue's case: torch.compile(fullgraph, aot_eager) of the cpu backend with label
    1_000_000 crashed the process (exit 139), and -5 returned 1.9e23."""
    script = textwrap.dedent(
        """
        import torch, rlhf_kernels as rk
        f = torch.compile(lambda x, y: rk.token_logprobs(x, y, backend="cpu"), fullgraph=True, backend="aot_eager")
        x = torch.randn(4, 32000)
        for bad in (1_000_000, -5):
            y = torch.tensor([0, 1, bad, 3])
            try:
                out = f(x, y)
            except ValueError as error:
                assert "labels must be in" in str(error), error
                print("raised")
            else:
                assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all(), out
                print("nan")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-3000:])
    assert result.stdout.split() in (["raised", "raised"], ["nan", "nan"]), result.stdout


# ------------------------------------------------- 2. masked vocabularies --


def _exact(logits: torch.Tensor, labels: torch.Tensor):
    """float64 log-probs and entropy in which a masked logit has probability exactly 0."""
    z = logits.double()
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    return logp.gather(-1, labels[:, None])[:, 0], entropy


MASKINGS = [
    pytest.param(1000, 10, F32_MIN, id="V1000-keep10-finfo.min"),  # the issue's: entropy 599 (truth 2.25) on cpu
    pytest.param(5000, 500, -INF, id="V5000-keep500-inf"),  # the issue's: NaN / +inf / NaN
    pytest.param(1000, 10, -INF, id="V1000-keep10-inf"),
]


@pytest.mark.parametrize("V,kept,fill", MASKINGS)
@pytest.mark.parametrize("backend_name", _backends("token_logprobs"))
def test_masked_vocabulary_token_logprobs(backend_name, V, kept, fill):
    N = 3
    logits = torch.randn(N, V) * 3
    keep = torch.zeros(N, V, dtype=torch.bool)
    keep[:, :kept] = True
    keep[1] = keep[1].roll(V // 2)  # the kept block elsewhere in another row
    logits = logits.masked_fill(~keep, fill).requires_grad_(True)
    labels = torch.stack([torch.nonzero(row)[0, 0] for row in keep])
    lp, h = rk.token_logprobs(logits, labels, return_entropy=True, backend=backend_name)
    want_lp, want_h = _exact(logits.detach(), labels)
    torch.testing.assert_close(lp.double(), want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.double(), want_h, atol=1e-5, rtol=1e-5)
    (lp.sum() + 0.5 * h.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~keep] == 0).all()  # the 4.0 per masked logit on cpu


@pytest.mark.parametrize("fill", [-INF, F32_MIN])
@pytest.mark.parametrize("backend_name", _backends("linear_logprobs"))
def test_masked_vocabulary_linear_logprobs(backend_name, fill):
    """Padded vocabulary rows masked through the bias: their weight and bias get no gradient."""
    N, H, V, kept = 4, 8, 300, 20
    hidden, weight = torch.randn(N, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    bias = torch.zeros(V)
    bias[kept:] = fill
    bias.requires_grad_(True)
    labels = torch.randint(0, kept, (N,))
    lp, h = rk.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, backend=backend_name)
    logits = (hidden @ weight.T + bias).detach()
    want_lp, want_h = _exact(logits, labels)
    torch.testing.assert_close(lp.double(), want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.double(), want_h, atol=1e-5, rtol=1e-5)
    (lp.sum() + h.sum()).backward()
    for grad in (hidden.grad, weight.grad, bias.grad):
        assert torch.isfinite(grad).all()
    assert (weight.grad[kept:] == 0).all() and (bias.grad[kept:] == 0).all()


@pytest.mark.parametrize("fill", [-INF, F32_MIN])
@pytest.mark.parametrize("backend_name", _backends("linear_policy_loss"))
def test_masked_vocabulary_linear_policy_loss(backend_name, fill):
    """Padded vocabulary rows masked through the bias: the loss, its entropy statistic and
    the gradients are the float64 unfused computation's (_exact's log-probs and entropy, the
    reference policy_loss), and the masked rows of weight and bias get exactly 0."""
    B, T, H, V, kept = 2, 4, 8, 300, 20
    mask = _mask(B, T)
    x = _linear_policy_inputs(B, T, H, V, torch.Generator().manual_seed(7))
    x["bias"][kept:] = fill
    x["labels"] %= kept
    options = dict(loss_type="grpo", kl_coef=0.1, entropy_coef=0.05, is_weights=True)
    leaves = {name: x[name].clone().requires_grad_(True) for name in ("hidden", "weight", "bias")}
    loss, stats = _linear_policy_loss(dict(x, **leaves), mask, backend_name, **options)
    grads = torch.autograd.grad(loss, list(leaves.values()))

    exact = {name: x[name].double().requires_grad_(True) for name in ("hidden", "weight", "bias")}
    logits = (exact["hidden"] @ exact["weight"].T + exact["bias"]).reshape(B * T, V)
    lp, entropy = _exact(logits, torch.where(mask != 0, x["labels"], 0).reshape(B * T))
    doubles = {name: value.double() for name, value in x.items() if name in POLICY_TENSORS}
    doubles.update(logprobs=lp.reshape(B, T), entropy=entropy.reshape(B, T))
    want, want_stats = _policy_loss(doubles, mask, "reference", **options)
    want_grads = torch.autograd.grad(want, list(exact.values()))

    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["entropy"].double(), want_stats["entropy"], atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads, want_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)
    assert (grads[1][kept:] == 0).all() and (grads[2][kept:] == 0).all()


@pytest.mark.parametrize("backend_name", _backends("token_logprobs"))
def test_minus_inf_only_for_a_label_whose_own_logit_is_minus_inf(backend_name):
    logits = torch.randn(3, 50)
    logits[:, 40:] = -INF
    logits[2, 40:] = F32_MIN
    labels = torch.tensor([3, 45, 45])  # row 1: its own logit is -inf; row 2: finfo.min
    lp, h = rk.token_logprobs(logits, labels, return_entropy=True, backend=backend_name)
    assert lp[1] == -INF
    assert torch.isfinite(lp[[0, 2]]).all() and torch.isfinite(h).all()
    assert lp[2] < -1e38


# ----------------------------------------------------------------- 3. NaN --


def _nan_case(op: str, variant):
    """(fn(backend) -> outputs that must be NaN, fn(backend) -> outputs that must stay finite)."""
    B, T, V, H = 3, 5, 7, 4
    mask = _mask(B, T)
    if op == "token_logprobs":
        logits = torch.randn(B, V)
        logits[0, 3] = NAN
        labels = torch.tensor([1, 2, 3])
        lp = lambda b: rk.token_logprobs(logits, labels, backend=b)
        return lambda b: [lp(b)[0]], lambda b: [lp(b)[1:]]
    if op in ("linear_logprobs", "sequence_logprobs", "linear_dpo_loss"):
        hidden, weight = torch.randn(2 * B, T, H), torch.randn(V, H)
        hidden[0, 0, 1] = NAN  # a valid position of row 0
        labels, full = torch.randint(0, V, (2 * B, T)), torch.ones(2 * B, T)
        if op == "linear_logprobs":
            out = lambda b: rk.linear_logprobs(hidden, weight, labels, backend=b)
            return lambda b: [out(b)[0, 0]], lambda b: [out(b)[1:]]
        if op == "sequence_logprobs":
            out = lambda b: rk.sequence_logprobs(hidden, weight, labels, full, backend=b)
            return lambda b: [out(b)[0]], lambda b: [out(b)[1:]]
        ref = torch.zeros(B), torch.zeros(B)
        loss = lambda b: rk.linear_dpo_loss(
            hidden, weight, labels, full, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1], backend=b
        )[0]
        return lambda b: [loss(b)], lambda b: []
    if op == "kl_penalty":
        estimator, clamp = variant
        lp, ref = -torch.rand(B, T), -torch.rand(B, T)
        lp[1, 2] = NAN
        out = lambda b: rk.kl_penalty(lp, ref, estimator=estimator, clamp=clamp, backend=b)
        return lambda b: [out(b)[1, 2]], lambda b: [out(b)[0]]
    if op == "kl_shaped_rewards":
        lp, ref = -torch.rand(B, T), -torch.rand(B, T)
        lp[1, 2] = NAN
        out = lambda b: rk.kl_shaped_rewards(torch.randn(B), lp, ref, mask, kl_coef=0.1, backend=b)
        return lambda b: [out(b)[0][1, 2], out(b)[1][1, 2]], lambda b: [out(b)[0][0]]
    if op in ("gae", "discounted_returns"):
        rewards, values = torch.randn(B, T), torch.randn(B, T)
        rewards[1, 2] = NAN
        if op == "gae":
            out = lambda b: rk.gae(rewards, values, mask, mask_mode=variant, backend=b)[0]
        else:
            out = lambda b: rk.discounted_returns(rewards, mask, backend=b)
        return lambda b: [out(b)[1, :3]], lambda b: [out(b)[0], out(b)[1, 3:]]
    if op in ("masked_mean", "masked_whiten"):
        x = torch.randn(B, T)
        x[1, 2] = NAN
        if op == "masked_mean":
            return lambda b: [rk.masked_mean(x, mask, backend=b)], lambda b: [rk.masked_mean(x, mask, 1, backend=b)[0]]
        out = lambda b: rk.masked_whiten(x, mask, backend=b)
        return lambda b: [out(b)[mask != 0]], lambda b: []
    if op == "ppo_policy_loss":
        lp, old, adv = -torch.rand(B, T), -torch.rand(B, T), torch.randn(B, T)
        lp[1, 2] = NAN
        loss = lambda b: rk.ppo_policy_loss(lp, old, adv, mask, backend=b, **variant)[0]
        return lambda b: [loss(b)], lambda b: []
    if op == "ppo_value_loss":
        v, old, ret = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
        v[1, 2] = NAN
        loss = lambda b: rk.ppo_value_loss(v, old, ret, mask, clip=variant, backend=b)[0]
        return lambda b: [loss(b)], lambda b: []
    if op == "policy_loss":
        poisoned, options = variant
        x = _policy_inputs(B, T)
        x[poisoned][1, 2] = NAN
        run = lambda b: _policy_loss(x, mask, b, **options)
        read_it = ("ratio_mean", "ratio_max") if poisoned == "logprobs" else ()  # the statistics that read it
        return lambda b: [run(b)[0], *(run(b)[1][name] for name in read_it)], lambda b: []
    if op == "linear_policy_loss":
        poisoned, options = variant
        x = _linear_policy_inputs(B, T, H, V)
        if poisoned == "advantages[B]":
            x["advantages"] = x["advantages"][:, 0].clone()
            x["advantages"][1] = NAN
        elif poisoned == "hidden":
            x["hidden"][1, 2, 0] = NAN
        else:
            x[poisoned][1, 2] = NAN
        run = lambda b: _linear_policy_loss(x, mask, b, **options)
        # the statistics that read it (geo_mean has no entropy statistic), and one that does not
        read_it = {"hidden": ("ratio_mean", "ratio_max"), "old_logprobs": ("ratio_mean", "ratio_max")}
        if poisoned == "hidden" and options.get("loss_type") != "geo_mean":
            read_it["hidden"] += ("entropy",)

        def nan(b):
            loss, stats = run(b)
            return [loss, *(stats[name] for name in read_it.get(poisoned, ()))]

        return nan, lambda b: [] if poisoned == "hidden" else [run(b)[1]["entropy"]]
    if op == "dpo_loss":
        loss_type, divergence = (variant, "reverse_kl") if isinstance(variant, str) else variant
        logps = [-torch.rand(B) * 5 for _ in range(4)]
        logps[0 if loss_type == "sft" else 1][0] = NAN  # sft reads the chosen log-probs only
        extra = dict(label_smoothing=0.1) if loss_type in ("exo_pair", "robust") else {}
        if loss_type in ("sigmoid_norm", "sft"):
            extra = dict(chosen_lengths=torch.full((B,), 3), rejected_lengths=torch.full((B,), 4))
        if divergence != "reverse_kl":
            extra["f_divergence_type"] = divergence
        out = lambda b: rk.dpo_loss(*logps, loss_type=loss_type, backend=b, **extra)
        if loss_type == "sft":  # one NLL over the batch's chosen tokens: every pair's loss reads it
            return lambda b: [out(b)[0]], lambda b: [out(b)[2]]
        if loss_type in rk.reference.dpo.BATCH_LOSS_TYPES:  # aot: sorted across the batch, the loss reads every pair
            return lambda b: [out(b)[0].sum(), out(b)[2][0]], lambda b: [out(b)[1], out(b)[2][1:]]
        return lambda b: [out(b)[0][0]], lambda b: [out(b)[0][1:]]
    if op == "group_advantages":
        estimator, options, poisoned = variant
        kw = _advantage_inputs(estimator, options)
        valid = kw.get("mask", _mask(6, 5)) != 0
        group_0 = (GA_GROUPS == 0)[:, None].expand(6, 5)
        if poisoned == "scores":  # sequence estimators: row 1's score, in group 0
            kw["scores"][1] = NAN
            batch_wide = (
                estimator in ("reinforce_plus_plus_baseline", "gdpo") or options.get("scale_rewards") == "batch"
            )
            nan = torch.ones(6, dtype=torch.bool) if batch_wide else GA_GROUPS == 0
        elif poisoned == "token_rewards":  # row 1's last valid reward
            kw["token_rewards"][1, 3] = NAN
            if estimator == "remax":  # row 1's returns to go up to it
                nan = torch.zeros(6, 5, dtype=torch.bool)
                nan[1, :4] = True
            else:  # reinforce_plus_plus whitens over the batch; OTB: the group's baselines
                nan = valid if estimator == "reinforce_plus_plus" else valid & group_0
        else:  # old_logprobs of row 1 at position 1: its path weight W from there on, in its group's baselines
            kw["old_logprobs"][1, 1] = NAN
            column = valid.cumsum(-1) - 1 if estimator == "tir_optimal_token_baseline" else torch.arange(5)
            nan = valid & group_0 & (column >= 1)
        out = lambda b: _advantages(kw, b)
        return lambda b: [out(b)[nan]], lambda b: [out(b)[~nan]]
    if op == "broadcast_advantages":
        advantages = torch.randn(B)
        advantages[1] = NAN
        out = lambda b: rk.broadcast_advantages(advantages, mask, backend=b)
        return lambda b: [out(b)[1][mask[1] != 0]], lambda b: [out(b)[[0, 2]], out(b)[1][mask[1] == 0]]
    if op == "bradley_terry_loss":
        chosen, rejected = torch.randn(B), torch.randn(B)
        rejected[1] = NAN
        return lambda b: [rk.bradley_terry_loss(chosen, rejected, backend=b)], lambda b: []
    assert op == "ranking_loss"
    rewards, ranks = torch.randn(B, 4), torch.arange(4).repeat(B, 1)
    rewards[1, 2] = NAN
    return lambda b: [rk.ranking_loss(rewards, ranks, backend=b)], lambda b: []


NAN_CASES = (
    [("token_logprobs", None), ("linear_logprobs", None), ("sequence_logprobs", None), ("linear_dpo_loss", None)]
    + [("kl_penalty", (e, c)) for e in ESTIMATORS for c in (None, 1.0)]
    + [("kl_shaped_rewards", None), ("discounted_returns", None), ("masked_mean", None), ("masked_whiten", None)]
    + [("gae", mode) for mode in ("ignore", "multiply", "carry")]
    + [("ppo_policy_loss", {}), ("ppo_policy_loss", dict(dual_clip=3.0, log_ratio_clamp=5.0))]
    + [("ppo_value_loss", 0.2), ("ppo_value_loss", None)]
    + [("dpo_loss", loss) for loss in rk.reference.dpo.LOSS_TYPES]  # per pair, aot, aot_unpaired, sft
    + [("dpo_loss", (loss, f)) for f in rk.reference.dpo.F_DIVERGENCES[1:] for loss in ("sigmoid", "ipo", "robust")]
    + [("bradley_terry_loss", None), ("ranking_loss", None)]
    + [("group_advantages", (e, o, "scores")) for e, o in GA_CASES if e in GA.SEQUENCE_ESTIMATORS]
    + [("group_advantages", (e, o, "token_rewards")) for e, o in GA_CASES if e in GA.TOKEN_ESTIMATORS]
    + [("group_advantages", (e, {}, "old_logprobs")) for e in GA.OTB_ESTIMATORS]
    + [("broadcast_advantages", None)]
    + [("policy_loss", ("logprobs", dict(loss_type=loss))) for loss in POLICY_LOSS_TYPES]
    + [("policy_loss", ("logprobs", dict(loss_type="grpo", dual_clip=3.0, delta=1.5, log_ratio_clamp=5.0)))]
    + [("policy_loss", ("logprobs", dict(loss_type="cispo", cispo_clip="upper", clip_high=5.0)))]
    + [("policy_loss", ("logprobs", dict(loss_type="dapo", importance_sampling_level="sequence")))]
    + [("policy_loss", ("ref_logprobs", dict(loss_type="grpo", kl_coef=0.1, kl_estimator=e))) for e in ESTIMATORS]
    + [("policy_loss", ("ref_logprobs", dict(loss_type="bnpo", kl_coef=0.1, kl_estimator="low_var_kl+")))]
    + [("policy_loss", ("is_weights", dict(loss_type=loss, is_weights=True))) for loss in ("cispo", "vespo")]
    + [("policy_loss", ("advantages", dict(loss_type=loss, dual_clip=3.0))) for loss in ("grpo", "sapo")]
    + [("policy_loss", ("old_logprobs", dict(loss_type=loss))) for loss in ("dr_grpo", "dro")]
    + [
        ("linear_policy_loss", ("hidden", dict(loss_type=loss, kl_coef=0.1, entropy_coef=0.01)))
        for loss in ("grpo", "gspo", "cispo", "vespo")
    ]
    + [("linear_policy_loss", ("hidden", dict(loss_type="geo_mean")))]
    + [("linear_policy_loss", ("old_logprobs", dict(loss_type="dapo", dual_clip=3.0)))]
    + [("linear_policy_loss", ("advantages", dict(loss_type="grpo", dual_clip=3.0)))]
    + [("linear_policy_loss", ("advantages[B]", dict(loss_type=loss))) for loss in ("sapo", "vespo")]
    + [("linear_policy_loss", ("ref_logprobs", dict(kl_coef=0.1, kl_estimator=e))) for e in ("k3", "low_var_kl")]
    + [("linear_policy_loss", ("is_weights", dict(loss_type="cispo", is_weights=True)))]
)


@pytest.mark.parametrize(
    "op,variant,backend_name",
    [
        pytest.param(op, variant, *p.values, marks=p.marks, id=f"{op}-{variant}-{p.values[0]}")
        for op, variant in NAN_CASES
        for p in [q if hasattr(q, "values") else pytest.param(q) for q in _backends(op)]
    ],
)
def test_nan_at_a_valid_position_is_never_hidden(op, variant, backend_name):
    """A NaN input at a valid position makes the outputs that read it NaN (the issue:
    ppo_policy_loss inf on cpu and -0.975 on triton, triton ppo_value_loss 0.555,
    kl_penalty(low_var_kl) 10.0, dpo_loss(hinge) 0.0; policy_loss grpo 0.744 on triton
    and its ratio_max finite on cpu and triton): clamp / max / min keep NaN as torch's
    do. Outputs that do not read it stay finite."""
    nan_outputs, finite_outputs = _nan_case(op, variant)
    for out in nan_outputs(backend_name):
        assert torch.isnan(out).all(), out
    for out in finite_outputs(backend_name):
        assert torch.isfinite(out).all(), out


def _masked_poison_case(op: str, variant):
    """fn(poison value, backend) -> (outputs, [grads]) whose valid entries must not depend on
    what the mask-0 positions hold; the mask of those entries (None: all)."""
    B, T = 3, 6
    mask = _mask(B, T)
    base = torch.randn(4, B, T)

    def poisoned(x, poison):
        return torch.where(mask != 0, x, torch.full_like(x, poison))

    if op in ("ppo_policy_loss", "ppo_value_loss"):

        def fn(poison, b):
            x = poisoned(base[0], poison).requires_grad_(True)
            others = [poisoned(base[i], poison) for i in (1, 2)]
            if op == "ppo_policy_loss":
                loss, stats = rk.ppo_policy_loss(x, others[0], others[1], mask, agg=variant, dual_clip=3.0, backend=b)
            else:
                loss, stats = rk.ppo_value_loss(x, others[0], others[1], mask, agg=variant, backend=b)
            (grad,) = torch.autograd.grad(loss, x)
            return [loss, *stats.values(), grad[mask != 0], grad[mask == 0]]

        return fn
    if op == "policy_loss":
        clean = _policy_inputs(B, T, torch.Generator().manual_seed(2))

        def fn(poison, b):
            x = {name: poisoned(value, poison) for name, value in clean.items()}
            x["logprobs"].requires_grad_(True)
            x["entropy"].requires_grad_(True)
            loss, stats = _policy_loss(x, mask, b, **variant)
            grads = torch.autograd.grad(loss, [x["logprobs"], x["entropy"]], allow_unused=True)
            grads = [torch.zeros(B, T) if g is None else g for g in grads]  # entropy: no bonus, no gradient
            return [loss, *stats.values()] + [g[mask != 0] for g in grads] + [g[mask == 0] for g in grads]

        return fn
    if op == "linear_policy_loss":
        clean = _linear_policy_inputs(B, T, 4, 7, torch.Generator().manual_seed(4))

        def fn(poison, b):  # every [B, T] input, hidden and labels (out of range too) poisoned at mask-0
            x = {name: poisoned(clean[name], poison) for name in POLICY_TENSORS}
            x["hidden"] = torch.where(mask[..., None] != 0, clean["hidden"], torch.full_like(clean["hidden"], poison))
            fill = {0.0: 0, INF: -5, -INF: 7}.get(poison, 10**6)  # 0.0: the clean run's valid labels
            x["labels"] = torch.where(mask != 0, clean["labels"], torch.full_like(clean["labels"], fill))
            leaves = [x["hidden"].requires_grad_(True)] + [
                x.setdefault(name, clean[name].clone().requires_grad_(True)) for name in ("weight", "bias")
            ]
            loss, stats = _linear_policy_loss(x, mask, b, **variant)
            d_hidden, d_weight, d_bias = torch.autograd.grad(loss, leaves)
            return [loss, *stats.values(), d_hidden[mask != 0], d_hidden[mask == 0], d_weight, d_bias]

        return fn
    if op in ("masked_mean", "masked_whiten"):

        def fn(poison, b):
            x = poisoned(base[0], poison).requires_grad_(True)
            if op == "masked_mean":
                out = [rk.masked_mean(x, mask, backend=b), rk.masked_mean(x, mask, -1, backend=b)]
            else:
                out = [rk.masked_whiten(x, mask, fill_masked=variant, backend=b)[mask != 0]]
                if not variant:  # the mask-0 outputs are whitened too: they read their own x
                    return out
            (grad,) = torch.autograd.grad(sum(o.sum() for o in out), x)
            return out + [grad[mask != 0], grad[mask == 0]]

        return fn
    if op in ("gae", "discounted_returns"):

        def fn(poison, b):
            r, v = poisoned(base[0], poison), poisoned(base[1], poison)
            if op == "gae":
                advantages, returns = rk.gae(r, v, mask, mask_mode=variant, backend=b)
                return [advantages[mask != 0], returns[mask != 0]]
            return [rk.discounted_returns(r, mask, backend=b)[mask != 0]]

        return fn
    if op == "kl_shaped_rewards":

        def fn(poison, b):
            lp, ref = poisoned(-base[0].abs(), poison), poisoned(-base[1].abs(), poison)
            rewards, kl = rk.kl_shaped_rewards(base[2, :, 0], lp, ref, mask, kl_coef=0.1, estimator=variant, backend=b)
            return [rewards[mask != 0], kl]

        return fn
    if op == "token_logprobs":

        def fn(poison, b):
            logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
            logits[2] = poison
            logits.requires_grad_(True)
            lp, h = rk.token_logprobs(logits, torch.tensor([1, 2, -100, 3]), return_entropy=True, backend=b)
            (grad,) = torch.autograd.grad(lp.sum() + h.sum(), logits)
            return [lp, h, grad]

        return fn
    if op == "sequence_logprobs":

        def fn(poison, b):  # labels at mask-0 positions are never read: any value, out of range too
            g = torch.Generator().manual_seed(1)
            hidden, weight = torch.randn(B, T, 4, generator=g), torch.randn(7, 4, generator=g)
            labels = torch.randint(0, 7, (B, T), generator=g)
            fill = {0.0: 0, INF: -5, -INF: 7}.get(poison, 10**6)  # 0.0: the clean run's valid labels
            labels = torch.where(mask != 0, labels, torch.full_like(labels, fill))
            return [rk.sequence_logprobs(hidden, weight, labels, mask, backend=b)]

        return fn
    if op == "linear_logprobs":

        def fn(poison, b):  # rows labelled ignore_index hold poison hidden states (padding)
            g = torch.Generator().manual_seed(8)
            hidden, weight, bias = (
                torch.randn(6, 4, generator=g),
                torch.randn(7, 4, generator=g),
                torch.randn(7, generator=g),
            )
            labels = torch.randint(0, 7, (6,), generator=g)
            labels[[1, 4]] = -100
            keep = labels != -100
            hidden = torch.where(keep[:, None], hidden, torch.full_like(hidden, poison))
            leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
            lp, entropy = rk.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, backend=b)
            d_hidden, d_weight, d_bias = torch.autograd.grad(lp.sum() + entropy[keep].sum(), leaves)
            if variant == "d_weight":
                return [d_weight]
            return [lp, entropy[keep], d_hidden[keep], d_hidden[~keep], d_bias]

        return fn
    if op == "linear_dpo_loss":

        def fn(poison, b):  # mask-0 positions: poison hidden states, labels out of the vocabulary
            g = torch.Generator().manual_seed(9)
            pairs = _mask(2 * B, T)
            hidden, weight = torch.randn(2 * B, T, 4, generator=g), torch.randn(7, 4, generator=g)
            labels, refs = torch.randint(0, 7, (2 * B, T), generator=g), torch.randn(2, B, generator=g)
            hidden = torch.where(pairs[..., None] != 0, hidden, torch.full_like(hidden, poison)).requires_grad_(True)
            fill = {0.0: 0, INF: -5, -INF: 7}.get(poison, 10**6)
            labels = torch.where(pairs != 0, labels, torch.full_like(labels, fill))
            weight.requires_grad_(True)
            loss, stats = rk.linear_dpo_loss(hidden, weight, labels, pairs, ref_chosen_logps=refs[0],
                                             ref_rejected_logps=refs[1], backend=b)  # fmt: skip
            d_hidden, d_weight = torch.autograd.grad(loss, [hidden, weight])
            if variant == "d_weight":
                return [d_weight]
            return [loss, *_flatten(stats), d_hidden[pairs != 0], d_hidden[pairs == 0]]

        return fn
    if op == "group_advantages":
        estimator, options = variant
        kw = _advantage_inputs(estimator, options, generator=torch.Generator().manual_seed(9))
        if estimator in GA.TOKEN_ESTIMATORS:  # every [B, T] input poisoned at mask-0 positions
            names = [k for k in ("token_rewards", "old_logprobs", "sum_pi_squared", "is_weights") if k in kw]

            def fn(poison, b):
                x = {k: torch.where(kw["mask"] != 0, kw[k], torch.full_like(kw[k], poison)) for k in names}
                return [_advantages(dict(kw, **x), b)]  # every position: remax's mask-0 ones are returns to go

            return fn
        # Length-weighted statistics: a row of length 0 (no valid token) weighs nothing (opo: in a group of
        # three; the whitened ones: alone in its group, so only the whitening could read it).
        row = 2 if estimator == "opo" else 5
        lengths = kw["lengths"].clone()
        lengths[row] = 0
        others = torch.arange(6) != row

        def fn(poison, b):
            scores = kw["scores"].clone()
            scores[row] = poison
            groups = torch.tensor([0, 0, 0, 1, 1, 2])
            return [_advantages(dict(kw, scores=scores, lengths=lengths, group_index=groups), b)[others]]

        return fn
    if op == "broadcast_advantages":

        def fn(poison, b):  # row 0's advantage: its mask-0 positions stay exactly 0, the other rows unchanged
            advantages = base[0, :, 0].clone()
            advantages[0] = poison
            advantages.requires_grad_(True)
            out = rk.broadcast_advantages(advantages, mask, backend=b)
            (grad,) = torch.autograd.grad(out.sum(), advantages)
            return [out[1:], out[0][mask[0] == 0], grad]

        return fn
    assert op == "ranking_loss"

    def fn(poison, b):  # a response with a NaN rank is in no pair: its reward is never read
        rewards = base[0, :, :4].clone()
        rewards[:, 3] = poison
        ranks = torch.tensor([0.0, 1.0, 2.0, NAN]).repeat(B, 1)
        rewards.requires_grad_(True)
        loss = rk.ranking_loss(rewards, ranks, backend=b)
        (grad,) = torch.autograd.grad(loss, rewards)
        return [loss, grad]

    return fn


SEQUENCE_LEVEL = dict(importance_sampling_level="sequence")
MASKED_CASES = (
    [("ppo_policy_loss", agg) for agg in rk.reference.ppo.AGG_MODES]
    + [("ppo_value_loss", "token-mean"), ("ppo_value_loss", "seq-mean-token-sum")]
    + [("masked_mean", None), ("masked_whiten", True), ("masked_whiten", False)]
    + [("gae", "multiply"), ("gae", "carry"), ("discounted_returns", None)]
    + [("kl_shaped_rewards", e) for e in ("k1", "k3", "low_var_kl")]
    + [("token_logprobs", None), ("sequence_logprobs", None), ("ranking_loss", None)]
    + [("policy_loss", dict(loss_type="grpo", agg=agg, dual_clip=3.0, delta=1.5)) for agg in POLICY_AGGS]
    + [
        ("policy_loss", dict(loss_type=loss, is_weights=True, kl_coef=0.1, entropy_coef=0.01))
        for loss in POLICY_LOSS_TYPES
    ]
    + [("policy_loss", dict(loss_type=loss, importance_sampling_level="sequence")) for loss in ("grpo", "cispo")]
    + [
        ("policy_loss", dict(loss_type="dapo", kl_coef=0.1, kl_estimator=e, kl_is_corrected=c))
        for e, c in [("low_var_kl+", False), ("k3", True), ("abs", False)]
    ]
    + [
        ("linear_policy_loss", dict(loss_type="grpo", is_weights=True, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)),
        ("linear_policy_loss", dict(loss_type="vespo", is_weights=True, kl_coef=0.1, kl_estimator="k2")),
        ("linear_policy_loss", dict(loss_type="gspo", kl_coef=0.1, kl_estimator="low_var_kl", entropy_coef=0.01)),
        ("linear_policy_loss", dict(loss_type="cispo", is_weights=True, entropy_coef=0.01, agg="seq-mean-token-sum")),
        ("linear_policy_loss", dict(SEQUENCE_LEVEL, loss_type="dr_grpo", kl_is_corrected=True, kl_coef=0.1)),
    ]
    + [("linear_logprobs", part) for part in ("values", "d_weight")]
    + [("linear_dpo_loss", part) for part in ("values", "d_weight")]
    + [
        ("group_advantages", (e, o))
        for e, o in GA_CASES
        if e in GA.TOKEN_ESTIMATORS or e in ("opo", "reinforce_plus_plus_baseline", "gdpo")
    ]
    + [("broadcast_advantages", None)]
)


@pytest.mark.parametrize(
    "op,variant,backend_name",
    [
        pytest.param(
            op,
            variant,
            *p.values,
            id=f"{op}-{variant}-{p.values[0]}",
            marks=p.marks,
        )  # fmt: skip
        for op, variant in MASKED_CASES
        for p in [q if hasattr(q, "values") else pytest.param(q) for q in _backends(op)]
    ],
)
def test_nan_and_inf_at_masked_positions_never_reach_valid_outputs(op, variant, backend_name):
    """Masks are selects, not products (0 x inf = NaN): the valid outputs and gradients are
    the same whatever the mask-0 positions hold (gae's "carry" leaves them unread)."""
    fn = _masked_poison_case(op, variant)
    clean = fn(0.0, backend_name)
    for poison in (NAN, INF, -INF):
        for got, want in zip(fn(poison, backend_name), clean):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m, p=poison: f"poison {p}: {m}")


# -------------------------------------------------------- 4. double backward --


def _double_case(op: str, variant):
    """(fn(*inputs), float64 inputs requiring grad) for gradgradcheck."""
    g = torch.Generator().manual_seed(3)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)

    B, T, V, H = 2, 3, 5, 4
    mask = _mask(B, T).double()
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    if op in ("linear_logprobs", "sequence_logprobs", "linear_dpo_loss"):
        B, T, V, H = 1, 3, 3, 2  # numerical Jacobians of a chunked path: few elements
        mask, labels = _mask(B, T).double(), labels[: 2 * B] % V
    if op == "linear_policy_loss":  # old / ref log-probs near the true ones: no clip boundary nearby
        x = _linear_policy_inputs(B, T, 2, 3, g, dtype=torch.float64)
        lp = torch.log_softmax(x["hidden"] @ x["weight"].T + x["bias"], -1).gather(-1, x["labels"][..., None])[..., 0]
        x["old_logprobs"] = lp + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
        x["ref_logprobs"] = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
        fn = lambda h, w, b: _linear_policy_loss(dict(x, hidden=h, weight=w, bias=b), mask, None, **variant)[0]
        return fn, [x[name].clone().requires_grad_(True) for name in ("hidden", "weight", "bias")]
    if op == "token_logprobs":
        fn = lambda x: sum(rk.token_logprobs(x, labels[:B, :2] % 4, return_entropy=True, **variant))
        return fn, [r(B, 2, 4)]
    if op == "linear_logprobs":
        fn = lambda h, w, b: rk.linear_logprobs(h, w, labels[:B], bias=b, return_entropy=True)[1]
        return fn, [r(B, T, H), r(V, H), r(V)]
    if op == "sequence_logprobs":
        return lambda h, w: rk.sequence_logprobs(h, w, labels[:B], mask, average=True), [r(B, T, H), r(V, H)]
    if op == "linear_dpo_loss":
        ref = torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)
        full = torch.ones(2 * B, T)
        fn = lambda h, w: rk.linear_dpo_loss(
            h, w, labels, full, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1], beta=1.0
        )[0]
        return fn, [r(2 * B, T, H), r(V, H)]
    if op == "kl_penalty":
        return lambda a, b: rk.kl_penalty(a, b, estimator=variant, clamp=None), [r(B, T), r(B, T)]
    if op == "masked_mean":
        return lambda x: rk.masked_mean(x, mask, -1), [r(B, T)]
    if op == "masked_whiten":
        return lambda x: rk.masked_whiten(x, mask, fill_masked=variant), [r(B, T)]
    if op == "ppo_policy_loss":
        old, adv = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1, torch.randn(B, T, generator=g).double()
        fn = lambda x: rk.ppo_policy_loss(x, old, adv, mask, dual_clip=2.0, agg=variant)[0]
        return fn, [r(B, T, scale=0.1)]
    if op == "ppo_value_loss":
        old, ret = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g).double()
        return lambda v: rk.ppo_value_loss(v, old, ret, mask, clip=0.5)[0], [r(B, T)]
    if op == "dpo_loss":
        loss_type, divergence = (variant, "reverse_kl") if isinstance(variant, str) else variant
        refs = torch.randn(2, B, generator=g, dtype=torch.float64)
        extra = dict(label_smoothing=0.1) if loss_type in ("exo_pair", "robust") else {}
        if loss_type in ("sigmoid_norm", "sft"):
            extra = dict(chosen_lengths=torch.tensor([3, 4]), rejected_lengths=torch.tensor([2, 5]))
        if divergence != "reverse_kl":
            extra["f_divergence_type"] = divergence
        fn = lambda a, b: rk.dpo_loss(a, b, *refs, beta=0.5, loss_type=loss_type, **extra)[0]
        return fn, [r(B), r(B)]
    if op == "bradley_terry_loss":
        return lambda a, b: rk.bradley_terry_loss(a, b, margin=0.3), [r(4), r(4)]
    if op == "broadcast_advantages":
        return lambda a: rk.broadcast_advantages(a, mask), [r(B)]
    if op == "policy_loss":
        x = _policy_inputs(B, T, g, dtype=torch.float64)
        x["old_logprobs"] = x["logprobs"] + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
        x["ref_logprobs"] = x["logprobs"] + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
        lp = x["logprobs"].clone().requires_grad_(True)
        return lambda lp: _policy_loss(dict(x, logprobs=lp), mask, None, **variant)[0], [lp]
    assert op == "ranking_loss"
    ranks = torch.tensor([[0, 1, 1, 2], [3, 2, 1, 0]])
    return lambda x: rk.ranking_loss(x, ranks), [r(B, 4)]


DOUBLE_CASES = (
    [("token_logprobs", {}), ("token_logprobs", dict(softcap=2.0, temperature=0.7))]
    + [("linear_logprobs", None), ("sequence_logprobs", None), ("linear_dpo_loss", None)]
    + [("kl_penalty", e) for e in ESTIMATORS]
    + [("masked_mean", None), ("masked_whiten", True), ("masked_whiten", False)]
    + [("ppo_policy_loss", "token-mean"), ("ppo_policy_loss", "seq-mean-token-mean"), ("ppo_value_loss", None)]
    + [("dpo_loss", loss) for loss in ("sigmoid", "ipo", "exo_pair", "apo_down", "sigmoid_norm", "discopop")]
    + [("bradley_terry_loss", None), ("ranking_loss", None), ("broadcast_advantages", None)]
    # policy_loss: the types without a stop-gradient (a finite difference of a first derivative
    # through sg() also moves the stopped factor; cispo's test is below)
    + [
        ("policy_loss", dict(loss_type="grpo", dual_clip=2.0, delta=1.15, kl_coef=0.1, kl_estimator="k3")),
        ("policy_loss", dict(loss_type="vanilla", log_ratio_clamp=0.05, agg="seq-mean-token-sum-norm")),
        ("policy_loss", dict(loss_type="sapo", is_weights=True, kl_coef=0.2, kl_estimator="low_var_kl")),
        ("policy_loss", dict(loss_type="dro", dro_beta=0.5, kl_coef=0.1, kl_estimator="k2", agg="token-sum")),
        ("policy_loss", dict(loss_type="gpg", is_weights=True, kl_coef=0.1, kl_estimator="k1+")),
        ("policy_loss", dict(loss_type="grpo", importance_sampling_level="sequence")),
        ("policy_loss", dict(loss_type="geo_mean")),
    ]
    + [
        ("linear_policy_loss", dict(loss_type="grpo", dual_clip=2.0, kl_coef=0.1, entropy_coef=0.05, is_weights=True)),
        ("linear_policy_loss", dict(SEQUENCE_LEVEL, loss_type="vanilla", kl_coef=0.2, kl_estimator="k2")),
        ("linear_policy_loss", dict(loss_type="vanilla", kl_coef=0.2, agg="seq-mean-token-sum-norm")),
    ]
)


@pytest.mark.parametrize(
    "op,variant,backend_name",
    [
        pytest.param(op, variant, *p.values, marks=p.marks, id=f"{op}-{variant}-{p.values[0]}")
        for op, variant in DOUBLE_CASES
        for p in [q if hasattr(q, "values") else pytest.param(q) for q in _backends(op)]
    ],
)
def test_double_backward_is_exact(op, variant, backend_name, monkeypatch):
    """Second derivatives (create_graph=True) on every backend equal finite differences of
    the first (gradgradcheck, float64); they were a silent 0 in 33 of 40 cpu configurations
    (kl_penalty k2: 0 where the truth is 1)."""
    _assert_exact_second_derivatives(op, variant, backend_name, monkeypatch)


def _derivatives(fn, inputs) -> list:
    """First derivatives (create_graph) along a fixed cotangent and second derivatives
    along a fixed direction: one forward and two backwards."""
    out = fn(*inputs)
    g = torch.Generator().manual_seed(11)
    cotangent = torch.randn(out.shape, generator=g, dtype=out.dtype)
    firsts = torch.autograd.grad(out, inputs, cotangent, create_graph=True, allow_unused=True)
    firsts = [torch.zeros_like(x) if d is None else d for d, x in zip(firsts, inputs)]
    direction = sum((d * torch.randn(d.shape, generator=g, dtype=d.dtype)).sum() for d in firsts)
    seconds = [None] * len(inputs)  # a function linear in its inputs: no graph, second derivatives 0
    if direction.requires_grad:
        seconds = torch.autograd.grad(direction, inputs, allow_unused=True)
    return [d.detach() for d in firsts] + [torch.zeros_like(x) if d is None else d for d, x in zip(seconds, inputs)]


def _assert_exact_second_derivatives(op, variant, backend_name, monkeypatch):
    """gradgradcheck, except for triton in its interpreter, where its finite differences
    ran the kernels for up to 20 s a case: there the first and second derivatives must
    equal the reference's (which gradgradcheck checks in the case's reference run)."""
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", backend_name)
    fn, inputs = _double_case(op, variant)
    if backend_name != "triton" or torch.cuda.is_available():
        assert torch.autograd.gradgradcheck(fn, inputs), (op, variant)
        return
    got = _derivatives(fn, inputs)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    for a, b in zip(got, _derivatives(fn, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{op} {variant}: {m}")


DPO_DOUBLE = list(rk.reference.dpo.LOSS_TYPES) + [
    (loss, f) for f in rk.reference.dpo.F_DIVERGENCES[1:] for loss in ("sigmoid", "ipo", "sft")
]


@pytest.mark.parametrize("backend_name", _backends("dpo_loss"))
def test_double_backward_every_dpo_loss_type(backend_name, monkeypatch):
    """Every loss type (per pair, and aot, aot_unpaired, sft, which couple the pairs) and
    the f-divergences, on every backend (triton in the interpreter: against the
    reference's, as test_double_backward_is_exact)."""
    for loss in DPO_DOUBLE:
        _assert_exact_second_derivatives("dpo_loss", loss, backend_name, monkeypatch)


def test_double_backward_with_a_process_group_names_the_op_and_backend():
    """The vocab-parallel path (process_group=) computes its gradient by hand: create_graph
    is a NotImplementedError naming the op and the backend (it said only "with
    process_group"); first derivatives still work. A one-process gloo group, in process."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        B, T, H, V = 2, 3, 4, 5
        hidden, weight = torch.randn(B, T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
        labels, mask = torch.randint(0, V, (B, T)), torch.ones(B, T)
        old, adv = -torch.rand(B, T), torch.randn(B)
        calls = {
            "token_logprobs": lambda: rk.token_logprobs(hidden @ weight.T, labels, process_group=group),
            "linear_logprobs": lambda: rk.linear_logprobs(hidden, weight, labels, process_group=group),
            "sequence_logprobs": lambda: rk.sequence_logprobs(hidden, weight, labels, mask, process_group=group),
            "linear_dpo_loss": lambda: rk.linear_dpo_loss(
                hidden, weight, labels, mask, reference_free=True, process_group=group
            )[0],
        }
        # linear_policy_loss runs linear_logprobs' vocab-parallel path: the error names that op
        calls["linear_policy_loss"] = lambda: rk.linear_policy_loss(
            hidden, weight, labels, mask, old_logprobs=old, advantages=adv, process_group=group
        )[0]
        for op, fn in calls.items():
            assert torch.isfinite(torch.autograd.grad(fn().sum(), hidden)[0]).all()
            named = "linear_logprobs" if op == "linear_policy_loss" else op
            message = f"double backward is not supported by {named} on backend reference with process_group"
            with pytest.raises(NotImplementedError, match=message):
                torch.autograd.grad(fn().sum(), hidden, create_graph=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend_name", _backends("policy_loss"))
def test_policy_loss_cispo_second_derivative_is_the_kl_terms(backend_name):
    """cispo's weight is a constant (sg): d2 loss / d lp2 is the KL's alone, k2's kl_coef /
    N per valid token under token-mean (cpu and triton returned the stored first
    derivative, so autograd saw no second derivative at all: 0, silently)."""
    mask = _mask(2, 4).double()
    x = _policy_inputs(2, 4, torch.Generator().manual_seed(5), dtype=torch.float64)
    lp = x["logprobs"].clone().requires_grad_(True)
    loss, _ = _policy_loss(dict(x, logprobs=lp), mask, backend_name, loss_type="cispo", kl_coef=0.3,
                           kl_estimator="k2", agg="token-mean")  # fmt: skip
    (grad,) = torch.autograd.grad(loss, lp, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), lp)
    torch.testing.assert_close(second, 0.3 * mask / mask.sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend_name", _backends("kl_penalty"))
def test_kl_k2_second_derivative_is_one(backend_name):
    lp = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    kl = rk.kl_penalty(lp, torch.zeros(2, dtype=torch.float64), estimator="k2", backend=backend_name)
    (grad,) = torch.autograd.grad(kl.sum(), lp, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), lp)
    assert second.tolist() == [1.0, 1.0]


# ------------------------------------------------------ 5. empty batches --


def _empty_case(op: str, B: int, T: int, variant):
    """fn(backend) -> outputs for a batch with no rows (B = 0) or no positions (T = 0)."""
    V, H = 5, 4
    x = lambda *s: torch.randn(*s, requires_grad=True)
    options = variant if isinstance(variant, dict) else dict(agg=variant)  # the meta test passes an agg
    if op == "group_advantages" and not isinstance(variant, tuple):
        variant = ("grpo", {})
    mask = torch.ones(B, T)
    labels = torch.zeros(B, T, dtype=torch.long)
    calls = {
        "token_logprobs": lambda b: rk.token_logprobs(x(B, T, V), labels, return_entropy=True, backend=b),
        "linear_logprobs": lambda b: rk.linear_logprobs(x(B, T, H), x(V, H), labels, backend=b),
        "sequence_logprobs": lambda b: rk.sequence_logprobs(x(B, T, H), x(V, H), labels, mask, backend=b),
        "kl_penalty": lambda b: rk.kl_penalty(x(B, T), x(B, T), estimator="k3", backend=b),
        "kl_shaped_rewards": lambda b: rk.kl_shaped_rewards(x(B), x(B, T), x(B, T), mask, kl_coef=0.1, backend=b),
        "gae": lambda b: rk.gae(x(B, T), x(B, T), mask, backend=b),
        "discounted_returns": lambda b: rk.discounted_returns(x(B, T), mask, backend=b),
        "masked_mean": lambda b: rk.masked_mean(x(B, T), mask, backend=b),
        "masked_whiten": lambda b: rk.masked_whiten(x(B, T), mask, backend=b),
        "ppo_policy_loss": lambda b: rk.ppo_policy_loss(x(B, T), x(B, T), x(B, T), mask, agg=variant, backend=b),
        "ppo_value_loss": lambda b: rk.ppo_value_loss(x(B, T), x(B, T), x(B, T), mask, agg=variant, backend=b),
        "dpo_loss": lambda b: rk.dpo_loss(x(B), x(B), x(B), x(B), backend=b),
        "linear_dpo_loss": lambda b: rk.linear_dpo_loss(
            x(2 * B, T, H), x(V, H), labels.repeat(2, 1), mask.repeat(2, 1), reference_free=True, backend=b
        ),
        "bradley_terry_loss": lambda b: rk.bradley_terry_loss(x(B), x(B), backend=b),
        "ranking_loss": lambda b: rk.ranking_loss(x(B, 3), torch.zeros(B, 3), backend=b),
        "policy_loss": lambda b: _policy_loss({name: x(B, T) for name in POLICY_TENSORS}, mask, b, **options),
        "linear_policy_loss": lambda b: _linear_policy_loss(
            dict({name: x(B, T) for name in POLICY_TENSORS}, hidden=x(B, T, H), weight=x(V, H), bias=x(V), labels=labels),
            mask, b, **options,
        ),
        "group_advantages": lambda b: _advantages(_advantage_inputs(*variant, B=B, T=T, mask=mask), b),
        "broadcast_advantages": lambda b: rk.broadcast_advantages(x(B), mask, backend=b),
    }  # fmt: skip
    return calls[op]


FULL_POLICY_LOSS = dict(is_weights=True, kl_coef=0.1, entropy_coef=0.01)
LINEAR_POLICY_EMPTY = [(loss, None) for loss in ("grpo", "dr_grpo", "geo_mean", "vespo")] + [
    ("dapo", "token-mean"),
    ("gspo", "seq-mean-token-sum"),
]
EMPTY_CASES = (
    [
        (op, None)
        for op in sorted(SWEPT_OPS)
        if not op.startswith("ppo_") and not op.endswith("policy_loss") and op != "group_advantages"
    ]
    + [("group_advantages", case) for case in GA_CASES]
    + [(op, agg) for op in ("ppo_policy_loss", "ppo_value_loss") for agg in rk.reference.ppo.AGG_MODES]
    + [("policy_loss", dict(loss_type="grpo", agg=agg, **FULL_POLICY_LOSS)) for agg in POLICY_AGGS]
    + [("policy_loss", dict(loss_type=loss, **FULL_POLICY_LOSS)) for loss in POLICY_LOSS_TYPES]
    + [("policy_loss", dict(loss_type="grpo", importance_sampling_level="sequence", kl_is_corrected=True, kl_coef=0.1))]
    + [("linear_policy_loss", dict(loss_type=loss, agg=agg, **FULL_POLICY_LOSS)) for loss, agg in LINEAR_POLICY_EMPTY]
)


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for value in out.values() for v in _flatten(value)]
    return [v for value in out for v in _flatten(value)]


@pytest.mark.parametrize(
    "op,variant,backend_name",
    [
        pytest.param(op, variant, *p.values, marks=p.marks, id=f"{op}-{variant}-{p.values[0]}")
        for op, variant in EMPTY_CASES
        for p in [q if hasattr(q, "values") else pytest.param(q) for q in _backends(op)]
    ],
)
@pytest.mark.parametrize("B,T", [(0, 3), (2, 0)], ids=["B0", "T0"])
def test_empty_batches_give_empty_or_zero_never_nan(op, variant, backend_name, B, T):
    """B = 0 or T = 0: empty outputs, and losses / means of nothing are 0 (the seq-mean
    aggregations raised ZeroDivisionError on cpu / triton and gave NaN on the reference;
    bradley_terry_loss on N = 0 gave NaN; policy_loss geo_mean at B = 0 and
    seq-mean-token-sum-norm at T = 0 gave NaN everywhere). kl_shaped_rewards needs a
    position (T >= 1)."""
    run = _empty_case(op, B, T, variant)
    if op == "kl_shaped_rewards" and T == 0:
        with pytest.raises(ValueError, match="T >= 1"):
            run(backend_name)
        return
    if op == "group_advantages" and variant[0] in ("reinforce_plus_plus_baseline", "gdpo") and B > 0:
        # T = 0 leaves B sequences of no token to whiten over: verl raises, and so do we
        with pytest.raises(ValueError, match="at least two valid tokens"):
            run(backend_name)
        return
    outputs = _flatten(run(backend_name))
    # Scalars over nothing are 0 (T = 0 leaves rows: only the means over tokens are empty).
    nothing = B == 0 or op in ("ppo_policy_loss", "ppo_value_loss", "masked_mean") or op.endswith("policy_loss")
    if op == "group_advantages":  # an empty batch, or T = 0 for the token estimators: an empty result
        sequence = variant[0] in GA.SEQUENCE_ESTIMATORS
        assert [tuple(out.shape) for out in outputs] == [(B,) if sequence else (B, T)]
    for out in outputs:
        assert not torch.isnan(out).any(), (op, out)
        if out.dim() == 0 and nothing:
            assert out.item() == 0, (op, out)
    differentiable = [out for out in outputs if out.requires_grad]
    if differentiable:
        sum(out.sum() for out in differentiable).backward()


# ---------------------------------------------------------- meta tensors --


META_CASES = [(op, "token-mean") for op in sorted(SWEPT_OPS) if op != "group_advantages"] + [
    ("group_advantages", case) for case in GA_CASES
]


@pytest.mark.parametrize("op,variant", META_CASES, ids=[f"{op}-{variant}" for op, variant in META_CASES])
def test_meta_inputs_give_meta_outputs(op, variant):
    """Meta tensors (FSDP's meta-device init, shape inference) run wherever the op is
    resolved automatically, never calling .item() (group_advantages called torch.unique
    and .item(): NotImplementedError); a backend named for them that has no meta kernel
    is a clear error."""
    B, T = 2, 3
    with torch.device("meta"):
        outputs = _flatten(_empty_case(op, B, T, variant)(None))
    assert outputs and all(out.device.type == "meta" for out in outputs)
    if op == "group_advantages":
        assert outputs[0].shape == ((B,) if variant[0] in GA.SEQUENCE_ESTIMATORS else (B, T))
    for name in ("cpu", "triton"):
        if op in getattr(_backend, "HAS_CPU" if name == "cpu" else "HAS_TRITON"):
            with torch.device("meta"), pytest.raises(ValueError, match="meta"):
                _empty_case(op, B, T, variant)(name)


NOT_DIFFERENTIABLE = sorted(NOT_APPLICABLE["double backward"])


@pytest.mark.parametrize("op,backend_name", _sweep(NOT_DIFFERENTIABLE))
def test_non_differentiable_ops_carry_no_graph(op, backend_name):
    """The ops documented as not differentiable return constants for inputs that require
    grad (no graph for a first or second derivative to follow, not a silent wrong one)."""
    variants = GA_CASES if op == "group_advantages" else [None]
    for variant in variants:
        outputs = _flatten(_empty_case(op, 2, 3, variant)(backend_name))
        assert outputs and not any(out.requires_grad for out in outputs), (op, variant)


@pytest.mark.parametrize("backend_name", _backends("token_logprobs"))
def test_log_prob_ops_trace_with_fake_tensors(backend_name):
    """torch.compile traces on fake tensors: the value checks are skipped, no .item()."""
    logits, labels = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    fn = torch.compile(
        lambda x, y: rk.token_logprobs(x, y, return_entropy=True, backend=backend_name),
        fullgraph=True,
        backend="aot_eager",
    )
    for got, want in zip(fn(logits, labels), rk.token_logprobs(logits, labels, return_entropy=True)):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------ 5. other edge cases --


@pytest.mark.parametrize("backend_name", _backends("masked_mean"))
def test_masked_mean_dim_out_of_range_raises_everywhere(backend_name):
    x, mask = torch.randn(2, 3), torch.ones(2, 3)
    for dim in (2, -3, (0, 5)):
        with pytest.raises(IndexError, match="dim"):
            rk.masked_mean(x, mask, dim, backend=backend_name)
    torch.testing.assert_close(rk.masked_mean(x, mask, -1, backend=backend_name), x.mean(-1))
    torch.testing.assert_close(rk.masked_mean(x, mask, (-2, 1), backend=backend_name), x.mean())


def test_linear_dpo_loss_checks_the_device_of_every_reference_input():
    B, T, H, V = 1, 3, 4, 5
    args = (torch.randn(2 * B, T, H), torch.randn(V, H), torch.zeros(2 * B, T, dtype=torch.long), torch.ones(2 * B, T))
    on_meta = torch.zeros(B, device="meta")
    with pytest.raises(ValueError, match="ref_chosen_logps must be on"):
        rk.linear_dpo_loss(*args, ref_chosen_logps=on_meta, ref_rejected_logps=on_meta)
    with pytest.raises(ValueError, match="ref_hidden must be on"):
        rk.linear_dpo_loss(*args, ref_hidden=torch.zeros(2 * B, T, H, device="meta"))
    with pytest.raises(ValueError, match="weights must be on"):
        rk.linear_dpo_loss(*args, reference_free=True, weights=on_meta)


@pytest.mark.parametrize("backend_name", _backends("ranking_loss"))
def test_ranking_loss_compares_int64_ranks_exactly(backend_name):
    """Ranks 2^25 and 2^25 + 1 are distinct (as float32 they tied: no pair, loss 0)."""
    rewards = torch.tensor([[0.5, -0.25, 1.0]], requires_grad=True)
    ranks = torch.tensor([[2**25, 2**25 + 1, 2**25 + 2]])
    loss = rk.ranking_loss(rewards, ranks, backend=backend_name)
    want = rk.ranking_loss(rewards, torch.tensor([[0, 1, 2]]), backend="reference")
    torch.testing.assert_close(loss, want)
    assert loss > 0


@pytest.mark.parametrize("backend_name", _backends("masked_mean"))
def test_half_precision_masked_statistics_accumulate_in_float32(backend_name):
    """4,000 fp16 values of 100: the mean is 100 (the reference summed in fp16: inf), and
    whitening is finite (it was NaN)."""
    x, mask = torch.full((4000,), 100.0, dtype=torch.float16), torch.ones(4000)
    mean = rk.masked_mean(x, mask, backend=backend_name)
    assert mean.dtype == torch.float16 and mean.item() == 100.0
    x = x + torch.linspace(-1, 1, 4000, dtype=torch.float16)
    whitened = rk.masked_whiten(x, mask, backend=backend_name)
    assert whitened.dtype == torch.float16 and torch.isfinite(whitened).all()
    torch.testing.assert_close(whitened.float().std(), torch.tensor(1.0), atol=2e-2, rtol=0)


@pytest.mark.parametrize("backend_name", _backends("kl_penalty"))
def test_k3_without_cancellation_and_at_minus_infinity(backend_name):
    """k3 = exp(-d) + d - 1: d = 1e-4 is 5e-9 (it was 0: exp(-d) - 1 cancels in fp32), and
    d = -inf is +inf (it was -inf on cpu, NaN elsewhere); low_var_kl likewise near 0."""
    d = torch.tensor([1e-4, -1e-4, 3e-3, -0.3, 0.49, 0.51, -2.0, 30.0, -INF, INF])
    ref = torch.zeros_like(d)
    exact = [math.expm1(-v) + v if math.isfinite(v) else INF for v in d.double().tolist()]
    exact[-1] = INF  # d = +inf: exp(-inf) + inf - 1
    k3 = rk.kl_penalty(d, ref, estimator="k3", backend=backend_name)
    torch.testing.assert_close(k3.double(), torch.tensor(exact, dtype=torch.float64), rtol=2e-6, atol=0)
    low_var = rk.kl_penalty(d[:6], ref[:6], estimator="low_var_kl", backend=backend_name)
    want = torch.tensor([math.expm1(-v) + v for v in d[:6].double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(low_var.double(), want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend_name", _backends("ppo_policy_loss"))
def test_ppo_approx_kl_small_log_ratios(backend_name):
    """approx_kl = mean((ratio - 1) - log ratio) of tiny log-ratios is their k3, not 0 or noise."""
    lp = torch.full((1, 4), 1e-4)
    _, stats = rk.ppo_policy_loss(lp, torch.zeros(1, 4), torch.ones(1, 4), torch.ones(1, 4), backend=backend_name)
    want = torch.tensor(math.expm1(1e-4) - 1e-4, dtype=torch.float64)
    torch.testing.assert_close(stats["approx_kl"].double(), want, rtol=1e-4, atol=0)


# ------------------------------------------------------------- class coverage --

# The public ops each class of hostile input reaches (test_every_public_op_is_swept: with
# NOT_APPLICABLE's exemptions, every public op in every class).
CLASS_COVERAGE: dict[str, set] = {
    # + masked_mean's dim (test_masked_mean_dim_out_of_range_raises_everywhere) and group_advantages'
    # labels (test_group_advantages_take_any_integer_labels)
    "indices": set(INDEX_OPS) | {"masked_mean", "group_advantages"},
    # test_masked_vocabulary_token_logprobs / _linear_logprobs / _linear_policy_loss
    "masked vocabulary": {"token_logprobs", "linear_logprobs", "linear_policy_loss"},
    "NaN at a valid position": {op for op, _ in NAN_CASES},
    "NaN / inf at a masked position": {op for op, _ in MASKED_CASES},
    "empty batches": {op for op, _ in EMPTY_CASES},
    "meta tensors": {op for op, _ in META_CASES},
    "double backward": {op for op, _ in DOUBLE_CASES},
}
