"""The OpenRLHF drop-ins against OpenRLHF 0.11.2's own code.

OpenRLHF's modules import deepspeed / ray / flash_attn / peft at load time, and its
dependencies pin builds (flash-attn, deepspeed) that do not install here. So its files
are loaded as the `openrlhf` package by a small importer: the modules the drop-ins
replace and the trainer modules that call them run as released (openrlhf.models,
.models.loss, .models.utils, .utils.loss_utils, .trainer.ppo_utils.experience,
.trainer.ppo_utils.experience_maker, .trainer.ray.ppo_actor); every other openrlhf
module, and deepspeed / ray / flash_attn / peft where not installed, are stubs during the
import only. The files come from the installed openrlhf 0.11.2 (`pip install --no-deps
openrlhf==0.11.2`) or, without it, from tests/vendored/openrlhf_0_11_2 (the same files;
RLHF_KERNELS_OPENRLHF_SOURCE=vendored or =installed forces one).

1. Parity: every function and every policy_loss_type / is_correction option against
   OpenRLHF's, values, gradients and output dtypes, on ragged masks (right padding,
   holes, an all-masked row), bool and float masks; fp32 tight, bf16 within a stated
   bound.
2. OpenRLHF's own unit tests of compute_approx_kl and PolicyLoss
   (tests/test_kl_estimator_gradient.py, tests/test_loss_aggregation.py) re-run with
   patch() applied: the names they test are rebound to what the patched openrlhf
   modules hold (ours), and each test that calls one is checked to reach rlhf_kernels.
3. OpenRLHF 0.11.2's own ActorPPOTrainer.__init__ / training_step and
   RemoteExperienceMaker.compute_advantages_and_returns, run unpatched and patched:
   same loss, metrics and gradients, and rlhf_kernels' ops dispatched (counted by a
   TorchDispatchMode and through the public functions).
4. patch() / unpatch() and the version guard.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import math
import os
import sys
import types
import warnings
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import random_mask
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_kernels as rk
from rlhf_kernels.integrations import _version
from rlhf_kernels.integrations import openrlhf as rk_openrlhf

VERSION = "0.11.2"
VENDORED = Path(__file__).resolve().parent / "vendored" / "openrlhf_0_11_2"
SOURCE_ENV = "RLHF_KERNELS_OPENRLHF_SOURCE"

# ------------------------------------------------------------- loading OpenRLHF --

# The openrlhf modules that run as released (True: a package, its __init__ runs).
REAL_MODULES = {
    "openrlhf.models": True,
    "openrlhf.models.loss": False,
    "openrlhf.models.utils": False,
    "openrlhf.utils.loss_utils": False,
    "openrlhf.trainer.ppo_utils.experience": False,
    "openrlhf.trainer.ppo_utils.experience_maker": False,
    "openrlhf.trainer.ray.ppo_actor": False,
}
# Imported at load time by those modules; stubbed while loading when not installed.
IMPORT_TIME_DEPENDENCIES = ("deepspeed", "ray", "tqdm", "flash_attn", "peft")
OWN_TESTS = ("test_kl_estimator_gradient", "test_loss_aggregation")


class _StubModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        value = mock.MagicMock(name=f"{self.__name__}.{attr}")
        setattr(self, attr, value)
        return value


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


class _OpenRLHFImporter(importlib.abc.MetaPathFinder):
    """During the load: REAL_MODULES from `root`, stubs for the other openrlhf modules
    and for the missing import-time dependencies."""

    def __init__(self, root: Path, stubbed: set):
        self.root, self.stubbed = root, stubbed

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top == "openrlhf" and name in REAL_MODULES:
            relative = Path(*name.split("."))
            if REAL_MODULES[name]:
                return importlib.util.spec_from_file_location(
                    name, self.root / relative / "__init__.py", submodule_search_locations=[str(self.root / relative)]
                )
            return importlib.util.spec_from_file_location(name, self.root / relative.with_suffix(".py"))
        if top == "openrlhf" or top in self.stubbed:
            return importlib.machinery.ModuleSpec(name, _StubLoader(), is_package=True)
        return None


def _source():
    """(root holding openrlhf/ and tests/, where from)."""
    installed = _version.installed_version("openrlhf")
    choice = os.environ.get(SOURCE_ENV, "")
    if choice == "installed" and installed != VERSION:
        pytest.skip(
            f"{SOURCE_ENV}=installed, but openrlhf {installed} is installed, not {VERSION}", allow_module_level=True
        )
    if choice == "vendored" or installed != VERSION:
        return VENDORED, "vendored"
    spec = importlib.util.find_spec("openrlhf")
    root = Path(next(iter(spec.submodule_search_locations))).parent
    if not all((root / "tests" / f"{name}.py").exists() for name in OWN_TESTS):
        return VENDORED, "vendored"  # an install without the wheel's tests
    return root, "installed"


def _load(root: Path):
    stubbed = {name for name in IMPORT_TIME_DEPENDENCIES if importlib.util.find_spec(name) is None}
    before = set(sys.modules)
    importer = _OpenRLHFImporter(root, stubbed)
    sys.meta_path.insert(0, importer)
    # openrlhf.models.utils wraps compute_entropy (not a drop-in) in torch.compile at import;
    # as OpenRLHF's own actor test does, it runs eagerly here (no inductor import).
    eager = mock.patch.object(torch, "compile", lambda fn=None, **_: fn if fn is not None else (lambda f: f))
    eager.start()
    try:
        modules = {name: importlib.import_module(name) for name in REAL_MODULES}
        own = {}
        for name in OWN_TESTS:
            spec = importlib.util.spec_from_file_location(f"openrlhf_own_tests.{name}", root / "tests" / f"{name}.py")
            own[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(own[name])
    finally:
        eager.stop()
        sys.meta_path.remove(importer)
        for name in list(sys.modules):  # import-time stubs only: flash_attn must be absent at run time
            if name.split(".")[0] in stubbed and name not in before:
                del sys.modules[name]
    return modules, own


ROOT, SOURCE = _source()
try:
    MODULES, OWN = _load(ROOT)
except Exception as error:  # noqa: BLE001 - any failure to load OpenRLHF's files skips, with the reason
    pytest.skip(f"OpenRLHF {VERSION}'s files did not load from {ROOT}: {error!r}", allow_module_level=True)
UP_LOSS = MODULES["openrlhf.models.loss"]
UP_UTILS = MODULES["openrlhf.models.utils"]
UP_MAKER = MODULES["openrlhf.trainer.ppo_utils.experience_maker"]
UP_ACTOR = MODULES["openrlhf.trainer.ray.ppo_actor"]
Experience = MODULES["openrlhf.trainer.ppo_utils.experience"].Experience
# OpenRLHF's own objects, captured before any patch().
UP = SimpleNamespace(
    PolicyLoss=UP_LOSS.PolicyLoss,
    ValueLoss=UP_LOSS.ValueLoss,
    compute_approx_kl=UP_UTILS.compute_approx_kl,
    compute_reward=UP_UTILS.compute_reward,
    log_probs_from_logits=UP_UTILS.log_probs_from_logits,
    get_advantages_and_returns=vars(UP_MAKER.RemoteExperienceMaker)["get_advantages_and_returns"],
    get_cumulative_returns=vars(UP_MAKER.RemoteExperienceMaker)["get_cumulative_returns"],
)


def test_openrlhf_source_is_0_11_2():
    """Which files these tests ran against (-rP shows it)."""
    print(f"OpenRLHF {VERSION} from {SOURCE}: {ROOT}")
    assert "is_correction_level" in inspect.signature(UP.PolicyLoss.__init__).parameters
    assert "unbiased_gradient" in inspect.signature(UP.compute_approx_kl).parameters


@contextlib.contextmanager
def openrlhf_patched():
    """rk_openrlhf.patch() on the loaded openrlhf; the vendored files have no installed
    distribution, so the version guard is shown theirs."""
    with contextlib.ExitStack() as stack:
        if SOURCE == "vendored":
            real = _version.installed_version
            stack.enter_context(
                mock.patch.object(_version, "installed_version", lambda d: VERSION if d == "openrlhf" else real(d))
            )
        assert rk_openrlhf.patch() > 0
        stack.callback(rk_openrlhf.unpatch)
        yield


@pytest.fixture(scope="module", autouse=True)
def _forget_openrlhf():
    """The loaded openrlhf modules leave sys.modules with this test module."""
    yield
    for name in list(sys.modules):
        if name == "openrlhf" or name.startswith(("openrlhf.", "_openrlhf_", "openrlhf_own_tests")):
            del sys.modules[name]


# ------------------------------------------------------------- counting kernels --

PUBLIC_OPS = ("token_logprobs", "kl_penalty", "kl_shaped_rewards", "gae", "masked_mean", "ppo_policy_loss",
              "ppo_value_loss")  # fmt: skip


class KernelCount(TorchDispatchMode):
    """Counts the rlhf_kernels ops dispatched (the compiled backends' torch.library ops)."""

    def __init__(self):
        super().__init__()
        self.ops: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rlhf_kernels":
            name = func.__name__.split(".")[0]
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_kernels():
    """(public-function calls, dispatched ops) of rlhf_kernels inside the block."""
    calls: dict = {}
    with contextlib.ExitStack() as stack:
        for name in PUBLIC_OPS:
            original = getattr(rk, name)

            def counted(*args, __name=name, __original=original, **kwargs):
                calls[__name] = calls.get(__name, 0) + 1
                return __original(*args, **kwargs)

            stack.enter_context(mock.patch.object(rk, name, counted))
        dispatched = stack.enter_context(KernelCount())
        yield calls, dispatched.ops


def _compiled(op: str) -> bool:
    from rlhf_kernels import backend

    return backend.resolve(op, torch.device("cpu"), None) != "reference"


# ------------------------------------------------------------------- parity ------

B, T, V = 6, 11, 37


def _leaves(inputs):
    return [x.detach().clone().requires_grad_(True) for x in inputs]


def _run(fn, *inputs):
    """fn's outputs, and the gradients of <first output, fixed random weights> w.r.t. inputs."""
    leaves = _leaves(inputs)
    out = fn(*leaves)
    first = out[0] if isinstance(out, tuple) else out
    weight = torch.randn(first.shape, generator=torch.Generator().manual_seed(1)).to(first.dtype)
    (first * weight).sum().backward()
    return out, [leaf.grad for leaf in leaves]


def _close(got, want, **tol):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None or a is None:
            assert a is None and b is None, f"output {i}: {a!r} vs {b!r}"
            continue
        assert a.dtype == b.dtype, f"output {i}: dtype {a.dtype}, OpenRLHF's {b.dtype}"
        torch.testing.assert_close(a.detach(), b.detach(), **tol, msg=lambda m: f"output {i}: {m}")


def _same(ours, theirs, *inputs, atol=1e-5, rtol=1e-5, grad_tol=None):
    got, got_grads = _run(ours, *inputs)
    want, want_grads = _run(theirs, *inputs)
    _close(got, want, atol=atol, rtol=rtol)
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **(grad_tol or {"atol": atol, "rtol": rtol}))


