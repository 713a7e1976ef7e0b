"""What every stage shares: devices, seeds, the per-step batch order, checkpoints
(save_pretrained + optimizer and trainer state) and the metrics log.

A checkpoint is one folder, output/checkpoint-NNNNNN/, holding the weights
(save_pretrained, or a state dict for other modules), the optimizer state
(optimizer/, written by torch.distributed.checkpoint: every process of a data
parallel run writes its part, and a resume on any number of processes reads it),
trainer_state.json and checkpoint.json (stage, step, options, fingerprints of the
frozen models the run depends on, and a sha256 of every file). It is written in full
into a temporary folder and renamed into place, and only then is the previous one
deleted, so a kill at any moment leaves a complete checkpoint, never a mix of two.
Under torchrun rank 0 writes everything but the other ranks' optimizer shards, the
metrics and the exported model; the folder must be on a filesystem every rank sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
import warnings

import torch

import rlhf_kernels as rk

from . import distributed

MANIFEST = "checkpoint.json"
# Test hook: "model" or "model@STEP" kills the process right after a checkpoint's
# weights are written and before its trainer state, as an OOM kill or power cut would.
CRASH_ENV = "RLHF_TRAINER_CRASH_AFTER"
# The options a resume may change, because they take effect from the next step: the
# step count may grow, checkpoints may come more or less often, lr is written into
# the restored optimizer and kl_coef replaces the restored KL coefficient. Any other
# change would silently not apply (or apply to half a run), so resume refuses it.
RESUMABLE = ("steps", "checkpoint_every", "lr", "kl_coef")
# The command line's options outside the stage config that shape a run (`train` records
# them in each checkpoint's "run"): the data (its sha256: the same file, wherever it is),
# the weights' dtype, the RM's data kind and the device type. A resume refuses any change:
# a run resumed on other data, in another precision or on another device (its kernels
# round differently) would not continue the one its checkpoint comes from.
RUN_OPTIONS = {"data_sha256": "--data", "bf16": "--bf16", "rankings": "--rankings", "device": "--device"}


try:
    from torch.distributed.checkpoint.api import CheckpointException
except ImportError:  # torch without distributed support

    class CheckpointException(BaseException):  # torch's name
        pass


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (missing, corrupted, or from another run)."""


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
    """Appends one JSON object per line (stage, step, metrics) to metrics.jsonl; rows
    already in the file are read back (a resumed demo plots every stage). Under
    torchrun only rank 0 reads and writes the file (the others keep rows in memory)."""

    def __init__(self, path: str | None):
        self.path = path if distributed.is_main() else None
        path = self.path
        # torn: the file holds a line that is not a row (cut short by a kill) or does not end
        # in a newline; it is rewritten from the rows before anything is appended to it
        self.rows, self.torn = _read_metrics(path) if path and os.path.exists(path) else ([], False)

    def log(self, stage: str, step: int, **metrics) -> dict:
        row = {"stage": stage, "step": step, **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        if self.path is not None:
            if self.torn:  # appending to a cut-off line would glue this row onto it: both lost
                self._rewrite(self.rows[:-1])
            with open(self.path, "a") as out:
                out.write(json.dumps(row) + "\n")
        return row

    def _rewrite(self, rows: list[dict]) -> None:
        """The file replaced by `rows`, one line each (a temporary file renamed into place)."""
        with open(self.path + ".tmp", "w") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
            out.flush()
            os.fsync(out.fileno())
        os.replace(self.path + ".tmp", self.path)
        self.torn = False

    def truncate(self, stage: str, step: int) -> None:
        """Before a stage (re)starts at `step`: drops its rows after that step (a run
        killed after its last checkpoint logged steps that will run again) and any
        second row of one step (the RM's held-out accuracy, logged again at the end)."""
        seen, kept = set(), []
        for row in self.rows:
            if row.get("stage") == stage:
                if row.get("step", 0) > step or row.get("step") in seen:
                    continue
                seen.add(row.get("step"))
            kept.append(row)
        if (len(kept) != len(self.rows) or self.torn) and self.path is not None:
            self._rewrite(kept)
        self.rows = kept


def _read_rows(path: str) -> list[dict]:
    """The rows of a metrics file (a line cut short by a kill left out)."""
    return _read_metrics(path)[0]


def _read_metrics(path: str) -> tuple[list[dict], bool]:
    """The rows of a metrics file, and whether it is torn: a line that is not a JSON object
    (cut short by a kill) or a last line without its newline."""
    with open(path, "rb") as source:
        data = source.read()
    rows, torn = [], bool(data) and not data.endswith(b"\n")
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill: left out, and the file rewritten without it
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            torn = True
    return rows, torn


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: str) -> str:
    """sha256 of a file's bytes."""
    return _file_digest(path)


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    """Every file under directory, as sorted relative paths."""
    out = []
    for root, _, names in os.walk(directory):
        out += [os.path.relpath(os.path.join(root, name), directory) for name in names]
    return sorted(out)


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(directory: str, fill, collective: bool = False) -> None:
    """Writes a folder through fill(temporary folder), fsyncs it and renames it into
    place, so readers (and a resume after a kill) see the old folder or the new one,
    never a half-written one. collective: every rank calls it and runs fill (each
    writes its part); rank 0 prepares, fsyncs and renames, between barriers."""
    main = not collective or distributed.is_main()
    parent, name = os.path.split(os.path.abspath(directory))
    temporary, old = os.path.join(parent, f".tmp-{name}"), os.path.join(parent, f".old-{name}")
    if main:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    if collective:
        distributed.barrier()
    fill(temporary)
    if collective:
        distributed.barrier()
    if main:
        for relative in _files(temporary):
            _fsync(os.path.join(temporary, relative))
        if os.path.exists(directory):  # rename() cannot replace a non-empty folder: move it aside first
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(temporary, directory)
        _fsync(parent)
        shutil.rmtree(old, ignore_errors=True)
    if collective:
        distributed.barrier()


