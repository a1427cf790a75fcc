"""Selection attention, forward, query-tile schedule: neighbouring queries share each block load.

One program per (batch, tile of QT consecutive query tokens, KV head, tile of up to GT of that
head's G query heads): its rows are the QT x GT (token, query head) pairs, BM = QT * GT padded to
a power of two >= 16 (tl.dot's smallest M). It loads the rows' queries [BM, Dk] once, then walks
the *union* of the tile's canonical rows (sorted ascending, each block once; made by the pre-pass
`nsa_ext.schedules.tiles.tile_unions`) and for each union block streams K [BS, Dk] and V [BS, Dv]
once for all BM rows. A row that did not choose the block is masked out of it (membership), and
each row keeps its own causal limit. So a tile whose queries chose overlapping blocks reads each
distinct block once instead of once per query, at the price of masked MMA rows for blocks only
some of its queries chose (the chooser in nsa_ext/schedules weighs the two).

Membership without a search: the union and every canonical row are sorted, so each row keeps a
cursor into its own row; a union block is the row's iff it equals the block under the row's
cursor, and the cursor then moves on. The K/V loads depend only on the union entry (read from
memory, not from the cursors), so the compiler can pipeline them as in the row schedule.

Blocks are named by the position of their first key along k's T axis (`k_offset + n * BLOCK`),
which makes a tile that straddles a varlen sequence boundary correct as it is: blocks of
different sequences never compare equal, and each row's causal limit is an absolute key index.

Writes o [B, TQ, HQ, Dv] in q's dtype and lse [B, TQ, HQ] fp32 (natural log; o = 0 and lse = -inf
for a row that attends to no key). Offsets are 64-bit.

`attend_chunk_rows` (one online-softmax step with a per-row mask) is shared with the KV-outer
schedule (selection_kv.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .selection_fwd import (LOG2E, LN2, LARGE_PROGRAMS, _HEURISTICS, _interpreted, autotune,
                            autotuned)

TILE_ROWS = 64       # (token, head) rows per tile program: the M of its dots
# Large launches try 4 and 8 warps (ptxas for sm_90, BM = 64, D = 128: 255 registers either
# way, 32 bytes of spills with 4 warps and none with 8), with two to four copy stages: the
# software pipeline keeps num_stages - 1 blocks' K/V copies in flight per program, and the union
# walk is bound by copies in flight (notes/schedules.md). Built for sm_90 here (Triton 3.8, no
# GPU): d128 takes 80 / 112 / 144 KB of shared memory at 2 / 3 / 4 stages, so 4 warps x 3 stages
# still fit two programs per SM; configs that do not fit are dropped by the autotuner. Small
# launches and launches inside a CUDA-graph capture take the first config, untuned.
ROWS_CONFIGS = [triton.Config({}, num_warps=w, num_stages=st)
                for w, st in ((4, 2), (8, 2), (4, 3), (8, 3), (8, 4))]


def prune_rows_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    q = args["q"]
    if not args["LARGE"] or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return configs[:1]
    return configs


def tile_shape(G: int, rows: int = TILE_ROWS):
    """(QT tokens per tile, GT heads per head tile) for group size G: GT = min(G, rows) heads,
    QT = rows // GT tokens (at least 1), so QT * GT <= rows (G = 3: 21 x 3 = 63 rows)."""
    GT = min(G, rows)
    return max(1, rows // GT), GT


def rows_block(QT: int, GT: int) -> int:
    """BM: the rows padded to a power of two, at least 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(QT * GT))


def chunk_size(block_size: int, K: int, V: int) -> int:
    """BS: keys per step; a whole block up to 64 keys (32 beside a 256-wide head tile)."""
    widest = max(triton.next_power_of_2(K), triton.next_power_of_2(V))
    return max(16, min(block_size, 64 if widest <= 128 else 32))


@triton.jit
def attend_chunk_rows(b_q, k_base, v_base, j, m_load, m_s, o_k, o_v, stride_kt, stride_vt,
                      qk_scale, m_i, l_i, acc, K: tl.constexpr, V: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """One online-softmax step of rows b_q [BM, BK] over keys j [BS]: loads K [BS, BK] and
    V [BS, BV] where m_load [BS] (masked keys read nothing) and attends where m_s [BM, BS].
    A row may see no key in a step while its running max is still -inf (it did not choose this
    block, or not yet any), so -inf - -inf is kept away from exp2 (m_use)."""
    b_k = tl.load(k_base + j[:, None] * stride_kt + o_k[None, :],
                  mask=m_load[:, None] & (o_k < K)[None, :], other=0.0)
    b_v = tl.load(v_base + j[:, None] * stride_vt + o_v[None, :],
                  mask=m_load[:, None] & (o_v < V)[None, :], other=0.0)
    # [BM, BS]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale
    b_s = tl.where(m_s, b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.math.exp2(m_i - m_use)
    b_p = tl.math.exp2(b_s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(b_p, 1)
    # [BM, BV]
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def tile_rows(i_b, t0, i_g, TQ, TK, QT: tl.constexpr, GT: tl.constexpr, G, BM: tl.constexpr,
              pos, k_offset, IS_VARLEN: tl.constexpr):
    """The rows [BM] of a program whose tokens start at t0 (token-major, GT heads each):
    (t, g, valid, tok, kv0, lim) with t the token along q's T axis, g the query head within the
    group, tok = i_b * TQ + t, kv0 the token's sequence's first key and lim its last visible key
    along k's T axis (-1 for padding rows)."""
    r = tl.arange(0, BM)
    r_tok = r // GT
    g = i_g * GT + r % GT
    t = t0 + r_tok
    valid = (r_tok < QT) & (t < TQ) & (g < G)
    tok = i_b * TQ + t
    if IS_VARLEN:
        p_abs = tl.load(pos + tok, mask=valid, other=-1)
        kv0 = tl.load(k_offset + tok, mask=valid, other=0)
    else:
        p_abs = t + TK - TQ
        kv0 = t * 0
    lim = tl.where(valid, kv0 + p_abs, -1)
    return t, g, valid, tok, kv0, lim


@triton.jit
def load_q_rows(q, i_b, t, heads, valid, stride_qb, stride_qt, stride_qh, o_k, K: tl.constexpr):
    """[BM, BK] queries of rows (token t, query head `heads`) of batch i_b: padding rows (not
    `valid`) are zeros, harmless in the dots and never stored. Shared with selection_kv.py."""
    return tl.load(q + i_b * stride_qb + t[:, None] * stride_qt + heads[:, None] * stride_qh
                   + o_k[None, :], mask=valid[:, None] & (o_k < K)[None, :], other=0.0)


@triton.heuristics({
    **_HEURISTICS,
    "BM": lambda args: rows_block(args["QT"], args["GT"]),
    "BS": lambda args: chunk_size(args["BLOCK"], args["K"], args["V"]),
    "LARGE": lambda args: autotuned(args["union_count"].numel(), LARGE_PROGRAMS,
                                    args["q"].dtype),
})
@autotune(configs=ROWS_CONFIGS, key=["BLOCK", "BK", "BV", "BM", "LARGE"],
          prune_configs_by={"early_config_prune": prune_rows_configs})
@triton.jit(do_not_specialize=["TQ", "TK", "S", "H", "G", "U", "NT"])
def selection_tile_kernel(
    q, k, v, o, lse,
    blocks,            # [B, TQ, H, S] int32, canonical rows
    num_blocks,        # [B, TQ, H] int32
    union,             # [B, NT, H, U] int64: first keys of the tile's union blocks, ascending
    union_count,       # [B, NT, H] int32
    pos, k_offset,     # [B, TQ] int64 each (varlen only; None otherwise)
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    qk_scale,          # scale * log2(e)
    TQ, TK, S, H, G, U, NT,
    K: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr, QT: tl.constexpr, GT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, LARGE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)       # (batch, KV head, tile), tile fastest
    i_g = tl.program_id(1)
    i_tile = pid % NT
    i_bh = pid // NT
    i_b = i_bh // H
    i_h = i_bh % H
    NC: tl.constexpr = (BLOCK + BS - 1) // BS
    t, g, valid, tok, kv0, lim = tile_rows(i_b, i_tile * QT, i_g, TQ, TK, QT, GT, G, BM, pos,
                                           k_offset, IS_VARLEN)
    lim_max = tl.max(lim, 0)
    heads = i_h * G + g

    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_s = tl.arange(0, BS)
    b_q = load_q_rows(q, i_b, t, heads, valid, stride_qb, stride_qt, stride_qh, o_k, K)
    # Keys are addressed along k's T axis (kv0 is folded into the block starts).
    k_base = k + i_b * stride_kb + i_h * stride_kh
    v_base = v + i_b * stride_vb + i_h * stride_vh

    # Each row's cursor into its canonical row and the first key of the block under it.
    row_blocks = blocks + (tok * H + i_h) * S                       # [BM] pointers
    n_row = tl.load(num_blocks + tok * H + i_h, mask=valid, other=0)
    cursor = tl.zeros([BM], dtype=tl.int32)
    blk = tl.load(row_blocks, mask=n_row > 0, other=-1).to(tl.int64)
    head = tl.where(blk >= 0, kv0 + blk * BLOCK, -2)

    tile_union = union + ((i_b * NT + i_tile) * H + i_h) * U
    n_union = tl.load(union_count + (i_b * NT + i_tile) * H + i_h)

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    for it in range(n_union * NC):
        if NC == 1:
            start = tl.load(tile_union + it)
            o_j = o_s
        else:
            start = tl.load(tile_union + it // NC)
            o_j = (it % NC) * BS + o_s
        j = start + o_j                                  # [BS] keys along k's T axis
        m_load = j <= lim_max
        if BS > BLOCK:
            m_load = m_load & (o_j < BLOCK)
        member = head == start                           # [BM]
        m_s = member[:, None] & (j[None, :] <= lim[:, None]) & m_load[None, :]
        m_i, l_i, acc = attend_chunk_rows(b_q, k_base, v_base, j, m_load, m_s, o_k, o_v,
                                          stride_kt, stride_vt, qk_scale, m_i, l_i, acc, K, V,
                                          DOT_PRECISION)
        # After a block's last chunk its rows move on to their next block.
        if NC == 1:
            cursor += member.to(tl.int32)
        else:
            cursor += (member & (it % NC == NC - 1)).to(tl.int32)
        blk = tl.load(row_blocks + cursor, mask=cursor < n_row, other=-1).to(tl.int64)
        head = tl.where(blk >= 0, kv0 + blk * BLOCK, -2)

    # Empty rows: l_i == 0, acc == 0 -> o = 0, lse = -inf.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    b_o = acc / l_safe[:, None]
    b_lse = tl.where(l_i > 0, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    p_o = o + i_b * stride_ob + t[:, None] * stride_ot + heads[:, None] * stride_oh + o_v[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=valid[:, None] & (o_v < V)[None, :])
    tl.store(lse + tok * (H * G) + heads, b_lse, mask=valid)


def selection_tile_fwd(q, k, v, blocks, num_blocks, union, union_count, *, scale: float,
                       block_size: int, tokens_per_tile: int, heads_per_tile: int,
                       pos=None, k_offset=None, interpret: bool = False):
    """Launch the tile kernel. Returns (o, lse, grid).

    q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv] (last dim contiguous); blocks
    [B, TQ, H, S] int32 and num_blocks [B, TQ, H] int32 canonical; union [B, NT, H, U] int64 and
    union_count [B, NT, H] int32 from `tile_unions` with the same `tokens_per_tile` (QT);
    `heads_per_tile` (GT) query heads per program; pos, k_offset [B, TQ] int64 for varlen.
    """
    B, TQ, HQ, Dk = q.shape
    _, TK, H, Dv = v.shape
    G = HQ // H
    S = blocks.shape[-1]
    NT, U = union.shape[1], union.shape[3]
    QT, GT = tokens_per_tile, heads_per_tile
    blocks = blocks.contiguous()
    num_blocks = num_blocks.contiguous()
    if pos is not None:
        pos = pos.to(torch.int64).contiguous()
        k_offset = k_offset.to(torch.int64).contiguous()
    o = torch.empty((B, TQ, HQ, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, TQ, HQ), dtype=torch.float32, device=q.device)
    grid = (B * H * NT, triton.cdiv(G, GT))
    kernel = _interpreted(selection_tile_kernel) if interpret else selection_tile_kernel
    kernel[grid](
        q, k, v, o, lse, blocks, num_blocks, union.contiguous(), union_count.contiguous(),
        pos, k_offset,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        scale * LOG2E,
        TQ, TK, S, H, G, U, NT,
        K=Dk, V=Dv, BLOCK=block_size, QT=QT, GT=GT,
    )
    return o, lse, grid


__all__ = ["selection_tile_fwd", "selection_tile_kernel", "attend_chunk_rows", "tile_rows",
           "tile_shape", "rows_block", "chunk_size", "TILE_ROWS"]