def _policy_inputs(dtype=torch.float32, spread=1.0):
    log_probs = -torch.rand(B, T) * 4
    old = log_probs + 0.3 * torch.randn(B, T)
    rollout = old + spread * torch.randn(B, T)  # train / rollout mismatch: some units out of band
    advantages = torch.randn(B, T)
    return [x.to(dtype) for x in (log_probs, old, advantages, rollout)]


# Every valid (level, mode, gating, threshold) of OpenRLHF 0.11.2's IS correction.
IS_OPTIONS = {
    "off": ("off", "mask", "ratio", (0.5, 5.0)),
    "token-clip-ratio (TIS)": ("token", "clip", "ratio", (0.5, 2.0)),
    "token-mask-ratio (ICEPOP)": ("token", "mask", "ratio", (0.5, 2.0)),
    "seq-mask-ratio (seq-mask-tis)": ("seq", "mask", "ratio", (0.7, 1.5)),
    "token-mask-binary_kl": ("token", "mask", "binary_kl", (0, 0.05)),
    "seq-mask-binary_kl": ("seq", "mask", "binary_kl", (0, 0.12)),
    "token-mask-tv": ("token", "mask", "tv", (0, 0.1)),
    "seq-mask-tv": ("seq", "mask", "tv", (0, 0.15)),
}
GLOBAL = {"dp_size": 2, "batch_num_tokens": torch.tensor(50.0), "global_batch_size": torch.tensor(9.0)}


