"""The `row` schedule: the group-centric kernel (or per-head, NSA_SEL_TRITON_GROUP=0) of
triton_ref/selection_fwd.py, one program per (query token, KV head[, tile of 64 query heads]).

Serves every call the Triton backend serves. Each row reads its own selected blocks, so its K/V
traffic is the selection itself whatever the overlap between rows (the bench's `floor/row`).
Small calls (decode) take the split-KV kernel instead; the backend decides that before any
schedule runs, from shapes alone.
"""
from __future__ import annotations

import torch

from . import Launch, Prepared

NAME = "row"


def reasons_unsupported(call, settings, facts) -> list:
    return []


def forward(prep: Prepared):
    from triton_ref.selection_fwd import selection_fwd

    call = prep.call
    group = prep.settings.sel_triton_group
    o, lse, grid = selection_fwd(call.q, call.k, call.v, prep.blocks, prep.num_blocks,
                                 scale=call.scale, block_size=call.block_size, pos=prep.pos,
                                 k_offset=prep.k_offset, group=group, interpret=prep.interpret)
    return o, lse, Launch("group" if group else "head", grid)


def reads(prep: Prepared, launch: Launch) -> int:
    """Visible keys of every selected block, once per row and head tile (group) or query head."""
    from triton_ref.selection_fwd import group_tile

    call = prep.call
    bs = call.block_size
    start = prep.blocks.to(torch.int64) * bs
    visible = (prep.geometry.pos[:, :, None, None] - start + 1).clamp(max=bs)
    visible = torch.where(prep.blocks >= 0, visible, torch.zeros_like(visible))
    G = call.group_size
    copies = -(-G // group_tile(G)) if launch.variant == "group" else G
    return int(visible.sum().item()) * copies
