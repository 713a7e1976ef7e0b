"""Data parallel training under torchrun (one job: the process group and what the
stages need from it); a no-op in a single process.

`torchrun --nproc-per-node N -m rlhf_trainer train|demo ...` starts N processes with
RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous in their environment; setup() joins
them into one process group (gloo on CPU; on CUDA nccl for CUDA tensors and gloo for
CPU ones, each rank on cuda:LOCAL_RANK). Without those variables (or WORLD_SIZE=1)
nothing here communicates and every helper returns its input.

How a stage stays equal to the single-process run on the same global batch:
  - each step's global batch indices are what they were (seeded by seed and step);
    each rank takes a contiguous share (shard);
  - a loss normalised by a batch count (tokens, pairs, sequences) is divided by the
    global count (all_reduce of the local counts) and multiplied by the world size,
    so that DDP's gradient average is exactly the single-process gradient
    (loss_scale); the logged value is the global one (weighted_means);
  - sampled stages (PPO, GRPO) give each rank its own prompts and generator
    (rank_generator: seed, step and rank); batch statistics that must be global are
    reduced: masked_whiten of PPO's advantages, the KL controller's mean KL, GRPO's
    reward scaling (the scores are gathered; a group stays whole on one rank);
  - rank 0 alone writes metrics, checkpoints (with the others for the optimizer's
    torch.distributed.checkpoint shards), reports and shows progress.

Gradients are averaged by torch's DistributedDataParallel (DataParallel below). The
stages call the fused linear_* ops on final hidden states and lm_head.weight read
outside the module's forward, and sample with the whole model; DDP keeps every
parameter whole on every rank, so that code is unchanged (FSDP2 would shard
lm_head.weight and gather it only inside a module's forward).
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

import rlhf_kernels as rk


def _env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str = "auto", timeout_s: float | None = None) -> torch.device:
    """Joins torchrun's process group once (idempotent) and returns this rank's device:
    under torchrun cuda:LOCAL_RANK ("auto" on a CUDA machine, or "cuda...") with NCCL for
    CUDA tensors and gloo for CPU ones, else cpu with gloo; in one process
    pick_device(device) and no group."""
    from .common import pick_device

    if _env_world_size() <= 1 and not dist.is_initialized():
        return pick_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if not dist.is_initialized():
        options = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        if use_cuda:
            torch.cuda.set_device(local_rank)
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=torch.device("cuda", local_rank), **options)
        else:
            dist.init_process_group("gloo", **options)
        atexit.register(shutdown)
    elif dist.get_backend() == "gloo":  # joined for CPU work (the demo): stay there
        use_cuda = False
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def bounds(n: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of n items (sizes differ by at most 1)."""
    world, me = world_size(), rank()
    return me * n // world, (me + 1) * n // world


def shard(items: Sequence) -> Sequence:
    """This rank's contiguous share of a global batch (all of it in one process)."""
    start, stop = bounds(len(items))
    return items[start:stop]


