"""One command that validates a GPU: build, GPU tests, every benchmark family, a summary.

    bash bench/gpu.sh                      # or: python -m bench.gpu / python bench/gpu.py
    python bench/gpu.py --dry-run --out /tmp/dry   # CI: CPU tensors, tiny sizes, builds nothing

Steps: build rlhf_kernels._C for the local GPU's architecture; record the environment
(env.json, env.md); run tests/test_gpu.py (tests.log, tests.xml); run every benchmark
family of bench/run.py on CUDA against the anchors that are installed (one CSV, table and
plot per family, progress in bench.log); write summary.md, with each rate as a share of
the device's datasheet peak. Output: --out, default bench/results/<gpu>-<date>/.
Fits in 8 minutes on one H100: the benchmarks run one shape per op and each family
has a time budget (an implementation past it is skipped, and the summary says so).

--dry-run builds nothing and runs every step's Python on CPU tensors at tiny sizes
(tests/test_gpu.py with RLHF_KERNELS_GPU_DRY_RUN=1, the Triton kernels in Triton's
interpreter); its figures are not GPU figures.

Exit status: 0 everything ran and passed; 1 a test or one of our implementations
failed; 2 a step could not run (build, pytest, a benchmark family).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from xml.etree import ElementTree

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
DRY_RUN_ENV = "RLHF_KERNELS_GPU_DRY_RUN"
DRY_RUN_BANNER = (
    "> **Dry run on CPU, not GPU figures.** Every step's code ran on CPU tensors at tiny sizes "
    "(`bench/gpu.py --dry-run`); nothing here measures a GPU.\n"
)

# Datasheet peaks: (name pattern, HBM bandwidth GB/s, dense BF16 tensor-core TFLOP/s, no
# sparsity), matched in order against torch.cuda.get_device_name().lower().
# NVIDIA H100 datasheet: SXM5 3.35 TB/s, 989 TFLOP/s; PCIe 2.0 TB/s, 756; NVL 3.9 TB/s, 835.
# NVIDIA H200 datasheet: SXM 4.8 TB/s, 989 TFLOP/s; NVL 4.8 TB/s, 835.
# NVIDIA A100 datasheet: 80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s, 40GB 1,555 GB/s; 312 TFLOP/s.
PEAKS = (
    ("h200 nvl", "H200 NVL", 4800, 835),
    ("h200", "H200 SXM", 4800, 989),
    ("h100 nvl", "H100 NVL", 3900, 835),
    ("h100 pcie", "H100 PCIe", 2000, 756),
    ("h100", "H100 SXM", 3350, 989),  # "NVIDIA H100 80GB HBM3"
    ("a100-sxm4-80gb", "A100 80GB SXM", 2039, 312),
    ("a100 80gb pcie", "A100 80GB PCIe", 1935, 312),
    ("a100", "A100 40GB", 1555, 312),
)

# Seconds each benchmark family may take on a GPU, most of it torch.compile's first
# compiles (forward and forward+backward graphs) and the baselines' Triton JIT; the whole
# run (build ~1 min, tests ~2 min) stays under 8 minutes on an H100.
FAMILY_BUDGET_S = {"logprobs": 100, "gae": 30, "ppo": 35, "kl": 35, "dpo": 60, "grpo": 90}
TOTAL_BUDGET_S = 450
TESTS_TIMEOUT_S = 240

# Dry run: the smallest shapes, in each family's SHAPES layout (bench/<family>.py).
TINY_SHAPES = {
    "logprobs": {"token": [(8, 300)], "linear": [(8, 16, 300)]},
    "gae": [(4, 40)],
    "ppo": [(4, 40)],
    "kl": [(4, 40)],
    "dpo": [(1, 8, 16, 300)],
    "grpo": {"policy": [(4, 40)], "linear": [(2, 4, 16, 300)]},
}


def peak_of(device_name: str):
    """(label, GB/s, TFLOP/s) from PEAKS, or None: peak unknown."""
    for pattern, label, bandwidth, tflops in PEAKS:
        if pattern in device_name.lower():
            return label, bandwidth, tflops
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


class Steps:
    """What each step did, for the summary's first table."""

    def __init__(self):
        self.rows: list[tuple[str, str, float, str]] = []
        self.exit_status = 0

    @contextlib.contextmanager
    def timed(self, name: str):
        entry = {"status": "ok", "detail": ""}
        start = time.monotonic()
        try:
            yield entry
        except Exception as error:  # a step that crashed: record it, run the next one
            entry["status"], entry["detail"] = "CRASHED", _first_line(error)
            self.fail(2)
        self.rows.append((name, entry["status"], time.monotonic() - start, entry["detail"]))
        print(f"== {name}: {entry['status']} {entry['detail']}", file=sys.stderr, flush=True)

    def fail(self, status: int) -> None:
        self.exit_status = max(self.exit_status, status)


