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

README.md's demo tables are rendered from these files, never copied by hand: each sits
between `<!-- demo-seeds:begin bench/results/<file>.md -->` and `<!-- demo-seeds:end -->`,
and a run that writes <file>.md rewrites its README table (readme_table(): the summary
table's cells, stage names with their DemoConfig settings, a [min, max] that equals the
mean shown once). `python bench/demo_seeds.py --readme-only` re-renders every README
table from the committed files without running anything; tests/test_trainer.py checks
that README's tables are what the files render to.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
README = os.path.join(ROOT, "README.md")
# A README table rendered from a results file: <!-- demo-seeds:begin RESULTS_FILE --> ... end.
README_BLOCK = re.compile(r"(<!-- demo-seeds:begin (\S+) -->\n)(.*?)(<!-- demo-seeds:end -->)", re.DOTALL)
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


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _short(x: float) -> str:
    """3e-4 as 3e-4 (not 0.0003), 0.5 as 0.5."""
    if x and abs(x) < 1e-3:
        mantissa, exponent = f"{x:e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{x:g}"


def stage_labels(config) -> dict[str, str]:
    """README's stage names: each stage with the DemoConfig settings that define it."""
    return {
        "sft": "sft",
        "ppo": f"ppo (kl_coef {_short(config.ppo.kl_coef)})",
        "dpo": f"dpo (beta {_short(config.dpo.beta)}, lr {_short(config.dpo.lr)})",
        "grpo": f"grpo (kl_coef {_short(config.grpo.kl_coef)})",
        "ppo_kl0": f"ppo_kl0 (kl_coef 0, {config.hacking_steps} steps)",
    }


def readme_table(results: str) -> str:
    """README's table of a results file's text (what report() wrote): its summary table
    with the stages named by their settings (DemoConfig's, or DemoConfig.quick's for a
    --quick run), the demo's options in the first column's title, and a cell whose
    min and max equal its mean (sft's KL and win rate) shown as the mean alone."""
    from rlhf_trainer.demo import DemoConfig

    lines = results.splitlines()
    title = re.match(r"# `rlhf-kernels demo([^`]*)`", lines[0])
    if title is None:
        raise ValueError(f"not a demo_seeds.py results file (title {lines[0]!r})")
    options = title.group(1).split()
    quick = "--quick" in options
    options = " ".join(option for option in options if option != "--quick")
    labels = stage_labels(DemoConfig.quick() if quick else DemoConfig())
    start = next(i for i, line in enumerate(lines) if line.startswith("| stage |"))
    header = _cells(lines[start])
    header[0] = f"stage ({options})" if options else "stage"
    out = ["| " + " | ".join(header) + " |", lines[start + 1]]
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        stage, *cells = _cells(line)
        shown = []
        for cell in cells:
            mean, _, bounds = cell.partition(" [")
            shown.append(mean if bounds.rstrip("]").split(", ") == [mean, mean] else cell)
        out.append(f"| {labels.get(stage, stage)} | " + " | ".join(shown) + " |")
    return "\n".join(out) + "\n"


def readme_block(table: str) -> str:
    """What README holds between its markers: the table, with a blank line either side
    (so Markdown renders it as a table next to the comments)."""
    return "\n" + table + "\n"


def readme_blocks(readme: str) -> list[tuple[str, str]]:
    """(results file relative to the checkout, the table README holds for it)."""
    return [(match.group(2), match.group(3)) for match in README_BLOCK.finditer(readme)]


def render_readme(readme: str, only: str | None = None) -> str:
    """README's text with its demo tables rendered from their results files (only: the
    one file, relative to the checkout)."""

    def render(match) -> str:
        path = match.group(2)
        if only is not None and os.path.normpath(path) != os.path.normpath(only):
            return match.group(0)
        with open(os.path.join(ROOT, path)) as source:
            table = readme_table(source.read())
        return match.group(1) + readme_block(table) + match.group(4)

    return README_BLOCK.sub(render, readme)


def update_readme(only: str | None = None) -> bool:
    """Rewrites README.md's demo tables (only: the one results file); True if it changed."""
    with open(README) as source:
        before = source.read()
    after = render_readme(before, only)
    if after != before:
        with open(README, "w") as out:
            out.write(after)
    return after != before


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
    parser.add_argument(
        "--readme-only", action="store_true", help="re-render README's demo tables from the results files; run nothing"
    )
    args = parser.parse_args(argv)
    if args.readme_only:
        print("README.md " + ("updated" if update_readme() else "already matches the results files"))
        return 0
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
    relative = os.path.relpath(os.path.abspath(args.results), ROOT)
    with open(README) as source:
        blocks = readme_blocks(source.read())
    if any(os.path.normpath(path) == relative for path, _ in blocks):
        update_readme(relative)
        print(f"updated README.md's table of {relative}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
