"""Selection attention, backward: deterministic Triton kernels (no atomics) and their launcher.

A few launches, each output element written by exactly one program, every sum in a fixed order,
so dq, dk, dv are bitwise the same on every run (SPEC.md, "determinism"):

0. `selection_bwd_delta_kernel`: delta = rowsum(dO * O) - dlse per (query, head) (dlse: the
   gradient of lse, 0 without one), read by both passes.
1. `selection_bwd_dq_kernel`, query-outer (the forward's group-centric schedule): one program per
   (query token, KV head, tile of up to 64 of its G query heads). It loads q [BG, Dk], dO
   [BG, Dv] and delta, then streams the row's canonical blocks in chunks of BS keys,
   recomputing P = exp(scale q k^T - lse) and dS = P (dO v^T - delta), and accumulates
   dq [BG, Dk] += dS k in registers, written once.
2. `selection_bwd_dkdv_kernel`, KV-outer over the inverse index (nsa_ext/inverse_index.py): one
   program per (work item, chunk of BN keys of the item's block). A work item is a fixed slice
   of the ascending list of query tokens that chose one (batch, KV head, block). The program
   loads its K [BN, Dk] and V [BN, Dv] once, then walks the slice's (token, head) pairs BM at a
   time: gathers q [BM, Dk], dO [BM, Dv], lse and delta [BM], recomputes P and dS [BM, BN] with
   the causal mask j <= pos of each pair's query, and accumulates dv [BN, Dv] += P^T dO and
   dk [BN, Dk] += scale dS^T q in registers. A bucket served by one item stores dk, dv directly;
   one cut into several items stores fp32 partials to scratch. For G <= 8 the same kernel runs
   a second time in its DQ_PARTIALS variant, storing each pair's dq share dS k [BM, Dk] at the
   pair's canonical entry; `selection_bwd_dq_merge_kernel` sums a row's shares in canonical
   order. It replaces the dQ kernel there (see DQ_PARTIALS_MAX_G).
3. `selection_bwd_dkdv_merge_kernel`: per (bucket, key chunk) cut into several items, sums the
   partials in item order and stores dk, dv.

It reads the canonical rows as the forward does (sorted, de-duplicated, causally trimmed), so
every listed query has a finite lse; padded heads get lse = +inf, making their P exactly 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .selection_fwd import (_HEURISTICS, LOG2E, _python_function, _with_interpreted_helpers,
                            autotune, autotuned, default_chunk, group_queries, group_tile,
                            query_of_program, selected_chunk, untuned)

DQ_CONFIGS = [triton.Config({"BS": bs}, num_warps=w, num_stages=st)
              for bs in (16, 32, 64) for w in (4, 8) for st in (1, 2, 3)]
DKDV_CONFIGS = [triton.Config({"BM": bm}, num_warps=w, num_stages=st)
                for bm in (32, 64, 128) for w in (4, 8) for st in (1, 2, 3)]
LOG2E_C = tl.constexpr(LOG2E)
# (token, head) pairs one dK/dV work item walks, at least: long enough that K/V loads and the
# item's write are amortised, short enough that the block every query chose (block 0 in NSA)
# is cut into as many items as the average block (see dkdv_tokens_per_item).
PAIRS_PER_ITEM = 4096


# dq from per-(pair, block) partials written by the dK/dV kernel (one more product there, then a
# fixed-order sum per row) instead of the dQ kernel's second gather of every selected K/V block:
# the partials move 8 * G * Dk bytes per (token, KV head, block) through HBM where the dQ kernel
# pulls 64 keys x (Dk + Dv) x 2 bytes from L2, so they pay below G ~ 16 (G / 32 of the bytes, at
# about half the bandwidth); taken up to G = 8, and while the partials fit a sixteenth of the
# GPU's memory (T = 32k, G = 4, D = 128: 4 GiB).
DQ_PARTIALS_MAX_G = 8


def dq_partials_fit(G: int, num_key_chunks: int, nbytes: int, device) -> bool:
    """Whether dq comes from the dK/dV kernel's partials (see DQ_PARTIALS_MAX_G)."""
    if G > DQ_PARTIALS_MAX_G or num_key_chunks != 1:
        return False         # a block cut into key chunks would need a partial per chunk
    if device.type != "cuda":
        return True
    return nbytes <= torch.cuda.get_device_properties(device).total_memory // 16


