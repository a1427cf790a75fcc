"""Query tiles' unions in one launch: each tile's distinct selected blocks, sorted.

The same result as the PyTorch chain in `nsa_ext.schedules.tiles` (block names -> segmented sort
-> first of each run -> cumsum -> scatter: ~12 kernels and as many host launches before a tile
kernel can start), computed by one program per (batch, tile, KV head) -- or per four of them
where a tile has at most 64 names, one row each of the program's block: it loads the tile's QT * S
canonical entries, names each block by its first key (`k_offset[token] + block * block_size`,
so blocks of different varlen sequences never share a name), sorts the names, keeps the first
of each run, and sorts again so the kept names come first, ascending, padded with NONE (int64
max). It also counts, per tile, the union's size and the tile's selections (entries >= 0 of
the canonical rows, which are -1 padded): the chooser's overlap statistic, from any sample of
tiles (every `stride`-th), without writing the union.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NONE = torch.iinfo(torch.int64).max        # sorts after every real block name
MAX_WIDTH = 4096                           # QT * S entries one program sorts (G = 1: 64 x 64)


@triton.jit
def tile_union_kernel(blocks, k_offset, starts, counts, selections, totals, TQ, H, S, NT,
                      NT_OUT, stride_tile, block_size, n_rows, QT: tl.constexpr,
                      BW: tl.constexpr, TPP: tl.constexpr, STORE: tl.constexpr,
                      TOTALS: tl.constexpr):
    # TPP tiles per program, one per row of a [TPP, BW] block: the sorts run along each row, and
    # the program adds its tiles' counts to `totals` with one atomic pair for all of them.
    row = tl.program_id(0) * TPP + tl.arange(0, TPP)          # (b, j, h) flattened
    live = row < n_rows
    h = row % H
    j = (row // H) % NT_OUT
    b = row // (H * NT_OUT)
    tile = j * stride_tile
    offs = tl.arange(0, BW)
    r = offs // S
    t = tile[:, None] * QT + r[None, :]
    valid = live[:, None] & (offs < QT * S)[None, :] & (t < TQ)
    tok = b[:, None].to(tl.int64) * TQ + t
    blk = tl.load(blocks + (tok * H + h[:, None]) * S + (offs % S)[None, :], mask=valid,
                  other=-1).to(tl.int64)
    first_key = tl.load(k_offset + tok, mask=valid, other=0)
    name = tl.where(blk >= 0, first_key + blk * block_size, 9223372036854775807)
    name = tl.sort(name)
    before = tl.broadcast_to(tl.maximum(offs - 1, 0)[None, :], (TPP, BW))
    prev = tl.gather(name, before, 1)
    first = (name != 9223372036854775807) & ((name != prev) | (offs == 0)[None, :])
    union_size = tl.sum(first.to(tl.int32), 1)
    selected = tl.sum((blk >= 0).to(tl.int32), 1)
    tl.store(counts + row, union_size, mask=live)
    tl.store(selections + row, selected, mask=live)
    if TOTALS:      # integer sums: the same totals in any order of the programs
        tl.atomic_add(totals, tl.sum(selected.to(tl.int64), 0))
        tl.atomic_add(totals + 1, tl.sum(union_size.to(tl.int64), 0))
    if STORE:
        kept = tl.sort(tl.where(first, name, 9223372036854775807))
        tl.store(starts + row[:, None].to(tl.int64) * (QT * S) + offs[None, :], kept,
                 mask=live[:, None] & (offs < QT * S)[None, :])


def tile_union(blocks, k_offset, block_size: int, tokens_per_tile: int, stride: int = 1,
               store: bool = True, interpret: bool = False, totals=None,
               tiles_per_program: int = 0, num_warps: int = 0):
    """(starts [B, NT', H, QT * S] int64 or None, counts [B, NT', H] int32, selections [B, NT', H]
    int32) for every `stride`-th tile (NT' = ceil(NT / stride)) of `tokens_per_tile` tokens.
    `totals` (int64 [2], zeroed): the kernel adds (selections, union blocks) of its tiles into it,
    the chooser's statistic without the ~5 reduction launches of summing the outputs.

    blocks [B, TQ, H, S] canonical rows (S >= 1, QT * S <= MAX_WIDTH), k_offset [B, TQ] int64:
    the first key of each query token's sequence along k's T axis (0 for a dense call).
    tiles_per_program (a power of two) and num_warps: 0 takes the measured defaults
    (_tiles_per_program, _num_warps); tests and scripts/union_probe.py set them."""
    B, TQ, H, S = blocks.shape
    QT = tokens_per_tile
    NT = -(-TQ // QT)
    NT_OUT = -(-NT // stride)
    width = QT * S
    if S == 0 or width > MAX_WIDTH:
        raise ValueError(f"tile_union: QT * S = {QT} * {S} must be in 1..{MAX_WIDTH}")
    device = blocks.device
    counts = torch.empty((B, NT_OUT, H), dtype=torch.int32, device=device)
    selections = torch.empty_like(counts)
    starts = torch.empty((B, NT_OUT, H, width) if store else (1,), dtype=torch.int64,
                         device=device)
    kernel = tile_union_kernel
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        kernel = InterpretedFunction(tile_union_kernel.fn)
    BW = triton.next_power_of_2(width)
    n_rows = B * NT_OUT * H
    TPP = tiles_per_program if tiles_per_program else _tiles_per_program(BW)
    kernel[(triton.cdiv(n_rows, TPP),)](
        blocks.contiguous(), k_offset.to(torch.int64).contiguous(), starts, counts, selections,
        totals, TQ, H, S, NT, NT_OUT, stride, block_size, n_rows,
        QT=QT, BW=BW, TPP=TPP, STORE=store, TOTALS=totals is not None,
        num_warps=num_warps or _num_warps(BW * TPP))
    return (starts if store else None), counts, selections


def _tiles_per_program(BW: int) -> int:
    """Tiles per program: four of up to 64 names (G = 16: four rows of one warp's [4, 64] block,
    one atomic pair for the four), else one. H200, T = 32k, G = 16 (notes/schedules.md): 68.0 us
    with one tile a program, 48.7 with two, 44.7 with four, 105.7 with eight; at 256 names one
    tile a program was fastest."""
    return 4 if BW <= 64 else 1


def _num_warps(BW: int) -> int:
    """Warps per tile's program: one up to 256 names (the sorts and the neighbour gather stay in
    one warp's shuffles), then 128 names a warp (<= 8 a thread at 4096: no spills). H200, T = 32k,
    H = 4, totals on (twelfth session, notes/schedules.md): 64 names (G = 16) 118 us with four
    warps -> 68 us with one; 256 (G = 4) 83 -> 68 us; 1024 (G = 1) 245 us with four -> 186 with
    eight."""
    return 1 if BW <= 256 else min(16, BW // 128)


__all__ = ["tile_union", "tile_union_kernel", "NONE", "MAX_WIDTH"]
