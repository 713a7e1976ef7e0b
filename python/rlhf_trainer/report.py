"""The demo's outputs: the stage table, the curves and the markdown report, whose
conclusions are computed from the numbers (a stage that does not beat SFT says so)."""

from __future__ import annotations

import dataclasses
import os


def stage_table(rows: list[dict], rm_accuracy: float | None) -> str:
    lines = [
        "| stage | gold reward | RM reward | KL to SFT (nats/seq) | win rate vs SFT (gold) | wall time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['stage']} | {row['gold_reward']:.3f} | {row['rm_reward']:.3f} | {row['kl']:.2f} | "
            f"{row['win_rate']:.2f} | {row['seconds']:.0f} s |"
        )
    if rm_accuracy is not None:
        lines.append(f"\nreward model held-out accuracy: {rm_accuracy:.1%}")
    return "\n".join(lines)


def conclusions(rows: list[dict], rm_accuracy: float | None) -> list[str]:
    by = {row["stage"]: row for row in rows}
    sft = by["sft"]
    out = []
    if rm_accuracy is not None:
        out.append(f"The reward model agrees with the held-out preference labels on {rm_accuracy:.1%} of pairs.")
    for name, label in (("ppo", "PPO with the KL penalty"), ("dpo", "DPO"), ("grpo", "GRPO")):
        if name not in by:
            continue
        row, gain = by[name], by[name]["gold_reward"] - sft["gold_reward"]
        verdict = "raised" if gain > 0 else "did NOT raise"
        out.append(
            f"{label} {verdict} the gold reward over SFT ({sft['gold_reward']:.3f} -> {row['gold_reward']:.3f}, "
            f"win rate {row['win_rate']:.2f}) at a KL of {row['kl']:.2f} nats per response."
        )
    if "ppo_kl0" in by and "ppo" in by:
        hack, ppo = by["ppo_kl0"], by["ppo"]
        out.append(
            f"Without the KL penalty PPO drifted to a KL of {hack['kl']:.2f} (vs {ppo['kl']:.2f} with it); "
            f"its RM reward is {hack['rm_reward']:.3f} (vs {ppo['rm_reward']:.3f}) and its gold reward "
            f"{hack['gold_reward']:.3f} (vs {ppo['gold_reward']:.3f})."
        )
        if hack["rm_reward"] > ppo["rm_reward"] and hack["gold_reward"] < ppo["gold_reward"]:
            out.append("That is reward hacking: the proxy went up while the gold reward went down.")
        elif hack["gold_reward"] >= ppo["gold_reward"]:
            out.append(
                "On this run the unpenalised policy did not lose gold reward: no reward hacking is visible here."
            )
    return out


def plot_curves(rows: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [stage for stage in ("ppo", "ppo_kl0") if any(r["stage"] == stage for r in rows)]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for stage in runs:
        steps = [r for r in rows if r["stage"] == stage]
        x = [r["step"] for r in steps]
        axes[0].plot(x, [r["gold_reward"] for r in steps], label=f"{stage} gold")
        axes[0].plot(x, [r["rm_reward"] for r in steps], "--", label=f"{stage} RM")
        axes[1].plot(x, [r["kl"] for r in steps], label=stage)
    dpo = [r for r in rows if r["stage"] == "dpo"]
    if dpo:
        axes[2].plot(
            [r["step"] for r in dpo], [r["reward_accuracy"] for r in dpo], label="DPO implicit-reward accuracy"
        )
    rm = [r for r in rows if r["stage"] == "rm" and "loss" in r]
    if rm:
        axes[2].plot([r["step"] for r in rm], [r["loss"] for r in rm], label="RM loss")
    for axis, title in zip(axes, ("reward during PPO", "KL to SFT (nats/seq)", "DPO accuracy and RM loss")):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(path: str, rows, rm_accuracy, table: str, plot_path, config) -> str:
    lines = [
        "# rlhf-kernels demo report",
        "",
        "The built-in task: prompts are 2-4 letters, the gold reward (hidden from every "
        "trained model) rewards listing each prompt letter once. SFT learns from imperfect "
        "demonstrations; the reward model from Bradley-Terry-labelled pairs "
        f"(noise {config.noise}); PPO, DPO and GRPO start from the SFT model.",
        "",
        table,
        "",
        "## What the numbers show",
        "",
        *[f"- {line}" for line in conclusions(rows, rm_accuracy)],
        "",
    ]
    if plot_path:
        lines += [f"![curves]({os.path.basename(plot_path)})", ""]
    lines += ["## Sample responses (first 5 held-out prompts)", ""]
    for row in rows:
        lines.append(f"- {row['stage']}: " + " | ".join(repr(r) for r in row["responses"][:5]))
    lines += ["", "## Configuration", "", "```", repr(dataclasses.asdict(config)), "```", ""]
    with open(path, "w") as out:
        out.write("\n".join(lines))
    return path