def _crash_point(name: str, step: int) -> None:
    wanted = os.environ.get(CRASH_ENV, "")
    point, _, at = wanted.partition("@")
    if point == name and at in ("", str(step)):
        os.kill(os.getpid(), signal.SIGKILL)


def _checkpoints(output: str) -> list[str]:
    """Complete checkpoint folders in output (a folder moved aside by publish() is
    still complete; .tmp-* ones are not)."""
    if not os.path.isdir(output):
        return []
    names = [n for n in os.listdir(output) if n.startswith(("checkpoint-", ".old-checkpoint-"))]
    return [os.path.join(output, n) for n in names if os.path.isfile(os.path.join(output, n, MANIFEST))]


def _manifest(directory: str) -> dict:
    try:
        with open(os.path.join(directory, MANIFEST)) as source:
            return json.load(source)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory}: unreadable {MANIFEST} ({error})") from None


OPTIMIZER = "optimizer"  # the torch.distributed.checkpoint folder of the optimizer state
TRAINER_STATE = "trainer_state.json"


@contextlib.contextmanager
def _single_process_is_intended():
    """torch.distributed.checkpoint warns that it runs in one process when there is no
    process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _save_optimizer(folder: str, models: dict, optimizer) -> None:
    """The optimizer state keyed by parameter names (get_optimizer_state_dict), written
    by torch.distributed.checkpoint: collective under torchrun (each rank writes its
    part; DDP's replicated state is written once), one process otherwise."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    holder = torch.nn.ModuleDict(models)
    with _single_process_is_intended():
        state = {"optimizer": get_optimizer_state_dict(holder, optimizer)}
        dcp.save(state, checkpoint_id=folder, no_dist=distributed.world_size() == 1)


def _load_optimizer(folder: str, models: dict, optimizer) -> None:
    """Reads what _save_optimizer wrote, on any number of processes. Parameters that
    never had a gradient (the reward model's unused lm_head) have no saved state and
    get none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    holder = torch.nn.ModuleDict(models)
    with _single_process_is_intended():
        target = get_optimizer_state_dict(holder, optimizer)  # allocates the state to read into
        saved = set(dcp.FileSystemReader(folder).read_metadata().state_dict_metadata)
        for name in list(target["state"]):
            if not any(key.startswith(f"optimizer.state.{name}.") for key in saved):
                del target["state"][name]
        dcp.load({"optimizer": target}, checkpoint_id=folder, no_dist=distributed.world_size() == 1)
        set_optimizer_state_dict(holder, optimizer, target, options=StateDictOptions(strict=False))


def save_checkpoint(output: str, *, stage: str, models: dict, optimizer, step: int, config, state: dict | None = None,
                    fingerprints: dict | None = None, run: dict | None = None) -> str:  # fmt: skip
    """models: name -> module; modules with save_pretrained are saved that way, the
    rest as state dicts; the optimizer in optimizer/ (torch.distributed.checkpoint),
    the trainer state in trainer_state.json; run: the command line's options (RUN_OPTIONS'
    keys, and "data": the file's path), recorded in checkpoint.json. Under torchrun every
    rank calls it (the optimizer is written collectively) and rank 0 writes the rest.
    Returns the checkpoint folder."""
    main = distributed.is_main()
    if main:
        os.makedirs(output, exist_ok=True)

    def fill(folder: str) -> None:
        if main:
            for name, module in models.items():
                if hasattr(module, "save_pretrained"):
                    module.save_pretrained(os.path.join(folder, name))
                else:
                    torch.save(module.state_dict(), os.path.join(folder, f"{name}.pt"))
            _crash_point("model", step)
        _save_optimizer(os.path.join(folder, OPTIMIZER), models, optimizer)
        if not main:
            return
        with open(os.path.join(folder, TRAINER_STATE), "w") as out:
            json.dump({"step": step, "state": state or {}}, out)
        manifest = {
            "stage": stage, "step": step, "config": dataclasses.asdict(config), "fingerprints": fingerprints or {},
            "run": run,
            "saved_at": time.time_ns(),  # orders two complete checkpoints (a kill before the old one is deleted)
            "files": {relative: _file_digest(os.path.join(folder, relative)) for relative in _files(folder)},
        }  # fmt: skip
        with open(os.path.join(folder, MANIFEST), "w") as out:
            json.dump(manifest, out, indent=1)

    directory = os.path.join(output, f"checkpoint-{step:06d}")
    publish(directory, fill, collective=True)
    if main:
        # killed runs' temporary folders
        stale = [os.path.join(output, n) for n in os.listdir(output) if n.startswith(".tmp-checkpoint-")]
        for other in _checkpoints(output) + stale:  # the new one is complete: the previous ones can go
            if os.path.abspath(other) != os.path.abspath(directory):
                shutil.rmtree(other, ignore_errors=True)
    distributed.barrier()
    return directory


def has_checkpoint(output: str) -> bool:
    return bool(_checkpoints(output))


def find_checkpoint(path: str) -> str:
    """The checkpoint folder `path` names: itself, or the newest complete one in it."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    found = _checkpoints(path)
    if found:
        return max(found, key=lambda directory: _manifest(directory)["saved_at"])
    if os.path.exists(os.path.join(path, "trainer_state.pt")):
        raise CheckpointError(f"--resume {path}: a checkpoint from an earlier version of the trainer, without "
                              "checksums; it cannot be verified, start a new run")  # fmt: skip
    raise CheckpointError(f"--resume {path}: no checkpoint there (no checkpoint-*/ folder with a {MANIFEST})")


def _data_name(digest: str | None) -> str:
    return "the built-in data" if digest is None else f"a file of sha256 {digest[:12]}"


def _describe_run_change(key: str, was, now) -> str:
    if key == "data_sha256":
        return f"--data {_data_name(was)} -> {_data_name(now)}"
    return f"{RUN_OPTIONS[key]} {was!r} -> {now!r}"


def _check_run(directory: str, saved: dict | None, run: dict | None) -> None:
    """Refuses a resume whose command-line options (RUN_OPTIONS) differ from the run's.
    Checkpoints written without them (older ones, the demo's) are not compared."""
    if saved is None or run is None:
        return
    changed = [_describe_run_change(key, saved.get(key), run.get(key)) for key in RUN_OPTIONS
               if saved.get(key) != run.get(key)]  # fmt: skip
    if changed:
        raise CheckpointError(
            f"--resume {directory}: changed command-line options a resume cannot apply: {', '.join(changed)} "
            f"(the checkpoint's data: {saved.get('data') or 'the built-in data'}); put them back, or start fresh: "
            "a new --output without --resume"
        )


def _check_resume(directory: str, manifest: dict, stage: str, config, fingerprints: dict,
                  run: dict | None = None) -> dict:  # fmt: skip
    """Refuses a checkpoint this run cannot continue; returns the options it changes."""
    if manifest.get("stage") != stage:
        raise CheckpointError(f"--resume {directory}: a checkpoint of stage {manifest.get('stage')!r}, "
                              f"not {stage!r}")  # fmt: skip
    if config.steps < manifest["step"]:
        raise CheckpointError(f"--resume {directory}: the checkpoint is at step {manifest['step']} but steps is "
                              f"{config.steps}; set steps >= {manifest['step']}")  # fmt: skip
    old, new = manifest["config"], dataclasses.asdict(config)
    changed = {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}
    refused = [f"{key} {was!r} -> {now!r}" for key, (was, now) in changed.items() if key not in RESUMABLE]
    if refused:
        raise CheckpointError(
            f"--resume {directory}: changed options a resume cannot apply: {', '.join(refused)} (a resume may "
            f"change only {', '.join(RESUMABLE)}); put them back or start a new run"
        )
    _check_run(directory, manifest.get("run"), run)
    for name, digest in fingerprints.items():
        if manifest["fingerprints"].get(name) != digest:
            raise CheckpointError(
                f"--resume {directory}: the {name} is not the one this checkpoint was trained against (its "
                f"weights differ); resume with the same models as the original run (e.g. the same --model)"
            )
    for relative, digest in manifest["files"].items():
        path = os.path.join(directory, relative)
        if not os.path.isfile(path) or _file_digest(path) != digest:
            raise CheckpointError(f"--resume {directory}: {relative} is missing or does not match its checksum "
                                  "(corrupted or changed after it was written); refusing to resume from it")  # fmt: skip
    return changed


def load_checkpoint(path: str, *, stage: str, models: dict, optimizer, config,
                    fingerprints: dict | None = None, run: dict | None = None) -> tuple[int, dict, dict, str]:  # fmt: skip
    """Verifies and loads what save_checkpoint wrote into the given modules; returns
    (step, trainer state, changed options {name: (old, new)}, checkpoint folder).
    Under torchrun every rank verifies and loads (so all refuse a bad checkpoint alike);
    the world size may differ from the run that wrote it."""
    directory = find_checkpoint(path)
    manifest = _manifest(directory)
    changed = _check_resume(directory, manifest, stage, config, fingerprints or {}, run)
    try:
        for name, module in models.items():
            if hasattr(module, "save_pretrained"):
                loaded = type(module).from_pretrained(os.path.join(directory, name))
                module.load_state_dict(loaded.state_dict())
            else:
                module.load_state_dict(torch.load(os.path.join(directory, f"{name}.pt"), weights_only=True))
        if os.path.isdir(os.path.join(directory, OPTIMIZER)):
            _load_optimizer(os.path.join(directory, OPTIMIZER), models, optimizer)
            with open(os.path.join(directory, TRAINER_STATE)) as source:
                saved = json.load(source)
        else:  # written before optimizer/: one trainer_state.pt with the optimizer's state_dict
            saved = torch.load(os.path.join(directory, "trainer_state.pt"), weights_only=False)
            optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError, KeyError, OSError, CheckpointException) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"--resume {directory}: does not fit this run's model ({first})") from None
    for group in optimizer.param_groups:  # the restored optimizer carries the old lr; apply this run's
        group["lr"] = config.lr
    return saved["step"], saved["state"], changed, directory