# ------------------------------------------------------------------------ build --


def build(out: str, torch, entry: dict) -> bool:
    """pip install -e . for this GPU's architecture only; the CUDA kernels required, and a
    CPU-only extension as the fallback so the tests and benchmarks still run."""
    major, minor = torch.cuda.get_device_capability()
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}", "MAX_JOBS": os.environ.get("MAX_JOBS", "16")}
    command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", ROOT]
    first = os.environ.get("RLHF_KERNELS_CUDA", "1")
    with open(os.path.join(out, "build.log"), "w") as log:
        for cuda in dict.fromkeys((first, "0")):
            log.write(
                f"$ RLHF_KERNELS_CUDA={cuda} TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} "
                f"MAX_JOBS={env['MAX_JOBS']} {' '.join(command)}\n"
            )
            log.flush()
            done = subprocess.run(
                command,
                cwd=ROOT,
                env={**env, "RLHF_KERNELS_CUDA": cuda},
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=300,
                check=False,
            )
            if done.returncode == 0:
                break
    entry["detail"] = f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}, RLHF_KERNELS_CUDA={cuda}; build.log"
    if done.returncode != 0:
        entry["status"] = "FAILED (the installed extension, if any, is what runs)"
    elif cuda == "0" and first != "0":
        entry["status"] = "FAILED (CUDA kernels did not build: CPU-only extension)"
    return done.returncode == 0 and (cuda != "0" or first == "0")


# ------------------------------------------------------------------ environment --


def _run_text(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(distribution: str):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def base_environment(dry_run: bool) -> dict:
    """What the summary needs even when the environment step fails."""
    return {
        "dry_run": dry_run,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "gpu": None,
        "peak": None,
    }


def environment(torch, harness, dry_run: bool) -> dict:
    from rlhf_kernels import cli

    env = {
        **base_environment(dry_run),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": harness.triton_version(),
        "git_commit": _run_text(["git", "rev-parse", "HEAD"]) or None,
        "git_dirty_files": len(_run_text(["git", "status", "--porcelain"]).splitlines()),
        # The baselines the benchmarks compare against, where installed.
        "anchors": {name: _version(name) for name in ("trl", "liger-kernel", "cut-cross-entropy", "transformers")},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        peak = peak_of(props.name)
        env.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            driver=_run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).split("\n")[0]
            if shutil.which("nvidia-smi")
            else "nvidia-smi not found",
            peak={"label": peak[0], "bandwidth_gbs": peak[1], "bf16_tflops": peak[2]} if peak else None,
        )
    else:
        env.update(gpu=None, cpu=harness.device_name("cpu"), peak=None)
    env["rlhf_kernels_info"] = cli.info()
    return env


def write_environment(out: str, env: dict) -> None:
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(env, f, indent=2)
    with open(os.path.join(out, "env.md"), "w") as f:
        f.write(f"# Environment\n\n{DRY_RUN_BANNER if env['dry_run'] else ''}\n")
        for key, value in env.items():
            if key != "rlhf_kernels_info":
                f.write(f"- {key}: {json.dumps(value) if isinstance(value, dict) else value}\n")
        f.write(f"\n## rlhf-kernels info\n\n```\n{env['rlhf_kernels_info']}\n```\n")