def minibatches(total: int, minibatch: int, local: int) -> list[tuple[int, int]]:
    """[begin, end) of this rank's part, among its `local` items, of each of the
    ceil(total / minibatch) minibatches of a global batch of `total` (every rank runs as
    many updates; in one process [k * minibatch, (k + 1) * minibatch) clipped to total)."""
    cuts = [min(k * minibatch, total) * local // total for k in range(-(-total // minibatch) + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def check_minibatches(what: str, total: int, minibatch: int, items_per_unit: int = 1) -> None:
    """Refuses (on every rank alike) a split that leaves some rank an empty part of a
    minibatch. total and minibatch count items; a rank's share is a contiguous share of
    total / items_per_unit units (GRPO: prompts of items_per_unit completions each)."""
    world, units = world_size(), total // items_per_unit
    for other in range(world):
        local = ((other + 1) * units // world - other * units // world) * items_per_unit
        if any(end <= begin for begin, end in minibatches(total, minibatch, local)):
            raise ValueError(f"{what}: with {world} processes a process would get an empty part of a minibatch; "
                             "use fewer or larger minibatches, or fewer processes")  # fmt: skip


def check_shareable(what: str, n: int) -> None:
    """Every rank needs at least one item of each global batch (an empty share would
    have nothing to run its share of the step on)."""
    if n < world_size():
        raise ValueError(f"{what} is {n}, fewer than the {world_size()} processes: each needs at least one; "
                         f"raise it to >= {world_size()} or run fewer processes")  # fmt: skip


def rank_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one step on this rank: common.step_generator(seed, step)
    in one process (a resumed run draws what the uninterrupted one drew), a stream
    per (seed, step, rank) otherwise."""
    if world_size() == 1:
        from .common import step_generator

        return step_generator(seed, step)
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) << 16) + rank() + 1)


def all_sum(values, device=None) -> torch.Tensor:
    """The element-wise sum over ranks of a list of numbers (float64, one all_reduce)."""
    tensor = torch.as_tensor(values, dtype=torch.float64, device=device)
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def global_count(local, device=None) -> float:
    """The sum over ranks of a local count (a number or a tensor to sum)."""
    value = float(local.sum()) if isinstance(local, torch.Tensor) else float(local)
    return float(all_sum([value], device)[0]) if world_size() > 1 else value


def global_max(local: int, device=None) -> int:
    if world_size() == 1:
        return local
    tensor = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor[0])


def loss_scale(local_count: float, global_count_: float) -> float:
    """The factor that turns a loss normalised by the local count into this rank's
    share of the loss normalised by the global count, times the world size (DDP
    divides the summed gradients by it): local_count * world / global_count."""
    return local_count * world_size() / global_count_ if global_count_ else 0.0


def weighted_means(metrics: dict, device=None) -> dict:
    """name -> (local value, local weight) to name -> the weighted mean over ranks
    (one all_reduce); in one process the values themselves."""
    if world_size() == 1:
        return {name: float(value) for name, (value, _) in metrics.items()}
    names = list(metrics)
    flat = [float(metrics[n][0]) * float(metrics[n][1]) for n in names] + [float(metrics[n][1]) for n in names]
    sums = all_sum(flat, device).tolist()
    return {n: sums[i] / sums[len(names) + i] if sums[len(names) + i] else 0.0 for i, n in enumerate(names)}


def gather_cat(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's tensor concatenated in rank order along dim 0 (the ranks' sizes may
    differ), and where this rank's rows start in it."""
    if world_size() == 1:
        return tensor, 0
    sizes = all_sum([0] * rank() + [tensor.shape[0]] + [0] * (world_size() - rank() - 1), tensor.device)
    sizes = [int(s) for s in sizes.tolist()]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]), sum(sizes[: rank()])


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """rlhf_kernels.masked_whiten (unbiased, masked positions 0) with the mean and
    variance over every rank's valid positions; in one process that op itself."""
    if world_size() == 1:
        return rk.masked_whiten(x, mask, eps=eps)
    dtype = torch.float64
    values, weights = x.detach().to(dtype), mask.to(dtype)
    live = weights != 0
    local = [float(weights.sum()), float(torch.where(live, values, 0.0).mul(weights).sum())]
    count, total = all_sum(local, x.device).tolist()
    mean = total / count if count > 0 else 0.0
    centered = torch.where(live, values, mean) - mean
    squares = float(all_sum([float(torch.where(live, centered.square(), 0.0).mul(weights).sum())], x.device)[0])
    variance = squares / (count - 1 if count - 1 > 0 else 1.0)
    return torch.where(live, centered * (variance + eps) ** -0.5, 0.0).to(x.dtype)


class _Step(nn.Module):
    """Holds the trained modules; its forward runs a stage's whole loss computation, so
    that computation goes through DDP's forward (which prepares the gradient all-reduce)
    even though it reads lm_head.weight and submodules directly."""

    def __init__(self, modules: dict):
        super().__init__()
        self.trained = nn.ModuleDict(modules)

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


class DataParallel:
    """The trained modules of a stage under DistributedDataParallel (when the world
    has more than one process). loss(fn, ...) calls fn(...) (which returns the loss,
    or a tuple/dict holding it) and its backward then averages the gradients over the
    ranks. Parameters are broadcast from rank 0 when it is built. static_graph: every
    step uses the same parameters, and those it never uses (the reward model's
    lm_head, a separate critic's) keep no gradient, as in one process."""

    def __init__(self, modules: dict):
        self.modules = modules
        self.ddp = None
        if world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            device = next(next(iter(modules.values())).parameters()).device
            self.ddp = DistributedDataParallel(
                _Step(modules), device_ids=[device.index] if device.type == "cuda" else None,
                static_graph=True, forward_sync_buffers=False,
            )  # fmt: skip

    def loss(self, fn, *args, **kwargs):
        if self.ddp is None:
            return fn(*args, **kwargs)
        return self.ddp(fn, *args, **kwargs)
