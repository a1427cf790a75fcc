"""Query tiles: the union of each tile's canonical rows, and the overlap statistic made from it.

A tile is QT consecutive query tokens (along q's T axis) of one KV head. Its union is the sorted
list of the distinct blocks any of its rows chose, each named by its first key along k's T axis
(`k_offset + block * block_size`): blocks of different varlen sequences never share a name, so a
tile may straddle a sequence boundary. The tile schedule streams this list; the chooser reads the
statistic `union blocks / selections` (1.0: no two rows of a tile share a block; 1/QT: all
chose the same), measured on a sample of tiles (`sampled_overlap`: the full union's sort is
needed only when the tile schedule runs), to decide whether loading each distinct block once
pays for the masked rows.

On a CUDA device one launch computes them: the extension's `tile_union` operator
(csrc/selection_union.cu: a team of warps per tile sorts its QT * S names in shared memory, keeps
the first of each run, scans, counts) or Triton's (triton_ref/tile_union.py, the same function):
the extension's in small calls, where Triton's launcher (~0.1 ms of host time) would decide the
call's time, and where Triton is missing; Triton's past EXTENSION_UNION_MAX_TILES tiles, where
its kernel measured faster. Elsewhere, and past those kernels' width, PyTorch ops compute the
same: one sort of B * TQ * H * S int64 keys in segments of QT * S, a cumulative sum and a
scatter (~12 launches). All three take sizes from shapes only (no host
synchronisation, no data-dependent allocation). Memory: the union is as large as the canonical
rows in int64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..call import SelectionCall
from ..device import on_device
from ..selection import RowGeometry

_NONE = torch.iinfo(torch.int64).max     # sorts after every real key


@dataclass(frozen=True)
class TileUnion:
    starts: torch.Tensor   # [B, NT, H, U] int64: first keys of the union's blocks, ascending
    counts: torch.Tensor   # [B, NT, H] int32: union size per tile
    tokens_per_tile: int   # QT
    # int64 [2] on the device: (selections, union blocks) of the whole call, where the union's
    # launch summed them (the chooser reads it); None from the PyTorch ops
    totals: Optional[torch.Tensor] = None

    @property
    def num_tiles(self) -> int:
        return self.starts.shape[1]


def _tile_keys(call: SelectionCall, geometry: RowGeometry, blocks: torch.Tensor, QT: int,
               stride: int = 1) -> torch.Tensor:
    """[B, NT / stride, H, QT * S] int64: every `stride`-th tile's block names, unsorted."""
    B, TQ, H, S = blocks.shape
    NT = -(-TQ // QT)
    blk = blocks.to(torch.int64)
    start = torch.where(blk >= 0, geometry.k_offset[:, :, None, None] + blk * call.block_size,
                        _NONE)
    if NT * QT != TQ:
        pad = torch.full((B, NT * QT - TQ, H, S), _NONE, dtype=torch.int64, device=blk.device)
        start = torch.cat([start, pad], dim=1)
    tiles = start.reshape(B, NT, QT, H, S)[:, ::stride]
    return tiles.permute(0, 1, 3, 2, 4).reshape(B, tiles.shape[1], H, QT * S)


def _extension_launch(blocks: torch.Tensor, tokens_per_tile: int) -> bool:
    """Does the extension's tile_union operator serve these canonical rows?"""
    from .. import _ext

    return (blocks.is_cuda and blocks.shape[-1] > 0 and
            tokens_per_tile * blocks.shape[-1] <= _ext.UNION_MAX_WIDTH and _ext.has_tile_union())


def _triton_launch(blocks: torch.Tensor, tokens_per_tile: int) -> bool:
    """Does triton_ref.tile_union serve these canonical rows (a CUDA device, a tile's QT * S
    entries within what one program sorts)?"""
    if not blocks.is_cuda or blocks.shape[-1] == 0:
        return False
    try:
        from triton_ref.tile_union import MAX_WIDTH
    except ImportError:
        return False
    return tokens_per_tile * blocks.shape[-1] <= MAX_WIDTH


def _one_launch(blocks: torch.Tensor, tokens_per_tile: int) -> bool:
    """Does one launch (the extension's or Triton's) serve these canonical rows?"""
    return _extension_launch(blocks, tokens_per_tile) or _triton_launch(blocks, tokens_per_tile)


# Where both launches serve, the extension's up to this many tiles (B * NT * H), Triton's past it.
# H200 (thirteenth session, notes/schedules.md): at model 32k, G = 16 (32768 tiles) the extension's
# kernel took 48.7 us against Triton's 39.1; in small calls the GPU time is a few us either way and
# the host's launch cost decides, where Triton's launcher costs ~0.1 ms.
EXTENSION_UNION_MAX_TILES = 4096


# The chooser computes the whole union before its host sync (the tile kernel's own input, then
# ready the moment tile is chosen) when it is at most this large; past it, a sample of tiles.
UNION_BEFORE_SYNC_BYTES = 64 << 20


def union_before_sync(blocks: torch.Tensor, tokens_per_tile: int) -> bool:
    """Should the chooser read its statistic off the full union (one launch, launched before the
    sync, kept for the tile schedule) rather than a sample? On CUDA, within one program's width
    and UNION_BEFORE_SYNC_BYTES of int64 names (T = 128k at H = 4, S = 16)."""
    return _one_launch(blocks, tokens_per_tile) and \
        blocks.numel() * 8 <= UNION_BEFORE_SYNC_BYTES


def union_launcher(blocks: torch.Tensor, tokens_per_tile: int) -> str:
    """Which computes these rows' unions: "extension", "triton" or "torch" (see the docstring)."""
    triton = _triton_launch(blocks, tokens_per_tile)
    if _extension_launch(blocks, tokens_per_tile):
        B, TQ, H, _ = blocks.shape
        if not triton or B * -(-TQ // tokens_per_tile) * H <= EXTENSION_UNION_MAX_TILES:
            return "extension"
    return "triton" if triton else "torch"


def tile_unions(call: SelectionCall, geometry: RowGeometry, blocks: torch.Tensor,
                tokens_per_tile: int) -> TileUnion:
    """The union of every tile of `tokens_per_tile` tokens' canonical rows `blocks [B, TQ, H, S]`."""
    launcher = union_launcher(blocks, tokens_per_tile)
    if launcher == "extension":
        totals = torch.zeros(2, dtype=torch.int64, device=blocks.device)
        starts, counts = torch.ops.nsa_ext_cuda.tile_union(
            blocks.contiguous(), geometry.k_offset.to(torch.int64).contiguous(), call.block_size,
            tokens_per_tile, totals)
        return TileUnion(starts, counts, tokens_per_tile, totals)
    if launcher == "triton":
        from triton_ref.tile_union import tile_union

        totals = torch.zeros(2, dtype=torch.int64, device=blocks.device)
        with on_device(blocks.device):     # Triton launches on the current device
            starts, counts, _ = tile_union(blocks, geometry.k_offset, call.block_size,
                                           tokens_per_tile, totals=totals)
        return TileUnion(starts, counts, tokens_per_tile, totals)
    return tile_unions_torch(call, geometry, blocks, tokens_per_tile)


def tile_unions_torch(call: SelectionCall, geometry: RowGeometry, blocks: torch.Tensor,
                      tokens_per_tile: int) -> TileUnion:
    """`tile_unions` in PyTorch ops (any device, any width)."""
    B, TQ, H, S = blocks.shape
    QT = tokens_per_tile
    NT = -(-TQ // QT)
    width = QT * S
    if S == 0:
        return TileUnion(torch.zeros(B, NT, H, 1, dtype=torch.int64, device=blocks.device),
                         torch.zeros(B, NT, H, dtype=torch.int32, device=blocks.device), QT)
    keys = _tile_keys(call, geometry, blocks, QT)
    keys = keys.sort(dim=-1).values
    keep = keys != _NONE
    keep[..., 1:] &= keys[..., 1:] != keys[..., :-1]          # first of each value
    slot = torch.where(keep, keep.cumsum(-1) - 1, width)      # dropped ones go past the end
    union = torch.full((B, NT, H, width + 1), _NONE, dtype=torch.int64, device=keys.device)
    union.scatter_(-1, slot, keys)
    counts = keep.sum(-1, dtype=torch.int32)
    return TileUnion(union[..., :width].contiguous(), counts, QT)


def overlap_ratio(union: TileUnion, num_blocks: torch.Tensor) -> torch.Tensor:
    """Union blocks over selections, summed over the call (0-d fp32 tensor on the device; 1.0
    where nothing was selected). Reading it costs a host synchronisation."""
    selections = num_blocks.sum(dtype=torch.int64)
    unions = union.counts.sum(dtype=torch.int64)
    return torch.where(selections > 0, unions / selections.clamp(min=1), 1.0).float()


def sampled_overlap(call: SelectionCall, geometry: RowGeometry, blocks: torch.Tensor,
                    num_blocks: torch.Tensor, tokens_per_tile: int,
                    sample_tiles: int = 256) -> torch.Tensor:
    """[3] int64 on the device: (selections in the call, union blocks of a sample of tiles,
    selections of those tiles). The sample is every k-th tile, k chosen for about
    `sample_tiles` tiles per (batch, KV head): the chooser's statistic at a fraction of the
    full union's sort (which only the tile schedule itself needs)."""
    B, TQ, H, S = blocks.shape
    QT = tokens_per_tile
    NT = -(-TQ // QT)
    stride = max(1, NT // sample_tiles)
    total = num_blocks.sum(dtype=torch.int64)
    if S == 0:
        return torch.stack([total, total, total])
    if _triton_launch(blocks, QT):
        from triton_ref.tile_union import tile_union

        with on_device(blocks.device):
            _, counts, selections = tile_union(blocks, geometry.k_offset, call.block_size, QT,
                                               stride=stride, store=False)
        return torch.stack([total, counts.sum(dtype=torch.int64),
                            selections.sum(dtype=torch.int64)])
    keys = _tile_keys(call, geometry, blocks, QT, stride).sort(dim=-1).values
    first = keys != _NONE
    first[..., 1:] &= keys[..., 1:] != keys[..., :-1]
    counts = num_blocks.to(torch.int64)
    if NT * QT != TQ:
        counts = torch.cat([counts, counts.new_zeros(B, NT * QT - TQ, H)], dim=1)
    sampled = counts.reshape(B, NT, QT, H)[:, ::stride].sum()
    return torch.stack([total, first.sum(dtype=torch.int64), sampled])
