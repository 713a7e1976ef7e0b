"""Reference token log-probs and entropy, from logits or from hidden states x lm_head.

Both work in row chunks of at most CHUNK_ELEMENTS logits, with a backward that
recomputes each chunk, so the extra memory is one chunk, never [N, V] in fp32.
Math per row, with x the raw logits and z the transformed ones:
    z = softcap * tanh(logit_scale * x / softcap) / T     (softcap set)
    z = logit_scale * x / T                               (otherwise)
    logprob = z[label] - logsumexp(z)
    entropy = logsumexp(z) - sum_v softmax(z)_v z_v
Rows whose label == ignore_index get 0 and zero gradient. A label outside [0, V)
that is not ignore_index (possible where the Python check is skipped: torch.compile)
is never read: its row's log-prob and gradient are NaN.
Double backward (create_graph=True) is exact: the backward then recomputes the
gradient as a graph (reference/autograd.py), unchunked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .autograd import recording_backward, vjp

# 16M fp32 logits = 64 MiB per [chunk, V] buffer; a chunk's forward holds about
# three such buffers (z, softmax, product), so ~200 MiB at any V.
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class LogitTransform:
    temperature: float = 1.0
    softcap: Optional[float] = None
    logit_scale: float = 1.0
    ignore_index: int = -100
    return_entropy: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.logit_scale != 1.0:
            x = x * self.logit_scale
        if self.softcap is not None:
            x = self.softcap * torch.tanh(x / self.softcap)
        if self.temperature != 1.0:
            x = x / self.temperature
        return x


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# On CUDA a chunk is sized for its GEMMs, not for a cache: at least 2048 rows (at
# V = 152064 the CPU's 2^24 logits would be 110 rows, and a [110, H] x [H, V] GEMM plus
# a dW update per chunk runs ~10x above the GEMM floor at N = 32k), or up to 1 GiB of
# fp32 chunk logits when that is more rows (small vocabularies). See docs/DESIGN.md.
CUDA_CHUNK_MIN_ROWS = 2048
CUDA_CHUNK_BYTES = 1 << 30


def chunk_rows(n_rows: int, vocab: int, device: Optional[torch.device] = None) -> int:
    """Rows per chunk of the chunked log-prob paths (forward of the logits path,
    recompute in every backward) for tensors on `device`."""
    if device is not None and torch.device(device).type == "cuda":
        rows = max(CUDA_CHUNK_MIN_ROWS, CUDA_CHUNK_BYTES // (4 * max(vocab, 1)))
    else:
        rows = CHUNK_ELEMENTS // max(vocab, 1)
    return max(1, min(n_rows, rows))


# Batch-invariant mode (rlhf_kernels.batch_invariant): a BLAS GEMM picks its blocking
# and kernel by the number of rows, so a row's logits can change in the last bits with
# the batch it is in (measured: 9.5e-7 for 7 rows alone vs inside 300, H = 512,
# V = 32000). In this mode every GEMM of the linear paths runs on fixed blocks of
# INVARIANT_ROWS rows, the last one zero-padded: one shape, so every row takes the same
# arithmetic whatever the batch, its position in it or the other rows (tested bitwise:
# subsets, permutations, padding rows). Cost: up to INVARIANT_ROWS - 1 padded rows and
# one GEMM call per block (bench/logprobs.py measures it).
INVARIANT_ROWS = 64


def row_blocks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_invariant: bool) -> torch.Tensor:
    """fn(x) for x [n, K] and a row-wise fn (a GEMM with a fixed right operand); in
    batch-invariant mode fn runs on [INVARIANT_ROWS, K] blocks only."""
    if not batch_invariant:
        return fn(x)
    n = x.shape[0]
    padding = (-n) % INVARIANT_ROWS
    if padding:
        x = torch.cat([x, x.new_zeros(padding, *x.shape[1:])])
    return torch.cat([fn(block) for block in x.split(INVARIANT_ROWS)])[:n]


def linear_chunk(hidden, weight, bias, rows: slice, batch_invariant: bool = False) -> torch.Tensor:
    """hidden[rows] @ weight^T + bias in the input dtype, as the unfused model computes
    its logits (in fixed row blocks in batch-invariant mode)."""
    return row_blocks(lambda x: torch.nn.functional.linear(x, weight, bias), hidden[rows], batch_invariant)


def _chunk_logprobs(x: torch.Tensor, labels: torch.Tensor, opts: LogitTransform):
    """x [C, V] raw logits in the compute dtype -> (logprobs [C], entropy [C] or None)."""
    valid = labels != opts.ignore_index
    # An ignored row is never read: NaN / inf there reaches neither output nor gradient.
    z = opts.apply(torch.where(valid.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device)))
    in_vocab = (labels >= 0) & (labels < z.shape[-1])
    safe_labels = torch.where(valid & in_vocab, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(z, dim=-1)
    label_z = z.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    # An out-of-range label is never gathered; its row is NaN, gradient included (the
    # factor multiplies the whole log-prob, so its backward is NaN too).
    poison = torch.where(in_vocab | ~valid, 1.0, float("nan")).to(z.dtype)
    logprobs = torch.where(valid, (label_z - lse) * poison, zero)
    if not opts.return_entropy:
        return logprobs, None
    # A masked logit (-inf or finfo.min) has p = 0: its z must not enter, neither as
    # 0 * -inf (NaN) nor through autograd's p-weighted backward (0 * overflow).
    p = torch.softmax(z, dim=-1)
    entropy = lse - (p * torch.where(p > 0, z, torch.zeros_like(z))).sum(-1)
    return logprobs, torch.where(valid, entropy, zero)


def _entropy_opts(opts: LogitTransform) -> LogitTransform:
    return LogitTransform(opts.temperature, opts.softcap, opts.logit_scale, opts.ignore_index, True)


def token_logprobs_vjp(logits, labels, grad_logprobs, grad_entropy, opts: LogitTransform, needed: bool = True):
    """d logits of token log-probs [N, V] as a graph (double backward; any backend)."""
    dtype = compute_dtype(logits.dtype)
    (grad,) = vjp(
        lambda x: _chunk_logprobs(x.reshape(-1, x.shape[-1]).to(dtype), labels, _entropy_opts(opts)),
        [logits],
        [needed],
        [grad_logprobs, grad_entropy],
    )
    return grad


def linear_logprobs_vjp(
    hidden, weight, bias, labels, grad_logprobs, grad_entropy, opts: LogitTransform, batch_invariant, needs
):
    """(d hidden, d weight, d bias) of linear log-probs as a graph (double backward; any backend)."""
    dtype = compute_dtype(hidden.dtype)

    def forward(h, w, b):
        z = linear_chunk(h, w, b, slice(None), batch_invariant).to(dtype)
        return _chunk_logprobs(z, labels, _entropy_opts(opts))

    return vjp(forward, [hidden, weight, bias], needs, [grad_logprobs, grad_entropy])


def _chunk_grad(x, labels, grad_logprobs, grad_entropy, opts: LogitTransform) -> torch.Tensor:
    """d(loss)/d x for one chunk, by autograd through _chunk_logprobs (recompute)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logprobs, entropy = _chunk_logprobs(x, labels, opts)
        outputs, grads = [logprobs], [grad_logprobs]
        if entropy is not None and grad_entropy is not None:
            outputs.append(entropy)
            grads.append(grad_entropy)
        (grad_x,) = torch.autograd.grad(outputs, [x], grads)
    return grad_x


