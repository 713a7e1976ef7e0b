"""Vocab-parallel linear_logprobs at P ranks against the all-gather-logits baseline.

    python bench/vocab_parallel.py [--ranks 2] [--N 512] [--H 512] [--V 32000] [--device cpu]
        [--repeats 7] [--output bench/results/vocab-parallel-cpu.md]

Each of P processes (gloo on CPU, nccl on CUDA) holds hidden [N, H] (replicated), labels
[N] and its lm_head shard [V / P, H]. Two implementations of the per-token log-probs:

- ours: rk.linear_logprobs(hidden, weight_shard, labels, process_group=group): chunked,
  no [N, V] logits anywhere; 2 small all_gathers forward, 1 all_reduce of d hidden backward.
- all-gather logits (what users do without a vocab-parallel op, Megatron's
  gather_output=True): logits_shard = hidden @ weight_shard.T, all_gather to the full
  [N, V] logits on every rank, log_softmax + gather. Its autograd is Megatron's: the
  gather's backward keeps this rank's slice of d logits, the input's backward
  all-reduces d hidden.

Modes: forward (no_grad, as old-policy / reference log-probs are taken) and
forward+backward (d hidden and d weight shard). Time: median of --repeats runs after 2
warm-up runs, the slowest rank's (all ranks run in lock step). Memory: each rank's peak
extra resident memory of one run (bench/harness.py's method: VmHWM after
/proc/self/clear_refs on CPU, max_memory_allocated on CUDA), the largest over ranks.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness

import rlhf_kernels as rk


class _CopyToParallel(torch.autograd.Function):
    """Identity forward, all_reduce backward (Megatron's copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherFromParallel(torch.autograd.Function):
    """all_gather along the last dim forward, keep this rank's slice backward
    (Megatron's gather_from_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rank, ctx.width = rank, x.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width].contiguous(), None


def all_gather_logits(hidden, weight, labels, group):
    logits = _GatherFromParallel.apply(_CopyToParallel.apply(hidden, group) @ weight.T, group)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def ours(hidden, weight, labels, group):
    return rk.linear_logprobs(hidden, weight, labels, process_group=group)


IMPLS = {"ours (process_group)": ours, "all-gather logits": all_gather_logits}


def _trim() -> None:
    """Return the heap's free memory to the OS. harness.peak_mb calls fn.reset() just
    before it reads the resident set; without this, buffers under the timing runs' 32 MiB
    mmap threshold stay in glibc's heap after they are freed, and the measured run reuses
    those resident pages: it measured 0 MiB for a forward that allocates ~90 MiB."""
    if harness._LIBC is not None:
        harness._LIBC.malloc_trim(0)


def _runner(fn, hidden, weight, labels, group, mode):
    if mode == "forward":

        def run():
            with torch.no_grad():
                fn(hidden, weight, labels, group)

        run.reset = _trim
        return run
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)

    def run():
        fn(h, w, labels, group).sum().backward()

    def reset():
        h.grad = w.grad = None
        _trim()

    run.reset = reset
    return run


def _worker(rank, size, port, args, queue):
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
    )
    if device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.N, args.H, generator=generator).to(device)
    weight = (torch.randn(args.V, args.H, generator=generator) / args.H**0.5).to(device)
    labels = torch.randint(0, args.V, (args.N,), generator=generator).to(device)
    shard = args.V // size
    weight = weight[rank * shard : (rank + 1) * shard].contiguous()
    group = dist.group.WORLD
    # The two agree (fp32) before anything is timed.
    torch.testing.assert_close(
        ours(hidden, weight, labels, group), all_gather_logits(hidden, weight, labels, group), rtol=1e-5, atol=1e-4
    )
    rows = []
    for name, fn in IMPLS.items():
        for mode in ("forward", "forward+backward"):
            run = _runner(fn, hidden, weight, labels, group, mode)
            dist.barrier()
            ms = harness.time_ms(run, device, warmup=2, repeats=args.repeats)
            dist.barrier()
            peak = harness.peak_mb(run, device)
            stats = torch.tensor([ms, -1.0 if peak is None else peak], dtype=torch.float64, device=device)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            rows.append((name, mode, float(stats[0]), float(stats[1])))
    if rank == 0:
        queue.put((rows, harness.device_name(device)))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--N", type=int, default=512)
    parser.add_argument("--H", type=int, default=512)
    parser.add_argument("--V", type=int, default=32000)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default=None, help="write the markdown table here")
    parser.add_argument("--note", default="", help="a line for the report (e.g. the machine was shared)")
    args = parser.parse_args()
    if args.V % args.ranks:
        parser.error("--V must be a multiple of --ranks (the baseline gathers equal shards)")
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_worker, args=(args.ranks, _free_port(), args, queue), nprocs=args.ranks, start_method="spawn")
    rows, device_name = queue.get()
    case = f"N={args.N} H={args.H} V={args.V} float32, P={args.ranks}"
    command = "python " + shlex.join([os.path.relpath(__file__)] + sys.argv[1:])
    lines = [
        f"# vocab-parallel linear_logprobs, {args.device}",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {datetime.date.today().isoformat()}; torch {torch.__version__}; {device_name} per rank "
        f"({args.ranks} ranks, {'gloo' if args.device == 'cpu' else 'nccl'}).",
        "Time: median of repeated runs after 2 warm-up runs, the slowest rank. Peak: each rank's peak "
        "extra memory of one run (bench/harness.py's method, glibc's heap trimmed first), the largest rank.",
    ]
    if args.note:
        lines += ["", args.note]
    lines += ["", "| case | impl | mode | ms | peak MiB per rank |", "|---|---|---|---:|---:|"]
    lines += [f"| {case} | {name} | {mode} | {ms:.1f} | {peak:.0f} |" for name, mode, ms, peak in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        with open(args.output, "w") as out:
            out.write(text)


if __name__ == "__main__":
    main()
