"""Sequence packing: move between packed rows [N, ...] and padded batches [B, T, ...].

A packed batch concatenates B sequences without padding; ``cu_seqlens`` [B + 1] (int32 or
int64, flash-attn / verl / TRL's convention) holds their offsets: sequence b is packed rows
cu_seqlens[b]:cu_seqlens[b + 1], so cu_seqlens[0] = 0 and cu_seqlens[-1] = N. Position ids
that restart at 0 at each sequence (Hugging Face's packed layout) give it through
``cu_seqlens_from_position_ids``.

Which ops take packed rows directly and which need ``pad_packed`` first: docs/DESIGN.md,
"Sequence packing". Both directions are one gather / scatter through the same index
(``_token_index``) and are differentiable. Value checks (monotone offsets, cu_seqlens[-1] = N,
lengths <= max_len) read the offsets: always on CPU, on GPU only with RLHF_KERNELS_DEBUG=1,
as every op's data-dependent checks (rlhf_kernels/_validation.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _validation as check

Tensor = torch.Tensor

__all__ = ["cu_seqlens_from_position_ids", "pack_padded", "pad_packed", "padding_mask"]


def _any_tensor(name: str, x: object, min_ndim: int, shape_doc: str) -> None:
    """A tensor of any dtype (packed rows may be log-probs, labels, hidden states or a mask)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
    check.tensor(name, x, dtypes=(x.dtype,), min_ndim=min_ndim, shape_doc=shape_doc)


def _lengths(
    cu_seqlens: Tensor, *, total: Optional[int] = None, max_len: Optional[int] = None, max_len_name: str = "max_len"
) -> Tensor:
    """Checks cu_seqlens (and max_len's type) and returns the sequence lengths [B] (int64)."""
    if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 0):
        raise ValueError(f"{max_len_name} must be None or an int >= 0, got {max_len!r}")
    check.tensor("cu_seqlens", cu_seqlens, dtypes=check.INDEX_DTYPES, ndim=1, shape_doc="[B + 1]")
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens must have B + 1 >= 1 entries [B + 1], got shape (0,)")
    lengths = cu_seqlens.long().diff()
    if check.values_checked(cu_seqlens):
        if int(cu_seqlens[0]) != 0:
            raise ValueError(f"cu_seqlens[0] must be 0, got {int(cu_seqlens[0])}")
        if bool((lengths < 0).any()):
            b = int((lengths < 0).nonzero()[0])
            raise ValueError(
                f"cu_seqlens must be non-decreasing (sequence offsets), got "
                f"cu_seqlens[{b}] = {int(cu_seqlens[b])} > cu_seqlens[{b + 1}] = {int(cu_seqlens[b + 1])}"
            )
        if total is not None and int(cu_seqlens[-1]) != total:
            raise ValueError(
                f"cu_seqlens[-1] must equal the number of packed rows N = {total}, got {int(cu_seqlens[-1])}"
            )
        if max_len is not None and lengths.numel() and int(lengths.max()) > max_len:
            raise ValueError(
                f"{max_len_name} = {max_len} is shorter than the longest sequence in cu_seqlens, {int(lengths.max())}"
            )
    return lengths


def _max_len(lengths: Tensor, max_len: Optional[int]) -> int:
    """T: max_len, or the longest sequence (a host read of the lengths)."""
    if max_len is None:
        return int(lengths.max()) if lengths.numel() else 0
    return max_len


def _token_index(cu_seqlens: Tensor, total: int, max_len: int) -> Tensor:
    """[N] int64: packed row i is padded position (b, t) = divmod(index[i], max_len).

    The one index both directions use, so pad_packed and pack_padded are exact inverses.
    b is the sequence holding row i (the number of ends cu_seqlens[1:] <= i, which skips
    empty sequences), t its offset in that sequence. No Python loop over tokens or sequences.
    """
    offsets = cu_seqlens.long()
    row = torch.arange(total, device=offsets.device)
    seq = torch.searchsorted(offsets[1:], row, right=True)
    return seq * max_len + (row - offsets[seq])


