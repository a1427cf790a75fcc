"""Per-row geometry of a call, shared by the backends that need it.

A *row* is one (batch, query position, KV head): the G query heads of a KV group share it.
`row_geometry` gives, per query token, its absolute position, its sequence's key length and the
offset of its sequence's keys; `canonical_blocks` turns each row's raw `block_indices` into the
set SPEC.md defines, as a sorted list padded with -1.

Why a sort-based de-duplication: S is small (~16), so two sorts along the last axis are cheap and
fully vectorised, need no host synchronisation and no data-dependent allocation (CUDA-graph safe),
and give a canonical row that kernels can stream without checking for repeats or bounds. Blocks
past the row's causal limit (`block > pos // block_size`) hold no visible key, so dropping them
here changes nothing and spares the kernels a load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .call import SelectionCall


@dataclass(frozen=True)
class RowGeometry:
    pos: torch.Tensor        # [B, TQ] int64: absolute key position of each query
    seqlen_k: torch.Tensor   # [B, TQ] int64: key length of the query's sequence
    k_offset: torch.Tensor   # [B, TQ] int64: index of the sequence's first key along k's T axis
    seq: torch.Tensor | None = None   # [B, TQ] int64: the query's sequence (varlen only)


# The geometry of a dense call depends on (B, TQ, TK, device) only: small ones (decode, chunks,
# where eager calls are bound by host time) are kept, so a repeated shape costs no tensor op.
# Consumers only read these tensors. None is made or kept while tracing, and none made while a
# CUDA graph is captured is kept (it belongs to that graph's pool, which this cache could outlive).
_DENSE_GEOMETRY: dict = {}
_KEEP_ROWS = 1 << 16          # B * TQ up to this: at most 1.5 MiB of int64 per geometry
_KEEP_GEOMETRIES = 16
# A capture reads a kept geometry (made outside any capture) instead of building one: the
# geometry's arange, add, copy and fills were ~6-8 us of a captured CUDA-path decode step on the
# H200 (notes/eager.md, twenty-first session). A graph reads it at every replay, so a geometry
# handed to a capture is pinned for the process: _DENSE_GEOMETRY may drop its entries, this never.
# Small shapes only (decode, small chunks: at most 96 KiB each), and at most this many.
_PINNED_GEOMETRY: dict = {}
_PIN_ROWS = 1 << 12
_PIN_GEOMETRIES = 64


def _dense_geometry(B: int, TQ: int, TK: int, device: torch.device) -> RowGeometry:
    t = torch.arange(TQ, device=device, dtype=torch.int64)
    pos = (t + (TK - TQ)).expand(B, TQ)
    seqlen_k = torch.full((B, TQ), TK, device=device, dtype=torch.int64)
    k_offset = torch.zeros((B, TQ), device=device, dtype=torch.int64)
    return RowGeometry(pos, seqlen_k, k_offset)


def _kept_geometry(B: int, TQ: int, TK: int, device: torch.device) -> RowGeometry | None:
    """The kept geometry of a small dense call (made now where none is), or None where none may be
    used: too many rows, tracing, or a capture that finds none made before it."""
    if B * TQ > _KEEP_ROWS or torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return None
    key = (B, TQ, TK, device)
    geometry = _PINNED_GEOMETRY.get(key)
    if geometry is not None:
        return geometry
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        geometry = _DENSE_GEOMETRY.get(key)
        if geometry is None or B * TQ > _PIN_ROWS or len(_PINNED_GEOMETRY) >= _PIN_GEOMETRIES:
            return None
        _PINNED_GEOMETRY[key] = geometry
        return geometry
    geometry = _DENSE_GEOMETRY.get(key)
    if geometry is None:
        with torch.inference_mode(False):     # usable outside inference mode later on
            geometry = _dense_geometry(B, TQ, TK, device)
            # Kept contiguous, so kernels that need it (.contiguous()) copy nothing per call.
            geometry = RowGeometry(geometry.pos.contiguous(), geometry.seqlen_k,
                                   geometry.k_offset)
        if len(_DENSE_GEOMETRY) >= _KEEP_GEOMETRIES:
            _DENSE_GEOMETRY.clear()
        _DENSE_GEOMETRY[key] = geometry
    return geometry


def row_geometry(call: SelectionCall) -> RowGeometry:
    B, TQ, TK = call.batch, call.seqlen_q, call.seqlen_k
    device = call.device
    if not call.is_varlen:
        return _kept_geometry(B, TQ, TK, device) or _dense_geometry(B, TQ, TK, device)
    t = torch.arange(TQ, device=device, dtype=torch.int64)
    cu_q = call.cu_seqlens_q.to(torch.int64)
    cu_k = call.cu_seqlens_k.to(torch.int64)
    # Sequence of each packed query token; empty sequences are skipped by right=True.
    seq = torch.searchsorted(cu_q[1:], t, right=True)
    len_q = (cu_q[1:] - cu_q[:-1])[seq]
    len_k = (cu_k[1:] - cu_k[:-1])[seq]
    pos = (t - cu_q[seq]) + (len_k - len_q)
    return RowGeometry(pos.unsqueeze(0), len_k.unsqueeze(0), cu_k[seq].unsqueeze(0), seq.unsqueeze(0))


def canonical_blocks(call: SelectionCall, geometry: RowGeometry | None = None):
    """Each row's selected set, sorted ascending, padded with -1 at the end.

    Returns `(blocks [B, TQ, H, S] int32, num_blocks [B, TQ, H] int32)`. An entry survives when it
    is within the row's first `block_counts` entries, `0 <= idx <= pos // block_size` (which also
    implies idx < ceil(TK / block_size), since pos < TK) and the first of its value in the row.

    One kernel launch (`nsa_ext_cuda::canonical_blocks`) where the CUDA extension is loaded, the
    call is on a CUDA device and S <= 32; else `canonical_blocks_torch`, the same function in a
    dozen PyTorch ops (on the H100 ~0.2 ms of GPU time and ~0.4 ms of host time a call, which
    made eager chunked prefill host-bound).
    """
    geometry = geometry or row_geometry(call)
    args = canonical_op_args(call, geometry)
    if args is not None:
        return torch.ops.nsa_ext_cuda.canonical_blocks(*args)
    return canonical_blocks_torch(call, geometry)


def canonical_op_args(call: SelectionCall, geometry: RowGeometry):
    """The arguments of `nsa_ext_cuda::canonical_blocks` (block_indices, pos, block_counts,
    count_limit, block_size) for this call, or None where the operator cannot take it (no
    extension, not CUDA, S = 0 or S > 32). The CUDA backend's one-operator row path
    (`selection_fwd_rows`) takes the same arguments."""
    S = call.num_selected
    if call.device.type != "cuda" or not 0 < S:
        return None
    from . import _ext

    if S > _ext.CANONICAL_MAX_SELECTED or not _ext.available():
        return None
    counts = call.block_counts
    if counts is not None and counts.dtype not in (torch.int32, torch.int64):
        counts = counts.to(torch.int64)
    return (call.block_indices.contiguous(), geometry.pos.contiguous(),
            None if counts is None else counts.contiguous(), call.block_count_limit,
            call.block_size)


def canonical_blocks_torch(call: SelectionCall, geometry: RowGeometry | None = None):
    """`canonical_blocks` in PyTorch ops (any device, any S)."""
    geometry = geometry or row_geometry(call)
    S = call.num_selected
    idx = call.block_indices.to(torch.int64)
    if S == 0:
        empty = torch.zeros(idx.shape[:3], dtype=torch.int32, device=idx.device)
        return idx.to(torch.int32), empty
    last_visible = (geometry.pos // call.block_size)[:, :, None, None]        # [B, TQ, 1, 1]
    entry = torch.arange(S, device=idx.device)
    valid = (idx >= 0) & (idx <= last_visible)
    if call.block_counts is not None:
        valid &= entry < call.block_counts.to(torch.int64).unsqueeze(-1)
    elif call.block_count_limit < S:
        valid &= entry < call.block_count_limit
    # Invalid entries sort to the end; a repeat equals its left neighbour after the sort.
    sentinel = torch.iinfo(torch.int64).max
    ordered = torch.where(valid, idx, sentinel).sort(dim=-1).values
    repeat = torch.zeros_like(valid)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    ordered = torch.where(repeat, sentinel, ordered).sort(dim=-1).values
    kept = ordered != sentinel
    blocks = torch.where(kept, ordered, -1).to(torch.int32)
    return blocks, kept.sum(-1, dtype=torch.int32)