def _policy_kwargs(policy_loss_type, is_option, dual_clip, token_level_loss):
    level, mode, gating, threshold = IS_OPTIONS[is_option]
    return dict(
        clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level_loss,
        policy_loss_type=policy_loss_type, is_correction_level=level, is_correction_mode=mode,
        is_correction_gating=gating, is_correction_threshold=list(threshold),
    )  # fmt: skip


@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
@pytest.mark.parametrize("is_option", list(IS_OPTIONS))
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("agg", ["local", "global"])
def test_policy_loss_parity(policy_loss_type, is_option, dual_clip, token_level_loss, agg):
    kwargs = _policy_kwargs(policy_loss_type, is_option, dual_clip, token_level_loss)
    ours, theirs = rk_openrlhf.PolicyLoss(**kwargs), UP.PolicyLoss(**kwargs)
    log_probs, old, advantages, rollout = _policy_inputs()
    extra = GLOBAL if agg == "global" else {}
    for mask in (random_mask(B, T).bool(), random_mask(B, T)):
        _same(
            lambda lp: ours(lp, old, advantages, mask, rollout, **extra),
            lambda lp: theirs(lp, old, advantages, mask, rollout, **extra),
            log_probs,
        )


@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
@pytest.mark.parametrize("is_option", list(IS_OPTIONS))
def test_policy_loss_bf16_dtype_and_bound(policy_loss_type, is_option):
    """bf16 inputs: every output in OpenRLHF's dtype (bool mask, or fp32 mask and a fp32
    batch_num_tokens, which promote OpenRLHF's outputs to fp32); values within 2e-2 +
    2e-2 relative (OpenRLHF rounds each intermediate to bf16, the kernel computes in fp32
    and rounds once); clip_ratio and is_filter_ratio within 2 tokens' share (a ratio at a
    clip bound rounds either way)."""
    kwargs = _policy_kwargs(policy_loss_type, is_option, 3.0, True)
    ours, theirs = rk_openrlhf.PolicyLoss(**kwargs), UP.PolicyLoss(**kwargs)
    log_probs, old, advantages, rollout = _policy_inputs(torch.bfloat16)
    # Probabilities below 1 in bf16: at p = 1 OpenRLHF's binary KL is 0 * log 0 = NaN, and its
    # masked_mean (a product) carries a padding position's NaN into the sequence statistic;
    # rk.masked_mean keeps mask-0 positions out (tests/test_hostile.py), so they differ there.
    old, rollout = old.clamp(max=-0.05), rollout.clamp(max=-0.05)
    cases = [(random_mask(B, T).bool(), {}), (random_mask(B, T), GLOBAL), (random_mask(B, T).bool(), GLOBAL)]
    for mask, extra in cases:
        got, got_grads = _run(lambda lp: ours(lp, old, advantages, mask, rollout, **extra), log_probs)
        want, want_grads = _run(lambda lp: theirs(lp, old, advantages, mask, rollout, **extra), log_probs)
        share = 2 / max(int(mask.sum()), 1) + 1e-6
        for i, (a, b) in enumerate(zip(got, want)):
            assert (a is None) == (b is None)
            if b is None:
                continue
            assert a.dtype == b.dtype, f"output {i}: {a.dtype} vs OpenRLHF's {b.dtype}"
            tol = {"atol": share, "rtol": 0} if i in (1, 4) else {"atol": 2e-2, "rtol": 2e-2}
            torch.testing.assert_close(a.detach().float(), b.detach().float(), **tol)
        assert got_grads[0].dtype == want_grads[0].dtype == torch.bfloat16
        # OpenRLHF's bf16 ratio often lands exactly on a clip bound (bf16(1.28) = 1.28125).
        # There torch >= 2.14's clamp blocks the gradient (half of it, through min's tie),
        # while the drop-in keeps the closed-interval rule of torch <= 2.13 on every torch
        # (README, "Gradients exactly at a clamp's bound"; tests/test_ppo.py checks the
        # bounds on purpose). On such a torch, compare the gradients off the bounds.
        keep = torch.ones_like(mask, dtype=torch.bool)
        if not _torch_clamp_passes_at_bound():
            keep = ~_ratio_on_clip_bound(log_probs, old, kwargs)
        torch.testing.assert_close(
            got_grads[0].float()[keep], want_grads[0].float()[keep], atol=2e-2, rtol=5e-2
        )


