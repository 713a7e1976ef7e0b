"""Ahead-of-time compile gate: every Triton specialization the launchers produce,
compiled for real GPU targets on a machine without a GPU.

    python tests/triton_aot.py [--targets 80,90,100] [--out bench/results/triton-resources.md]

Triton's interpreter (what the other tests run) accepts code that the GPU compiler
rejects, and says nothing of registers. Here each launcher in rlhf_kernels/triton is
called on meta tensors inside `_launch.recording()`, so the kernels, grids, block
sizes, num_warps and constexprs are exactly the ones it would launch; each distinct
specialization (Triton's own binder: dtypes, constexprs, divisibility of ints and
pointers) is compiled to a cubin with `triton.compile(ASTSource, target=GPUTarget)`,
and registers / local memory (spills) are read with the cuobjdump bundled with Triton.

Coverage, by construction, not by a hand-kept list of configurations:
- every option branch x every dtype an op accepts, at the launcher's largest and
  smallest block sizes (the heaviest and the lightest register footprint);
- every intermediate block size / shape class (the shapes of the issue: V in
  {1031, 32000, 152064, 262144}, N in {1, 8192, 65536}, H in {896, 4096, 8192}) at
  the default options;
- a check that every `*_kernel` in rlhf_kernels.triton was launched and that every
  bool constexpr took both values;
- the batch-invariant mode of the fused linear forward: its specialization and launch
  configuration are the same at every N (`batch_invariance_problems`; alone, without
  compiling: `--batch-invariance-only`).
Fails (exit 1) on a compile error, a spill (LOCAL > 0) not in ALLOWED_SPILLS, or a
kernel above 240 registers (within 16 of the ceiling); writes the resource table either way. Must run
without TRITON_INTERPRET (the test that calls it starts a clean subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass

import crash_tolerant_pool
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "triton-resources.md")
FAMILIES = ("logprobs", "kl", "ppo", "gae", "masked", "dpo", "rm", "grpo")
# (kernel name, target cc) -> why a spill is accepted. Empty: no kernel spills.
ALLOWED_SPILLS: dict[tuple[str, int], str] = {}
# (kernel name, target cc, triton version prefix) -> why more than MAX_REGISTERS (no
# spill) is accepted there.
ALLOWED_REGISTERS: dict[tuple[str, int, str], str] = {
    ("_linear_logprobs_forward_kernel", 100, "3.6"): "Triton 3.6 only, 16-bit at 64 x 128 x 64: 242, no spill "
    "(Triton 3.9: 236); Blackwell tiles are not tuned yet",
}
# Bool constexprs that take one value on a GPU, and why.
FIXED_ON_GPU = {
    ("_linear_logprobs_forward_kernel", "UPCAST_DOT_INPUTS"): "True only in the interpreter (CPU tensors)",
}
# The per-thread register ceiling of every NVIDIA GPU since Kepler is 255; a kernel
# within 16 of it has no headroom (a compiler update spills it) and low occupancy.
MAX_REGISTERS = 240
# Assumed by the binder for pointers (torch's allocations are 512-byte aligned; a
# sliced view's misaligned start only drops the divisibility hint).
INDEX = torch.int64


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


# ----------------------------------------------------------------- the calls --
# Each <family>_calls() yields (description, thunk); a thunk calls that family's
# launchers on meta tensors. `_sweep` takes every combination of the options at the
# largest shape (the heaviest registers) and every other shape at the default (first)
# options (block sizes and int specialisations: 1, a multiple of 16, neither).

VOCABS = (1031, 32000, 152064, 262144)
ROWS = (1, 8192, 65536)
HIDDENS = (896, 4096, 8192)
# Row lengths: 1 (specialised to a constant), not a multiple of 16, and the
# launchers' largest blocks (a long row last).
LENGTHS = (1, 300, 4096, 1 << 20)
FLOATS = (torch.float32, torch.float64)


def _sweep(name: str, shapes, options: dict, call):
    largest = shapes[-1]
    for values in itertools.product(*options.values()):
        chosen = dict(zip(options, values))
        yield f"{name} {largest} {chosen}", functools.partial(call, largest, **chosen)
    defaults = {key: values[0] for key, values in options.items()}
    for shape in shapes[:-1]:
        yield f"{name} {shape} {defaults}", functools.partial(call, shape, **defaults)


def logprobs_calls():
    m = importlib.import_module("rlhf_kernels.triton.logprobs")

    def token(shape, dtype, label_dtype, softcap, entropy):
        N, V = shape
        logits, labels = meta(N, V, dtype=dtype), meta(N, dtype=label_dtype)
        lp, h, lse = m.token_logprobs_forward(logits, labels, 0.9, softcap, 1.0, -100, entropy)
        m.token_logprobs_backward(lp, h if entropy else None, logits, labels, lse, h, 0.9, softcap, 1.0, -100)
        # the in-place backward: the gradient written over the logits
        m.token_logprobs_backward(lp, None, logits, labels, lse, h, 0.9, softcap, 1.0, -100, out=logits)

    token_options = dict(
        dtype=(torch.bfloat16, torch.float32, torch.float16, torch.float64),
        label_dtype=(torch.int64, torch.int32),
        softcap=(None, 30.0),
        entropy=(True, False),
    )
    yield from _sweep("token_logprobs", list(itertools.product(ROWS, VOCABS)), token_options, token)

    yield from _sweep("linear_logprobs", list(itertools.product(ROWS, HIDDENS, VOCABS)), LINEAR_OPTIONS, _linear)
    # The batch-invariant mode at every N of INVARIANT_ROWS: one specialization for all
    # of them (batch_invariance_problems checks it; the dedup in collect() keeps one).
    for N in INVARIANT_ROWS:
        shape = (N,) + INVARIANT_SHAPES[0]
        yield f"linear_logprobs batch_invariant {shape}", functools.partial(_linear, shape, batch_invariant=True)


def _linear(shape, dtype=torch.bfloat16, bias=False, softcap=None, entropy=True, tf32=False, batch_invariant=False):
    m = importlib.import_module("rlhf_kernels.triton.logprobs")
    N, H, V = shape
    hidden, weight = meta(N, H, dtype=dtype), meta(V, H, dtype=dtype)
    with _float32_matmul_precision("high" if tf32 else "highest"):
        m.linear_logprobs_forward(
            hidden,
            weight,
            meta(V, dtype=dtype) if bias else None,
            meta(N, dtype=INDEX),
            1.0,
            softcap,
            1.0,
            -100,
            entropy,
            batch_invariant=batch_invariant,
        )


LINEAR_OPTIONS = dict(
    dtype=(torch.bfloat16, torch.float32, torch.float16),
    bias=(False, True),
    softcap=(None, 30.0),
    entropy=(True, False),
    tf32=(False, True),
    batch_invariant=(False, True),
)
# The batch-invariant mode's claim on a GPU (docs/DESIGN.md, "Batch invariance"): a row's
# reduction order is fixed by the binary and its launch, so every N must give the same
# specialization (Triton's binder: N = 1 would be a constant, N % 16 == 0 a divisibility
# hint, unless the kernel says do_not_specialize), tiles, warps, stages and vocabulary
# splits; only grid axis 0 (the row blocks) may follow N. N: 1, not a multiple of 16, 64,
# and ROWS' large ones; (H, V): the largest shape with every option, the others at the
# default options.
INVARIANT_ROWS = (1, 7, 64, 300, 8192, 65536)
INVARIANT_SHAPES = tuple(itertools.product(HIDDENS[::-1], VOCABS[::-1]))


def batch_invariance_problems() -> tuple[int, list[str]]:
    """(option sets checked, problems): the binder's specialization and the launch
    configuration of the fused linear forward in batch-invariant mode, compared across
    INVARIANT_ROWS for each dtype x option set x (H, V). No compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from rlhf_kernels.triton._launch import recording

    backend = make_backend(GPUTarget("cuda", 90, 32))
    options = {k: v for k, v in LINEAR_OPTIONS.items() if k != "batch_invariant"}
    cases = [(INVARIANT_SHAPES[0], dict(zip(options, values))) for values in itertools.product(*options.values())]
    cases += [(shape, dict(dtype=dtype)) for shape in INVARIANT_SHAPES[1:] for dtype in options["dtype"]]
    problems = []
    for shape, chosen in cases:
        configurations = {}
        for N in INVARIANT_ROWS:
            with recording() as launches:
                _linear((N,) + shape, **chosen, batch_invariant=True)
            (launch,) = launches
            signature, constexprs, attrs, binder_options = _specializations(launch, backend)
            configurations[N] = repr((
                launch.kernel.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()),
                sorted(binder_options.items()), launch.num_warps, launch.num_stages,
                launch.grid[1:], launch.args[8],  # the vocabulary splits and the columns of each
            ))  # fmt: skip
        if len(set(configurations.values())) > 1:
            groups = {}
            for N, configuration in configurations.items():
                groups.setdefault(configuration, []).append(N)
            problems.append(
                f"batch-invariant linear_logprobs (H, V) = {shape} {chosen}: N in {INVARIANT_ROWS} gives "
                f"{len(groups)} different specializations / launch configurations, by N: {list(groups.values())}"
            )
    return len(cases), problems