def _link_or_copy(source: str, destination: str) -> None:
    try:  # the exported model shares the checkpoint's files instead of doubling the disk
        os.link(source, destination)
    except OSError:  # another filesystem, or a name the tokenizer already wrote
        if os.path.exists(destination):
            os.remove(destination)
        shutil.copy2(source, destination)


def progress(total: int, description: str, enabled: bool = True):
    """A tqdm bar (tqdm comes with transformers) showing the key metrics; off when
    stderr is not a terminal (a CI log would get one line per refresh)."""
    from tqdm.auto import tqdm

    disable = not enabled or not sys.stderr.isatty() or not distributed.is_main()
    return tqdm(total=total, desc=description, disable=disable, leave=False, dynamic_ncols=True)


class StageRun:
    """The bookkeeping every stage repeats: resuming from a verified checkpoint
    (`start`, the trainer `state`, the options it `changed`), the progress bar, the
    metrics line of each step, periodic checkpoints and the final one, and the final
    model exported to output/model (with the tokenizer) for the next stage's --model.

    frozen: name -> module the run depends on without training it (PPO's reference
    and reward model, DPO's reference); their weights' digests are stored in each
    checkpoint and a resume against other weights is refused. run: the command line's
    options (RUN_OPTIONS), stored in each checkpoint; a resume that changes one is refused."""

    def __init__(self, stage: str, config, log: MetricsLog, *, models: dict, optimizer, output=None, resume=None,
                 show_progress=True, frozen: dict | None = None, run: dict | None = None):  # fmt: skip
        self.stage, self.config, self.log, self.run = stage, config, log, run
        self.models, self.optimizer, self.output = models, optimizer, output
        self.fingerprints = {name: weights_digest(module) for name, module in (frozen or {}).items()}
        self.start, self.state, self.changed, self.resumed_from = 0, {}, {}, None
        if resume:
            self.start, self.state, self.changed, self.resumed_from = load_checkpoint(
                resume,
                stage=stage,
                models=models,
                optimizer=optimizer,
                config=config,
                fingerprints=self.fingerprints,
                run=run,
            )
            notes = "".join(f"; {key} {old!r} -> {new!r}" for key, (old, new) in self.changed.items()
                            if key in ("lr", "kl_coef"))  # fmt: skip
            if distributed.is_main():
                print(f"{stage}: resuming from {self.resumed_from} (step {self.start}){notes}", file=sys.stderr)
        log.truncate(stage, self.start)
        self.bar = progress(config.steps - self.start, stage, show_progress)

    def _save(self, step: int, state: dict | None) -> str:
        return save_checkpoint(self.output, stage=self.stage, models=self.models, optimizer=self.optimizer, step=step,
                               config=self.config, state=state, fingerprints=self.fingerprints, run=self.run)  # fmt: skip

    def step_done(self, step: int, shown: dict, state: dict | None = None, **metrics) -> None:
        """step: the 1-based step just finished; shown: the metrics on the bar. Out-of-range
        token ids met on a GPU during the step raise here (rk.check_index_errors: logging
        the metrics syncs anyway)."""
        self.log.log(self.stage, step, **metrics)
        rk.check_index_errors()
        self.bar.update(1)
        self.bar.set_postfix({name: f"{value:.3f}" for name, value in shown.items()})
        every = self.config.checkpoint_every
        if self.output and every and step % every == 0 and step < self.config.steps:  # finish() saves the last
            self._save(step, state)

    def finish(self, tokenizer=None, state: dict | None = None) -> None:
        self.bar.close()
        if not self.output:
            return
        resumed_here = self.resumed_from and os.path.dirname(os.path.abspath(self.resumed_from)) == os.path.abspath(
            self.output
        )
        if resumed_here and self.start == self.config.steps and not self.changed:
            directory = self.resumed_from  # a finished stage resumed in place: its final checkpoint is there
        else:
            directory = self._save(self.config.steps, state)
        if "model" in self.models and hasattr(self.models["model"], "save_pretrained") and distributed.is_main():

            def fill(folder: str) -> None:
                if tokenizer is not None:  # first: a writer must never open a file linked to the checkpoint's
                    tokenizer.save_pretrained(folder)
                shutil.copytree(os.path.join(directory, "model"), folder, copy_function=_link_or_copy,
                                dirs_exist_ok=True)  # fmt: skip

            publish(os.path.join(self.output, "model"), fill)
        distributed.barrier()
