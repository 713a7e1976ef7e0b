"""Micro-benchmarks: ours vs baselines, time (median after warm-up), peak memory, rate.

    python bench/run.py --family logprobs --device cpu --quick

Writes bench/results/<family>-<device>[-quick].{csv,md,png}; every row carries the
device, torch and triton versions. Progress goes to stderr as it runs.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

FAMILIES = ("logprobs", "gae", "ppo", "kl", "dpo", "grpo")
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

    def run():
        reset()
        out = fn(*leaves)
        out.backward(torch.ones_like(out))

    run.reset = reset
    return run


def measure(family: str, device: str, quick: bool, dtype: torch.dtype, cases=None) -> list[harness.Result]:
    """cases: the family's cases to run; default module.cases(device, quick, dtype)."""
    module = importlib.import_module(family)
    results = []
    repeats = 3 if quick else 7
    all_cases = list(module.cases(device, quick, dtype) if cases is None else cases)
    total = sum(len(case["impls"]) * len(case.get("modes", MODES)) for case in all_cases)
    step = 0
    for case in all_cases:
        args, grad_positions = case["make"]()
        for impl, fn in case["impls"].items():
            for mode in case.get("modes", MODES):
                step += 1
                print(f"[{step}/{total}] {case['name']} | {impl} | {mode} ...", end=" ", file=sys.stderr, flush=True)
                run = _runner(fn, args, grad_positions, mode)
                try:
                    ms = harness.time_ms(run, device, repeats=repeats)
                    peak = harness.peak_mb(run, device)
                except (RuntimeError, torch.OutOfMemoryError) as error:  # a baseline that cannot run this shape
                    print(f"failed: {error}", file=sys.stderr)
                    continue
                rate = case["work"][mode] / (ms / 1e3)
                print(f"{ms:.2f} ms, {peak if peak is not None else float('nan'):.0f} MiB", file=sys.stderr)
                results.append(
                    harness.Result(
                        family,
                        case["name"],
                        impl,
                        mode,
                        round(ms, 3),
                        round(peak, 1) if peak is not None else float("nan"),
                        round(rate, 2),
                        case["unit"],
                        harness.device_name(device),
                        torch.__version__,
                        harness.triton_version(),
                    )
                )
    return results


def write(
    results: list[harness.Result], stem: str, bandwidth_gbs: float | None = None, directory: str = RESULTS
) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    rows = [r.row() for r in results]
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
        if bandwidth_gbs is not None:
            out.write(
                f"Measured copy bandwidth: {bandwidth_gbs:.1f} GB/s (read + write of a 256 MiB copy); "
                "'of bw' is a GB/s rate as a fraction of it (above 100%: the inputs fit in the "
                "last-level cache).\n\n"
            )
        out.write("| case | impl | mode | ms | peak MiB | rate | of bw |\n|---|---|---|---:|---:|---:|---:|\n")
        for r in results:
            share = f"{r.rate / bandwidth_gbs:.0%}" if bandwidth_gbs and r.rate_unit == "GB/s" else ""
            out.write(
                f"| {r.case} | {r.impl} | {r.mode} | {r.ms:.2f} | {r.peak_mb:.0f} | {r.rate:.2f} {r.rate_unit} "
                f"| {share} |\n"
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
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one small shape per op, fewer repeats")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="default: the family's DEFAULT_DTYPE for the device",
    )
    args = parser.parse_args()
    dtype = (
        getattr(torch, args.dtype) if args.dtype else importlib.import_module(args.family).DEFAULT_DTYPE[args.device]
    )
    bandwidth = harness.copy_bandwidth_gbs(args.device)
    print(f"copy bandwidth: {bandwidth:.1f} GB/s", file=sys.stderr)
    results = measure(args.family, args.device, args.quick, dtype)
    stem = f"{args.family}-{args.device}-{str(dtype)[6:]}" + ("-quick" if args.quick else "")
    for path in write(results, stem, bandwidth):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