def _forward_chunks(n_rows: int, vocab: int, logits_of: Callable, labels, opts, dtype, device):
    logprobs = torch.empty(n_rows, dtype=dtype, device=device)
    entropy = torch.zeros(n_rows, dtype=dtype, device=device)
    step = chunk_rows(n_rows, vocab, device)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        lp, ent = _chunk_logprobs(logits_of(rows), labels[rows], opts)
        logprobs[rows] = lp
        if ent is not None:
            entropy[rows] = ent
    return logprobs, entropy


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, opts: LogitTransform, inplace_backward: bool):
        dtype = compute_dtype(logits.dtype)
        n_rows, vocab = logits.shape
        ctx.save_for_backward(logits, labels)
        ctx.opts = opts
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(labels)
        return _forward_chunks(n_rows, vocab, lambda rows: logits[rows].to(dtype), labels, opts, dtype, logits.device)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, labels = ctx.saved_tensors
        if recording_backward():  # create_graph=True: a differentiable backward
            grad = token_logprobs_vjp(logits, labels, grad_logprobs, grad_entropy, ctx.opts)
            return grad.to(logits.dtype), None, None, None
        dtype = compute_dtype(logits.dtype)
        # In place: each chunk is read (into its own fp32 copy) before it is overwritten.
        grad_logits = logits if ctx.inplace_backward else torch.empty_like(logits)
        step = chunk_rows(*logits.shape, logits.device)
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            grad_logits[rows] = _chunk_grad(
                logits[rows].to(dtype),
                labels[rows],
                grad_logprobs[rows],
                None if grad_entropy is None else grad_entropy[rows],
                ctx.opts,
            )
        return grad_logits, None, None, None


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: LogitTransform, batch_invariant: bool):
        dtype = compute_dtype(hidden.dtype)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.opts = opts
        ctx.batch_invariant = batch_invariant
        ctx.mark_non_differentiable(labels)
        return _forward_chunks(
            hidden.shape[0],
            weight.shape[0],
            lambda rows: linear_chunk(hidden, weight, bias, rows, batch_invariant).to(dtype),
            labels,
            opts,
            dtype,
            hidden.device,
        )

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, labels = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if recording_backward():  # create_graph=True: a differentiable backward
            grads = linear_logprobs_vjp(
                hidden, weight, bias, labels, grad_logprobs, grad_entropy, ctx.opts, ctx.batch_invariant,
                (need_hidden, need_weight, need_bias),
            )  # fmt: skip
            grads = [None if g is None else g.to(x.dtype) for g, x in zip(grads, (hidden, weight, bias))]
            return (*grads, None, None, None)
        dtype = compute_dtype(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # d weight and d bias accumulate over chunks in fp32 (fp64 for fp64 inputs).
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_bias else None
        step = chunk_rows(hidden.shape[0], weight.shape[0], hidden.device)
        for start in range(0, hidden.shape[0], step):
            rows = slice(start, start + step)
            grad_z = _chunk_grad(
                linear_chunk(hidden, weight, bias, rows, ctx.batch_invariant).to(dtype),
                labels[rows],
                grad_logprobs[rows],
                None if grad_entropy is None else grad_entropy[rows],
                ctx.opts,
            )
            backprop_linear_chunk(
                grad_z, hidden, weight, rows, grad_hidden, grad_weight, grad_bias, ctx.batch_invariant
            )
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
        )


