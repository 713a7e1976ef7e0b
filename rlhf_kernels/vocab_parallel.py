"""Vocab-parallel log-probs over a torch.distributed process group.

What ``process_group=`` on token_logprobs, linear_logprobs, sequence_logprobs and
linear_dpo_loss runs (rlhf_kernels.functional dispatches here). The contract:

- Each of the P ranks of the group holds a contiguous shard of the vocabulary, in rank
  order: logits [..., V_r], or lm_head weight [V_r, H] (and bias [V_r]). Shards may
  differ in size (V not divisible by P). Labels are global vocabulary indices and the
  same on every rank, as are hidden (linear ops), the mask and every option.
- ``vocab_size`` (optional) is the true global V when the shards are padded at the end
  (Megatron pads V up to a multiple of its divisor): rows >= vocab_size never enter
  the softmax; their gradient is exactly 0. Without a group it slices the padding off
  and runs the single-process op on its usual backend.
- Results equal the unsharded op on every rank (the same values, bitwise, on every
  rank); each rank gets the gradient of its own shard, and for the linear ops the
  gradient of hidden summed over the ranks (the full d hidden, on every rank).

Collectives per call (the whole batch, not per row block): forward, 2 all_gathers:
(1) a [P, 20] int64 table of each rank's shapes, options and label summary, from which
every rank learns the shard offsets and runs the same cross-rank checks, so bad input
raises the same error on every rank instead of hanging; (2) one [P, N, 5] gather of
the per-row local statistics (max, sum exp(z - max), sum exp(z - max) (z - max), the
label logit from its owner, an owner count), combined identically on every rank.
Gathering the statistics once replaces the usual max all_reduce followed by a sum
all_reduce of the rescaled sums: one round trip, P x 5 floats per row. Backward:
none for token_logprobs; one all_reduce (sum) of d hidden [N, H] for the linear ops,
run whenever any rank's hidden requires grad. On the error path only, one
all_gather_object of the error messages.

Local math: PyTorch on the shard's device (any device), in row chunks of the
reference's size (reference.logprobs.chunk_rows), fp32 accumulation (fp64 for fp64
inputs); the linear ops recompute each chunk's logits in the backward, as the
single-process ops do, so no [N, V_r] fp32 logits exist beyond one chunk. The compiled
cpu / triton kernels are not used on this path (they do not expose the partial
statistics); ``backend=`` must be None or "reference" with a group. Not traced by
torch.compile (the collectives are eager torch.distributed calls), and double backward
(create_graph=True) is not supported: a NotImplementedError naming the op and backend.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import _batch_invariance, reference
from . import _validation as check
from .reference.autograd import recording_backward
from .reference.logprobs import LogitTransform, backprop_linear_chunk, chunk_rows, compute_dtype, linear_chunk

Tensor = torch.Tensor

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NO_LABEL_MIN = 2**62
# The per-rank table: one int64 row per rank.
_FIELDS = (
    "error", "rows", "hidden", "shard", "ref_shard", "dtype", "label_min", "label_max", "checksum",
    "grad_needed", "hidden_grad", "has_bias", "temperature", "softcap", "logit_scale", "ignore_index",
    "return_entropy", "vocab_size", "batch_invariant", "kind",
)  # fmt: skip
_F = {name: i for i, name in enumerate(_FIELDS)}
_KINDS = ("token_logprobs", "linear_logprobs", "sequence_logprobs", "linear_dpo_loss")


def _float_bits(x: Optional[float]) -> int:
    return -1 if x is None else struct.unpack("<q", struct.pack("<d", float(x)))[0]


@dataclass(frozen=True)
class Layout:
    """Where this rank's shard sits, agreed by every rank."""

    shards: tuple[int, ...]  # V_r of every rank, in rank order
    rank: int
    vocab: int  # the global vocabulary that enters the softmax (vocab_size, or sum of shards)
    hidden_grad: bool  # some rank's hidden requires grad: every rank all-reduces d hidden

    @property
    def start(self) -> int:
        return sum(self.shards[: self.rank])

    @property
    def valid(self) -> int:
        """This shard's rows that are inside the vocabulary (the rest is padding)."""
        return max(0, min(self.shards[self.rank], self.vocab - self.start))