@contextlib.contextmanager
def _float32_matmul_precision(precision: str):
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def kl_calls():
    m = importlib.import_module("rlhf_kernels.triton.kl")

    def penalty(T, dtype, estimator, clamp, need_grad):
        x = meta(64, T, dtype=dtype)
        m.kl_penalty(x, x, estimator, clamp, need_grad)

    def rewards(T, dtype, estimator, clamp, indexed):
        x = meta(64, T, dtype=dtype)
        m.kl_shaped_rewards(
            meta(64, dtype=dtype), x, x, x, 0.05, estimator, clamp, meta(64, dtype=INDEX) if indexed else None
        )

    estimators = tuple(m.ESTIMATOR_CODES)
    yield from _sweep(
        "kl_penalty",
        LENGTHS,
        dict(dtype=FLOATS, estimator=estimators, clamp=(None, 10.0), need_grad=(True, False)),
        penalty,
    )
    yield from _sweep(
        "kl_shaped_rewards",
        LENGTHS,
        dict(dtype=FLOATS, estimator=estimators, clamp=(None, 10.0), indexed=(False, True)),
        rewards,
    )


def ppo_calls():
    m = importlib.import_module("rlhf_kernels.triton.ppo")

    def policy(T, dtype, dual_clip, log_ratio_clamp, need_grad):
        x = meta(256, T, dtype=dtype)
        m.ppo_policy_loss(x, x, x, x, meta(256, dtype=dtype), 0.2, 0.28, dual_clip, log_ratio_clamp, need_grad)

    def value(T, dtype, clip, need_grad):
        x = meta(256, T, dtype=dtype)
        m.ppo_value_loss(x, x, x, x, meta(256, dtype=dtype), clip, need_grad)

    yield from _sweep(
        "ppo_policy_loss",
        LENGTHS,
        dict(dtype=FLOATS, dual_clip=(None, 3.0), log_ratio_clamp=(None, 20.0), need_grad=(True, False)),
        policy,
    )
    yield from _sweep("ppo_value_loss", LENGTHS, dict(dtype=FLOATS, clip=(0.2, None), need_grad=(True, False)), value)