# torch.addmm(..., out_dtype=torch.float32) from 16-bit inputs: CUDA, torch >= 2.8.
_ADDMM_OUT_DTYPE = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 8)


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_z: torch.Tensor, hidden_rows: torch.Tensor) -> None:
    """grad_weight (fp32) += grad_z^T hidden_rows. For 16-bit hidden states on CUDA one
    tensor-core GEMM with fp32 output accumulated in place (torch.addmm out_dtype): d
    logits is rounded to 16 bits as the unfused model's backward rounds it, the product
    is not (rounding each chunk's product before the sum biases training: TRL measured
    entropy drifting lower). Elsewhere an fp32 addmm of the upcast hidden states (on
    CUDA that would be IEEE fp32: ~14x fewer FLOP/s on an H100 than bf16)."""
    if _ADDMM_OUT_DTYPE and grad_weight.device.type == "cuda" and hidden_rows.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(
            grad_weight, grad_z.to(hidden_rows.dtype).t(), hidden_rows, out_dtype=torch.float32, out=grad_weight
        )
    else:
        grad_weight.addmm_(grad_z.t(), hidden_rows.to(grad_weight.dtype))


def backprop_linear_chunk(
    grad_z, hidden, weight, rows, grad_hidden, grad_weight, grad_bias, batch_invariant: bool = False
) -> None:
    """Chain rule of logits = hidden @ weight^T + bias for the chunk `rows`, given its
    d logits grad_z (fp32): d hidden[rows] = dz W, d weight += dz^T h, d bias += sum dz.
    A gradient passed as None is not needed; d weight and d bias are fp32 accumulators.
    d hidden is row-wise, so batch-invariant mode blocks it too (d weight and d bias are
    sums over the batch's rows: they depend on the batch by definition)."""
    if grad_hidden is not None:
        grad_hidden[rows] = row_blocks(lambda g: g @ weight, grad_z.to(weight.dtype), batch_invariant)
    if grad_weight is not None:
        _accumulate_weight_grad(grad_weight, grad_z, hidden[rows])
    if grad_bias is not None:
        grad_bias += grad_z.sum(0)


def _finish(logprobs, entropy, batch_shape, return_entropy):
    logprobs = logprobs.reshape(batch_shape)
    return (logprobs, entropy.reshape(batch_shape)) if return_entropy else logprobs


def token_logprobs(
    logits,
    labels,
    *,
    temperature=1.0,
    ignore_index=-100,
    return_entropy=False,
    softcap=None,
    logit_scale=1.0,
    inplace_backward=False,
):
    opts = LogitTransform(temperature, softcap, logit_scale, ignore_index, return_entropy)
    batch_shape = labels.shape
    logprobs, entropy = _TokenLogprobs.apply(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), opts, inplace_backward
    )
    return _finish(logprobs, entropy, batch_shape, return_entropy)


def linear_logprobs(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    temperature=1.0,
    ignore_index=-100,
    return_entropy=False,
    softcap=None,
    logit_scale=1.0,
    batch_invariant=False,
):
    opts = LogitTransform(temperature, softcap, logit_scale, ignore_index, return_entropy)
    batch_shape = labels.shape
    logprobs, entropy = _LinearLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), opts, batch_invariant
    )
    return _finish(logprobs, entropy, batch_shape, return_entropy)


def sequence_logprobs(
    hidden,
    weight,
    labels,
    mask,
    *,
    average=False,
    temperature=1.0,
    ignore_index=-100,
    linear_logprobs=linear_logprobs,
):
    """Per-sequence sum (average=True: mean) of token log-probs over mask != 0 positions.

    `linear_logprobs` is the implementation of the token log-probs (the reference's by
    default; rlhf_kernels.functional passes the backend it resolved).
    """
    keep = mask != 0
    masked_labels = torch.where(keep, labels, torch.full_like(labels, ignore_index))
    logprobs = linear_logprobs(hidden, weight, masked_labels, temperature=temperature, ignore_index=ignore_index)
    total = logprobs.sum(-1)
    if not average:
        return total
    counts = keep.sum(-1).to(total.dtype)
    return total / counts.clamp(min=1)
