"""The `tile` schedule: QT neighbouring query tokens of one KV head walk the union of their
canonical rows, each union block loaded once for the tile (triton_ref/selection_tile.py).

QT x GT rows per program (`tile_shape`: about 64 (token, query head) rows, e.g. G = 16: 4 tokens,
G = 1: 64 tokens). Pays off where neighbouring queries chose the same blocks (trained models:
~0.9 Jaccard between adjacent rows); on a random selection the union is nearly QT times a row
and the masked rows cost MMA work for nothing, which the chooser's cost model weighs.
"""
from __future__ import annotations

import torch

from . import Launch, Prepared

NAME = "tile"


def tile_shape(call):
    from triton_ref.selection_tile import tile_shape as shape

    return shape(call.group_size)


def reasons_unsupported(call, settings, facts) -> list:
    return []


def forward(prep: Prepared):
    from triton_ref.selection_tile import selection_tile_fwd

    call = prep.call
    QT, GT = tile_shape(call)
    union = prep.union(QT)
    o, lse, grid = selection_tile_fwd(call.q, call.k, call.v, prep.blocks, prep.num_blocks,
                                      union.starts, union.counts, scale=call.scale,
                                      block_size=call.block_size, tokens_per_tile=QT,
                                      heads_per_tile=GT, pos=prep.pos, k_offset=prep.k_offset,
                                      interpret=prep.interpret)
    return o, lse, Launch("tile", grid, {"tokens_per_tile": QT, "heads_per_tile": GT})


def reads(prep: Prepared, launch: Launch) -> int:
    """Keys the kernel loads: per tile, head tile and union block, the block's keys up to the
    tile's last visible key (its K/V load mask)."""
    call = prep.call
    QT, GT = tile_shape(call)
    union = prep.union(QT)
    B, TQ = prep.geometry.pos.shape
    NT = union.num_tiles
    lim = prep.geometry.k_offset + prep.geometry.pos                   # [B, TQ]
    if NT * QT != TQ:
        lim = torch.cat([lim, torch.full((B, NT * QT - TQ), -1, dtype=lim.dtype,
                                         device=lim.device)], dim=1)
    lim_max = lim.reshape(B, NT, QT).max(-1).values[:, :, None, None]  # [B, NT, 1, 1]
    U = union.starts.shape[-1]
    used = torch.arange(U, device=lim.device) < union.counts[..., None].to(torch.int64)
    keys = (lim_max - union.starts + 1).clamp(0, call.block_size)
    keys = torch.where(used, keys, torch.zeros_like(keys))
    return int(keys.sum().item()) * -(-call.group_size // GT)
