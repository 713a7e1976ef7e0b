"""TRL drop-ins (TRL 1.16 signatures and semantics) and patch() for unchanged TRL code.

    from rlhf_kernels.integrations import trl as rk_trl
    rk_trl.patch()            # every trl module that imported these names now calls ours
    ...                       # an unchanged TRL trainer / loss
    rk_trl.unpatch()          # or: with rk_trl.patched(): ...

What TRL 1.16's trainers call: DPOTrainer and GRPOTrainer (and SFT, KTO, RLOO and the
experimental async GRPO trainer, which install the same head) compute every log-prob
through the fused LM head that `add_fused_lm_head` installs, which calls
`trl.trainer.utils._ChunkedLogProbFunction` at each forward: ChunkedLogProbFunction
below is its drop-in, on rk.linear_logprobs (one fused kernel, no [N, V] logits;
entropy with it when asked). The public name trl.kernels.ChunkedLogProbFunction (the
same class, which no trainer calls by that name) is left as TRL's.
selective_log_softmax, selective_log_softmax_and_entropy and entropy_from_logits are
TRL 1.16's (trl.trainer.utils), with TRL's dispatch: where TRL runs its Triton kernel
(CUDA / XPU logits, Triton installed, TRL's own shape test) ours run rk's kernel and
return float32, as TRL's kernel does, 16-bit logits included; elsewhere float32 and
float64 logits run rk's kernel (output in the logits dtype, within fp32 / fp64
rounding of TRL's), and float16 / bfloat16 logits run TRL's own arithmetic (the
temperature division, log_softmax and entropy in the 16-bit dtype, TRL's loops):
TRL's bits, TRL's memory. rk's kernel rounds its fp32 result once; TRL's 16-bit
log_softmax differs from that by up to one ulp of the 16-bit type, its entropy (three
16-bit roundings) by more, so the 16-bit path is TRL's code, not the kernel.
GRPOTrainer's loss: patch() also replaces `GRPOTrainer._compute_loss` by
trl_grpo.compute_loss (TRL's forward, masks and metrics; the per-token loss, its
normaliser, the KL and the entropy bonus by rk.policy_loss; trl_grpo.py has the
mapping and the configurations that keep TRL's own code).
masked_mean, masked_var and masked_whiten are the helpers of TRL's PPO code (trl.core
up to 0.11, later trl.experimental's PPO; TRL 1.16 no longer ships them), with their
semantics: whitening is unbiased with rsqrt(var + 1e-8) and leaves masked positions
whitened (TRL's PPO trainer zeroes the pads afterwards). Departures, all where TRL
would return NaN: a mean over no valid element is 0 (TRL: 0/0), and masked_whiten
over one valid element gives 0 (TRL: NaN from its Bessel correction).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

import rlhf_kernels as rk

from . import trl_grpo
from ._patching import Patches, loaded_modules, patched_block
from ._version import supported_version

# TRL versions whose signatures and semantics these drop-ins follow (patch() refuses others).
SUPPORTED_VERSIONS = ("1.16.*",)
# TRL's ChunkedLogProbFunction outputs besides the log-probabilities (trl.kernels.chunked_logprob).
_CHUNKED_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_HALF = (torch.float16, torch.bfloat16)


def _trl_runs_its_kernel(
    logits: torch.Tensor, index: Optional[torch.Tensor] = None, row_mask: Optional[torch.Tensor] = None
) -> bool:
    """Whether TRL 1.16 computes this call with its Triton kernel
    (trl.kernels.selective_log_softmax_and_entropy: fp32 arithmetic, float32 outputs):
    CUDA / XPU logits, Triton installed and TRL's own test of the shapes and dtypes
    (trl.trainer.utils._supports_trl_loss_kernel). Elsewhere TRL runs torch ops."""
    if logits.device.type not in ("cuda", "xpu"):
        return False
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # no TRL: its torch path is the semantics to follow
        return False
    return bool(trl_utils.is_triton_available() and trl_utils._supports_trl_loss_kernel(logits, index, row_mask))


def _trl_half_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float, row_mask) -> torch.Tensor:
    """TRL 1.16's torch path for float16 / bfloat16 logits, operation for operation (its
    bits): the logits divided by the temperature in their dtype, then log_softmax in that
    dtype of each slice along the first dimension (TRL's loop), gathered; masked rows 0.
    1-D logits are one row (TRL's loop would iterate over their elements and fail)."""
    if temperature != 1.0:
        logits = logits / temperature
    squeeze = index.ndim == logits.ndim - 1
    if squeeze:
        index = index.unsqueeze(-1)
    if logits.ndim == 1:
        logprobs = F.log_softmax(logits, dim=-1).gather(-1, index)
    else:
        if index.shape[0] != logits.shape[0]:
            raise ValueError(f"index {tuple(index.shape)} does not match logits {tuple(logits.shape)}")
        logprobs = torch.stack(
            [F.log_softmax(rows, dim=-1).gather(-1, rows_index) for rows, rows_index in zip(logits, index)]
        )
    if squeeze:
        logprobs = logprobs.squeeze(-1)
    if row_mask is not None:
        logprobs = logprobs.masked_fill(row_mask == 0, 0.0)
    return logprobs


def _trl_half_entropy(logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """TRL 1.16's torch entropy for float16 / bfloat16 logits, operation for operation:
    rows in chunks of chunk_size, -(exp(log_softmax) * log_softmax).sum(-1) in the
    16-bit dtype."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk, dim=-1)
        parts.append(-(torch.exp(logps) * logps).sum(-1))
    return torch.cat(parts, dim=0).reshape(logits.shape[:-1])


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0, row_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """log_softmax(logits / temperature).gather(-1, index): index of shape (...) or
    (..., K) (top-K); rows where row_mask == 0 give 0. As TRL 1.16: float32 where TRL
    runs its Triton kernel (rk's kernel here); float16 / bfloat16 logits elsewhere run
    TRL's own 16-bit arithmetic (TRL's bits and dtype); float32 / float64 logits run
    rk's kernel, output in the logits dtype."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    trl_kernel = _trl_runs_its_kernel(logits, index, row_mask)
    if logits.dtype in _HALF and not trl_kernel:
        return _trl_half_log_softmax(logits, index, temperature, row_mask)
    top_k = index.ndim == logits.ndim
    first = index[..., 0] if top_k else index
    logprobs = rk.token_logprobs(logits, first, temperature=temperature)
    if top_k:
        # One kernel pass gives log p(first) = z_first / T - lse; the other K - 1 columns
        # reuse that row's lse: log p(k) = z_k / T - lse.
        scaled = logits.gather(-1, index).to(logprobs.dtype) / temperature
        lse = scaled[..., :1] - logprobs.unsqueeze(-1)
        logprobs = scaled - lse
    if row_mask is not None:
        logprobs = logprobs.masked_fill(row_mask == 0, 0.0)
    return logprobs if trl_kernel else logprobs.to(logits.dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per row. As TRL 1.16: float32 where TRL runs its
    Triton kernel (rk's kernel here); float16 / bfloat16 logits elsewhere run TRL's own
    16-bit arithmetic in chunks of chunk_size rows (TRL's bits); float32 / float64 logits
    run rk's kernel (streams rows, chunk_size not needed), output in the logits dtype."""
    trl_kernel = _trl_runs_its_kernel(logits)
    if logits.dtype in _HALF and not trl_kernel:
        return _trl_half_entropy(logits, chunk_size)
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = rk.token_logprobs(logits, labels, return_entropy=True)
    return entropy if trl_kernel else entropy.to(logits.dtype)


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax(logits / T).gather(index), entropy of softmax(logits / T)); rows where
    row_mask == 0 give 0 and 0. Dispatch and dtypes as selective_log_softmax: one rk
    kernel pass for both outputs (float32 where TRL runs its Triton kernel, else the
    logits dtype), TRL's own 16-bit arithmetic for float16 / bfloat16 logits elsewhere
    (the logits divided by T in their dtype, then TRL's log_softmax and entropy)."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    trl_kernel = _trl_runs_its_kernel(logits, index, row_mask)
    if logits.dtype in _HALF and not trl_kernel:
        if temperature != 1.0:
            logits = logits / temperature
        logprobs = _trl_half_log_softmax(logits, index, 1.0, row_mask)
        with torch.set_grad_enabled(entropy_requires_grad and torch.is_grad_enabled()):
            entropy = _trl_half_entropy(logits, 128)
        if row_mask is not None:
            entropy = entropy.masked_fill(row_mask == 0, 0.0)
        return logprobs, entropy
    logprobs, entropy = rk.token_logprobs(logits, index, temperature=temperature, return_entropy=True)
    if not entropy_requires_grad:
        entropy = entropy.detach()
    if row_mask is not None:
        logprobs = logprobs.masked_fill(row_mask == 0, 0.0)
        entropy = entropy.masked_fill(row_mask == 0, 0.0)
    if trl_kernel:
        return logprobs, entropy
    return logprobs.to(logits.dtype), entropy.to(logits.dtype)


# TRL 1.16's fused LM head projects [min(N, TRL_TOKEN_TILE), chunk_size] tiles of the
# logits in the compute dtype (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE; chunk_size
# is _CHUNKED_LOGPROB_CHUNK_SIZE = 32768 from add_fused_lm_head).
TRL_TOKEN_TILE = 4096


def _stats_bytes_per_logit(dtype: torch.dtype) -> int:
    """The most bytes _logit_statistics holds per logit of its chunk at once: the GEMM
    output and its fp32 copy (none for fp32), or the fp32 logits and logsumexp's one
    [rows, V] temporary."""
    size = dtype.itemsize
    return max(8, 4 + (size if size != 4 else 0))


def _stats_chunk_rows(n_rows: int, vocab: int, chunk_size: int, dtype: torch.dtype, device) -> int:
    """Rows per chunk of the metric-statistics pass: the rows of the chunked paths
    (reference.logprobs.chunk_rows), capped so that the pass never holds more bytes than
    the logits tile TRL's own head holds (min(N, 4096) x chunk_size in the compute dtype);
    at least one row."""
    from ..reference.logprobs import chunk_rows

    tile_bytes = min(n_rows, TRL_TOKEN_TILE) * chunk_size * dtype.itemsize
    cap = tile_bytes // (_stats_bytes_per_logit(dtype) * max(vocab, 1))
    return max(1, min(chunk_rows(n_rows, vocab, device), cap))


def _logit_statistics(hidden, weight, bias, targets, temperature, softcap, logit_scale, names, chunk_size) -> dict:
    """TRL's per-token metric statistics (no gradient), in row chunks of the logits:
    mean_logits = mean_v z, is_top1 = (argmax_v z == target, the first maximum wins, as
    TRL's running-max test), log_sum_sq_probs = log sum_v p_v^2 = logsumexp(2 z) - 2 lse,
    with z the transformed fp32 logits (LogitTransform's arithmetic, in place)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    out = {name: [] for name in names}
    step = _stats_chunk_rows(n, vocab, chunk_size, hidden.dtype, hidden.device)
    with torch.no_grad():
        for start in range(0, n, step):
            z = torch.nn.functional.linear(hidden[start : start + step], weight, bias)
            z = z.float()  # the GEMM output, or an fp32 copy of it (the 16-bit output is freed here)
            if logit_scale != 1.0:
                z.mul_(logit_scale)
            if softcap is not None:
                z.div_(softcap).tanh_().mul_(softcap)
            if temperature != 1.0:
                z.div_(temperature)
            if "mean_logits" in out:
                out["mean_logits"].append(z.mean(-1))
            if "is_top1" in out:
                out["is_top1"].append(z.argmax(-1) == targets[start : start + step])
            if "log_sum_sq_probs" in out:
                lse = torch.logsumexp(z, -1)
                out["log_sum_sq_probs"].append(torch.logsumexp(z.mul_(2), -1) - 2 * lse)
            del z
    empty = {"is_top1": torch.bool}
    return {
        name: torch.cat(chunks) if chunks else hidden.new_empty(0, dtype=empty.get(name, torch.float32))
        for name, chunks in out.items()
    }


class ChunkedLogProbFunction:
    """TRL 1.16's trl.kernels.ChunkedLogProbFunction, called as TRL's fused LM head calls
    it: apply(hidden [N, H], weight [V, H], bias [V] or None, targets [N], temperature,
    chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=...) ->
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each [N] (float32, as
    TRL's; is_top1 bool), each optional one None unless named in outputs (TRL computes
    only those too). log_probs, and entropy when asked, come from one rk.linear_logprobs
    call, differentiable w.r.t. hidden, weight and bias (chunk_size is TRL's tiling
    knob: the kernel does not need it). The metric statistics (mean_logits, is_top1,
    log_sum_sq_probs: no gradient; DPOTrainer, KTOTrainer and SFTTrainer ask for some)
    take a second, no-grad pass over row chunks of the logits, sized to hold no more
    bytes than TRL's own [4096, chunk_size] tile (the kernels do not compute them yet);
    none when none is asked. The projection runs in the autocast dtype when autocast
    is on, as TRL's does."""

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: Optional[float] = None,
        logit_scale: float = 1.0,
        outputs: tuple = _CHUNKED_OUTPUTS,
    ):
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        options = {"temperature": temperature, "softcap": final_logit_softcapping, "logit_scale": logit_scale}
        with torch.autocast(device_type, enabled=False):
            with_entropy = "entropy" in outputs
            result = rk.linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=with_entropy, **options)
            logprobs, entropy = result if with_entropy else (result, None)
            extra = [name for name in ("log_sum_sq_probs", "mean_logits", "is_top1") if name in outputs]
            stats = {}
            if extra:
                stats = _logit_statistics(
                    hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale, extra, chunk_size
                )
        return (
            logprobs.float(),  # float32 as TRL's (its statistics are float32 for float64 inputs too)
            None if entropy is None else entropy.float(),
            stats.get("log_sum_sq_probs"),
            stats.get("mean_logits"),
            stats.get("is_top1"),
        )


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: Optional[int] = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask), over all elements or along axis."""
    return rk.masked_mean(values, mask, dim=axis)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Masked variance around the masked mean; Bessel-corrected when unbiased."""
    if unbiased and mask.sum() == 0:
        raise ValueError(
            "The sum of the mask is zero, which can happen when `mini_batch_size=1`;"
            "try increase the `mini_batch_size` or `gradient_accumulation_steps`"
        )
    centered = values - rk.masked_mean(values, mask)
    variance = rk.masked_mean(centered.square(), mask)
    if unbiased:
        count = mask.sum()
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) * rsqrt(unbiased var + 1e-8) (+ mean when not shift_mean), over mask."""
    return rk.masked_whiten(values, mask, shift_mean=shift_mean, unbiased=True, eps=1e-8, fill_masked=False)


DROP_INS = {
    # the fused LM head of DPOTrainer / GRPOTrainer (trl.trainer.utils imports it under this name)
    "_ChunkedLogProbFunction": ChunkedLogProbFunction,
    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
    "selective_log_softmax": selective_log_softmax,
    "entropy_from_logits": entropy_from_logits,
    "masked_mean": masked_mean,
    "masked_var": masked_var,
    "masked_whiten": masked_whiten,
}
_patches = Patches()


def _trl_modules():
    importlib.import_module("trl.trainer.utils")  # the home of the log-prob helpers
    return loaded_modules("trl")


def _supported() -> bool:
    """Whether the installed TRL is one these drop-ins follow; warns if not."""
    return supported_version("trl", "trl", SUPPORTED_VERSIONS) is not None


def _patch_grpo_loss() -> None:
    """GRPOTrainer._compute_loss -> trl_grpo.compute_loss (a subclass that overrides it,
    such as trl.experimental's GMPOTrainer, keeps its own)."""
    try:
        from trl.trainer.grpo_trainer import GRPOTrainer
    except ImportError as error:  # a dependency of GRPOTrainer is missing: nothing to patch
        warnings.warn(f"rlhf_kernels.integrations.trl.patch(): GRPOTrainer not patched ({error})", stacklevel=3)
        return
    theirs = GRPOTrainer.__dict__.get("_compute_loss")
    if getattr(theirs, "__module__", None) != "trl.trainer.grpo_trainer":
        return  # already replaced by someone else: leave it
    trl_grpo.TRL_COMPUTE_LOSS = theirs
    _patches.set_attr(GRPOTrainer, "_compute_loss", trl_grpo.compute_loss)


def patch() -> int:
    """Replaces TRL's functions of DROP_INS's names, as trl.trainer.utils defines or
    imports them, in every loaded trl module that holds that very object under that name
    (trl.trainer.utils and every `from ... import name`; trl.kernels' own names, e.g. its
    Triton selective_log_softmax_and_entropy and the public ChunkedLogProbFunction, are
    other objects or names and stay TRL's), and GRPOTrainer's _compute_loss (by
    trl_grpo.compute_loss); returns how many attributes were replaced. Modules imported
    later see the patched trl.trainer.utils. With a TRL version other than
    SUPPORTED_VERSIONS it warns and patches nothing; while patched, a second patch()
    returns 0."""
    if _patches or not _supported():
        return 0
    _patch_grpo_loss()
    utils = importlib.import_module("trl.trainer.utils")
    theirs = {
        name: getattr(utils, name)
        for name in DROP_INS
        if callable(getattr(utils, name, None)) and getattr(getattr(utils, name), "__module__", "").startswith("trl")
    }
    for module in _trl_modules():
        namespace = vars(module)
        for name, original in theirs.items():
            if namespace.get(name) is original:
                _patches.set_attr(module, name, DROP_INS[name])
    return len(_patches)


def unpatch() -> None:
    """Restores every attribute patch() replaced, and TRL's function wherever a trl
    module imported ours while patched."""
    if _patches:
        _patches.undo(_trl_modules())


patched = patched_block(patch, unpatch)
patched.__doc__ = """with patched(): TRL runs on rlhf_kernels inside the block (a block entered while
already patched leaves the outer patch in place); yields patch()'s count."""