def grpo_calls():
    m = importlib.import_module("rlhf_kernels.triton.grpo")
    params = [0.8, 1.28, 3.0, 1.5, 20.0, 1.0, 1.05, 0.5, 0.8, 1.28, 0.1, 0.0]

    def policy(T, dtype, loss_code, kl_code, has_isw, need_grad):
        x = meta(256, T, dtype=dtype)
        isw = x if has_isw else meta(0, dtype=dtype)
        m.grpo_policy_loss(x, x, x, x, isw, x, meta(256, dtype=dtype), loss_code, kl_code, params, need_grad)

    # Every loss type with and without a KL term (13: low_var_kl+; 29: the same times the
    # ratio, kl_is_corrected), weights and gradient; every KL estimator (and its
    # straight-through "+", and k3 corrected: TRL's beta with use_bias_correction_kl) on
    # the clip family.
    options = dict(
        dtype=FLOATS, loss_code=(0, 1, 2, 3), kl_code=(0, 13, 29), has_isw=(True, False), need_grad=(True, False)
    )
    yield from _sweep("grpo_policy_loss", LENGTHS, options, policy)
    kl_options = dict(dtype=FLOATS, loss_code=(0,), kl_code=(1, 2, 3, 4, 5, 9, 10, 11, 12, 19), has_isw=(False,), need_grad=(True,))
    yield from _sweep("grpo_policy_loss kl", LENGTHS[-1:], kl_options, policy)


