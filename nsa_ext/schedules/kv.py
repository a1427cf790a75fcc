"""The `kv` schedule: one program per (KV block, KV head, chunk of the queries that chose it)
writing partial outputs, then a merge per query in a fixed order (triton_ref/selection_kv.py).

Built on the inverse index (`nsa_ext.inverse_index`: the same builder as the KV-outer backward)
and its work items of PER_ITEM tokens (`item_shape`: about 64 (token, query head) rows, e.g.
G = 1: 64 tokens, G = 4: 16). Each partial is written at its entry's place in the canonical rows
(the index's `entries`), so the merge reads a row's partials side by side, in the row's
canonical order: deterministic, no atomics.

Scratch: (B * TQ * H * S) * G * (Dv + 1) fp32, sized by shapes (the index's capacity), not by
the data; a call needing more than KV_SCRATCH_LIMIT is not served. Pays off for small G, where a
query row is much smaller than the block it reads (G = 1: q 256 B + partial 516 B in and out vs
a 32 KiB block, bf16 D = 128, block 64).
"""
from __future__ import annotations

import torch

from ..inverse_index import build_inverse_index, work_items
from . import Launch, Prepared

NAME = "kv"
KV_SCRATCH_LIMIT = 32 << 30     # bytes of fp32 partials


def item_shape(call):
    from triton_ref.selection_kv import item_shape as shape

    return shape(call.group_size)


def scratch_bytes(call) -> int:
    capacity = call.batch * call.seqlen_q * call.num_heads_kv * call.num_selected
    return capacity * call.group_size * (call.head_dim_v + 1) * 4


def reasons_unsupported(call, settings, facts) -> list:
    need = scratch_bytes(call)
    if need > KV_SCRATCH_LIMIT:
        return [f"its partial outputs need {need / (1 << 30):.1f} GiB of fp32 scratch "
                f"(B*TQ*H*S*G*(Dv+1)*4), over the {KV_SCRATCH_LIMIT >> 30} GiB limit"]
    return []


def _parts(prep: Prepared):
    if "kv" not in prep.cache:
        call = prep.call
        index = build_inverse_index(call, prep.geometry, prep.blocks, prep.num_blocks)
        per_item, _ = item_shape(call)
        items = work_items(index, per_item, interpret=prep.interpret)
        prep.cache["kv"] = (index, items)
    return prep.cache["kv"]


def forward(prep: Prepared):
    from triton_ref.selection_kv import selection_kv_fwd

    call = prep.call
    index, items = _parts(prep)
    _, GT = item_shape(call)
    o, lse, grid = selection_kv_fwd(
        call.q, call.k, call.v, prep.num_blocks, index.tokens, index.entries, items,
        index.slot_key_start, index.slot_key_end, scale=call.scale, block_size=call.block_size,
        slots=index.slots, num_buckets=index.num_buckets, heads_per_tile=GT, pos=prep.pos,
        k_offset=prep.k_offset, interpret=prep.interpret)
    return o, lse, Launch("kv", grid, {"per_item": items.per_item, "heads_per_tile": GT})


def reads(prep: Prepared, launch: Launch) -> int:
    """Keys the kernel loads: per used item and head tile, the block's keys up to the last
    visible key of the item's last (largest) token, within the block's sequence."""
    call = prep.call
    index, items = _parts(prep)
    _, GT = item_shape(call)
    used = items.bucket < index.num_buckets
    if not bool(used.any()):
        return 0
    bucket = items.bucket[used].to(torch.int64)
    slot = bucket % index.slots
    b = bucket // (index.slots * index.heads)
    last_token = index.tokens[items.end[used] - 1].to(torch.int64)
    lim = (prep.geometry.k_offset + prep.geometry.pos)[b, last_token]
    lim = torch.minimum(lim, index.slot_key_end[slot] - 1)
    keys = (lim - index.slot_key_start[slot] + 1).clamp(0, call.block_size)
    return int(keys.sum().item()) * -(-call.group_size // GT)