def bwd_chunk(block_size: int, K: int, V: int, full_precision: bool = False) -> int:
    """BS of the untuned dQ config: the forward's, capped at 32 (the backward holds more tiles)
    -- except for fp32 inputs (full-precision dots, never tuned) beside heads up to 128 wide,
    where the forward's 64 measured 8.55 ms against 14.66 at 32 (H200, T = 2k, HQ = 64, G = 16,
    d 128, random; the twenty-sixth session's tuning)."""
    chunk = default_chunk(block_size, K, V)
    if full_precision and max(K, V) <= 128:
        return chunk
    return min(32, chunk)


def dkdv_keys(block_size: int, K: int, V: int) -> int:
    """BN, keys per dK/dV program: a whole block up to 64 keys (32 beside a head wider than 128:
    dk and dv accumulate in registers, [BN, Dk] + [BN, Dv] fp32); at least 16 for tl.dot."""
    widest = max(triton.next_power_of_2(K), triton.next_power_of_2(V))
    return max(16, min(triton.next_power_of_2(block_size), 64 if widest <= 128 else 32))


def dkdv_tokens_per_item(G: int, capacity: int, sm_count: int) -> int:
    """Query tokens per dK/dV work item: PAIRS_PER_ITEM pairs, or more once the call has enough
    work to fill the GPU many times over (fewer items: less scratch, fewer partial merges)."""
    return max(-(-PAIRS_PER_ITEM // G), -(-capacity // (16 * max(1, sm_count))), 1)


def _prune_dq(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    block = args["BLOCK"]
    if untuned(args):
        chunk = bwd_chunk(block, args["K"], args["V"], args["DOT_PRECISION"] == "ieee")
        return [triton.Config({"BS": chunk}, num_warps=4, num_stages=1)]
    usable = {max(16, min(block, 64))} | ({32} if block >= 64 else set())
    return [c for c in configs if c.kwargs["BS"] in usable]


def _prune_dkdv(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    # fp32 inputs (full-precision dots, many more registers per product): compiled for SM 9.0
    # (scripts/triton_sm90_report.py --kernels dkdv --dtype fp32; Triton 3.6 and 3.8), every
    # 4-warp config from BM = 64 up, and most others, come out of ptxas with 32 registers and
    # 28-74 KiB of spills per thread (and 6-100 s of ptxas each); BM = 32 at 8 warps, one stage
    # is the one without that at d 64 (174 registers, no spill) and d 128 (255, 1.3 KiB). So
    # fp32's default is that config and its tuning tries 8 warps only (twenty-fifth session,
    # notes/backward.md; times on a GPU not measured yet).
    full_precision = args["DOT_PRECISION"] == "ieee"
    if untuned(args):
        if full_precision:
            return [triton.Config({"BM": 32}, num_warps=8, num_stages=1)]
        return [triton.Config({"BM": 64}, num_warps=4, num_stages=1)]
    # (fp32 launches are never tuned now -- `autotuned` -- so the fp32 rules below are for a
    # LARGE fp32 launch made by hand, e.g. scripts/triton_sm90_report.py --dtype fp32.)
    # BM = 128 goes beside a head wider than 128, and with fp32 inputs beside one of 128: there
    # (fp32, d 128) it needs 256-258 KiB of shared memory, above any GPU's 227 KiB per block, so
    # it never launches, and each config took 60-100 s in ptxas.
    widest = max(args["BK"], args["BV"])
    wide = widest > 128 or (full_precision and widest >= 128)
    return [c for c in configs if not (wide and c.kwargs["BM"] > 64)
            and not (full_precision and c.num_warps < 8)]


@triton.heuristics({
    **_HEURISTICS,
    "BG": lambda args: group_tile(args["G"]),
    "LARGE": lambda args: autotuned(args["num_blocks"].numel(), dtype=args["q"].dtype),
})
@autotune(configs=DQ_CONFIGS, key=["BLOCK", "BK", "BV", "BG", "LARGE"],
          prune_configs_by={"early_config_prune": _prune_dq})
@triton.jit(do_not_specialize=["TQ", "TK", "S", "H", "G"])
def selection_bwd_dq_kernel(
    q, k, v, do, lse, delta,         # do: [B, TQ, HQ, Dv] contiguous; lse, delta: [B, TQ, HQ] fp32
    dq,                              # [B, TQ, HQ, Dk] contiguous, q's dtype
    blocks, num_blocks, pos, k_offset,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    qk_scale, scale,
    TQ, TK, S, H, G,
    K: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, LARGE: tl.constexpr,
):
    i_g = tl.program_id(1)
    i_b, i_h, i_t, tok, p_abs, kv_start = query_of_program(
        tl.program_id(0).to(tl.int64), TQ, TK, H, pos, k_offset, IS_VARLEN)
    row = tok * H + i_h
    n = tl.load(num_blocks + row)
    NC: tl.constexpr = (BLOCK + BS - 1) // BS
    HQ = H * G

    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_s = tl.arange(0, BS)
    # [BG], [BG], [BG, BK]
    heads, m_g, b_q = group_queries(q, i_b, i_t, i_h, i_g, G, stride_qb, stride_qt, stride_qh,
                                    o_k, K, BG)
    m_qk = m_g[:, None] & (o_k < K)[None, :]
    m_ov = m_g[:, None] & (o_v < V)[None, :]

    # [BG, BV], [BG]
    b_do = tl.load(do + (tok * HQ + heads)[:, None] * V + o_v[None, :], mask=m_ov, other=0.0)
    b_delta = tl.load(delta + tok * HQ + heads, mask=m_g, other=0.0)
    # lse in the log2 domain; +inf on padded heads makes their P exactly 0.
    lse2 = tl.load(lse + tok * HQ + heads, mask=m_g, other=float("inf")) * LOG2E_C

    k_base = k + i_b * stride_kb + kv_start * stride_kt + i_h * stride_kh
    v_base = v + i_b * stride_vb + kv_start * stride_vt + i_h * stride_vh
    row_blocks = blocks + row * S

    dq_acc = tl.zeros([BG, BK], dtype=tl.float32)
    for it in range(n * NC):
        j, m_j = selected_chunk(row_blocks, it, o_s, p_abs, BLOCK, BS, NC)
        # [BS, BK], [BS, BV]
        b_k = tl.load(k_base + j[:, None] * stride_kt + o_k[None, :],
                      mask=m_j[:, None] & (o_k < K)[None, :], other=0.0)
        b_v = tl.load(v_base + j[:, None] * stride_vt + o_v[None, :],
                      mask=m_j[:, None] & (o_v < V)[None, :], other=0.0)
        # [BG, BS]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale
        b_p = tl.where(m_j[None, :], tl.math.exp2(b_s - lse2[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        # [BG, BK]
        dq_acc = tl.dot(b_ds.to(b_k.dtype), b_k, dq_acc, input_precision=DOT_PRECISION)

    tl.store(dq + (tok * HQ + heads)[:, None] * K + o_k[None, :],
             (dq_acc * scale).to(dq.dtype.element_ty), mask=m_qk)


@triton.heuristics({"HAS_DLSE": lambda args: args["dlse"] is not None})
@triton.jit
def selection_bwd_delta_kernel(o, do, dlse, delta, rows, V: tl.constexpr, BV: tl.constexpr,
                               BR: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta [rows] = rowsum(dO * O) - dlse over BR rows of o, do [rows, V] (contiguous), fp32."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_v = tl.arange(0, BV)
    m_r = r < rows
    mask = m_r[:, None] & (o_v < V)[None, :]
    b_o = tl.load(o + r[:, None] * V + o_v[None, :], mask=mask, other=0.0).to(tl.float32)
    b_do = tl.load(do + r[:, None] * V + o_v[None, :], mask=mask, other=0.0).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)
    if HAS_DLSE:
        b_delta -= tl.load(dlse + r, mask=m_r, other=0.0)
    tl.store(delta + r, b_delta, mask=m_r)


@triton.heuristics({
    **_HEURISTICS,
    "BN": lambda args: dkdv_keys(args["BLOCK"], args["K"], args["V"]),
    "LARGE": lambda args: autotuned(args["item_bucket"].numel(), 256, args["q"].dtype),
    "DKDV": lambda args: args["dk"] is not None,
    "DQ_PARTIALS": lambda args: args["dq_part"] is not None,
})
@autotune(configs=DKDV_CONFIGS, key=["BLOCK", "BK", "BV", "BN", "LARGE", "DKDV", "DQ_PARTIALS"],
          prune_configs_by={"early_config_prune": _prune_dkdv})
@triton.jit(do_not_specialize=["TQ", "TK", "H", "G", "num_buckets", "slots"])
def selection_bwd_dkdv_kernel(
    q, k, v, do, lse, delta,         # do [B, TQ, HQ, Dv] contiguous; lse, delta [B, TQ, HQ] fp32
    dk, dv,                          # [B, TK, H, Dk] / [B, TK, H, Dv] contiguous, k's / v's dtype
    dk_part, dv_part,                # [max_items, NKC, BN, Dk] / [.., Dv] fp32 scratch
    dq_part,                         # [B * TQ * H * S * G, Dk] fp32
    # DKDV: accumulate and write dk, dv (dk is not None); DQ_PARTIALS: write each pair's share
    # of dq (dq_part is not None). Launched once per output: the dK/dV accumulators and the dq
    # tile together cost registers (spills) that each variant alone does not.
    tokens, entries, item_bucket, item_start, item_end, num_items,   # the inverse index, its items
    slot_key_start, slot_key_end, slot_seq_start, pos,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    qk_scale, scale,
    TQ, TK, H, G, num_buckets, slots,
    K: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, LARGE: tl.constexpr,
    DKDV: tl.constexpr, DQ_PARTIALS: tl.constexpr,
):
    i_item = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    NKC: tl.constexpr = (BLOCK + BN - 1) // BN
    bucket = tl.load(item_bucket + i_item).to(tl.int64)
    if bucket < num_buckets:         # items past the end of the bound-sized grid do nothing
        slot = bucket % slots
        i_h = (bucket // slots) % H
        i_b = bucket // (slots * H)
        HQ = H * G
        o_n = tl.arange(0, BN)
        o_k = tl.arange(0, BK)
        o_v = tl.arange(0, BV)
        # [BN]: the chunk's keys along k's T axis, and their positions within the sequence
        keys = tl.load(slot_key_start + slot) + i_c * BN + o_n
        m_n = (keys < tl.load(slot_key_end + slot)) & (i_c * BN + o_n < BLOCK)
        j_seq = keys - tl.load(slot_seq_start + slot)
        # [BN, BK], [BN, BV]
        b_k = tl.load(k + i_b * stride_kb + keys[:, None] * stride_kt + i_h * stride_kh + o_k[None, :],
                      mask=m_n[:, None] & (o_k < K)[None, :], other=0.0)
        b_v = tl.load(v + i_b * stride_vb + keys[:, None] * stride_vt + i_h * stride_vh + o_v[None, :],
                      mask=m_n[:, None] & (o_v < V)[None, :], other=0.0)

        start = tl.load(item_start + i_item)
        pairs = (tl.load(item_end + i_item) - start) * G
        dk_acc = tl.zeros([BN, BK], dtype=tl.float32)
        dv_acc = tl.zeros([BN, BV], dtype=tl.float32)
        o_m = tl.arange(0, BM)
        for r0 in range(0, pairs, BM):
            # [BM]: pair r is head r % G of the item's (r // G)-th token (tokens ascending)
            r = r0 + o_m
            m_r = r < pairs
            t = tl.load(tokens + start + r // G, mask=m_r, other=0).to(tl.int64)
            head = i_h * G + r % G
            if IS_VARLEN:
                p_abs = tl.load(pos + t, mask=m_r, other=0)
            else:
                p_abs = t + (TK - TQ)
            row = (i_b * TQ + t) * HQ + head
            # [BM, BK], [BM, BV]
            b_q = tl.load(q + i_b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh
                          + o_k[None, :], mask=m_r[:, None] & (o_k < K)[None, :], other=0.0)
            b_do = tl.load(do + row[:, None] * V + o_v[None, :],
                           mask=m_r[:, None] & (o_v < V)[None, :], other=0.0)
            lse2 = tl.load(lse + row, mask=m_r, other=float("inf")) * LOG2E_C
            b_delta = tl.load(delta + row, mask=m_r, other=0.0)
            # [BM, BN]
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale
            visible = m_n[None, :] & (j_seq[None, :] <= p_abs[:, None])
            b_p = tl.where(visible, tl.math.exp2(b_s - lse2[:, None]), 0.0)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
            b_ds = b_p * (b_dp - b_delta[:, None])
            if DKDV:
                # [BN, BV], [BN, BK]
                dv_acc = tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, dv_acc,
                                input_precision=DOT_PRECISION)
                dk_acc = tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, dk_acc,
                                input_precision=DOT_PRECISION)
            if DQ_PARTIALS:
                # [BM, BK]: this block's share of each pair's dq, at the pair's canonical entry
                b_dq = tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION) * scale
                entry = tl.load(entries + start + r // G, mask=m_r, other=0).to(tl.int64)
                tl.store(dq_part + (entry * G + r % G)[:, None] * K + o_k[None, :], b_dq,
                         mask=m_r[:, None] & (o_k < K)[None, :])
        if DKDV:
            dk_acc = dk_acc * scale
            m_dk = m_n[:, None] & (o_k < K)[None, :]
            m_dv = m_n[:, None] & (o_v < V)[None, :]
            if tl.load(num_items + bucket) == 1:
                kv_row = (i_b * TK + keys) * H + i_h
                tl.store(dk + kv_row[:, None] * K + o_k[None, :], dk_acc.to(dk.dtype.element_ty),
                         mask=m_dk)
                tl.store(dv + kv_row[:, None] * V + o_v[None, :], dv_acc.to(dv.dtype.element_ty),
                         mask=m_dv)
            else:
                part = (i_item * NKC + i_c) * BN + o_n
                tl.store(dk_part + part[:, None] * K + o_k[None, :], dk_acc, mask=m_dk)
                tl.store(dv_part + part[:, None] * V + o_v[None, :], dv_acc, mask=m_dv)


@triton.heuristics({
    "BK": lambda args: max(16, triton.next_power_of_2(args["K"])),
    "BV": lambda args: max(16, triton.next_power_of_2(args["V"])),
    "BN": lambda args: dkdv_keys(args["BLOCK"], args["K"], args["V"]),
})
@triton.jit(do_not_specialize=["TK", "H", "slots"])
def selection_bwd_dkdv_merge_kernel(
    dk, dv, dk_part, dv_part, first_item, num_items, slot_key_start, slot_key_end,
    TK, H, slots,
    K: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    """Per (bucket, BR keys of a key chunk): dk, dv = the sum of the bucket's item partials, in
    item order. BR < BN: more, smaller programs (a bucket's partials are a few 100 KiB)."""
    bucket = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1) // (BN // BR)
    i_r = tl.program_id(1) % (BN // BR)
    NKC: tl.constexpr = (BLOCK + BN - 1) // BN
    n = tl.load(num_items + bucket)
    if n > 1:
        slot = bucket % slots
        i_h = (bucket // slots) % H
        i_b = bucket // (slots * H)
        o_n = i_r * BR + tl.arange(0, BR)
        o_k = tl.arange(0, BK)
        o_v = tl.arange(0, BV)
        keys = tl.load(slot_key_start + slot) + i_c * BN + o_n
        m_n = (keys < tl.load(slot_key_end + slot)) & (i_c * BN + o_n < BLOCK)
        m_dk = m_n[:, None] & (o_k < K)[None, :]
        m_dv = m_n[:, None] & (o_v < V)[None, :]
        first = tl.load(first_item + bucket)
        dk_acc = tl.zeros([BR, BK], dtype=tl.float32)
        dv_acc = tl.zeros([BR, BV], dtype=tl.float32)
        for it in range(n):
            part = ((first + it) * NKC + i_c) * BN + o_n
            dk_acc += tl.load(dk_part + part[:, None] * K + o_k[None, :], mask=m_dk, other=0.0)
            dv_acc += tl.load(dv_part + part[:, None] * V + o_v[None, :], mask=m_dv, other=0.0)
        kv_row = (i_b * TK + keys) * H + i_h
        tl.store(dk + kv_row[:, None] * K + o_k[None, :], dk_acc.to(dk.dtype.element_ty), mask=m_dk)
        tl.store(dv + kv_row[:, None] * V + o_v[None, :], dv_acc.to(dv.dtype.element_ty), mask=m_dv)


@triton.heuristics({
    "BK": lambda args: max(16, triton.next_power_of_2(args["K"])),
    "BG": lambda args: group_tile(args["G"]),
})
@triton.jit(do_not_specialize=["S", "G"])
def selection_bwd_dq_merge_kernel(dq, dq_part, num_blocks, S, G, K: tl.constexpr,
                                  BK: tl.constexpr, BG: tl.constexpr):
    """Per (query token and KV head = row, tile of BG heads): dq = the sum of the row's per-block
    partials in canonical order (entries 0 .. num_blocks - 1), written once."""
    row = tl.program_id(0).to(tl.int64)
    o_g = tl.program_id(1) * BG + tl.arange(0, BG)
    o_k = tl.arange(0, BK)
    mask = (o_g < G)[:, None] & (o_k < K)[None, :]
    acc = tl.zeros([BG, BK], dtype=tl.float32)
    for s in range(tl.load(num_blocks + row)):
        acc += tl.load(dq_part + ((row * S + s) * G + o_g)[:, None] * K + o_k[None, :],
                       mask=mask, other=0.0)
    # dq [B, TQ, HQ, Dk] contiguous: row * G + head is the (token, query head) row
    tl.store(dq + (row * G + o_g)[:, None] * K + o_k[None, :], acc.to(dq.dtype.element_ty),
             mask=mask)


_interpreted_cache = {}


def _interpreted(kernel, untuned_values):
    """The CPU-interpreter twin (see selection_fwd._interpreted), with the untuned config."""
    if kernel not in _interpreted_cache:
        from triton.runtime.interpreter import InterpretedFunction

        values = {**getattr(kernel, "values", {}), **untuned_values}
        fn = InterpretedFunction(_with_interpreted_helpers(_python_function(kernel)))
        _interpreted_cache[kernel] = triton.heuristics(values)(fn) if values else fn
    return _interpreted_cache[kernel]


def _kernel(kernel, interpret, untuned_values):
    return _interpreted(kernel, untuned_values) if interpret else kernel


_side_streams = {}


def _side_stream(device):
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def selection_bwd(q, k, v, o, lse, do, dlse, blocks, num_blocks, index, items, *, scale: float,
                  block_size: int, pos=None, k_offset=None, interpret: bool = False,
                  overlap: bool = True):
    """(dq, dk, dv) in the inputs' dtype, from the forward's o and lse and the gradients do, dlse.

    Shapes as in selection_fwd.selection_fwd; o, do [B, TQ, HQ, Dv]; lse, dlse [B, TQ, HQ] fp32
    (dlse may be None); `index` the call's InverseIndex and `items` its WorkItems
    (nsa_ext/inverse_index.py). Scratch: fp32 partials of dk/dv, items.max_items x
    ceil(block_size / BN) x BN x (Dk + Dv) x 4 bytes, allocated only when an item can share its
    bucket (the caching allocator hands it back at once).

    `overlap` (CUDA): the dQ kernel runs on a side stream beside the dK/dV kernels. They share
    only read-only inputs and write disjoint outputs, and one is bound by gathering K/V, the
    other by its four products, so an SM can run programs of both at once. The caller's stream
    waits for the side stream before returning (CUDA-graph capture allowed: fork and join).
    """
    B, TQ, HQ, Dk = q.shape
    _, TK, H, Dv = v.shape
    G = HQ // H
    S = blocks.shape[-1]
    device = q.device
    blocks, num_blocks = blocks.contiguous(), num_blocks.contiguous()
    if pos is not None:
        pos = pos.to(torch.int64).contiguous()
        k_offset = k_offset.to(torch.int64).contiguous()
    # The kernels' dots take dO in the inputs' dtype (a caller may hand an fp32 gradient).
    o, do, lse = o.contiguous(), do.to(q.dtype).contiguous(), lse.contiguous()
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    dq = torch.empty((B, TQ, HQ, Dk), dtype=q.dtype, device=device)
    delta = torch.empty((B, TQ, HQ), dtype=torch.float32, device=device)
    # Keys of buckets nobody chose keep these zeros (no program owns them).
    dk = torch.zeros((B, TK, H, Dk), dtype=k.dtype, device=device)
    dv = torch.zeros((B, TK, H, Dv), dtype=v.dtype, device=device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))

    rows, BR = B * TQ * HQ, 32
    _kernel(selection_bwd_delta_kernel, interpret, {})[(triton.cdiv(rows, BR),)](
        o, do, dlse, delta, rows, V=Dv, BV=max(16, triton.next_power_of_2(Dv)), BR=BR)

    BN = dkdv_keys(block_size, Dk, Dv)
    NKC = triton.cdiv(block_size, BN)
    dq_part = None
    if dq_partials_fit(G, NKC, blocks.numel() * G * Dk * 4, device):
        # Rows past a row's num_blocks are never read: no need to zero the scratch.
        dq_part = torch.empty((blocks.numel() * G, Dk), dtype=torch.float32, device=device)

    def launch_dq():
        kernel = _kernel(selection_bwd_dq_kernel, interpret,
                         {"BS": lambda args: bwd_chunk(args["BLOCK"], args["K"], args["V"],
                                                       args["q"].dtype == torch.float32)})
        kernel[(TQ * B * H, triton.cdiv(G, group_tile(G)))](
            q, k, v, do, lse, delta, dq, blocks, num_blocks, pos, k_offset, *strides,
            scale * LOG2E, scale, TQ, TK, S, H, G, K=Dk, V=Dv, BLOCK=block_size)

    side = None
    if dq_part is not None:
        pass                         # dq after the dK/dV kernel, from its partials
    elif overlap and device.type == "cuda" and not interpret:
        side = _side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            launch_dq()
    else:
        launch_dq()

    if items.per_item < TQ:          # a bucket lists each token at most once: TQ at most
        dk_part = torch.empty((items.max_items, NKC, BN, Dk), dtype=torch.float32, device=device)
        dv_part = torch.empty((items.max_items, NKC, BN, Dv), dtype=torch.float32, device=device)
    else:                            # every bucket is one item: no partials
        dk_part = dv_part = dk
    kernel = _kernel(selection_bwd_dkdv_kernel, interpret,     # _prune_dkdv's untuned BM
                     {"BM": lambda args: 32 if args["q"].dtype == torch.float32 else 64})
    for outputs in ((dk, dv, dk_part, dv_part, None),) + (
            ((None, None, None, None, dq_part),) if dq_part is not None else ()):
        kernel[(items.max_items, NKC)](
            q, k, v, do, lse, delta, *outputs,
            index.tokens, index.entries, items.bucket, items.start, items.end, items.num_items,
            index.slot_key_start, index.slot_key_end, index.slot_seq_start, pos, *strides,
            scale * LOG2E, scale, TQ, TK, H, G, index.num_buckets, index.slots,
            K=Dk, V=Dv, BLOCK=block_size,
        )
    if dq_part is not None:
        _kernel(selection_bwd_dq_merge_kernel, interpret, {})[
            (B * TQ * H, triton.cdiv(G, group_tile(G)))](dq, dq_part, num_blocks, S, G, K=Dk)
    if dk_part is not dk:
        kernel = _kernel(selection_bwd_dkdv_merge_kernel, interpret, {})
        BR = 16
        kernel[(index.num_buckets, NKC * BN // BR)](
            dk, dv, dk_part, dv_part, items.first_item, items.num_items,
            index.slot_key_start, index.slot_key_end, TK, H, index.slots,
            K=Dk, V=Dv, BLOCK=block_size, BR=BR,
        )
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)
    return dq, dk, dv