def gae_calls():
    m = importlib.import_module("rlhf_kernels.triton.gae")

    def gae(T, dtype, mode, has_mask):
        x = meta(64, T, dtype=dtype)
        m.gae(x, x, x if has_mask else None, 1.0, 0.95, mode)

    yield from _sweep("gae", LENGTHS, dict(dtype=FLOATS, mode=tuple(m.MASK_MODE_CODES), has_mask=(True, False)), gae)


def masked_calls():
    m = importlib.import_module("rlhf_kernels.triton.masked")

    def whiten(shape, dtype, shift_mean, fill_masked):
        x = meta(*shape, dtype=dtype)
        m.masked_sums(x, x)
        _, stats = m.masked_whiten(x, x, shift_mean, True, 1e-8, fill_masked)
        m.masked_whiten_backward(x, x, x, stats, shift_mean, fill_masked)

    # 1 x 2^34: one flattened whitening of 16 Gi elements (grid and index widths).
    shapes = ((1, 1), (512, 300), (1, 1 << 34))
    yield from _sweep("masked", shapes, dict(dtype=FLOATS, shift_mean=(True, False), fill_masked=(True, False)), whiten)


def dpo_calls():
    m = importlib.import_module("rlhf_kernels.triton.dpo")

    def dpo(B, dtype, loss_type, reference_free, need_grad, extras):
        x = meta(B, dtype=dtype)
        # extras: LD-DPO tails [4, B], lengths [2, B] and WPO weights [B] (run-time flags,
        # as the f-divergence: no specialization of their own)
        optional = (meta(4, B, dtype=dtype), meta(2, B, dtype=dtype), x) if extras else (None, None, None)
        m.dpo_loss(x, x, x, x, *optional, 0.1, loss_type, 0.1, reference_free, False, "alpha_divergence", 0.5, 80.0,
                   0.5, 0.05, need_grad)  # fmt: skip

    options = dict(dtype=FLOATS, loss_type=tuple(m.LOSS_CODES), reference_free=(False, True), need_grad=(True, False),
                   extras=(True, False))  # fmt: skip
    yield from _sweep("dpo_loss", (1, 300, 4096), options, dpo)


def rm_calls():
    m = importlib.import_module("rlhf_kernels.triton.rm")

    def bradley_terry(n, dtype, margin, need_grad):
        m.bradley_terry_loss(
            meta(n, dtype=dtype), meta(n, dtype=dtype), meta(n, dtype=dtype) if margin else None, need_grad
        )

    def ranking(K, dtype, need_grad):
        m.ranking_loss(meta(128, K, dtype=dtype), meta(128, K, dtype=dtype), need_grad)

    yield from _sweep(
        "bradley_terry_loss",
        (1, 300, 4096),
        dict(dtype=FLOATS, margin=(False, True), need_grad=(True, False)),
        bradley_terry,
    )
    yield from _sweep(
        "ranking_loss",
        (2, 7, 16, 64, 256),
        dict(dtype=(torch.float64, torch.float32), need_grad=(True, False)),
        ranking,
    )


# ------------------------------------------------------------- compilation --


@dataclass
class Spec:
    kernel: object
    description: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return self.kernel.__name__


def _specializations(launch, backend):
    """The runtime binder's (signature, constexprs, attrs, options) for one launch:
    the same function Triton calls before compiling, run for `backend`'s target."""
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def collect(families=FAMILIES) -> tuple[list[Spec], dict]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from rlhf_kernels.triton._launch import recording

    backend = make_backend(GPUTarget("cuda", 90, 32))
    specs: dict[str, Spec] = {}
    seen_constexprs: dict[str, dict[str, set]] = {}
    for family in families:
        for description, thunk in globals()[f"{family}_calls"]():
            with recording() as launches:
                thunk()
            for launch in launches:
                signature, constexprs, attrs, options = _specializations(launch, backend)
                name = launch.kernel.__name__
                for param in launch.kernel.params:
                    if param.is_constexpr and param.name in launch.constexprs:
                        values = seen_constexprs.setdefault(name, {}).setdefault(param.name, set())
                        values.add(launch.constexprs[param.name])
                key = repr(
                    (name, signature, sorted(constexprs.items()), sorted(attrs.items()), sorted(options.items()))
                )
                if key not in specs:
                    specs[key] = Spec(
                        launch.kernel,
                        description,
                        signature,
                        constexprs,
                        attrs,
                        options,
                        launch.num_warps,
                        launch.num_stages,
                    )
    return list(specs.values()), seen_constexprs


