"""Selection attention, forward, KV-outer schedule: each block is loaded once per chunk of the
queries that chose it, partial results merged per query in a fixed order (no atomics).

Two kernels over the inverse index (`nsa_ext.inverse_index`: per bucket = (batch, KV head, block
slot) the query tokens that chose the block, ascending, cut into work items of at most PER_ITEM
tokens by `work_items`):

- `selection_kv_kernel`: one program per (work item, tile of up to GT of the KV head's G query
  heads). Its rows are the item's tokens x GT heads (BM = PER_ITEM * GT padded to a power of two
  >= 16). It gathers the rows' queries [BM, Dk], streams the block's K [BS, Dk] / V [BS, Dv]
  once (each row masked by its own causal limit), and writes per (canonical entry, query head)
  the block's normalised partial output o_part [B*TQ*H*S, G, Dv] fp32 and its log2-domain lse
  lse_part [B*TQ*H*S, G] fp32, at the entry's place in the canonical rows (the index's
  `entries`: ((b * TQ + t) * H + h) * S + s). Every row of an item chose
  the block, and a canonical row's block holds a key its query sees, so every stored partial has
  a finite lse. Unused items (the grid is sized by the bound) return at once.
- `selection_kv_merge_kernel`: one program per (query token, KV head, tile of query heads). It
  walks the row's canonical blocks in their order (ascending), whose partials lie side by side
  (the row's S entries), and combines them through their lse. The order of the sums is fixed by the canonical row, so a run gives the same
  bits every time. Writes o [B, TQ, HQ, Dv] in q's dtype and lse [B, TQ, HQ] fp32 (natural log;
  o = 0 and lse = -inf for an empty row).

Traffic per (query, selected block): Dk * G query elements in, Dv * G + G fp32 partials out and
back in the merge; the K/V block itself once per item instead of once per query (the row
schedule's 2 * BLOCK * D elements per pair). Offsets are 64-bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .selection_fwd import LOG2E, LN2, _HEURISTICS, _interpreted, group_tile
from .selection_fwd import LARGE_PROGRAMS, autotune, autotuned
from .selection_tile import (ROWS_CONFIGS, attend_chunk_rows, chunk_size, load_q_rows,
                             prune_rows_configs, rows_block)

ITEM_ROWS = 64       # (token, head) rows per KV-outer program: the M of its dots


def item_shape(G: int, rows: int = ITEM_ROWS):
    """(PER_ITEM tokens per work item, GT heads per head tile): GT = min(G, rows),
    PER_ITEM = rows // GT (at least 1)."""
    GT = min(G, rows)
    return max(1, rows // GT), GT


@triton.heuristics({
    **_HEURISTICS,
    "BM": lambda args: rows_block(args["PER_ITEM"], args["GT"]),
    "BS": lambda args: chunk_size(args["BLOCK"], args["K"], args["V"]),
    "LARGE": lambda args: autotuned(args["item_bucket"].numel(), LARGE_PROGRAMS,
                                    args["q"].dtype),
})
@autotune(configs=ROWS_CONFIGS, key=["BLOCK", "BK", "BV", "BM", "LARGE"],
          prune_configs_by={"early_config_prune": prune_rows_configs})
@triton.jit(do_not_specialize=["TQ", "TK", "H", "G", "SLOTS", "NUM_BUCKETS"])
def selection_kv_kernel(
    q, k, v, o_part, lse_part,
    tokens,            # [capacity] int32: the index's query tokens, ascending per bucket
    entries,           # [capacity] int32/int64: each listed token's canonical entry
    item_bucket,       # [max_items] int32 (NUM_BUCKETS: unused item)
    item_start, item_end,   # [max_items] int64: the item's entries tokens[start:end]
    slot_key_start, slot_key_end,   # [SLOTS] int64: the slot's first key / its sequence's end
    pos, k_offset,     # [B, TQ] int64 each (varlen only; None otherwise)
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    qk_scale,
    TQ, TK, H, G, SLOTS, NUM_BUCKETS,
    K: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr, PER_ITEM: tl.constexpr,
    GT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, LARGE: tl.constexpr,
):
    i_item = tl.program_id(0).to(tl.int64)
    i_g = tl.program_id(1)
    bucket = tl.load(item_bucket + i_item).to(tl.int64)
    if bucket >= NUM_BUCKETS:          # an unused item (the grid is sized by the bound)
        return
    slot = bucket % SLOTS
    i_bh = bucket // SLOTS
    i_h = i_bh % H
    i_b = i_bh // H
    e0 = tl.load(item_start + i_item)
    e1 = tl.load(item_end + i_item)
    NC: tl.constexpr = (BLOCK + BS - 1) // BS

    # [BM] rows: the item's tokens (entries e0 .. e1 - 1), GT heads each, token-major.
    r = tl.arange(0, BM)
    r_tok = r // GT
    g = i_g * GT + r % GT
    e = e0 + r_tok
    valid = (r_tok < PER_ITEM) & (e < e1) & (g < G)
    t = tl.load(tokens + e, mask=valid, other=0).to(tl.int64)
    entry = tl.load(entries + e, mask=valid, other=0).to(tl.int64)
    tok = i_b * TQ + t
    if IS_VARLEN:
        p_abs = tl.load(pos + tok, mask=valid, other=-1)
        kv0 = tl.load(k_offset + tok, mask=valid, other=0)
    else:
        p_abs = t + TK - TQ
        kv0 = t * 0
    lim = tl.where(valid, kv0 + p_abs, -1)            # last visible key along k's T axis
    key0 = tl.load(slot_key_start + slot)
    key_end = tl.load(slot_key_end + slot)
    lim_max = tl.minimum(tl.max(lim, 0), key_end - 1)
    heads = i_h * G + g

    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_s = tl.arange(0, BS)
    b_q = load_q_rows(q, i_b, t, heads, valid, stride_qb, stride_qt, stride_qh, o_k, K)
    k_base = k + i_b * stride_kb + i_h * stride_kh
    v_base = v + i_b * stride_vb + i_h * stride_vh

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    for c in range(NC):
        o_j = c * BS + o_s
        j = key0 + o_j                                   # [BS] keys along k's T axis
        m_load = (j <= lim_max) & (o_j < BLOCK)
        m_s = m_load[None, :] & (j[None, :] <= lim[:, None])
        m_i, l_i, acc = attend_chunk_rows(b_q, k_base, v_base, j, m_load, m_s, o_k, o_v,
                                          stride_kt, stride_vt, qk_scale, m_i, l_i, acc, K, V,
                                          DOT_PRECISION)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    b_o = acc / l_safe[:, None]
    b_lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
    part = entry * G + g                              # [BM] (entry, head) rows of the scratch
    tl.store(o_part + part[:, None] * V + o_v[None, :], b_o,
             mask=valid[:, None] & (o_v < V)[None, :])
    tl.store(lse_part + part, b_lse, mask=valid)


@triton.heuristics({
    "BV": lambda args: max(16, triton.next_power_of_2(args["V"])),
    "BG": lambda args: group_tile(args["G"]),
})
@triton.jit(do_not_specialize=["H", "G", "S"])
def selection_kv_merge_kernel(
    o, lse, o_part, lse_part,
    num_blocks,        # [B, TQ, H] int32
    H, G, S,
    V: tl.constexpr, BV: tl.constexpr, BG: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)               # (b, t, KV head), as canonical rows
    i_g = tl.program_id(1)
    tok = row // H
    i_h = row % H
    n = tl.load(num_blocks + row)
    g = i_g * BG + tl.arange(0, BG)
    m_g = g < G
    o_v = tl.arange(0, BV)
    m_gv = m_g[:, None] & (o_v < V)[None, :]

    m_i = tl.full([BG], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BG], dtype=tl.float32)
    acc = tl.zeros([BG, BV], dtype=tl.float32)
    for s in range(n):                                # the row's blocks, ascending: fixed order
        part = (row * S + s) * G + g
        b_lse = tl.load(lse_part + part, mask=m_g, other=float("-inf"))
        b_o = tl.load(o_part + part[:, None] * V + o_v[None, :], mask=m_gv, other=0.0)
        m_new = tl.maximum(m_i, b_lse)
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.math.exp2(m_i - m_use)
        w = tl.math.exp2(b_lse - m_use)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + b_o * w[:, None]
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    heads = i_h * G + g
    out = tok * (H * G) + heads
    tl.store(o + out[:, None] * V + o_v[None, :], (acc / l_safe[:, None]).to(o.dtype.element_ty),
             mask=m_gv)
    tl.store(lse + out, tl.where(l_i > 0, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf")),
             mask=m_g)


def selection_kv_fwd(q, k, v, num_blocks, tokens, entries, items, slot_key_start,
                     slot_key_end, *, scale: float, block_size: int, slots: int,
                     num_buckets: int, heads_per_tile: int, pos=None, k_offset=None,
                     interpret: bool = False):
    """Launch the KV-outer kernel and its merge. Returns (o, lse, grid of the first kernel).

    q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv] (last dim contiguous); num_blocks
    [B, TQ, H] int32 canonical counts; tokens, entries, items, slot_key_start/end, slots,
    num_buckets from `build_inverse_index` / `work_items` (items of `items.per_item` tokens);
    pos, k_offset [B, TQ] int64 for varlen.
    Scratch: (B * TQ * H * S * G) * (Dv + 1) fp32 for the partials.
    """
    B, TQ, HQ, Dk = q.shape
    _, TK, H, Dv = v.shape
    G = HQ // H
    S = tokens.numel() // max(B * TQ * H, 1)
    GT = heads_per_tile
    capacity = tokens.numel()
    if pos is not None:
        pos = pos.to(torch.int64).contiguous()
        k_offset = k_offset.to(torch.int64).contiguous()
    o_part = torch.empty((max(capacity, 1) * G, Dv), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((max(capacity, 1) * G,), dtype=torch.float32, device=q.device)
    o = torch.empty((B, TQ, HQ, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, TQ, HQ), dtype=torch.float32, device=q.device)
    grid = (items.max_items, triton.cdiv(G, GT))
    kernel = _interpreted(selection_kv_kernel) if interpret else selection_kv_kernel
    if items.max_items > 0:
        kernel[grid](
            q, k, v, o_part, lse_part, tokens, entries, items.bucket, items.start, items.end,
            slot_key_start, slot_key_end, pos, k_offset,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            scale * LOG2E,
            TQ, TK, H, G, slots, num_buckets,
            K=Dk, V=Dv, BLOCK=block_size, PER_ITEM=items.per_item, GT=GT,
        )
    merge = _interpreted(selection_kv_merge_kernel) if interpret else selection_kv_merge_kernel
    merge[(B * TQ * H, triton.cdiv(G, group_tile(G)))](
        o, lse, o_part, lse_part, num_blocks.contiguous(), H, G, S, V=Dv,
        num_warps=4)
    return o, lse, grid


__all__ = ["selection_kv_fwd", "selection_kv_kernel", "selection_kv_merge_kernel", "item_shape",
           "ITEM_ROWS"]
