"""Which implementation of an op runs.

Resolution, per op: the explicit ``backend=`` argument, then the environment
variable ``RLHF_KERNELS_BACKEND``, then auto. Auto picks, for CUDA tensors, the
fastest measured of triton/cuda (``CUDA_AUTO_ORDER``); for CPU tensors the C++
``cpu`` kernel; and ``reference`` wherever nothing else exists.

``RLHF_KERNELS_BACKEND`` is one name for every op (``cpu``), or comma-separated
``key=name`` overrides where key is an op family (``gae=cpu``) or one op
(``masked_whiten=reference``), optionally after a default:
``reference,gae=cpu``. An op's own key beats its family's. A named backend that
cannot run the op is an error, never a silent substitution.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from . import _extension

BACKENDS = ("triton", "cuda", "cpu", "reference")
ENV_VAR = "RLHF_KERNELS_BACKEND"

# Every public op and its family (the name its files carry in every layer).
OP_FAMILY: dict[str, str] = {
    "token_logprobs": "logprobs",
    "linear_logprobs": "logprobs",
    "sequence_logprobs": "logprobs",
    "kl_penalty": "kl",
    "kl_shaped_rewards": "kl",
    "gae": "gae",
    "discounted_returns": "gae",
    "masked_mean": "gae",
    "masked_whiten": "gae",
    "ppo_policy_loss": "ppo",
    "ppo_value_loss": "ppo",
    "dpo_loss": "dpo",
    "linear_dpo_loss": "dpo",
    "bradley_terry_loss": "rm",
    "ranking_loss": "rm",
    "policy_loss": "grpo",
    "linear_policy_loss": "grpo",
}
FAMILIES = tuple(dict.fromkeys(OP_FAMILY.values()))

# The C++ ops (csrc/registration.cpp) a public op runs on: it has the `cpu` /
# `cuda` backend when all of them have a kernel for that device.
_LOGPROBS_OPS = ("token_logprobs", "token_logprobs_backward")
COMPILED_OPS: dict[str, tuple[str, ...]] = {
    "token_logprobs": _LOGPROBS_OPS,
    # linear_logprobs' cpu path is a Python custom op around the C++ token kernels
    # (rlhf_kernels/ops/logprobs.py); the ops built on it follow it.
    "linear_logprobs": _LOGPROBS_OPS,
    "sequence_logprobs": _LOGPROBS_OPS,
    "linear_dpo_loss": (*_LOGPROBS_OPS, "dpo_loss"),
    "dpo_loss": ("dpo_loss",),
    "bradley_terry_loss": ("bradley_terry_loss",),
    "ranking_loss": ("ranking_loss",),
    "gae": ("gae",),
    "discounted_returns": ("gae",),
    "ppo_policy_loss": ("ppo_policy_loss",),
    "ppo_value_loss": ("ppo_value_loss",),
    "kl_penalty": ("kl_penalty",),
    "kl_shaped_rewards": ("kl_shaped_rewards",),
    "masked_mean": ("masked_sums",),
    "masked_whiten": ("masked_whiten", "masked_whiten_backward"),
    "policy_loss": ("grpo_policy_loss",),
    "linear_policy_loss": (*_LOGPROBS_OPS, "grpo_policy_loss"),
}

# Auto's order on CUDA tensors, fastest first. Triton leads until an op's
# benchmark in bench/results/ measures its CUDA C++ kernel faster; gae's only
# GPU kernel so far is the C++ one.
DEFAULT_CUDA_AUTO_ORDER = ("triton", "cuda")
CUDA_AUTO_ORDER: dict[str, tuple[str, ...]] = {"gae": ("cuda", "triton"), "discounted_returns": ("cuda", "triton")}


def _check_op(op: str) -> None:
    if op not in OP_FAMILY:
        raise ValueError(f"op must be one of {tuple(OP_FAMILY)}, got {op!r}")


def _check_name(name: str, source: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} (or None for auto), got {name!r}")


def _has_compiled(op: str, dispatch_key: str) -> bool:
    ops = COMPILED_OPS.get(op, ())
    return bool(ops) and all(_extension.has_kernel(name, dispatch_key) for name in ops)


# The rlhf_kernels.triton module a public op runs on, where it has one.
TRITON_MODULES: dict[str, str] = {
    "token_logprobs": "logprobs",
    "linear_logprobs": "logprobs",
    "sequence_logprobs": "logprobs",
    "linear_dpo_loss": "logprobs",
    "ppo_policy_loss": "ppo",
    "ppo_value_loss": "ppo",
    "kl_penalty": "kl",
    "kl_shaped_rewards": "kl",
    "gae": "gae",
    "discounted_returns": "gae",
    "masked_mean": "masked",
    "masked_whiten": "masked",
    "dpo_loss": "dpo",
    "bradley_terry_loss": "rm",
    "ranking_loss": "rm",
    "policy_loss": "grpo",
    "linear_policy_loss": "grpo",
}


def _has_triton(op: str) -> bool:
    return op in TRITON_MODULES and importlib.util.find_spec("triton") is not None


# Looked up once at import, as plain sets, so resolve() traces cleanly under
# torch.compile(fullgraph=True) (no dispatcher queries or imports inside a graph).
HAS_CPU = frozenset(op for op in OP_FAMILY if _has_compiled(op, "CPU"))
HAS_CUDA = frozenset(op for op in OP_FAMILY if _has_compiled(op, "CUDA"))
HAS_TRITON = frozenset(op for op in OP_FAMILY if _has_triton(op))


def _triton_interpreted() -> bool:
    # Under TRITON_INTERPRET=1 Triton kernels run on CPU tensors (the tests' way
    # of checking them without a GPU).
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(op: str, device: torch.device | str) -> tuple[str, ...]:
    """Backends that can run `op` on tensors of `device`, in auto's order."""
    _check_op(op)
    device_type = torch.device(device).type
    names: list[str] = []
    if device_type == "cuda":
        for name in CUDA_AUTO_ORDER.get(op, DEFAULT_CUDA_AUTO_ORDER):
            if (name == "triton" and op in HAS_TRITON) or (name == "cuda" and op in HAS_CUDA):
                names.append(name)
    elif device_type == "cpu":
        if op in HAS_CPU:
            names.append("cpu")
    names.append("reference")
    if device_type == "cpu" and op in HAS_TRITON and _triton_interpreted():
        names.append("triton")  # the interpreter: explicit choice only, never auto's
    return tuple(names)