def coverage_problems(seen_constexprs: dict) -> list[str]:
    """Every *_kernel of the package was launched; every bool constexpr took both values."""
    import triton

    problems = []
    for family in FAMILIES:
        module = importlib.import_module(f"rlhf_kernels.triton.{family}")
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                if name not in seen_constexprs:
                    problems.append(f"{family}.{name} is never launched by the gate's calls")
    for name, constexprs in seen_constexprs.items():
        for key, values in constexprs.items():
            if all(isinstance(v, bool) for v in values) and len(values) < 2 and (name, key) not in FIXED_ON_GPU:
                problems.append(f"{name}: constexpr {key} only took {values}")
    return problems


_SPECS: list[Spec] = []
_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _job(index: int, cc: int) -> tuple:
    spec = _SPECS[index]
    launch_options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return index, cc, spec.kernel.__module__, spec.name, spec.signature, spec.constexprs, spec.attrs, launch_options


def _compile_one(job) -> dict:
    _, cc, module, name, signature, constexprs, attrs, launch_options = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", cc, 32)
    # The backend options of this target (the binder's are sm_90's: passing them to an
    # sm_80 compile selects Hopper-only instructions and aborts LLVM).
    options = make_backend(target).parse_options(launch_options).__dict__
    kernel = getattr(importlib.import_module(module), name)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs),
                target=target,
                options=options,
            )
    except Exception as error:  # noqa: BLE001 - every compile error is a gate failure, reported
        message = "".join(traceback.format_exception_only(type(error), error)).strip()
        return {"error": message[-2000:]}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True)
    match = _RESOURCE.search(dump.stdout)
    if match is None:
        return {"error": f"cuobjdump: {dump.stdout[-500:]} {dump.stderr[-500:]}"}
    regs, stack, _, local = (int(g) for g in match.groups())
    return {
        "regs": regs,
        "stack": stack,
        "local": local,
        "shared": compiled.metadata.shared,
        "seconds": time.perf_counter() - started,
    }


