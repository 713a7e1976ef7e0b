"""The `rlhf-kernels` command.

rlhf-kernels info   versions, which build was installed (CUDA or CPU, and why),
                    whether rlhf_kernels._C loaded, and per op the
                    backends available on CPU / CUDA tensors and auto's pick
rlhf-kernels step   one PPO step's math on random rollouts, printed (no transformers needed)

The trainer's commands (demo, train, label) live in rlhf_trainer.cli; the
`rlhf-kernels` script (rlhf_trainer.entry) offers both sets.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Optional, Sequence

import torch

from . import _extension, backend


def _triton_version() -> str:
    if importlib.util.find_spec("triton") is None:
        return "not installed"
    import triton

    return triton.__version__


def info() -> str:
    cuda_ok = torch.cuda.is_available()
    lines = [
        f"rlhf-kernels {__import__('rlhf_kernels').__version__}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {_triton_version()}",
        f"CUDA device: {torch.cuda.get_device_name() if cuda_ok else 'none'}",
        f"build: {_extension.build_summary()}",
        f"rlhf_kernels._C: {'loaded' if _extension.LOADED else 'NOT loaded: ' + _extension.LOAD_ERROR}"
        + (
            f" (CPU kernels: {', '.join(sorted(backend.HAS_CPU)) or 'none'};"
            f" CUDA kernels: {', '.join(sorted(backend.HAS_CUDA)) or 'none'})"
            if _extension.LOADED
            else ""
        ),
        f"{backend.ENV_VAR}={__import__('os').environ.get(backend.ENV_VAR, '')!r}",
        "",
        f"{'op':<20} {'family':<9} {'cpu tensors (auto first)':<26} cuda tensors (auto first)",
    ]
    for op, family in backend.OP_FAMILY.items():
        cpu = ", ".join(backend.available(op, "cpu"))
        cuda = ", ".join(backend.available(op, "cuda"))
        lines.append(f"{op:<20} {family:<9} {cpu:<26} {cuda}")
    return "\n".join(lines)


def step(batch: int = 4, length: int = 16, vocab: int = 50, hidden: int = 32, seed: int = 0) -> str:
    """Log-probs -> KL-shaped rewards -> GAE -> whitening -> PPO losses -> backward."""
    import rlhf_kernels as rk

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=g)
    lm_head = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_(True)
    ref_head = lm_head.detach() + 0.01 * torch.randn(vocab, hidden, generator=g)
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length) < lengths[:, None]
    scores = torch.randn(batch, generator=g)
    values = torch.randn(batch, length, generator=g, requires_grad=True)

    logprobs, entropy = rk.linear_logprobs(h, lm_head, tokens, return_entropy=True)
    with torch.no_grad():
        ref_logprobs = rk.linear_logprobs(h, ref_head, tokens)
    rewards, kl = rk.kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.05)
    advantages, returns = rk.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    advantages = rk.masked_whiten(advantages, mask)
    # The rollout policy differs a little from the one being trained (a later PPO epoch).
    old_logprobs = logprobs.detach() + 0.2 * torch.randn(batch, length, generator=g)
    old_values = values.detach() + 0.3 * torch.randn(batch, length, generator=g)
    policy_loss, stats = rk.ppo_policy_loss(logprobs, old_logprobs, advantages, mask)
    value_loss, value_stats = rk.ppo_value_loss(values, old_values, returns, mask)
    (policy_loss + 0.5 * value_loss).backward()
    picked = {op: backend.resolve(op, "cpu") for op in ("linear_logprobs", "gae", "ppo_policy_loss")}
    return "\n".join(
        [
            f"backends on CPU: {picked}",
            f"mean entropy {rk.masked_mean(entropy, mask).item():.4f}  mean KL {rk.masked_mean(kl, mask).item():.6f}",
            f"mean advantage after whitening {rk.masked_mean(advantages, mask).item():+.2e}",
            f"policy loss {policy_loss.item():.4f} (clipfrac {stats['clipfrac'].item():.3f})  "
            f"value loss {value_loss.item():.4f} (vf_clipfrac {value_stats['vf_clipfrac'].item():.3f})",
            f"|grad lm_head| {lm_head.grad.norm().item():.4f}  |grad values| {values.grad.norm().item():.4f}",
        ]
    )


def add_commands(commands) -> None:
    """The library's own commands (no trainer needed): info and step."""
    commands.add_parser("info", help="versions, compiled kernels, backends per op")
    step_parser = commands.add_parser("step", help="one PPO step's math on random rollouts")
    step_parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    if args.command == "info":
        print(info())
    elif args.command == "step":
        print(step(seed=args.seed))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m rlhf_kernels.cli info|step`. The `rlhf-kernels` script is the bundled
    trainer's entry point (rlhf_trainer.entry), which adds demo, train and label; the
    library never imports the trainer."""
    parser = argparse.ArgumentParser(prog="rlhf-kernels", description=__doc__.split("\n\n")[0])
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