def _torch_clamp_passes_at_bound() -> bool:
    """torch.clamp's gradient exactly at its bound: 1 through torch 2.13, 0 from 2.14."""
    x = torch.tensor(1.0, requires_grad=True)
    x.clamp(max=1.0).backward()
    return x.grad.item() == 1.0


def _ratio_on_clip_bound(log_probs, old, kwargs):
    """Where OpenRLHF's per-token ratio, in the inputs' dtype, equals a clip bound."""
    ratio = (log_probs - old).clamp(-20.0, 20.0).exp()
    return (ratio == 1 - kwargs["clip_eps_low"]) | (ratio == 1 + kwargs["clip_eps_high"])


def test_policy_loss_action_mask_none():
    log_probs, old, advantages, _ = _policy_inputs()
    for dual_clip in (None, 2.0):
        _same(
            lambda lp: rk_openrlhf.PolicyLoss(dual_clip=dual_clip)(lp, old, advantages),
            lambda lp: UP.PolicyLoss(dual_clip=dual_clip)(lp, old, advantages),
            log_probs,
        )


def test_policy_loss_validation_matches_openrlhf():
    for kwargs in (
        dict(is_correction_level="seq", is_correction_mode="clip"),
        dict(is_correction_level="token", is_correction_mode="clip", is_correction_gating="tv"),
        dict(is_correction_level="token", is_correction_gating="kl"),
        dict(is_correction_level="geo"),
        dict(is_correction_mode="drop"),
        dict(is_correction_level="seq", is_correction_gating="binary_kl", is_correction_threshold=[0.5, 5.0]),
    ):
        with pytest.raises(ValueError) as want:
            UP.PolicyLoss(**kwargs)
        with pytest.raises(ValueError) as got:
            rk_openrlhf.PolicyLoss(**kwargs)
        assert str(got.value) == str(want.value)
    with pytest.raises(AssertionError):
        rk_openrlhf.PolicyLoss(dual_clip=1.0)
    with pytest.raises(ValueError, match="Invalid policy loss type"):
        rk_openrlhf.PolicyLoss(policy_loss_type="grpo")(*_policy_inputs()[:3])


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("agg", ["local", "global"])
def test_value_loss_parity(clip_eps, token_level_loss, agg):
    values, old_values, returns = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    extra = GLOBAL if agg == "global" else {}
    ours, theirs = rk_openrlhf.ValueLoss(clip_eps, token_level_loss), UP.ValueLoss(clip_eps, token_level_loss)
    for mask in (random_mask(B, T).bool(), random_mask(B, T)):
        _same(
            lambda v: ours(v, old_values, returns, mask, **extra),
            lambda v: theirs(v, old_values, returns, mask, **extra),
            values,
        )
    bf16 = [x.bfloat16() for x in (values, old_values, returns)]
    mask = random_mask(B, T).bool()
    got, want = ours(*bf16, mask, **extra), theirs(*bf16, mask, **extra)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased_gradient", [False, True])
