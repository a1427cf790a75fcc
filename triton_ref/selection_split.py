"""Selection attention, forward, split over the selected blocks (flash-decoding style).

For decode (TQ = 1, or a few) with a small batch there are only B * TQ * H rows of work: too few
programs to fill the GPU. Here each row's selection is cut into NSPLIT slices of its *entries*,
one program per (query token, KV head, slice, tile of query heads); a second kernel merges the
slices' partial results through their log-sum-exp.

`selection_split_kernel`: one program loads its tile's query rows [BG, Dk] once, reads the row's
raw `block_indices` entries [SP] once, and streams the K [BS, Dk] / V [BS, Dv] chunks of the
blocks of its slice. Set semantics are applied in the kernel, with no sort and no preprocessing
launch: an entry counts when it is within `block_counts`, 0 <= idx <= pos // BLOCK (the causal
limit, which also implies idx < ceil(TK / BLOCK)), and no earlier counted entry of the row has
its value (an [SP] comparison against the entry). An entry that does not count is streamed with
every key masked, rather than skipped by a branch, so the loop stays pipelinable.
With NSPLIT == 1 it writes o [B, TQ, HQ, Dv] and lse [B, TQ, HQ] itself; otherwise it writes
unnormalised partials acc [rows*G, NSPLIT, Dv], m and l [rows*G, NSPLIT] (fp32, log2 domain)
and `selection_merge_kernel` (one program per query head row) combines them.

The workspace size depends only on shapes and NSPLIT (chosen from shapes and the SM count), the
launcher never reads device values: a decode step can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .selection_fwd import (LOG2E, LN2, _chunk, attend_chunk, group_queries, group_tile,
                            query_of_program)


@triton.heuristics({
    "BK": lambda args: max(16, triton.next_power_of_2(args["K"])),
    "BV": lambda args: max(16, triton.next_power_of_2(args["V"])),
    "BS": _chunk,
    "NC": lambda args: max(1, args["BLOCK"] // _chunk(args)),
    "BG": lambda args: group_tile(args["G"]),
    "SP": lambda args: max(2, triton.next_power_of_2(args["S"])),
    "IS_VARLEN": lambda args: args["pos"] is not None,
    "HAS_COUNTS": lambda args: args["block_counts"] is not None,
    "ONE_SPLIT": lambda args: args["NSPLIT"] == 1,
    "DOT_PRECISION": lambda args: "ieee" if args["q"].dtype == torch.float32 else "tf32",
})
@triton.jit(do_not_specialize=["TQ", "TK", "S", "count_limit", "EPS"])
def selection_split_kernel(
    q, k, v, o, lse, acc_ws, m_ws, l_ws,
    block_indices,          # [B, TQ, H, S] int32/int64, raw (SPEC.md's set semantics applied here)
    block_counts,           # [B, TQ, H] integer or None
    count_limit,            # int block_counts (clipped to S) when block_counts is None
    pos, k_offset,          # [B, TQ] int64 each, varlen only
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ib, stride_it, stride_ih, stride_is,
    stride_cb, stride_ct, stride_ch,
    qk_scale, TQ, TK, S, EPS,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
    NSPLIT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BS: tl.constexpr, NC: tl.constexpr,
    BG: tl.constexpr, SP: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_COUNTS: tl.constexpr,
    ONE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_split = tl.program_id(1)
    i_g = tl.program_id(2)
    i_b, i_h, i_t, tok, p_abs, kv_start = query_of_program(
        tl.program_id(0).to(tl.int64), TQ, TK, H, pos, k_offset, IS_VARLEN)
    last_block = p_abs // BLOCK

    # The row's entries [SP] and which of them count (before de-duplication).
    if HAS_COUNTS:
        limit = tl.load(block_counts + i_b * stride_cb + i_t * stride_ct + i_h * stride_ch)
        limit = tl.minimum(tl.maximum(limit.to(tl.int32), 0), S)
    else:
        limit = count_limit
    row_ptr = block_indices + i_b * stride_ib + i_t * stride_it + i_h * stride_ih
    o_e = tl.arange(0, SP)
    entries = tl.load(row_ptr + o_e * stride_is, mask=o_e < limit, other=-1).to(tl.int64)
    counted = (o_e < limit) & (entries >= 0) & (entries <= last_block)

    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_s = tl.arange(0, BS)
    # [BG], [BG], [BG, BK]
    heads, m_g, b_q = group_queries(q, i_b, i_t, i_h, i_g, G, stride_qb, stride_qt, stride_qh,
                                    o_k, K, BG)
    k_base = k + i_b * stride_kb + kv_start * stride_kt + i_h * stride_kh
    v_base = v + i_b * stride_vb + kv_start * stride_vt + i_h * stride_vh

    m_i = tl.full([BG], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BG], dtype=tl.float32)
    acc = tl.zeros([BG, BV], dtype=tl.float32)
    e_lo = i_split * EPS
    e_hi = tl.minimum(e_lo + EPS, limit)
    # No branch in the loop, so the compiler can pipeline the loads: an entry that does not
    # count is streamed fully masked (its loads read nothing; attend_chunk guards the empty step).
    for e in range(e_lo, e_hi):
        blk = tl.load(row_ptr + e * stride_is).to(tl.int64)
        seen_before = tl.sum((counted & (entries == blk) & (o_e < e)).to(tl.int32), 0)
        keep = (blk >= 0) & (blk <= last_block) & (seen_before == 0)
        blk = tl.where(keep, blk, 0)
        for c in range(NC):
            o_j = c * BS + o_s
            j = blk * BLOCK + o_j
            m_j = (j <= p_abs) & keep
            if BS > BLOCK:
                m_j = m_j & (o_j < BLOCK)
            m_i, l_i, acc = attend_chunk(b_q, k_base, v_base, j, m_j, o_k, o_v, stride_kt,
                                         stride_vt, qk_scale, m_i, l_i, acc, K, V,
                                         DOT_PRECISION, True)

    head_rows = tok * (H * G) + heads                      # [BG] flat (b, t, hq)
    if ONE_SPLIT:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        b_o = acc / l_safe[:, None]
        b_lse = tl.where(l_i > 0, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
        tl.store(o + head_rows[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty),
                 mask=m_g[:, None] & (o_v < V)[None, :])
        tl.store(lse + head_rows, b_lse, mask=m_g)
    else:
        slot = head_rows * NSPLIT + i_split
        tl.store(acc_ws + slot[:, None] * V + o_v[None, :], acc,
                 mask=m_g[:, None] & (o_v < V)[None, :])
        tl.store(m_ws + slot, m_i, mask=m_g)
        tl.store(l_ws + slot, l_i, mask=m_g)


@triton.heuristics({
    "BV": lambda args: max(16, triton.next_power_of_2(args["V"])),
    "NP": lambda args: max(2, triton.next_power_of_2(args["NSPLIT"])),
})
@triton.jit
def selection_merge_kernel(o, lse, acc_ws, m_ws, l_ws, V: tl.constexpr, NSPLIT: tl.constexpr,
                           BV: tl.constexpr, NP: tl.constexpr):
    # One program per (b, t, hq): combine NSPLIT partials [NP], [NP, BV] through their maxima.
    r = tl.program_id(0).to(tl.int64)
    o_p = tl.arange(0, NP)
    o_v = tl.arange(0, BV)
    m_p = tl.load(m_ws + r * NSPLIT + o_p, mask=o_p < NSPLIT, other=float("-inf"))
    l_p = tl.load(l_ws + r * NSPLIT + o_p, mask=o_p < NSPLIT, other=0.0)
    m = tl.max(m_p, 0)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    w = tl.where(m_p > float("-inf"), tl.math.exp2(m_p - m_safe), 0.0)
    l = tl.sum(l_p * w, 0)
    acc = tl.load(acc_ws + (r * NSPLIT + o_p[:, None]) * V + o_v[None, :],
                  mask=(o_p < NSPLIT)[:, None] & (o_v < V)[None, :], other=0.0)
    l_safe = tl.where(l > 0, l, 1.0)
    b_o = tl.sum(acc * w[:, None], 0) / l_safe
    tl.store(o + r * V + o_v, b_o.to(o.dtype.element_ty), mask=o_v < V)
    tl.store(lse + r, tl.where(l > 0, (m_safe + tl.math.log2(l_safe)) * LN2, float("-inf")))


def choose_num_splits(work_items: int, num_entries: int, sm_count: int) -> int:
    """Slices per row: programs for at most one wave over the SMs, at most one slice per entry.
    Shapes and the SM count only: never a device value. (H100, B=32 x H=4 = 128 rows, TK=64k,
    CUDA-graph replay: 1 slice 28.2 us, 2: 32.2, 4: 34.0, 8: 35.2; at B=128: 1 slice 101 us,
    2: 112: once the rows fill the SMs, slices only add partial writes and the merge.)"""
    if num_entries <= 1 or sm_count <= 0:
        return 1
    wanted = sm_count // max(work_items, 1)
    splits = max(1, min(wanted, num_entries))
    return triton.cdiv(num_entries, triton.cdiv(num_entries, splits))   # no empty slice


def _launch_args(q, k, v, block_indices, *, scale: float, block_size: int, block_counts=None,
                 count_limit: int = None, pos=None, k_offset=None, num_splits: int = 1):
    """(split kernel's grid, its keyword arguments, merge kernel's grid or None, its keyword
    arguments) with freshly allocated o, lse and workspaces: what `selection_split_fwd` launches."""
    B, TQ, HQ, Dk = q.shape
    _, TK, H, Dv = v.shape
    G = HQ // H
    S = block_indices.shape[-1]
    count_limit = S if count_limit is None else min(count_limit, S)
    num_splits = max(1, min(num_splits, max(S, 1)))
    eps = triton.cdiv(max(S, 1), num_splits)
    o = torch.empty((B, TQ, HQ, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, TQ, HQ), dtype=torch.float32, device=q.device)
    if num_splits > 1:
        rows = B * TQ * HQ
        acc_ws = torch.empty((rows, num_splits, Dv), dtype=torch.float32, device=q.device)
        m_ws = torch.empty((rows, num_splits), dtype=torch.float32, device=q.device)
        l_ws = torch.empty((rows, num_splits), dtype=torch.float32, device=q.device)
    else:
        acc_ws = m_ws = l_ws = lse                       # unused
    if pos is not None:
        pos = pos.to(torch.int64).contiguous()
        k_offset = k_offset.to(torch.int64).contiguous()
    counts_strides = block_counts.stride() if block_counts is not None else (0, 0, 0)
    split = dict(
        q=q, k=k, v=v, o=o, lse=lse, acc_ws=acc_ws, m_ws=m_ws, l_ws=l_ws,
        block_indices=block_indices, block_counts=block_counts, count_limit=count_limit,
        pos=pos, k_offset=k_offset,
        stride_qb=q.stride(0), stride_qt=q.stride(1), stride_qh=q.stride(2),
        stride_kb=k.stride(0), stride_kt=k.stride(1), stride_kh=k.stride(2),
        stride_vb=v.stride(0), stride_vt=v.stride(1), stride_vh=v.stride(2),
        stride_ib=block_indices.stride(0), stride_it=block_indices.stride(1),
        stride_ih=block_indices.stride(2), stride_is=block_indices.stride(3),
        stride_cb=counts_strides[0], stride_ct=counts_strides[1], stride_ch=counts_strides[2],
        qk_scale=scale * LOG2E, TQ=TQ, TK=TK, S=S, EPS=eps,
        H=H, G=G, K=Dk, V=Dv, BLOCK=block_size, NSPLIT=num_splits, num_warps=4, num_stages=3)
    grid = (B * TQ * H, num_splits, triton.cdiv(G, group_tile(G)))
    if num_splits == 1:
        return grid, split, None, None
    merge = dict(o=o, lse=lse, acc_ws=acc_ws, m_ws=m_ws, l_ws=l_ws, V=Dv, NSPLIT=num_splits,
                 num_warps=1 if Dv <= 64 else 2)
    return grid, split, (B * TQ * HQ,), merge


def selection_split_fwd(q, k, v, block_indices, *, scale: float, block_size: int,
                        block_counts=None, count_limit: int = None, pos=None, k_offset=None,
                        num_splits: int = 1, kernels=None):
    """Launch the split kernel (and the merge kernel when num_splits > 1). Returns (o, lse).

    q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv] (last dim contiguous); block_indices
    [B, TQ, H, S] raw; block_counts [B, TQ, H] or None with `count_limit` (an int <= S);
    pos/k_offset [B, TQ] int64 for varlen. `kernels` replaces (split, merge), e.g. with
    interpreted twins for CPU tests.
    """
    split_kernel, merge_kernel = kernels or (selection_split_kernel, selection_merge_kernel)
    grid, split, merge_grid, merge = _launch_args(
        q, k, v, block_indices, scale=scale, block_size=block_size, block_counts=block_counts,
        count_limit=count_limit, pos=pos, k_offset=k_offset, num_splits=num_splits)
    split_kernel[grid](**split)
    if merge is not None:
        merge_kernel[merge_grid](**merge)
    return split["o"], split["lse"]


# The tensors a SplitLaunch puts in each kernel's argument list per call.
_SPLIT_SLOTS = ("q", "k", "v", "o", "lse", "acc_ws", "m_ws", "l_ws", "block_indices")
_MERGE_SLOTS = ("o", "lse", "acc_ws", "m_ws", "l_ws")


class SplitLaunch:
    """`selection_split_fwd` for eager calls that repeat one call's metadata (an eager plan, dense
    layout, no block_counts tensor, no varlen): after the first call each launch skips Triton's
    per-call launcher (triton_ref/direct_launch.py), ~60 us of host time per kernel on the H200
    host. Same kernels, same arguments, so the same bits as `selection_split_fwd`."""

    def __init__(self, *, scale: float, block_size: int, count_limit: int, num_splits: int):
        self._scalars = dict(scale=scale, block_size=block_size, count_limit=count_limit,
                             num_splits=num_splits)
        self._split = self._merge = None
        self.direct_launches = 0          # launches that skipped Triton's launcher (tests)

    def __call__(self, q, k, v, block_indices):
        from .direct_launch import DirectLaunch

        grid, split, merge_grid, merge = _launch_args(q, k, v, block_indices, **self._scalars)
        tensors = [split[name] for name in _SPLIT_SLOTS]
        if self._split is not None and self._split(*tensors):
            self.direct_launches += 1
            if merge is not None:
                if not self._merge(*(merge[name] for name in _MERGE_SLOTS)):
                    selection_merge_kernel[merge_grid](**merge)
            return split["o"], split["lse"]
        if self._split is None:
            _, self._split = DirectLaunch.first(selection_split_kernel, grid, _SPLIT_SLOTS,
                                                **split)
            if merge is not None:
                _, self._merge = DirectLaunch.first(selection_merge_kernel, merge_grid,
                                                    _MERGE_SLOTS, **merge)
            if self._split is not None and merge is not None and self._merge is None:
                self._split = None                        # relaunch both or neither directly
        else:
            selection_split_kernel[grid](**split)
            if merge is not None:
                selection_merge_kernel[merge_grid](**merge)
        return split["o"], split["lse"]


__all__ = ["selection_split_fwd", "SplitLaunch", "selection_split_kernel", "selection_merge_kernel",
           "choose_num_splits"]