def _world(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _gather(x: Tensor, group) -> Tensor:
    """[P, *x.shape]: every rank's x, in rank order (one collective)."""
    size, _ = _world(group)
    out = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.stack(out)


def _label_summary(labels: Tensor, ignore_index: int, mask: Optional[Tensor]) -> tuple[int, int, int]:
    """(min, max, checksum) of the labels that are read (!= ignore_index, mask != 0);
    zeros when the values are not read (GPU without RLHF_KERNELS_DEBUG, compile, meta)."""
    if not check.values_checked(labels):
        return 0, 0, 0
    flat = labels.reshape(-1).long()
    used = flat != ignore_index
    if mask is not None:
        used &= mask.reshape(-1) != 0
    position = torch.arange(1, flat.numel() + 1, device=flat.device)
    checksum = int((torch.where(used, flat + 1, 0) * position).sum())
    if not bool(used.any()):
        return _NO_LABEL_MIN, -1, checksum
    kept = flat[used]
    return int(kept.min()), int(kept.max()), checksum


def _consensus(
    group,
    kind: str,
    validate: Callable[[], object],
    describe: Callable[[], dict],
) -> tuple[Layout, object]:
    """Runs this rank's checks (validate) and one all_gather of every rank's description;
    then the same cross-rank checks on every rank. Returns (layout, validate's result).
    An error on any rank becomes the same exception on every rank."""
    size, rank = _world(group)
    row = [0] * len(_FIELDS)
    error: Optional[BaseException] = None
    result = None
    device = torch.device("cpu")
    try:
        result = validate()
        info = describe()
        device = info.pop("device")
        for name, value in info.items():
            row[_F[name]] = int(value)
        row[_F["kind"]] = _KINDS.index(kind)
    except (TypeError, ValueError, IndexError) as exc:
        error = exc
        row = [-1] * len(_FIELDS)
        row[_F["error"]] = 1
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    table = _gather(torch.tensor(row, dtype=torch.int64, device=device), group).tolist()
    failed = [r for r in range(size) if table[r][_F["error"]] == 1]
    if failed:
        messages = [None] * size
        dist.all_gather_object(messages, None if error is None else (type(error).__name__, str(error)), group=group)
        first_type, first_message = messages[failed[0]]
        cls = {"TypeError": TypeError, "IndexError": IndexError}.get(first_type, ValueError)
        ranks = ", ".join(str(r) for r in failed)
        raise cls(f"{kind} with process_group: rank {failed[0]}: {first_message} (failed on rank(s) {ranks})")

    def column(name):
        return [table[r][_F[name]] for r in range(size)]

    def agree(name, what):
        values = column(name)
        if len(set(values)) != 1:
            raise ValueError(f"{kind} with process_group: {what} must be the same on every rank; by rank: {values}")
        return values[0]

    agree("kind", "the op")
    agree("rows", "the number of rows (labels' positions)")
    if kind != "token_logprobs":
        agree("hidden", "the hidden size H (hidden.shape[-1] and weight.shape[1])")
        agree("has_bias", "whether a bias is given")
    agree("dtype", "the input dtype")
    for name in ("temperature", "softcap", "logit_scale", "ignore_index", "return_entropy", "batch_invariant"):
        agree(name, f"the option {name}")
    agree("vocab_size", "vocab_size")
    agree("grad_needed", "whether a gradient is recorded (grad mode and requires_grad of the inputs)")
    agree("checksum", "the labels (global vocabulary indices)")
    shards = tuple(column("shard"))
    total = sum(shards)
    ref_shards = column("ref_shard")
    if ref_shards[0] != -1 and tuple(ref_shards) != shards:
        raise ValueError(
            f"{kind} with process_group: ref_weight's shards must match weight's; rows by rank: "
            f"{ref_shards} vs {list(shards)}"
        )
    vocab_size = table[0][_F["vocab_size"]]
    vocab = total if vocab_size == -1 else vocab_size
    if vocab > total:
        raise ValueError(
            f"{kind} with process_group: vocab_size={vocab} is more than the shards hold "
            f"({total} = {' + '.join(str(s) for s in shards)})"
        )
    label_min, label_max = table[0][_F["label_min"]], table[0][_F["label_max"]]
    if label_max >= vocab or (label_min < 0 and label_min != _NO_LABEL_MIN):
        ignore_index = table[0][_F["ignore_index"]]
        bad = label_max if label_max >= vocab else label_min
        raise ValueError(
            f"{kind} with process_group: labels must be global vocabulary indices in [0, {vocab}) "
            f"or equal ignore_index={ignore_index}; found e.g. {bad} (shards by rank: {list(shards)})"
        )
    hidden_grad = any(v == 1 for v in column("hidden_grad"))
    return Layout(shards, rank, vocab, hidden_grad), result


def _grad_needed(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_backend(backend: Optional[str]) -> None:
    if backend not in (None, "reference"):
        raise ValueError(
            f"backend={backend!r} cannot run with process_group: the vocab-parallel path is "
            f"PyTorch (rlhf_kernels/vocab_parallel.py); pass backend=None or 'reference'"
        )


def _check_vocab_size(vocab_size) -> None:
    if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive int (the true global vocabulary) or None, got {vocab_size!r}")


def _check_padding(name: str, x: Tensor, vocab_size: Optional[int]) -> None:
    """vocab_size (no group) is at most the rows x holds along its vocabulary dim."""
    _check_vocab_size(vocab_size)
    rows = x.shape[-1] if name == "logits" else x.shape[0]
    if vocab_size is not None and vocab_size > rows:
        raise ValueError(f"vocab_size={vocab_size} is more than {name} holds ({rows})")


def _check_group(process_group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group given but torch.distributed is not initialized")


def _options(opts: LogitTransform, vocab_size, batch_invariant: bool = False) -> dict:
    return dict(
        temperature=_float_bits(opts.temperature),
        softcap=_float_bits(opts.softcap),
        logit_scale=_float_bits(opts.logit_scale),
        ignore_index=opts.ignore_index,
        return_entropy=opts.return_entropy,
        vocab_size=-1 if vocab_size is None else vocab_size,
        batch_invariant=batch_invariant,
    )


# ---------------------------------------------------------------- local math --


def _transform(
    x: Tensor, valid: Tensor, opts: LogitTransform, fresh: bool, keep_tanh: bool = False
) -> tuple[Tensor, Optional[Tensor]]:
    """z of raw logits x [C, V] in the compute dtype with ignored rows zeroed first (never
    read: NaN there reaches nothing), and tanh(scale x / softcap) for the softcap
    derivative if keep_tanh. The same operations, in the same order, as
    LogitTransform.apply. fresh: x is a temporary (a GEMM's output, an upcast copy)
    that may be overwritten, which saves a [C, V] buffer."""
    if fresh:
        z = x.masked_fill_(~valid.unsqueeze(-1), 0.0)
    else:
        z = torch.where(valid.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    if opts.logit_scale != 1.0:
        z.mul_(opts.logit_scale)
    tanh = None
    if opts.softcap is not None:
        if keep_tanh:
            tanh = z.div_(opts.softcap).tanh_()
            z = torch.mul(tanh, opts.softcap)
        else:
            z.div_(opts.softcap).tanh_().mul_(opts.softcap)
    if opts.temperature != 1.0:
        z.div_(opts.temperature)
    return z, tanh


def _owned(labels: Tensor, valid: Tensor, layout: Layout) -> tuple[Tensor, Tensor]:
    """(rows whose label is in this shard, the label's index in the shard)."""
    local = labels.long() - layout.start
    owned = valid & (local >= 0) & (local < layout.valid)
    return owned, torch.where(owned, local, torch.zeros_like(local))


def _chunk_stats(x: Tensor, labels: Tensor, opts: LogitTransform, layout: Layout, fresh: bool) -> Tensor:
    """[C, 5] local statistics of raw logits x [C, valid] in the compute dtype:
    (max m, sum exp(z - m), sum exp(z - m) (z - m), label logit or 0, owns the label)."""
    valid = labels != opts.ignore_index
    z, _ = _transform(x, valid, opts, fresh)
    owned, index = _owned(labels, valid, layout)
    stats = z.new_zeros(z.shape[0], 5)
    stats[:, 3] = torch.where(owned, z.gather(-1, index.unsqueeze(-1)).squeeze(-1), 0.0)
    stats[:, 4] = owned.to(z.dtype)
    m = z.amax(-1)
    m = torch.where(m == float("-inf"), 0.0, m)  # a fully masked shard: exp(-inf) = 0
    z.sub_(m.unsqueeze(-1))
    stats[:, 0] = m
    if not opts.return_entropy:
        stats[:, 1] = z.exp_().sum(-1)
        return stats
    e = torch.exp(z)
    stats[:, 1] = e.sum(-1)
    # a masked logit (p = 0) must not enter as 0 * -inf
    stats[:, 2] = e.mul_(z.masked_fill_(e == 0, 0.0)).sum(-1)
    return stats


def _empty_stats(n: int, dtype, device) -> Tensor:
    stats = torch.zeros(n, 5, dtype=dtype, device=device)
    stats[:, 0] = float("-inf")
    return stats


def _combine(gathered: Tensor, labels: Tensor, opts: LogitTransform) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs, entropy, lse) [N] from every rank's statistics [P, N, 5], combined in
    rank order (the same arithmetic, so the same bits, on every rank)."""
    m, s, t, label_z, owners = gathered.unbind(-1)
    top = m.amax(0)
    top = torch.where(top == float("-inf"), 0.0, top)
    scale = torch.exp(m - top)  # 0 for a shard with nothing in the vocabulary
    total = (scale * s).sum(0)
    lse = top + torch.log(total)
    valid = labels != opts.ignore_index
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    # A label nobody owns (out of range, where values are not checked) is a NaN row.
    poison = torch.where(owners.sum(0) == 1, 1.0, float("nan")).to(lse.dtype)
    logprobs = torch.where(valid, (label_z.sum(0) - lse) * poison, zero)
    if not opts.return_entropy:
        return logprobs, torch.zeros_like(logprobs), lse
    shifted = torch.where(s > 0, t + (m - top) * s, zero)  # sum exp(z - top) (z - top), per rank
    inner = (scale * shifted).sum(0)
    entropy = torch.log(total) - inner / total
    return logprobs, torch.where(valid, entropy, zero), lse


def _chunk_grad(x, labels, grad_logprobs, grad_entropy, lse, entropy, opts: LogitTransform, layout, fresh) -> Tensor:
    """d loss / d raw logits [C, valid] of one chunk (compute dtype), from the global
    lse and entropy: dz = g_lp (onehot - p) - g_H p (log p + H), times dz/dx."""
    valid = labels != opts.ignore_index
    z, tanh = _transform(x, valid, opts, fresh, keep_tanh=True)
    owned, index = _owned(labels, valid, layout)
    log_p = z.sub_(lse.unsqueeze(-1))
    p = torch.exp(log_p)
    g_lp = torch.where(valid, grad_logprobs.to(z.dtype), 0.0).unsqueeze(-1)
    if grad_entropy is not None and opts.return_entropy:
        g_h = torch.where(valid, grad_entropy.to(z.dtype), 0.0).unsqueeze(-1)
        dead = p == 0  # a masked logit: log p = -inf must not enter as 0 * -inf
        coef = log_p.add_(entropy.unsqueeze(-1)).mul_(g_h).add_(g_lp).masked_fill_(dead, 0.0)
        grad = p.mul_(coef).neg_()
    else:
        grad = p.mul_(g_lp).neg_()
    grad.scatter_add_(-1, index.unsqueeze(-1), torch.where(owned.unsqueeze(-1), g_lp, 0.0))
    if opts.temperature != 1.0:
        grad.div_(opts.temperature)
    if tanh is not None:
        grad.mul_(1.0 - tanh * tanh)
    if opts.logit_scale != 1.0:
        grad.mul_(opts.logit_scale)
    return grad


# ----------------------------------------------------------- autograd Functions --


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, opts: LogitTransform, layout: Layout, group, inplace_backward: bool):
        dtype = compute_dtype(logits.dtype)
        n, valid = logits.shape[0], layout.valid
        stats = _empty_stats(n, dtype, logits.device)
        if valid:
            step = chunk_rows(n, valid, logits.device)
            for start in range(0, n, step):
                rows = slice(start, start + step)
                fresh = logits.dtype != dtype  # .to made a copy
                stats[rows] = _chunk_stats(logits[rows, :valid].to(dtype), labels[rows], opts, layout, fresh)
        logprobs, entropy, lse = _combine(_gather(stats, group), labels, opts)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.opts, ctx.layout, ctx.inplace_backward = opts, layout, inplace_backward
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        _no_double_backward("token_logprobs")
        logits, labels, lse, entropy = ctx.saved_tensors
        layout, opts = ctx.layout, ctx.opts
        dtype = compute_dtype(logits.dtype)
        grad_logits = logits if ctx.inplace_backward else torch.empty_like(logits)
        valid = layout.valid
        grad_logits[:, valid:] = 0  # padded vocabulary rows
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        if valid:
            step = chunk_rows(logits.shape[0], valid, logits.device)
            for start in range(0, logits.shape[0], step):
                rows = slice(start, start + step)
                grad_logits[rows, :valid] = _chunk_grad(
                    logits[rows, :valid].to(dtype), labels[rows], grad_logprobs[rows],
                    None if grad_entropy is None else grad_entropy[rows], lse[rows], entropy[rows], opts, layout,
                    logits.dtype != dtype,
                )  # fmt: skip
        return grad_logits, None, None, None, None, None


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts, layout: Layout, group, batch_invariant: bool, op: str):
        dtype = compute_dtype(hidden.dtype)
        n, valid = hidden.shape[0], layout.valid
        w, b = weight[:valid], None if bias is None else bias[:valid]
        stats = _empty_stats(n, dtype, hidden.device)
        if valid:
            step = chunk_rows(n, valid, hidden.device)
            for start in range(0, n, step):
                rows = slice(start, start + step)
                x = linear_chunk(hidden, w, b, rows, batch_invariant).to(dtype)
                stats[rows] = _chunk_stats(x, labels[rows], opts, layout, fresh=True)
        logprobs, entropy, lse = _combine(_gather(stats, group), labels, opts)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.opts, ctx.layout, ctx.group, ctx.batch_invariant, ctx.op = opts, layout, group, batch_invariant, op
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        _no_double_backward(ctx.op)
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        layout, opts = ctx.layout, ctx.opts
        need_weight, need_bias = ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None
        need_hidden = layout.hidden_grad  # every rank's partial d hidden enters the sum
        dtype = compute_dtype(hidden.dtype)
        valid = layout.valid
        w = weight[:valid]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_bias else None
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        if valid and (need_hidden or need_weight or need_bias):
            b = None if bias is None else bias[:valid]
            step = chunk_rows(hidden.shape[0], valid, hidden.device)
            for start in range(0, hidden.shape[0], step):
                rows = slice(start, start + step)
                grad_z = _chunk_grad(
                    linear_chunk(hidden, w, b, rows, ctx.batch_invariant).to(dtype), labels[rows],
                    grad_logprobs[rows], None if grad_entropy is None else grad_entropy[rows], lse[rows],
                    entropy[rows], opts, layout, True,
                )  # fmt: skip
                backprop_linear_chunk(
                    grad_z, hidden, w, rows, grad_hidden,
                    None if grad_weight is None else grad_weight[:valid],
                    None if grad_bias is None else grad_bias[:valid], ctx.batch_invariant,
                )  # fmt: skip
        if need_hidden:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
        return (
            grad_hidden if ctx.needs_input_grad[0] else None,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None, None, None, None,
        )  # fmt: skip


def _no_double_backward(op: str) -> None:
    """create_graph=True through the vocab-parallel path: a clear error naming the op."""
    if recording_backward():
        raise NotImplementedError(
            f"double backward is not supported by {op} on backend reference with process_group (the vocab-parallel "
            "path computes its gradient by hand, not as a graph); take second derivatives without process_group"
        )


def _finish(logprobs, entropy, shape, return_entropy):
    logprobs = logprobs.reshape(shape)
    return (logprobs, entropy.reshape(shape)) if return_entropy else logprobs


def _linear_apply(hidden, weight, labels, *, layout, group, bias=None, temperature=1.0, ignore_index=-100,
                  return_entropy=False, softcap=None, logit_scale=1.0, batch_invariant=False,
                  op="linear_logprobs"):  # fmt: skip
    """linear_logprobs on an agreed layout (what the sequence-level ops call; op: the public
    op the call serves, for the double-backward error)."""
    opts = LogitTransform(temperature, softcap, logit_scale, ignore_index, return_entropy)
    logprobs, entropy = _LinearLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), opts, layout, group, batch_invariant, op
    )
    return _finish(logprobs, entropy, labels.shape, return_entropy)


# ------------------------------------------------------------------ public ops --
# Called by rlhf_kernels.functional when process_group or vocab_size is given; the
# arguments are the public functions' (see their docstrings).


def token_logprobs(logits, labels, *, temperature, ignore_index, return_entropy, softcap, logit_scale,
                   inplace_backward, process_group, vocab_size, backend):  # fmt: skip
    from .functional import logprobs as F

    options = dict(temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
                   softcap=softcap, logit_scale=logit_scale, inplace_backward=inplace_backward)  # fmt: skip
    if process_group is None:  # a padded vocabulary in one process: slice it off
        check.tensor("logits", logits, min_ndim=1, shape_doc="[..., V]")
        _check_padding("logits", logits, vocab_size)
        return F.token_logprobs(logits[..., :vocab_size], labels, **options, backend=backend)
    _check_group(process_group)

    def validate():
        _check_backend(backend)
        _check_vocab_size(vocab_size)
        check.tensor("logits", logits, min_ndim=1, shape_doc="[..., V_r]")
        if logits.shape[-1] == 0:
            raise ValueError(f"logits must be [..., V_r] with V_r >= 1, got {tuple(logits.shape)}")
        check.tensor("labels", labels, dtypes=check.INDEX_DTYPES, shape_doc="[...]")
        check.shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
        check.same_device(logits=logits, labels=labels)
        F._logit_options(temperature, ignore_index, return_entropy, softcap, logit_scale)
        if not isinstance(inplace_backward, bool):
            raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")

    opts = LogitTransform(temperature, softcap, logit_scale, ignore_index, return_entropy)

    def describe():
        label_min, label_max, checksum = _label_summary(labels, ignore_index, None)
        return dict(
            device=logits.device, rows=labels.numel(), hidden=-1, shard=logits.shape[-1], ref_shard=-1,
            dtype=_DTYPES.index(logits.dtype), label_min=label_min, label_max=label_max, checksum=checksum,
            grad_needed=_grad_needed(logits), hidden_grad=0, has_bias=0, **_options(opts, vocab_size),
        )  # fmt: skip

    layout, _ = _consensus(process_group, "token_logprobs", validate, describe)
    logprobs, entropy = _TokenLogprobs.apply(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), opts, layout, process_group, inplace_backward
    )
    return _finish(logprobs, entropy, labels.shape, return_entropy)


def _describe_linear(hidden, weight, bias, labels, mask, opts, vocab_size, batch_invariant, ref_weight=None):
    def describe():
        label_min, label_max, checksum = _label_summary(labels, opts.ignore_index, mask)
        return dict(
            device=hidden.device, rows=labels.numel(), hidden=hidden.shape[-1], shard=weight.shape[0],
            ref_shard=-1 if ref_weight is None else ref_weight.shape[0], dtype=_DTYPES.index(hidden.dtype),
            label_min=label_min, label_max=label_max, checksum=checksum,
            grad_needed=_grad_needed(hidden, weight, bias), hidden_grad=_grad_needed(hidden),
            has_bias=bias is not None, **_options(opts, vocab_size, batch_invariant),
        )  # fmt: skip

    return describe


def linear_logprobs(hidden, weight, labels, *, bias, temperature, ignore_index, return_entropy, softcap,
                    logit_scale, batch_invariant, process_group, vocab_size, backend):  # fmt: skip
    from .functional import logprobs as F

    options = dict(temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
                   softcap=softcap, logit_scale=logit_scale, batch_invariant=batch_invariant)  # fmt: skip
    if process_group is None:
        F._check_linear(hidden, weight, bias)
        _check_padding("weight", weight, vocab_size)
        bias = None if bias is None else bias[:vocab_size]
        return F.linear_logprobs(hidden, weight[:vocab_size], labels, bias=bias, **options, backend=backend)
    _check_group(process_group)
    batch_invariant = _batch_invariance.enabled(batch_invariant)

    def validate():
        _check_backend(backend)
        _check_vocab_size(vocab_size)
        F._check_linear(hidden, weight, bias)
        check.tensor("labels", labels, dtypes=check.INDEX_DTYPES, shape_doc="[...]")
        check.shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")
        check.same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
        F._logit_options(temperature, ignore_index, return_entropy, softcap, logit_scale)

    opts = LogitTransform(temperature, softcap, logit_scale, ignore_index, return_entropy)
    describe = _describe_linear(hidden, weight, bias, labels, None, opts, vocab_size, batch_invariant)
    layout, _ = _consensus(process_group, "linear_logprobs", validate, describe)
    return _linear_apply(
        hidden, weight, labels, layout=layout, group=process_group, bias=bias, temperature=temperature,
        ignore_index=ignore_index, return_entropy=return_entropy, softcap=softcap, logit_scale=logit_scale,
        batch_invariant=batch_invariant,
    )  # fmt: skip


def sequence_logprobs(hidden, weight, labels, mask, *, average, temperature, process_group, vocab_size, backend):
    from .functional import logprobs as F

    if process_group is None:
        check.tensor("weight", weight, ndim=2, shape_doc="[V, H]")
        _check_padding("weight", weight, vocab_size)
        return F.sequence_logprobs(
            hidden, weight[:vocab_size], labels, mask, average=average, temperature=temperature, backend=backend
        )
    _check_group(process_group)

    def validate():
        _check_backend(backend)
        _check_vocab_size(vocab_size)
        F._check_sequences(hidden, weight, labels, mask)
        check.positive("temperature", temperature)

    opts = LogitTransform(temperature=temperature)
    batch_invariant = _batch_invariance.enabled(None)  # the caller's setting (functional's _in_mode)
    describe = _describe_linear(hidden, weight, None, labels, mask, opts, vocab_size, batch_invariant)
    layout, _ = _consensus(process_group, "sequence_logprobs", validate, describe)
    linear_logprobs = partial(
        _linear_apply, layout=layout, group=process_group, batch_invariant=batch_invariant, op="sequence_logprobs"
    )
    return reference.sequence_logprobs(
        hidden, weight, labels, mask, average=average, temperature=temperature, linear_logprobs=linear_logprobs
    )


def linear_dpo_loss(hidden, weight, labels, mask, *, process_group, vocab_size, backend, **kwargs):
    """kwargs: linear_dpo_loss's keyword arguments (ref_*, the loss options, average, temperature)."""
    from .functional import dpo as F

    if process_group is None:
        check.tensor("weight", weight, ndim=2, shape_doc="[V, H]")
        _check_padding("weight", weight, vocab_size)
        ref_weight = kwargs.pop("ref_weight", None)
        if ref_weight is not None:
            check.tensor("ref_weight", ref_weight, ndim=2, shape_doc="[V, H]")
            _check_padding("ref_weight", ref_weight, vocab_size)
            ref_weight = ref_weight[:vocab_size]
        return F.linear_dpo_loss(
            hidden, weight[:vocab_size], labels, mask, ref_weight=ref_weight, **kwargs, backend=backend
        )
    _check_group(process_group)
    ref_weight = kwargs["ref_weight"]

    def validate():
        _check_backend(backend)
        _check_vocab_size(vocab_size)
        return F._check_linear_dpo(hidden, weight, labels, mask, **kwargs)

    opts = LogitTransform(temperature=kwargs["temperature"])
    batch_invariant = _batch_invariance.enabled(None)  # the caller's setting (functional's _in_mode)
    describe = _describe_linear(hidden, weight, None, labels, mask, opts, vocab_size, batch_invariant, ref_weight)
    layout, (types, average) = _consensus(process_group, "linear_dpo_loss", validate, describe)
    # One layout for the policy and the reference pass (ref_weight's shards are checked
    # to be weight's); the reference pass runs under no_grad, so its backward never runs.
    linear_logprobs = partial(
        _linear_apply, layout=layout, group=process_group, batch_invariant=batch_invariant, op="linear_dpo_loss"
    )
    options = {k: v for k, v in kwargs.items() if k not in ("average", "loss_type")}
    hidden = hidden.masked_fill((mask == 0).unsqueeze(-1), 0)  # as functional's: NaN padding never reaches d weight
    return reference.linear_dpo_loss(
        hidden, weight, labels, mask, average=average, loss_type=types, dtype=check.result_dtype(hidden),
        linear_logprobs=linear_logprobs, pair_loss=reference.dpo_loss, **options,
    )  # fmt: skip