@pytest.mark.parametrize("with_old", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_compute_approx_kl_parity(kl_estimator, unbiased_gradient, with_old, dtype):
    log_probs, base = -torch.rand(B, T) * 4, -torch.rand(B, T) * 4
    base[:, :3] -= torch.tensor([12.0, 95.0, 300.0])  # k3 past its clamp, past exp's fp32 range
    log_probs[:2, -2:] -= 15  # and k1 below -10
    old = (log_probs + 0.5 * torch.randn(B, T)).to(dtype) if with_old else None
    log_probs, base = log_probs.to(dtype), base.to(dtype)

    def call(fn):
        return lambda lp, b: fn(
            lp, b, log_probs_old=old, kl_estimator=kl_estimator, unbiased_gradient=unbiased_gradient
        )

    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype in (torch.float32, torch.float64) else {"atol": 1e-3, "rtol": 1e-3}
    _same(call(rk_openrlhf.compute_approx_kl), call(UP.compute_approx_kl), log_probs, base, **tol)


def test_compute_approx_kl_positional_and_errors():
    log_probs, base, old = -torch.rand(B, T), -torch.rand(B, T), -torch.rand(B, T)
    _close(
        rk_openrlhf.compute_approx_kl(log_probs, base, old, "k3", True),
        UP.compute_approx_kl(log_probs, base, old, "k3", True),
    )
    with pytest.raises(ValueError, match="Unknown kl_estimator"):
        rk_openrlhf.compute_approx_kl(log_probs, base, kl_estimator="k4")


@pytest.mark.parametrize("clip", [None, (-0.5, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compute_reward_parity(clip, dtype):
    kl, r = torch.randn(B, T).to(dtype), 2 * torch.randn(B)
    for mask in (random_mask(B, T).bool(), random_mask(B, T)):  # row 0 without a valid token
        got, want = rk_openrlhf.compute_reward(r, 0.05, kl, mask, clip), UP.compute_reward(r, 0.05, kl, mask, clip)
        assert got.dtype == want.dtype
        tol = {} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
        torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_log_probs_from_logits_parity(temperature, dtype):
    logits, labels = (3 * torch.randn(B, T, V)).to(dtype), torch.randint(0, V, (B, T))
    ours_logits, theirs_logits = logits.clone().requires_grad_(False), logits.clone()
    got = rk_openrlhf.log_probs_from_logits(ours_logits, labels, temperature)
    want = UP.log_probs_from_logits(theirs_logits, labels, temperature)
    assert got.dtype == want.dtype
    torch.testing.assert_close(ours_logits, theirs_logits)  # both divide the caller's logits in place
    tol = {"atol": 0.05, "rtol": 0.02} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(got.float(), want.float(), **tol)
    if temperature == 1.0:
        _same(lambda x: rk_openrlhf.log_probs_from_logits(x, labels), lambda x: UP.log_probs_from_logits(x, labels),
              logits.float())  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_advantages_and_returns_parity(dtype):
    values, rewards = torch.randn(B, T).to(dtype), torch.randn(B, T).to(dtype)
    # bf16: OpenRLHF's loop rounds to bf16 at each of the T steps, the kernel runs in fp32
    # and rounds once: within 0.1 (returns are O(1) to O(T)).
    tol = {"atol": 0.1, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
    for mask in (random_mask(B, T).bool(), random_mask(B, T), None):
        got = rk_openrlhf.get_advantages_and_returns(values, rewards, mask, 0.99, 0.95)
        want = UP.get_advantages_and_returns(None, values, rewards, mask, 0.99, 0.95)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.float(), b.float(), **tol)
        got = rk_openrlhf.get_cumulative_returns(rewards, mask, 0.9)
        want = UP.get_cumulative_returns(None, rewards, mask, 0.9)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), **tol)


def test_no_write_into_caller_tensors():
    """Only log_probs_from_logits' temperature division writes (OpenRLHF's own side effect)."""
    log_probs, old, advantages, rollout = _policy_inputs()
    mask = random_mask(B, T).bool()
    inputs = [log_probs, old, advantages, rollout, mask]
    copies = [x.clone() for x in inputs]
    for option in IS_OPTIONS:
        for loss_type in ("ppo", "gspo"):
            rk_openrlhf.PolicyLoss(**_policy_kwargs(loss_type, option, 3.0, False))(
                log_probs, old, advantages, mask, rollout
            )
    rk_openrlhf.compute_approx_kl(log_probs, old, rollout, "k3", True)
    rk_openrlhf.ValueLoss(0.2)(log_probs, old, advantages, mask)
    rk_openrlhf.compute_reward(advantages[:, 0], 0.1, old, mask)
    rk_openrlhf.get_advantages_and_returns(log_probs, old, mask, 1.0, 0.95)
    rk_openrlhf.get_cumulative_returns(old, mask, 1.0)
    for x, copy in zip(inputs, copies):
        assert torch.equal(x, copy)


# ------------------------------------------- OpenRLHF's own tests, patched ------


def _own_test(module, fn, names):
    """OpenRLHF's test `fn` with patch() applied and `names` (the drop-ins it tests)
    rebound in its module to what the patched openrlhf modules hold."""

    @functools.wraps(fn)
    def test(*args, **kwargs):
        with openrlhf_patched():
            homes = {"compute_approx_kl": UP_UTILS, "PolicyLoss": UP_LOSS}
            rebound = {name: getattr(homes[name], name) for name in names}
            assert all(rebound[name] is rk_openrlhf.drop_ins(VERSION)[name] for name in names)
            expected = []  # the kernels the drop-in calls that returned must have reached

            def spy(function):
                @functools.wraps(function)
                def spied(*a, **k):
                    out = function(*a, **k)
                    if function.__name__ == "forward":
                        expected.append("ppo_policy_loss")
                    else:  # compute_approx_kl: k3's value is OpenRLHF's torch expression (module docstring)
                        bound = inspect.signature(function).bind(*a, **k).arguments
                        if bound.get("kl_estimator", "k1") != "k3" or bound.get("unbiased_gradient"):
                            expected.append("kl_penalty")
                    return out

                return spied

            with contextlib.ExitStack() as stack:
                stack.enter_context(
                    mock.patch.object(rk_openrlhf.PolicyLoss, "forward", spy(rk_openrlhf.PolicyLoss.forward))
                )
                if "compute_approx_kl" in rebound:
                    rebound["compute_approx_kl"] = spy(rebound["compute_approx_kl"])
                stack.enter_context(mock.patch.dict(vars(module), rebound))
                calls, _ = stack.enter_context(counting_kernels())
                fn(*args, **kwargs)
            assert set(expected) <= set(calls), f"expected {expected}, called {calls}"

    test.__name__ = f"test_openrlhf_own__{fn.__name__}"
    return test


for _module_name, _names in (
    ("test_kl_estimator_gradient", ("compute_approx_kl",)),
    ("test_loss_aggregation", ("PolicyLoss",)),
):
    for _name, _fn in list(vars(OWN[_module_name]).items()):
        if _name.startswith("test_") and inspect.isfunction(_fn):
            globals()[f"test_openrlhf_own__{_module_name[5:]}__{_name[5:]}"] = _own_test(OWN[_module_name], _fn, _names)


def test_own_tests_were_collected():
    own = {name for name in globals() if name.startswith("test_openrlhf_own__")}
    theirs = {m: [n for n, f in vars(OWN[m]).items() if n.startswith("test_") and inspect.isfunction(f)] for m in OWN}
    # 0.11.2: 7 test functions (12 cases) of compute_approx_kl, 14 of PolicyLoss / aggregate_loss
    assert (len(theirs["test_kl_estimator_gradient"]), len(theirs["test_loss_aggregation"])) == (7, 14)
    assert len(own) == 21


# ------------------------------------------- OpenRLHF's actor, unpatched vs patched --


class _Actor(torch.nn.Module):
    """Stands in for openrlhf.models.Actor: its forward's log_probs_from_logits call,
    looked up in openrlhf.models.utils as Actor's module does at call time."""

    def __init__(self, logits, labels):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())
        self.labels = labels

    def forward(self, sequences, action_mask, attention_mask=None, return_output=False, ring_attn_group=None,
                packed_seq_lens=None, return_entropy=False, **kwargs):  # fmt: skip
        log_probs = sys.modules["openrlhf.models.utils"].log_probs_from_logits(self.logits, self.labels)
        return log_probs, SimpleNamespace(aux_loss=None, entropy=None)


def _actor_args(policy_loss_type, is_option, estimator, unbiased_gradient, loss_agg_mode):
    level, mode, gating, threshold = IS_OPTIONS[is_option]
    return SimpleNamespace(
        train=SimpleNamespace(max_epochs=1, dynamic_batch_enable=False, colocate_all=False, async_enable=False),
        actor=SimpleNamespace(eps_clip_low_high=(0.2, 0.28), dual_clip=3.0, loss_agg_mode=loss_agg_mode,
                              policy_loss_type=policy_loss_type, aux_loss_coef=0.0, entropy_coef=None),
        algo=SimpleNamespace(
            advantage=SimpleNamespace(is_correction_level=level, is_correction_mode=mode, is_correction_gating=gating,
                                      is_correction_threshold=list(threshold)),
            kl=SimpleNamespace(use_loss=True, init_coef=0.01, estimator=estimator, unbiased_gradient=unbiased_gradient),
        ),
        ds=SimpleNamespace(packing_samples=False),
        vllm=SimpleNamespace(sync_backend="nccl"),
    )  # fmt: skip


def _training_step(args, data):
    """OpenRLHF 0.11.2's ActorPPOTrainer: __init__ (builds PolicyLoss from args) and one
    training_step (PolicyLoss, compute_approx_kl, aggregate_loss, backward)."""
    strategy = SimpleNamespace(
        args=args, ring_attn_group=None, is_rank_0=lambda: True, get_grad_norm=lambda model: 0.0,
        backward=lambda loss, model, optimizer: loss.backward(), optimizer_step=lambda *a, **k: None,
    )  # fmt: skip
    actor = _Actor(data["logits"], data["labels"])
    trainer = UP_ACTOR.ActorPPOTrainer(
        strategy, actor, None, mock.MagicMock(), mock.MagicMock(), micro_train_batch_size=B
    )
    experience = Experience(
        sequences=data["labels"], attention_mask=torch.ones(B, T, dtype=torch.long), action_mask=data["mask"],
        action_log_probs=data["old"], base_action_log_probs=data["base"], rollout_log_probs=data["rollout"],
        advantages=data["advantages"], info={},
    )  # fmt: skip
    status = trainer.training_step(experience, kl_ctl=0.05, step=0)
    return trainer, status["metrics"], actor.logits.grad


ACTOR_CASES = {
    "ppo, no correction, k3 unbiased": ("ppo", "off", "k3", True, "token-mean"),
    "ppo, ICEPOP, k2 unbiased": ("ppo", "token-mask-ratio (ICEPOP)", "k2", True, "token-mean"),
    "ppo, TIS, k1": ("ppo", "token-clip-ratio (TIS)", "k1", False, "token-mean"),
    "ppo, seq binary_kl, k3, seq-mean": ("ppo", "seq-mask-binary_kl", "k3", False, "seq-mean-token-mean"),
    "gspo, seq-mask-tis, k3 unbiased": ("gspo", "seq-mask-ratio (seq-mask-tis)", "k3", True, "seq-mean-token-mean"),
}


@pytest.mark.parametrize("case", list(ACTOR_CASES))
def test_openrlhf_actor_training_step_dispatches_kernels(case):
    args = _actor_args(*ACTOR_CASES[case])
    logits, labels = 2 * torch.randn(B, T, V), torch.randint(0, V, (B, T))
    log_probs = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    old = log_probs + 0.2 * torch.randn(B, T)
    data = dict(logits=logits, labels=labels, mask=random_mask(B, T).bool(), old=old,
                base=old + 0.3 * torch.randn(B, T), rollout=old + 0.5 * torch.randn(B, T),
                advantages=torch.randn(B, T))  # fmt: skip

    with counting_kernels() as (calls, ops):
        trainer, want, want_grad = _training_step(args, data)
    assert type(trainer.actor_loss_fn) is UP.PolicyLoss and not calls and not ops

    with openrlhf_patched(), counting_kernels() as (calls, ops):
        trainer, got, got_grad = _training_step(args, data)
    assert type(trainer.actor_loss_fn) is rk_openrlhf.PolicyLoss
    kernels = ["token_logprobs", "ppo_policy_loss"]
    if args.algo.kl.estimator != "k3" or args.algo.kl.unbiased_gradient:
        kernels.append("kl_penalty")  # k3's value is OpenRLHF's torch expression (module docstring)
    for name in kernels:
        assert calls.get(name, 0) >= 1, f"{name} not called: {calls}"
    if _compiled("ppo_policy_loss"):
        for op in kernels:
            assert any(name.startswith(op) for name in ops), f"no rlhf_kernels::{op}* dispatched: {ops}"

    keys = ["policy_loss", "ppo_clip_ratio", "ppo_kl", "kl", "logprobs_diff", "vllm_kl", "is_filter_ratio"]
    assert [k for k in keys if k in got] == [k for k in keys if k in want]
    for key in keys:
        if key in want:
            assert got[key].dtype == want[key].dtype, key
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("estimator", ["gae", "reinforce", "group_norm"])
def test_openrlhf_experience_maker_advantages_dispatch_kernels(estimator):
    """RemoteExperienceMaker.compute_advantages_and_returns (compute_reward, then the GAE
    or cumulative-return method) unpatched vs patched."""
    mask = random_mask(4, T).bool()
    mask[0, :3] = True  # every row has a token (OpenRLHF's whitening divides by the count)
    kl, values, rewards = 0.1 * torch.randn(4, T), torch.randn(4, T), torch.randn(4)

    def run():
        maker = UP_MAKER.RemoteExperienceMaker.__new__(UP_MAKER.RemoteExperienceMaker)
        maker.advantage_estimator = estimator
        maker.kl_ctl = SimpleNamespace(value=0.05)
        advantage = SimpleNamespace(estimator=estimator, gamma=1.0, lambd=0.95, no_std_norm=False)
        maker.strategy = SimpleNamespace(args=SimpleNamespace(
            rollout=SimpleNamespace(n_samples_per_prompt=2), reward=SimpleNamespace(clip_range=None),
            algo=SimpleNamespace(advantage=advantage)))  # fmt: skip
        experience = Experience(index=[0, 1, 2, 3], rewards=rewards.clone(), action_mask=mask, kl=kl.clone(),
                                values=values.clone(), info={})  # fmt: skip
        return maker.compute_advantages_and_returns([experience])[0]

    with counting_kernels() as (calls, _):
        want = run()
    assert not calls
    with openrlhf_patched(), counting_kernels() as (calls, _):
        got = run()
    assert calls.get("kl_shaped_rewards", 0) == 1 and calls.get("gae", 0) == 1, calls
    for name in ("advantages", "returns"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.info["return"], want.info["return"])


# ------------------------------------------------------- patch() and the guard --


def test_patch_replaces_every_holder_and_unpatch_restores():
    holders = {
        "openrlhf.models": ["PolicyLoss", "ValueLoss", "DPOLoss"],
        "openrlhf.models.loss": ["PolicyLoss", "ValueLoss", "DPOLoss"],
        "openrlhf.models.utils": ["compute_approx_kl", "compute_reward", "log_probs_from_logits"],
        "openrlhf.trainer.ray.ppo_actor": ["PolicyLoss", "compute_approx_kl"],
        "openrlhf.trainer.ppo_utils.experience_maker": ["compute_approx_kl", "compute_reward"],
    }
    before = {(m, n): getattr(MODULES[m], n) for m, names in holders.items() for n in names}
    maker = UP_MAKER.RemoteExperienceMaker
    methods = {n: vars(maker)[n] for n in ("get_advantages_and_returns", "get_cumulative_returns")}
    ours = rk_openrlhf.drop_ins(VERSION)
    with openrlhf_patched():
        for (module, name), original in before.items():
            assert getattr(MODULES[module], name) is ours[name], (module, name)
        assert UP_ACTOR.aggregate_loss is UP_LOSS.aggregate_loss  # not a drop-in: untouched
        for name in methods:
            assert vars(maker)[name] is not methods[name]
        assert rk_openrlhf.patch() == 0  # already patched
        late = types.ModuleType("openrlhf.late_import")  # a module that imports while patched
        late.PolicyLoss = sys.modules["openrlhf.models"].PolicyLoss
        sys.modules[late.__name__] = late
    try:
        for (module, name), original in before.items():
            assert getattr(MODULES[module], name) is original, (module, name)
        for name, method in methods.items():
            assert vars(maker)[name] is method
        assert late.PolicyLoss is UP.PolicyLoss
    finally:
        del sys.modules[late.__name__]


@pytest.mark.parametrize("installed", ["0.10.9", "0.12.0", None])
def test_patch_warns_and_patches_nothing_on_another_version(installed):
    with mock.patch.object(_version, "installed_version", lambda d: installed):
        with pytest.warns(_version.UnsupportedVersionWarning) as record:
            assert rk_openrlhf.patch() == 0
    message = str(record[0].message)
    assert ("not installed" in message) if installed is None else (f"openrlhf {installed} is installed" in message)
    assert all(v in message for v in rk_openrlhf.SUPPORTED_VERSIONS) and "Nothing was patched" in message
    assert UP_LOSS.PolicyLoss is UP.PolicyLoss and UP_UTILS.compute_approx_kl is UP.compute_approx_kl
    assert UP_ACTOR.PolicyLoss is UP.PolicyLoss


@pytest.mark.parametrize("installed", ["0.11.0", "0.11.1", "0.11.2", "0.11.2+cu128"])
def test_patch_installs_the_classes_of_the_installed_version(installed):
    with mock.patch.object(_version, "installed_version", lambda d: installed), warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            assert rk_openrlhf.patch() > 0
            legacy = installed in ("0.11.0", "0.11.1")
            policy = rk_openrlhf.PolicyLossV0110 if legacy else rk_openrlhf.PolicyLoss
            kl = rk_openrlhf.compute_approx_kl_v0110 if installed == "0.11.0" else rk_openrlhf.compute_approx_kl
            assert UP_ACTOR.PolicyLoss is policy and UP_UTILS.compute_approx_kl is kl
        finally:
            rk_openrlhf.unpatch()
    assert UP_ACTOR.PolicyLoss is UP.PolicyLoss


def test_version_matching():
    assert _version.is_supported("0.11.2", ["0.11.2"]) and _version.is_supported("0.11.2+local", ["0.11.2"])
    assert not _version.is_supported("0.11.20", ["0.11.2"]) and not _version.is_supported("0.11", ["0.11.2"])
    assert _version.is_supported("1.16.3", ["1.16.*"]) and _version.is_supported("1.16", ["1.16.*"])
    assert not _version.is_supported("1.160.0", ["1.16.*"]) and not _version.is_supported("1.17.0", ["1.16.*"])
    assert _version.installed_version("surely-not-a-distribution-name") is None
    assert _version.installed_version("torch") is not None


def test_drop_ins_rejects_an_unsupported_version():
    with pytest.raises(ValueError, match="0.10.0"):
        rk_openrlhf.drop_ins("0.10.0")


def test_openrlhf_k3_is_finite_where_0_11_0_was_not():
    """Documented departure for 0.11.0 / 0.11.1 (k3 of a log-ratio below about -88)."""
    lp = torch.tensor([-100.0, -5.0], requires_grad=True)
    rk_openrlhf.compute_approx_kl_v0110(lp, torch.zeros(2), "k3").sum().backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[0] == 0
    assert math.isclose(float(UP.compute_approx_kl(lp.detach(), torch.zeros(2), kl_estimator="k3")[0]), 10.0)


def test_fields_of_experience_are_real():
    """The trainer test runs OpenRLHF's real Experience dataclass (not a stub)."""
    assert {f.name for f in fields(Experience)} >= {"action_mask", "rollout_log_probs", "advantages"}