def pad_packed(packed: Tensor, cu_seqlens: Tensor, *, max_len: Optional[int] = None, value: float = 0) -> Tensor:
    """Packed rows [N, ...] to a right-padded batch [B, T, ...].

    Args: packed [N] or [N, ...] (any dtype: log-probs, labels, hidden [N, H], a mask);
    cu_seqlens [B + 1] int32/int64 with cu_seqlens[-1] = N; max_len: T (default: the
    longest sequence, read from cu_seqlens; pass it to avoid that host sync, or to match
    another padded batch's T); value: what padding positions hold (0; e.g. -100 for labels).
    Returns: [B, T, ...] of packed's dtype; out[b, t] = packed[cu_seqlens[b] + t] for
    t < length b, else value. Differentiable w.r.t. packed (padding gets no gradient).
    """
    _any_tensor("packed", packed, 1, "[N, ...]")
    total, rest = packed.shape[0], packed.shape[1:]
    lengths = _lengths(cu_seqlens, total=total, max_len=max_len)
    check.same_device(packed=packed, cu_seqlens=cu_seqlens)
    T = _max_len(lengths, max_len)
    index = _token_index(cu_seqlens, total, T)
    # Out of place, so autograd sees index_copy's source: d packed = d out gathered at index.
    out = packed.new_full((lengths.numel() * T, *rest), value).index_copy(0, index, packed)
    return out.view(lengths.numel(), T, *rest)


def pack_padded(padded: Tensor, cu_seqlens: Tensor) -> Tensor:
    """A right-padded batch [B, T, ...] to packed rows [N, ...]; the inverse of pad_packed.

    Args: padded [B, T] or [B, T, ...] (any dtype); cu_seqlens [B + 1] int32/int64 whose
    lengths are <= T. Returns: [N, ...] with N = cu_seqlens[-1] (a host read, as any
    dynamic-size selection); out[cu_seqlens[b] + t] = padded[b, t] for t < length b.
    Padding positions are dropped. Differentiable w.r.t. padded (0 gradient on padding).
    """
    _any_tensor("padded", padded, 2, "[B, T, ...]")
    B, T, rest = padded.shape[0], padded.shape[1], padded.shape[2:]
    lengths = _lengths(cu_seqlens, max_len=T, max_len_name="padded's T (dim 1)")
    check.same_device(padded=padded, cu_seqlens=cu_seqlens)
    if lengths.numel() != B:
        raise ValueError(
            f"cu_seqlens must have B + 1 = {B + 1} entries for padded of shape {tuple(padded.shape)} [B, T, ...], "
            f"got {cu_seqlens.numel()}"
        )
    index = _token_index(cu_seqlens, int(cu_seqlens[-1]), T)
    return padded.reshape(B * T, *rest).index_select(0, index)


def padding_mask(cu_seqlens: Tensor, max_len: Optional[int] = None) -> Tensor:
    """[B, T] bool, True at the positions pad_packed fills from packed rows (t < length b).

    The mask the padded ops take. max_len: T as in pad_packed (default: the longest sequence).
    """
    lengths = _lengths(cu_seqlens, max_len=max_len)
    T = _max_len(lengths, max_len)
    return torch.arange(T, device=lengths.device) < lengths[:, None]


def cu_seqlens_from_position_ids(position_ids: Tensor) -> Tensor:
    """cu_seqlens [B + 1] int32 from packed position ids [N] or [1, N] that restart at 0.

    Each 0 starts a sequence (Hugging Face's packed layout, as its flash-attention path
    reads it); within a sequence the ids count up by 1, which is checked (values_checked).
    Returns int32 (flash-attn's dtype), on position_ids' device; a host sync (the number of
    sequences is data-dependent).
    """
    check.tensor("position_ids", position_ids, dtypes=check.INDEX_DTYPES, shape_doc="[N] or [1, N]")
    if not (position_ids.dim() == 1 or (position_ids.dim() == 2 and position_ids.shape[0] == 1)):
        raise ValueError(f"position_ids must have shape [N] or [1, N], got {tuple(position_ids.shape)}")
    pos = position_ids.reshape(-1)
    if check.values_checked(pos):
        if int(pos[0]) != 0:
            raise ValueError(f"position_ids must start at 0 (each packed sequence restarts at 0), got {int(pos[0])}")
        bad = (pos[1:] != 0) & (pos[1:] != pos[:-1] + 1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0]) + 1
            raise ValueError(
                f"position_ids must count up by 1 within a sequence and restart at 0, got "
                f"{int(pos[i - 1])} then {int(pos[i])} at index {i}"
            )
    starts = (pos == 0).nonzero().flatten()
    end = torch.tensor([pos.numel()], device=pos.device)
    return torch.cat([starts, end]).to(torch.int32)
