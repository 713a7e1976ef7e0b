"""`rlhf-kernels demo` over several seeds: the README's demo table.

    python bench/demo_seeds.py                      # seeds 0 1 2, the full demo (~3 x 2-3 min on 2 cores)
    python bench/demo_seeds.py --quick --results /tmp/quick.md

Runs the demo (rlhf_trainer.demo.run_demo, what `rlhf-kernels demo --seed N` runs)
once per seed, each in its own folder (--output/seed-N): run again, a seed whose
demo finished is loaded from its checkpoints instead of trained (the demo resumes its
finished stages), so a re-run only redoes what is missing. Prints, and writes to
--results, one table of every stage's mean [min, max] over the seeds (gold reward, RM
reward, KL to SFT, win rate against SFT, and the reward model's held-out accuracy),
then each seed's own rows, with the command, the date, the machine's CPU count,
torch's thread count and torch's version. The default folders and file are
rlhf-demo/seeds<suffix>/ and bench/results/demo-seeds<suffix>.md, the suffix naming
--quick, --noise and --length-bias when given (e.g. -length-bias-0.15), so runs with other
options neither overwrite nor restart each other.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
# (key in a stage row, column title, format)
METRICS = (
    ("gold_reward", "gold reward", "{:.3f}"),
    ("rm_reward", "RM reward", "{:.3f}"),
    ("kl", "KL to SFT (nats/seq)", "{:.2f}"),
    ("win_rate", "win rate vs SFT (gold)", "{:.2f}"),
)


def aggregate(runs: list[dict]) -> dict:
    """runs: one {"seed", "rows": [stage rows], "rm_accuracy"} per seed. Returns
    {"stages": {stage: {metric: (mean, min, max)}}, "rm_accuracy": (mean, min, max) or
    None}, stages in the order of the first run's rows."""
    if not runs:
        raise ValueError("no runs to aggregate")

    def summary(values: list[float]) -> tuple[float, float, float]:
        return sum(values) / len(values), min(values), max(values)

    stages = {}
    for row in runs[0]["rows"]:
        name = row["stage"]
        rows = [next(r for r in run["rows"] if r["stage"] == name) for run in runs]
        stages[name] = {key: summary([float(r[key]) for r in rows]) for key, _, _ in METRICS}
        stages[name]["seconds"] = summary([float(r.get("seconds", 0.0)) for r in rows])
    accuracies = [run["rm_accuracy"] for run in runs if run.get("rm_accuracy") is not None]
    return {"stages": stages, "rm_accuracy": summary(accuracies) if accuracies else None}


def _cell(stat: tuple[float, float, float], fmt: str) -> str:
    mean, low, high = stat
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


def summary_table(runs: list[dict]) -> str:
    """The markdown table of mean [min, max] over the runs, per stage and metric."""
    summary = aggregate(runs)
    seeds = ", ".join(str(run["seed"]) for run in runs)
    lines = [
        "| stage | " + " | ".join(title for _, title, _ in METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for name, stats in summary["stages"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(stats[key], fmt) for key, _, fmt in METRICS) + " |")
    if summary["rm_accuracy"] is not None:
        mean, low, high = summary["rm_accuracy"]
        lines.append(f"\nreward model held-out accuracy: {mean:.1%} [{low:.1%}, {high:.1%}] (seeds {seeds})")
    return "\n".join(lines)


def seed_table(runs: list[dict]) -> str:
    """Every seed's own rows (what `rlhf-kernels demo --seed N` prints), with wall times."""
    lines = [
        "| seed | stage | " + " | ".join(title for _, title, _ in METRICS) + " | wall time |",
        "|---:|---|" + "---:|" * (len(METRICS) + 1),
    ]
    for run in runs:
        for row in run["rows"]:
            cells = " | ".join(fmt.format(row[key]) for key, _, fmt in METRICS)
            lines.append(f"| {run['seed']} | {row['stage']} | {cells} | {row.get('seconds', 0.0):.0f} s |")
        if run.get("rm_accuracy") is not None:
            lines.append(f"| {run['seed']} | RM held-out accuracy | {run['rm_accuracy']:.1%} | | | | |")
    return "\n".join(lines)


def _commit() -> str:
    """The checkout's commit, and whether the code the demo runs has uncommitted changes."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--", "python", "rlhf_kernels", "csrc")
    return head + (" with uncommitted changes in python/, rlhf_kernels/ or csrc/" if dirty else "")


def report(runs: list[dict], *, command: str, threads: int, minutes: float, quick: bool, options: str = "") -> str:
    """options: the demo's options other than --quick, for the title (e.g. "--length-bias 0.15")."""
    import torch

    seeds = ", ".join(str(run["seed"]) for run in runs)
    return "\n".join(
        [
            f"# `rlhf-kernels demo{' --quick' if quick else ''}{' ' + options if options else ''}` over seeds {seeds}",
            "",
            f"- command: `{command}`",
            f"- date: {datetime.date.today().isoformat()}",
            f"- machine: {os.cpu_count()} CPUs ({platform.machine()}, {platform.system()}); torch threads: {threads}",
            f"- torch {torch.__version__}, python {platform.python_version()}",
            f"- commit: {_commit()}",
            (
                f"- wall time of this invocation: {minutes:.1f} min (stages resumed from checkpoints take ~0 s; "
                "a seed's wall times are in the per-seed table)"
            ),
            "",
            (
                "Mean [min, max] over the seeds (KL to SFT in nats per response; win rate against "
                "the SFT model's responses, judged by the gold reward):"
            ),
            "",
            summary_table(runs),
            "",
            "## Each seed",
            "",
            seed_table(runs),
            "",
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="DemoConfig.quick (the demo's --quick)")
    parser.add_argument("--output", help="the demos' folders: OUTPUT/seed-N (default: rlhf-demo/seeds<suffix>)")
    parser.add_argument("--results", help="the markdown file written (default: bench/results/demo-seeds<suffix>.md)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads in the demo (default: DemoConfig's, 1; 0: torch's)"
    )
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--length-bias", type=float, default=0.0)
    args = parser.parse_args(argv)
    suffix = "-quick" * args.quick + f"-noise-{args.noise:g}" * (args.noise != 0.05)
    suffix += f"-length-bias-{args.length_bias:g}" * bool(args.length_bias)
    args.output = args.output or f"rlhf-demo/seeds{suffix}"
    args.results = args.results or os.path.join(RESULTS, f"demo-seeds{suffix}.md")

    import torch
    from rlhf_trainer.demo import DemoConfig, run_demo

    start = time.perf_counter()
    runs = []
    for seed in args.seeds:
        config = DemoConfig.quick(seed) if args.quick else DemoConfig(seed=seed)
        config.noise, config.length_bias = args.noise, args.length_bias
        if args.threads is not None:
            config.threads = args.threads
        output = os.path.join(args.output, f"seed-{seed}")
        print(f"=== seed {seed} -> {output}", file=sys.stderr, flush=True)
        result = run_demo(output, config, show_progress=False, echo=lambda line: print(line, file=sys.stderr))
        runs.append({"seed": seed, "rows": result["rows"], "rm_accuracy": result["rm_accuracy"]})
    command = "python bench/demo_seeds.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    options = " ".join(
        [f"--noise {args.noise:g}"] * (args.noise != 0.05)
        + [f"--length-bias {args.length_bias:g}"] * bool(args.length_bias)
    )
    text = report(runs, command=command.strip(), threads=config.threads or torch.get_num_threads(),
                  minutes=(time.perf_counter() - start) / 60, quick=args.quick, options=options)  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as out:
        out.write(text)
    print(text)
    print(f"wrote {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