def env_choice(op: str) -> str | None:
    """The backend RLHF_KERNELS_BACKEND names for `op`, or None."""
    setting = os.environ.get(ENV_VAR, "").strip()
    default = family_choice = op_choice = None
    for item in setting.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            _check_name(item, ENV_VAR)
            default = item
            continue
        key, name = (part.strip() for part in item.split("=", 1))
        if key not in OP_FAMILY and key not in FAMILIES:
            raise ValueError(
                f"{ENV_VAR} entry {item!r}: key must be an op family {FAMILIES} or an op "
                f"{tuple(OP_FAMILY)}, got {key!r}"
            )
        _check_name(name, f"{ENV_VAR} entry {item!r}")
        if key == op:
            op_choice = name
        elif key == OP_FAMILY[op]:
            family_choice = name
    return op_choice or family_choice or default


_WARNED_REFERENCE_ON_CUDA: set[str] = set()


def _warn_reference_on_cuda(op: str) -> None:
    """Auto never runs the reference on CUDA tensors silently: one warning per op, saying why."""
    if op in _WARNED_REFERENCE_ON_CUDA or torch.compiler.is_compiling():
        return
    _WARNED_REFERENCE_ON_CUDA.add(op)
    reasons = []
    if op in TRITON_MODULES and not _has_triton(op):
        reasons.append("triton is not installed (pip install triton)")
    if op in COMPILED_OPS and op not in HAS_CUDA:
        reasons.append(
            "rlhf_kernels._C has no CUDA kernel for it"
            + (f" (the extension did not load: {_extension.LOAD_ERROR})" if not _extension.LOADED else "")
        )
    warnings.warn(
        f"rlhf_kernels: {op} on CUDA tensors runs the plain-PyTorch reference (slower, more memory): "
        + ("; ".join(reasons) or "no GPU kernel is available"),
        RuntimeWarning,
        stacklevel=4,
    )


def resolve(op: str, device: torch.device | str, backend: str | None = None) -> str:
    """The backend that runs `op` on `device`: explicit > env > auto."""
    choices = available(op, device)
    if backend is not None:
        _check_name(backend, "backend")
        requested, source = backend, "backend"
    else:
        requested, source = env_choice(op), ENV_VAR
    if requested is None:
        if choices[0] == "reference" and torch.device(device).type == "cuda":
            _warn_reference_on_cuda(op)
        return choices[0]
    if requested not in choices:
        reason = ""
        if requested in ("cpu", "cuda") and not _extension.LOADED:
            reason = f" (rlhf_kernels._C did not load: {_extension.LOAD_ERROR})"
        raise ValueError(
            f"{source}={requested!r} cannot run {op} on {torch.device(device).type} tensors"
            f"{reason}; available: {choices}"
        )
    return requested
