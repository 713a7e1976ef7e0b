"""Micro-benchmarks: ours vs baselines, time (median after warm-up), peak memory, rate.

    python bench/run.py --family logprobs --device cpu --quick
    python bench/run.py --family all --device cpu --contended

Writes bench/results/<family>-<device>-<dtype>[-quick][-contended].{csv,md,png}; every
row carries the device, torch and triton versions. Progress goes to stderr as it runs.
--contended times every row twice, per case: on the machine as it is, then
with two busy background processes (pure-Python loops started and stopped by
bench/harness.py's busy()), each run after a 10 ms pause (a cold thread pool, as between
training steps), and adds the busy time and the ratio busy / idle to each row;
--family all also writes all-<device>[-quick]-contended-summary.md (the worst ratio of
each family's own kernels, and gae's lead over the Python loops when busy).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import importlib
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

FAMILIES = ("logprobs", "gae", "ppo", "kl", "dpo", "grpo")
BUSY_PROCESSES = 2  # --contended: a data loader and a second job
# --contended: a pause before every run (both columns), so that each starts with the
# thread pool asleep, as a call between training steps does; back to back, the OpenMP
# workers are still spinning from the previous run and hide the wake-up on a busy machine.
COLD_PAUSE_S = 0.01
# --contended: before each case's idle pass, a wait longer than the CPU kernels' longest
# busy back-off (kBackoffMaxMs in csrc/cpu/threading.h), so the idle column is idle.
BACKOFF_SETTLE_S = 8.5
MODES = ("forward", "forward+backward")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _runner(fn, args, grad_positions, mode):
    if mode == "forward":

        def run():
            with torch.no_grad():
                fn(*args)

        return run
    leaves = [
        a.detach().requires_grad_(i in grad_positions) if a.is_floating_point() else a for i, a in enumerate(args)
    ]

    def reset():
        for leaf in leaves:
            leaf.grad = None

    # The upstream gradient is made once, outside the timed runs, as a loss's would be:
    # torch.ones_like inside the run was a parallel fill timed with every implementation
    # (0.5 ms idle, 5.9 ms with two busy background processes, at 256 x 4096 fp32).
    upstream = []

    def run():
        reset()
        out = fn(*leaves)
        if not upstream or upstream[0].shape != out.shape or upstream[0].dtype != out.dtype:
            upstream[:] = [torch.ones_like(out)]
        out.backward(upstream[0])

    run.reset = reset
    return run


def measure(
    family: str,
    device: str,
    quick: bool,
    dtype: torch.dtype,
    cases=None,
    contended: bool = False,
    smoke: bool = False,
) -> list[harness.Result]:
    """cases: the family's cases to run; default module.cases(device, quick, dtype).
    contended: per case, every row timed on the machine as it is, then every row again
    with two busy background processes (result.extra "contended_ms"); more repeats
    then, as the busy machine is noisier. smoke: one warm-up and one timed run per row
    (bench/gpu.py --dry-run: checks that every row runs, times nothing worth reading)."""
    module = importlib.import_module(family)
    results = []
    repeats = 1 if smoke else 3 if quick else 7
    warmup = 1 if smoke else 2
    pause = 0.0
    if contended:
        repeats, pause = max(repeats, 9), COLD_PAUSE_S
    all_cases = list(module.cases(device, quick, dtype) if cases is None else cases)
    # The modules imported so far (transformers, trl: ~10^6 objects) live until exit;
    # frozen, gc.collect() in peak_mb scans only what the cases allocate (0.3 s -> ms a call).
    gc.freeze()
    total = sum(len(case["impls"]) * len(case.get("modes", MODES)) for case in all_cases)
    step = 0
    for case in all_cases:
        args, grad_positions = case["make"]()
        rows = []  # (impl, mode, run, ms, peak)
        if contended:
            time.sleep(BACKOFF_SETTLE_S)  # the kernels' busy back-off from the last busy pass has ended
        for impl, fn in case["impls"].items():
            for mode in case.get("modes", MODES):
                step += 1
                print(f"[{step}/{total}] {case['name']} | {impl} | {mode} ...", end=" ", file=sys.stderr, flush=True)
                run = _runner(fn, args, grad_positions, mode)
                try:
                    ms = harness.time_ms(run, device, warmup=warmup, repeats=repeats, pause_s=pause)
                    peak = harness.peak_mb(run, device)
                except (RuntimeError, torch.OutOfMemoryError) as error:  # a baseline that cannot run this shape
                    print(f"failed: {error}", file=sys.stderr)
                    continue
                print(f"{ms:.2f} ms, {peak if peak is not None else float('nan'):.0f} MiB", file=sys.stderr)
                rows.append((impl, mode, run, ms, peak))
        busy_ms = {}
        if contended and rows:
            with harness.busy(BUSY_PROCESSES):
                for impl, mode, run, _, _ in rows:
                    print(f"busy: {case['name']} | {impl} | {mode} ...", end=" ", file=sys.stderr, flush=True)
                    busy_ms[impl, mode] = harness.time_ms(run, device, repeats=repeats, pause_s=pause)
                    print(f"{busy_ms[impl, mode]:.2f} ms", file=sys.stderr)
        for impl, mode, _, ms, peak in rows:
            results.append(
                harness.Result(
                    family,
                    case["name"],
                    impl,
                    mode,
                    round(ms, 3),
                    round(peak, 1) if peak is not None else float("nan"),
                    round(case["work"][mode] / (ms / 1e3), 2),
                    case["unit"],
                    harness.device_name(device),
                    torch.__version__,
                    harness.triton_version(),
                    extra={"contended_ms": busy_ms[impl, mode]} if (impl, mode) in busy_ms else {},
                )
            )
    gc.unfreeze()  # collectable again at exit (triton's nanobind objects report leaks otherwise)
    return results


def _ratio(r: harness.Result) -> float:
    """Contended time / uncontended time of one row (nan when not measured)."""
    return r.extra.get("contended_ms", float("nan")) / r.ms


def write_summary(by_family: dict[str, list[harness.Result]], stem: str, directory: str = RESULTS) -> str:
    """Per family, the worst contended / uncontended ratio among its compiled ours:* rows
    (the goal is <= 3x) and, for gae, our lead over the fastest Python loop when busy
    (the goal at 64 x 1024 is >= 50x)."""
    path = os.path.join(directory, f"{stem}.md")
    first = next(r for results in by_family.values() for r in results)
    with open(path, "w") as out:
        out.write(
            f"# {stem}\n\nDevice: {first.device}; torch {first.torch}. Each row timed idle-as-found, then with "
            f"{BUSY_PROCESSES} busy background processes; x busy = busy ms / ms. Goals (issue 19): every family's "
            "own kernels <= 3x; gae 64 x 1024 >= 50x the Python loops when busy.\n\n"
            "| family | worst x busy (ours) | row | ms | busy ms |\n|---|---:|---|---:|---:|\n"
        )
        for family, results in by_family.items():
            ours = [r for r in results if r.impl.startswith("ours:") and r.impl != "ours:reference"]
            if not ours:
                continue
            worst = max(ours, key=_ratio)
            out.write(
                f"| {family} | {_ratio(worst):.2f} | {worst.case} / {worst.impl} / {worst.mode} | {worst.ms:.2f} "
                f"| {worst.extra['contended_ms']:.2f} |\n"
            )
        gae = [r for r in by_family.get("gae", []) if r.case.startswith("gae ")]
        if gae:
            out.write("\n| gae case | ours:cpu busy ms | fastest loop busy ms | lead when busy | lead idle |\n")
            out.write("|---|---:|---:|---:|---:|\n")
            for case in dict.fromkeys(r.case for r in gae):
                rows = [r for r in gae if r.case == case]
                ours = next((r for r in rows if r.impl == "ours:cpu"), None)
                loops = [r for r in rows if r.impl.endswith(" loop")]
                if ours is None or not loops:
                    continue
                fastest_busy = min(r.extra["contended_ms"] for r in loops)
                fastest_idle = min(r.ms for r in loops)
                out.write(
                    f"| {case} | {ours.extra['contended_ms']:.3f} | {fastest_busy:.2f} "
                    f"| {fastest_busy / ours.extra['contended_ms']:.0f}x | {fastest_idle / ours.ms:.0f}x |\n"
                )
    return path


def read_results(path: str) -> list[harness.Result]:
    """The rows of a CSV that write() wrote, as Results (contended_ms back in extra)."""
    fields = {f.name: f.type for f in dataclasses.fields(harness.Result)}
    results = []
    with open(path, newline="") as source:
        for row in csv.DictReader(source):
            busy = row.pop("contended_ms", "")
            row.pop("contended_ratio", None)
            values = {k: (float(v) if k in ("ms", "peak_mb", "rate") else v) for k, v in row.items() if k in fields}
            results.append(harness.Result(**values, extra={"contended_ms": float(busy)} if busy else {}))
    return results


def write(
    results: list[harness.Result], stem: str, bandwidth_gbs: float | None = None, directory: str = RESULTS
) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    contended = any("contended_ms" in r.extra for r in results)
    rows = [r.row() for r in results]
    if contended:
        for row, r in zip(rows, results):
            row["contended_ms"] = round(r.extra.get("contended_ms", float("nan")), 3)
            row["contended_ratio"] = round(_ratio(r), 2)
    paths = [os.path.join(directory, f"{stem}.csv"), os.path.join(directory, f"{stem}.md")]
    with open(paths[0], "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    first = results[0]
    with open(paths[1], "w") as out:
        out.write(
            f"# {stem}\n\nDevice: {first.device}; torch {first.torch}; triton {first.triton}. "
            "Median of repeated runs after warm-up; peak = extra memory of one run.\n\n"
        )
        if contended:
            out.write(
                f"busy ms: the same row timed right after, with {BUSY_PROCESSES} busy background processes "
                "(pure-Python loops, one core each); x busy = busy ms / ms. Both columns pause "
                f"{COLD_PAUSE_S * 1e3:.0f} ms before every run (a cold thread pool, as between training steps), "
                "so their ms are not the back-to-back ms of a run without --contended. Other jobs may share "
                "the machine in both columns.\n\n"
            )
        if bandwidth_gbs is not None:
            out.write(
                f"Measured copy bandwidth: {bandwidth_gbs:.1f} GB/s (read + write of a 256 MiB copy); "
                "'of bw' is a GB/s rate as a fraction of it (above 100%: the inputs fit in the "
                "last-level cache).\n\n"
            )
        busy_head, busy_rule = (" busy ms | x busy |", "---:|---:|") if contended else ("", "")
        out.write(
            f"| case | impl | mode | ms | peak MiB | rate | of bw |{busy_head}\n|---|---|---|---:|---:|---:|---:|{busy_rule}\n"
        )
        for r in results:
            share = f"{r.rate / bandwidth_gbs:.0%}" if bandwidth_gbs and r.rate_unit == "GB/s" else ""
            busy = f" {r.extra['contended_ms']:.2f} | {_ratio(r):.2f} |" if "contended_ms" in r.extra else ""
            out.write(
                f"| {r.case} | {r.impl} | {r.mode} | {r.ms:.2f} | {r.peak_mb:.0f} | {r.rate:.2f} {r.rate_unit} "
                f"| {share} |{busy}\n"
            )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install '.[bench]')", file=sys.stderr)
        return paths
    cases = list(dict.fromkeys(r.case for r in results))
    fig, axes = plt.subplots(len(cases), 2, figsize=(12, 3.2 * len(cases)), squeeze=False)
    for row, case in enumerate(cases):
        for col, metric in enumerate(("ms", "peak_mb")):
            subset = [r for r in results if r.case == case]
            labels = [f"{r.impl}\n{r.mode}" for r in subset]
            axes[row][col].barh(labels, [getattr(r, metric) for r in subset])
            axes[row][col].set_title(
                f"{case}: {'time (ms)' if metric == 'ms' else 'peak extra memory (MiB)'}", fontsize=9
            )
            axes[row][col].tick_params(labelsize=7)
    fig.tight_layout()
    paths.append(os.path.join(directory, f"{stem}.png"))
    fig.savefig(paths[-1], dpi=110)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES + ("all",), required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one small shape per op, fewer repeats")
    parser.add_argument(
        "--contended",
        action="store_true",
        help=f"time every row again with {BUSY_PROCESSES} busy background processes; report the ratio",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="default: the family's DEFAULT_DTYPE for the device",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="TEXT",
        help="run only the cases whose name contains TEXT (e.g. linear_policy_loss); the results' file name says so",
    )
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="with --contended: only write the summary, from the families' -contended CSVs already in bench/results",
    )
    args = parser.parse_args()
    families = FAMILIES if args.family == "all" else (args.family,)
    only = "-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", args.only) if args.only else ""
    suffix = only + ("-quick" if args.quick else "") + ("-contended" if args.contended else "")
    if args.summarize:
        by_family = {}
        for family in families:
            dtype = args.dtype or str(importlib.import_module(family).DEFAULT_DTYPE[args.device])[6:]
            path = os.path.join(RESULTS, f"{family}-{args.device}-{dtype}{suffix}.csv")
            if os.path.exists(path):
                by_family[family] = read_results(path)
        print(write_summary(by_family, f"all-{args.device}{suffix}-summary"))
        return 0
    bandwidth = harness.copy_bandwidth_gbs(args.device)
    print(f"copy bandwidth: {bandwidth:.1f} GB/s", file=sys.stderr)
    by_family = {}
    for family in families:
        dtype = getattr(torch, args.dtype) if args.dtype else importlib.import_module(family).DEFAULT_DTYPE[args.device]
        print(f"== {family} ({str(dtype)[6:]})", file=sys.stderr)
        cases = importlib.import_module(family).cases(args.device, args.quick, dtype)
        if args.only:
            cases = [case for case in cases if args.only in case["name"]]
        results = measure(family, args.device, args.quick, dtype, cases, contended=args.contended)
        if not results:
            continue
        by_family[family] = results
        for path in write(results, f"{family}-{args.device}-{str(dtype)[6:]}{suffix}", bandwidth):
            print(path)
    if args.contended and len(families) > 1 and by_family:
        print(write_summary(by_family, f"all-{args.device}{suffix}-summary"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