# ------------------------------------------------------------------------ tests --


def run_tests(out: str, dry_run: bool, entry: dict, steps: Steps) -> list[str]:
    """pytest tests/test_gpu.py, every test (no -x: one failure must not hide the rest).
    Returns 'test id: message' per failed test."""
    xml_path = os.path.join(out, "tests.xml")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        os.path.join("tests", "test_gpu.py"),
        f"--junitxml={xml_path}",
    ]
    env = {**os.environ, DRY_RUN_ENV: "1"} if dry_run else dict(os.environ)
    with open(os.path.join(out, "tests.log"), "w") as log:
        try:
            done = subprocess.run(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=TESTS_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            entry["status"] = f"TIMED OUT after {TESTS_TIMEOUT_S} s"
            steps.fail(2)
            return []
    if done.returncode not in (0, 1) or not os.path.exists(xml_path):
        entry["status"] = f"FAILED TO RUN (pytest exit {done.returncode})"
        steps.fail(2)
        return []
    suite = ElementTree.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in suite.iter("testcase"):
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").strip().splitlines()
            failed.append(f"{case.get('name')}: {message[0][:160] if message else ''}")
    entry["status"] = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    entry["detail"] = "tests.log"
    if failed:
        steps.fail(1)
    return failed


# ------------------------------------------------------------------- benchmarks --


class Guard:
    """Wraps every implementation: any exception becomes the RuntimeError that
    run.measure skips (so one broken baseline cannot stop a family) and is recorded;
    past the family's deadline an implementation is skipped at once."""

    def __init__(self):
        self.failures: dict[tuple[str, str], str] = {}
        self.deadline = math.inf

    def wrap(self, case: str, impl: str, fn):
        def guarded(*args):
            if time.monotonic() > self.deadline:
                self.failures.setdefault((case, impl), "skipped: over the family's time budget")
                raise RuntimeError("over the time budget")
            try:
                return fn(*args)
            except Exception as error:
                self.failures.setdefault((case, impl), _first_line(error))
                raise RuntimeError(str(error)) from error

        return guarded


def _optional(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def extra_anchors(case_name: str, device: str) -> dict:
    """TRL's Triton log-prob kernels, next to the baselines bench/logprobs.py has."""
    if case_name.startswith("token_logprobs"):
        fused = _optional("trl.trainer.utils", "selective_log_softmax_and_entropy")
        if fused is not None:  # Triton on CUDA, torch on CPU; computes the entropy too
            name = "trl selective_log_softmax_and_entropy" + (" (triton, +entropy)" if device == "cuda" else "")
            return {name: lambda logits, labels: fused(logits, labels)[0]}
    if case_name.startswith("linear_logprobs"):
        chunked = _optional("trl.kernels", "ChunkedLogProbFunction")
        chunk = _optional("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE") or 32768
        if chunked is not None:  # cuBLAS tiles folded by a Triton kernel (torch on CPU)
            return {
                "trl ChunkedLogProbFunction": lambda h, w, y: chunked.apply(h, w, None, y, 1.0, chunk, None, 1.0, ())[0]
            }
    return {}


def family_cases(module, family: str, device: str, dry_run: bool, dtype, guard: Guard) -> list[dict]:
    """The family's cases. GPU: every anchor (torch.compile too, which quick mode leaves out)
    at the quick mode's one shape per op. Dry run: quick mode's anchors at TINY_SHAPES."""
    quick = dry_run
    key = (device, quick)
    saved = module.SHAPES[key]
    module.SHAPES[key] = TINY_SHAPES[family] if dry_run else module.SHAPES[(device, True)]
    try:
        cases = list(module.cases(device, quick, dtype))
    finally:
        module.SHAPES[key] = saved
    for case in cases:
        impls = {**case["impls"], **extra_anchors(case["name"], device)}
        case["impls"] = {impl: guard.wrap(case["name"], impl, fn) for impl, fn in impls.items()}
    return cases


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def run_benchmarks(out: str, device: str, dry_run: bool, deadline: float, steps: Steps):
    """Every family of bench/run.py, in this process. Returns (copy bandwidth GB/s or None,
    {family: (dtype, results, {(case, impl, mode): why it has no row})})."""
    import harness
    import run
    import torch

    families, bandwidth = {}, None
    with open(os.path.join(out, "bench.log"), "w") as log, contextlib.redirect_stderr(_Tee(sys.stderr, log)):
        with steps.timed("bench copy bandwidth") as entry:
            bandwidth = harness.copy_bandwidth_gbs(device)
            entry["detail"] = f"{bandwidth:.0f} GB/s (read + write of a 256 MiB copy)"
        for family in run.FAMILIES:
            with steps.timed(f"bench {family}") as entry:
                module = importlib.import_module(family)
                dtype = module.DEFAULT_DTYPE[device]
                guard = Guard()
                guard.deadline = min(deadline, time.monotonic() + FAMILY_BUDGET_S[family]) if not dry_run else deadline
                cases = family_cases(module, family, device, dry_run, dtype, guard)
                results = run.measure(family, device, dry_run, dtype, cases=cases, smoke=dry_run)
                stem = f"{family}-{device}-{str(dtype)[6:]}" + ("-dry-run" if dry_run else "")
                if results:
                    run.write(results, stem, bandwidth, directory=out)
                missing = {}
                have = {(r.case, r.impl, r.mode) for r in results}
                for case in cases:
                    for impl in case["impls"]:
                        for mode in case.get("modes", run.MODES):
                            if (case["name"], impl, mode) not in have:
                                why = guard.failures.get((case["name"], impl), "failed (see bench.log)")
                                missing[(case["name"], impl, mode)] = why
                families[family] = (dtype, results, missing)
                ours_failed = [k for k, why in missing.items() if k[1].startswith("ours:") and "budget" not in why]
                entry["detail"] = f"{len(results)} rows, {len(missing)} missing; {stem}.csv"
                if ours_failed:
                    entry["status"] = f"FAILED ({len(ours_failed)} of ours)"
                    steps.fail(1)
                elif missing:
                    entry["status"] = "ok (some baselines have no row)"
            gc.collect()  # the family's baselines (compiled graphs, modules) and cached blocks
            if device == "cuda":
                torch.cuda.empty_cache()
    return bandwidth, families


# ---------------------------------------------------------------------- summary --


def _share(result, dtype, peak) -> str:
    if peak is None:
        return "peak unknown"
    if result.rate_unit == "GB/s":
        return f"{result.rate / peak[1]:.0%}"
    if "16" in str(dtype):  # bf16 / fp16: the tensor-core peak applies
        return f"{result.rate / peak[2]:.0%}"
    return "n/a (fp32)"


def write_summary(out: str, env: dict, steps: Steps, failed_tests: list[str], bandwidth, families: dict) -> str:
    peak = (env["peak"]["label"], env["peak"]["bandwidth_gbs"], env["peak"]["bf16_tflops"]) if env.get("peak") else None
    device = env.get("gpu") or env.get("cpu")
    lines = [f"# GPU validation: {device}, {env['date'][:10]}", ""]
    if env["dry_run"]:
        lines += [DRY_RUN_BANNER]
    versions = (
        f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
        f"driver {env.get('driver', 'n/a')}; commit {env.get('git_commit')}; details in env.md."
    )
    lines += [
        versions,
        "",
        f"Peak (datasheet): {peak[0]}, {peak[1] / 1000:.2f} TB/s HBM, {peak[2]} TFLOP/s dense bf16."
        if peak
        else "Peak: unknown for this device (not in bench/gpu.py's PEAKS); rates are absolute only.",
    ]
    if bandwidth is not None:
        of_peak = f" ({bandwidth / peak[1]:.0%} of peak)" if peak else ""
        lines.append(f"Measured copy bandwidth: {bandwidth:.0f} GB/s{of_peak}.")
    lines += ["", "## Steps", "", "| step | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {name} | {status} | {seconds:.0f} | {detail} |" for name, status, seconds, detail in steps.rows]
    if failed_tests:
        lines += ["", "## Failed tests", ""] + [f"- `{line}`" for line in failed_tests]
    legend = (
        "Median ms after warm-up; peak MiB = extra memory of one run; rate = the op's useful bytes or "
        "FLOPs per second (bench/<family>.py); % of peak against the datasheet figure above (GB/s: HBM "
        "bandwidth; TFLOP/s: dense bf16)."
    )
    lines += ["", "## Benchmarks", "", legend, ""]
    for family, (dtype, results, missing) in families.items():
        lines += [f"### {family} ({str(dtype)[6:]})", ""]
        if results:
            lines += ["| case | impl | mode | ms | peak MiB | rate | % of peak |", "|---|---|---|---:|---:|---:|---:|"]
            lines += [
                f"| {r.case} | {r.impl} | {r.mode} | {r.ms:.3f} | {r.peak_mb:.0f} | {r.rate:.2f} {r.rate_unit} "
                f"| {_share(r, dtype, peak)} |"
                for r in results
            ]
        else:
            lines.append("No results.")
        if missing:
            lines += ["", "No row:"] + [
                f"- {case} | {impl} | {mode}: {why}" for (case, impl, mode), why in missing.items()
            ]
        lines.append("")
    text = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


# ------------------------------------------------------------------------- main --


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU tensors, tiny sizes, no build (CI)")
    parser.add_argument("--out", help="output folder (default bench/results/<gpu>-<date>/; dry run: a temp folder)")
    parser.add_argument("--skip-build", action="store_true", help="use the installed rlhf_kernels._C")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.dry_run:
        # CPU only, even on a GPU machine (set before torch loads); ours:triton runs in
        # Triton's interpreter (chosen when rlhf_kernels.triton is imported).
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the CPU check", file=sys.stderr)
        return 2
    today = datetime.date.today().isoformat()
    out = args.out or (
        tempfile.mkdtemp(prefix="rlhf-gpu-dry-run-")
        if args.dry_run
        else os.path.join(BENCH, "results", f"{_slug(torch.cuda.get_device_name())}-{today}")
    )
    os.makedirs(out, exist_ok=True)
    steps = Steps()

    with steps.timed("build") as entry:
        if args.dry_run or args.skip_build:
            entry["status"] = "skipped"
            entry["detail"] = "dry run" if args.dry_run else "--skip-build"
        elif not build(out, torch, entry):
            steps.fail(2)
    # rlhf_kernels is imported only now, after the build replaced its extension.
    sys.path.insert(0, BENCH)
    import harness

    env = base_environment(args.dry_run)
    with steps.timed("environment") as entry:
        env = environment(torch, harness, args.dry_run)
        write_environment(out, env)
        entry["detail"] = "env.json, env.md"
    failed_tests = []
    with steps.timed("tests") as entry:
        if args.skip_tests:
            entry["status"], entry["detail"] = "skipped", "--skip-tests"
        else:
            failed_tests = run_tests(out, args.dry_run, entry, steps)
    deadline = started + (math.inf if args.dry_run else TOTAL_BUDGET_S)
    bandwidth, families = run_benchmarks(out, device, args.dry_run, deadline, steps)
    steps.rows.append(("total", f"exit status {steps.exit_status}", time.monotonic() - started, ""))
    write_summary(out, env, steps, failed_tests, bandwidth, families)
    print(f"{os.path.join(out, 'summary.md')} (exit status {steps.exit_status})")
    return steps.exit_status


if __name__ == "__main__":
    sys.exit(main())
