"""What every stage shares: devices, seeds, the per-step batch order, checkpoints
(save_pretrained + optimizer and trainer state) and the metrics log."""

from __future__ import annotations

import json
import os
import random

import torch


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one step: a run resumed at step s draws what the
    uninterrupted run drew at s."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    return torch.randint(0, n, (batch_size,), generator=step_generator(seed, step)).tolist()


class MetricsLog:
    """Appends one JSON object per line (stage, step, metrics) to metrics.jsonl."""

    def __init__(self, path: str | None):
        self.path = path
        self.rows: list[dict] = []

    def log(self, stage: str, step: int, **metrics) -> dict:
        row = {"stage": stage, "step": step, **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as out:
                out.write(json.dumps(row) + "\n")
        return row


def save_checkpoint(directory: str, *, models: dict, optimizer, step: int, state: dict | None = None) -> None:
    """models: name -> module; modules with save_pretrained are saved that way, the
    rest as state dicts; the optimizer, step and trainer state in trainer_state.pt."""
    os.makedirs(directory, exist_ok=True)
    for name, module in models.items():
        if hasattr(module, "save_pretrained"):
            module.save_pretrained(os.path.join(directory, name))
        else:
            torch.save(module.state_dict(), os.path.join(directory, f"{name}.pt"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "step": step, "state": state or {}},
        os.path.join(directory, "trainer_state.pt"),
    )


def load_checkpoint(directory: str, *, models: dict, optimizer) -> tuple[int, dict]:
    """Loads what save_checkpoint wrote into the given modules; returns (step, state)."""
    path = os.path.join(directory, "trainer_state.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume {directory!r}: no trainer_state.pt there")
    for name, module in models.items():
        if hasattr(module, "save_pretrained"):
            loaded = type(module).from_pretrained(os.path.join(directory, name))
            module.load_state_dict(loaded.state_dict())
        else:
            module.load_state_dict(torch.load(os.path.join(directory, f"{name}.pt"), weights_only=True))
    saved = torch.load(path, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    return saved["step"], saved["state"]


def progress(total: int, description: str, enabled: bool = True):
    """A tqdm bar (tqdm comes with transformers) showing the key metrics; off when
    stderr is not a terminal (a CI log would get one line per refresh)."""
    import sys

    from tqdm.auto import tqdm

    disable = not enabled or not sys.stderr.isatty()
    return tqdm(total=total, desc=description, disable=disable, leave=False, dynamic_ncols=True)


class StageRun:
    """The bookkeeping every stage repeats: resuming from a checkpoint (`start`, the
    trainer `state`), the progress bar, the metrics line of each step, periodic
    checkpoints and the final one (with the tokenizer beside the model)."""

    def __init__(self, stage: str, config, log: MetricsLog, *, models: dict, optimizer, output=None, resume=None,
                 show_progress=True):  # fmt: skip
        self.stage, self.config, self.log = stage, config, log
        self.models, self.optimizer, self.output = models, optimizer, output
        self.start, self.state = load_checkpoint(resume, models=models, optimizer=optimizer) if resume else (0, {})
        self.bar = progress(config.steps - self.start, stage, show_progress)

    def step_done(self, step: int, shown: dict, state: dict | None = None, **metrics) -> None:
        """step: the 1-based step just finished; shown: the metrics on the bar."""
        self.log.log(self.stage, step, **metrics)
        self.bar.update(1)
        self.bar.set_postfix({name: f"{value:.3f}" for name, value in shown.items()})
        every = self.config.checkpoint_every
        if self.output and every and step % every == 0:
            save_checkpoint(self.output, models=self.models, optimizer=self.optimizer, step=step, state=state)

    def finish(self, tokenizer=None, state: dict | None = None) -> None:
        self.bar.close()
        if self.output:
            save_checkpoint(
                self.output, models=self.models, optimizer=self.optimizer, step=self.config.steps, state=state
            )
            if tokenizer is not None and "model" in self.models:
                tokenizer.save_pretrained(f"{self.output}/model")