def supported_targets(requested: list[int]) -> list[int]:
    """The requested ccs this Triton can compile for (sm_100 needs Triton >= 3.3)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    out = []
    for cc in requested:
        try:
            make_backend(GPUTarget("cuda", cc, 32)).parse_options({})
        except Exception:  # noqa: BLE001
            print(f"triton {triton.__version__} cannot target sm_{cc}; skipped", file=sys.stderr)
            continue
        out.append(cc)
    return out


def _constexpr_text(spec: Spec) -> str:
    names = spec.kernel.arg_names
    return ", ".join(f"{names[k[0]]}={v}" for k, v in sorted(spec.constexprs.items()) if not isinstance(v, str) or v)


def write_table(path: str, results: dict, targets: list[int], elapsed: float) -> None:
    import triton

    by_kernel: dict[str, list] = {}
    for index, spec in enumerate(_SPECS):
        by_kernel.setdefault(spec.name, []).append(index)
    lines = [
        "# Triton kernels: registers, spills and shared memory per GPU target",
        "",
        f"Written by `python tests/triton_aot.py` (run by tests/test_triton_aot.py): "
        f"triton {triton.__version__}, torch {torch.__version__}, {len(_SPECS)} specializations "
        f"x targets {', '.join(f'sm_{cc}' for cc in targets)}, compiled in {elapsed:.0f} s without a GPU.",
        "Compiled from the launchers' own launches (meta tensors), not a hand-kept list. "
        "regs: registers per thread (max of the kernel's specializations, 255 is the hardware ceiling); "
        "spill: local-memory bytes per thread; shared: bytes per program.",
        "",
        "## Per kernel (worst case over its specializations)",
        "",
        "| kernel | target | specializations | regs (max) | spill bytes (max) | shared bytes (max) | warps"
        " | heaviest specialization |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, indices in sorted(by_kernel.items()):
        for cc in targets:
            rows = [(i, results.get((i, cc), {})) for i in indices]
            ok = [(i, r) for i, r in rows if "regs" in r]
            if not ok:
                lines.append(f"| {name} | sm_{cc} | {len(indices)} | compile error | | | | |")
                continue
            worst_index, worst = max(ok, key=lambda item: (item[1]["regs"], item[1]["local"]))
            warps = sorted({_SPECS[i].num_warps for i in indices})
            lines.append(
                f"| {name} | sm_{cc} | {len(indices)} | {worst['regs']} | {max(r['local'] for _, r in ok)} | "
                f"{max(r['shared'] for _, r in ok)} | {'/'.join(map(str, warps))} | {_SPECS[worst_index].description} |"
            )
    lines += ["", "## Every specialization", "", "| kernel | launch | constexprs | warps | stages |"]
    lines[-1] += "".join(f" sm_{cc} regs / spill / shared |" for cc in targets)
    lines.append("|---|---|---|---|---|" + "---|" * len(targets))
    for index, spec in enumerate(_SPECS):
        cells = []
        for cc in targets:
            r = results.get((index, cc), {})
            cells.append("ERROR" if "regs" not in r else f"{r['regs']} / {r['local']} / {r['shared']}")
        lines.append(
            f"| {spec.name} | {spec.description} | {_constexpr_text(spec)} | {spec.num_warps} | {spec.num_stages} | "
            + " | ".join(cells)
            + " |"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as out:
        out.write("\n".join(lines) + "\n")


def _registers_allowed(name: str, cc: int) -> bool:
    import triton

    return any(
        (kernel, target) == (name, cc) and triton.__version__.startswith(version)
        for kernel, target, version in ALLOWED_REGISTERS
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,90,100", help="compute capabilities, comma-separated")
    parser.add_argument("--out", default=DEFAULT_OUT, help="the resource table (markdown)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument(
        "--batch-invariance-only",
        action="store_true",
        help="only compare the batch-invariant linear forward's specializations across N (no compile)",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_aot: unset TRITON_INTERPRET: the gate compiles for real GPU targets", file=sys.stderr)
        return 2
    cases, invariance = batch_invariance_problems()
    print(
        f"triton_aot: batch-invariant linear_logprobs: {cases} dtype / option / shape sets x N in {INVARIANT_ROWS}: "
        f"{'one specialization and launch configuration each' if not invariance else 'FAILED'}"
    )
    if args.batch_invariance_only:
        for problem in invariance:
            print(f"triton_aot: FAIL {problem}")
        return 1 if invariance else 0
    targets = supported_targets([int(cc) for cc in args.targets.split(",")])
    specs, seen = collect(tuple(args.families.split(",")))
    _SPECS[:] = specs
    problems = coverage_problems(seen) if args.families == ",".join(FAMILIES) else []
    problems += invariance
    print(f"triton_aot: {len(specs)} specializations x {len(targets)} targets", file=sys.stderr, flush=True)
    started = time.perf_counter()
    results = {}
    jobs = [_job(i, cc) for i in range(len(specs)) for cc in targets]
    for done, (job_index, result) in enumerate(crash_tolerant_pool.imap(_compile_one, jobs, args.jobs), 1):
        index, cc = jobs[job_index][:2]
        results[(index, cc)] = result
        if done % 200 == 0:
            print(f"triton_aot: {done}/{len(jobs)} compiled", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    write_table(args.out, results, targets, elapsed)
    for (index, cc), result in sorted(results.items()):
        spec = specs[index]
        where = f"{spec.name} sm_{cc} [{spec.description}]"
        if "error" in result:
            problems.append(f"compile error: {where}: {result['error']}")
        elif result["local"] > 0 and (spec.name, cc) not in ALLOWED_SPILLS:
            problems.append(f"spill: {where}: {result['local']} bytes of local memory")
        elif result["regs"] > MAX_REGISTERS and not _registers_allowed(spec.name, cc):
            problems.append(f"no register headroom: {where}: {result['regs']} registers")
    print(f"triton_aot: {len(jobs)} compiles in {elapsed:.0f} s; table: {os.path.relpath(args.out, ROOT)}")
    for problem in problems:
        print(f"triton_aot: FAIL {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
