"""Selection attention, backward: a group-centric Triton kernel and its launcher.

One program per (query token, KV head, tile of up to 64 of that head's G query heads), the forward's
schedule (selection_fwd.py). It loads the tile's q [BG, Dk], dO [BG, Dv], O [BG, Dv] and lse [BG]
once, then for each selected chunk of BS keys recomputes P = exp(scale * q k^T - lse) and
dS = P * (dO v^T - delta + dlse), with delta = rowsum(dO * O) and dlse the gradient of lse (0
without one), and
- accumulates dq [BG, Dk] += dS k in registers (written once, scaled, at the end);
- adds dk [BS, Dk] += scale * dS^T q and dv [BS, Dv] += P^T dO into fp32 buffers with relaxed
  atomics, since many rows select the same block. The sums are exact up to fp32 rounding, but
  their order (and so the last bits of dk, dv) can change from run to run.

It reads the canonical rows as the forward does (sorted, de-duplicated, causally trimmed), so every
row it visits has a finite lse; padded heads get lse = +inf, making their P exactly 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .selection_fwd import (LARGE_PROGRAMS, LOG2E, _python_function, _with_interpreted_helpers,
                            default_chunk, group_tile, query_of_program, untuned)

BWD_CONFIGS = [triton.Config({"BS": bs}, num_warps=w, num_stages=st)
               for bs in (16, 32, 64) for w in (4, 8) for st in (1, 2)]
LOG2E_C = tl.constexpr(LOG2E)


def bwd_chunk(block_size: int, K: int, V: int) -> int:
    """BS of the untuned config: the forward's, capped at 32 (the backward holds more tiles)."""
    return min(32, default_chunk(block_size, K, V))


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    block = args["BLOCK"]
    if untuned(args):
        return [triton.Config({"BS": bwd_chunk(block, args["K"], args["V"])},
                              num_warps=4, num_stages=1)]
    usable = {max(16, min(block, 64))} | ({32} if block >= 64 else set())
    return [c for c in configs if c.kwargs["BS"] in usable]


@triton.heuristics({
    "BK": lambda args: max(16, triton.next_power_of_2(args["K"])),
    "BV": lambda args: max(16, triton.next_power_of_2(args["V"])),
    "BG": lambda args: group_tile(args["G"]),
    "IS_VARLEN": lambda args: args["pos"] is not None,
    "HAS_DLSE": lambda args: args["dlse"] is not None,
    "DOT_PRECISION": lambda args: "ieee" if args["q"].dtype == torch.float32 else "tf32",
    "LARGE": lambda args: args["num_blocks"].numel() >= LARGE_PROGRAMS,
})
@triton.autotune(configs=BWD_CONFIGS, key=["BLOCK", "BK", "BV", "BG", "LARGE"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["dk", "dv"])
@triton.jit(do_not_specialize=["TQ", "TK", "S", "H", "G"])
def selection_bwd_group_kernel(
    q, k, v, o, do, lse, dlse,       # o, do: [B, TQ, HQ, Dv] contiguous; lse, dlse: [B, TQ, HQ] fp32
    dq,                              # [B, TQ, HQ, Dk] contiguous, q's dtype
    dk, dv,                          # [B, TK, H, Dk] / [B, TK, H, Dv] contiguous fp32, zeroed
    blocks, num_blocks, pos, k_offset,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    qk_scale, scale,
    TQ, TK, S, H, G,
    K: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LARGE: tl.constexpr,
):
    i_g = tl.program_id(1)
    i_b, i_h, i_t, tok, p_abs, kv_start = query_of_program(
        tl.program_id(0).to(tl.int64), TQ, TK, H, pos, k_offset, IS_VARLEN)
    row = tok * H + i_h
    n = tl.load(num_blocks + row)
    NC: tl.constexpr = (BLOCK + BS - 1) // BS
    HQ = H * G

    o_g = i_g * BG + tl.arange(0, BG)
    m_g = o_g < G
    heads = i_h * G + o_g
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_s = tl.arange(0, BS)
    m_qk = m_g[:, None] & (o_k < K)[None, :]
    m_ov = m_g[:, None] & (o_v < V)[None, :]

    # [BG, BK], [BG, BV], [BG]
    b_q = tl.load(q + i_b * stride_qb + i_t * stride_qt + heads[:, None] * stride_qh + o_k[None, :],
                  mask=m_qk, other=0.0)
    p_ov = (tok * HQ + heads)[:, None] * V + o_v[None, :]
    b_do = tl.load(do + p_ov, mask=m_ov, other=0.0)
    b_o = tl.load(o + p_ov, mask=m_ov, other=0.0)
    delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dlse + tok * HQ + heads, mask=m_g, other=0.0)
    # lse in the log2 domain; +inf on padded heads makes their P exactly 0.
    lse2 = tl.load(lse + tok * HQ + heads, mask=m_g, other=float("inf")) * LOG2E_C

    k_base = k + i_b * stride_kb + kv_start * stride_kt + i_h * stride_kh
    v_base = v + i_b * stride_vb + kv_start * stride_vt + i_h * stride_vh
    dk_base = dk + ((i_b * TK + kv_start) * H + i_h) * K
    dv_base = dv + ((i_b * TK + kv_start) * H + i_h) * V
    row_blocks = blocks + row * S

    dq_acc = tl.zeros([BG, BK], dtype=tl.float32)
    for it in range(n * NC):
        if NC == 1:
            blk = tl.load(row_blocks + it).to(tl.int64)
            o_j = o_s
        else:
            blk = tl.load(row_blocks + it // NC).to(tl.int64)
            o_j = (it % NC) * BS + o_s
        j = blk * BLOCK + o_j
        m_j = j <= p_abs
        if BS > BLOCK:
            m_j = m_j & (o_j < BLOCK)
        m_k = m_j[:, None] & (o_k < K)[None, :]
        m_v = m_j[:, None] & (o_v < V)[None, :]
        # [BS, BK], [BS, BV]
        b_k = tl.load(k_base + j[:, None] * stride_kt + o_k[None, :], mask=m_k, other=0.0)
        b_v = tl.load(v_base + j[:, None] * stride_vt + o_v[None, :], mask=m_v, other=0.0)
        # [BG, BS]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale
        b_p = tl.where(m_j[None, :], tl.math.exp2(b_s - lse2[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
        b_ds = b_p * (b_dp - delta[:, None])
        # [BG, BK]
        dq_acc = tl.dot(b_ds.to(b_k.dtype), b_k, dq_acc, input_precision=DOT_PRECISION)
        # [BS, BK], [BS, BV]
        b_dk = tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=DOT_PRECISION) * scale
        b_dv = tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=DOT_PRECISION)
        tl.atomic_add(dk_base + j[:, None] * (H * K) + o_k[None, :], b_dk, mask=m_k, sem="relaxed")
        tl.atomic_add(dv_base + j[:, None] * (H * V) + o_v[None, :], b_dv, mask=m_v, sem="relaxed")

    tl.store(dq + (tok * HQ + heads)[:, None] * K + o_k[None, :],
             (dq_acc * scale).to(dq.dtype.element_ty), mask=m_qk)


_interpreted_cache = {}


def _interpreted(kernel):
    """The CPU-interpreter twin (see selection_fwd._interpreted)."""
    if kernel not in _interpreted_cache:
        from triton.runtime.interpreter import InterpretedFunction

        values = {**kernel.values,
                  "BS": lambda args: bwd_chunk(args["BLOCK"], args["K"], args["V"])}
        _interpreted_cache[kernel] = triton.heuristics(values)(
            InterpretedFunction(_with_interpreted_helpers(_python_function(kernel))))
    return _interpreted_cache[kernel]


def selection_bwd(q, k, v, o, lse, do, dlse, blocks, num_blocks, *, scale: float,
                  block_size: int, pos=None, k_offset=None, interpret: bool = False):
    """(dq, dk, dv) in the inputs' dtype, from the forward's o and lse and the gradients do, dlse.

    Shapes as in selection_fwd.selection_fwd; o, do [B, TQ, HQ, Dv]; lse, dlse [B, TQ, HQ] fp32
    (dlse may be None).
    """
    B, TQ, HQ, Dk = q.shape
    _, TK, H, Dv = v.shape
    G = HQ // H
    S = blocks.shape[-1]
    blocks, num_blocks = blocks.contiguous(), num_blocks.contiguous()
    if pos is not None:
        pos = pos.to(torch.int64).contiguous()
        k_offset = k_offset.to(torch.int64).contiguous()
    # The kernel's dots take dO in the inputs' dtype (a caller may hand an fp32 gradient).
    o, do, lse = o.contiguous(), do.to(q.dtype).contiguous(), lse.contiguous()
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    dq = torch.empty((B, TQ, HQ, Dk), dtype=q.dtype, device=q.device)
    dk = torch.zeros((B, TK, H, Dk), dtype=torch.float32, device=q.device)
    dv = torch.zeros((B, TK, H, Dv), dtype=torch.float32, device=q.device)
    kernel = _interpreted(selection_bwd_group_kernel) if interpret else selection_bwd_group_kernel
    grid = (TQ * B * H, triton.cdiv(G, group_tile(G)))
    kernel[grid](
        q, k, v, o, do, lse, dlse, dq, dk, dv, blocks, num_blocks, pos, k_offset,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        scale * LOG2E, scale,
        TQ, TK, S, H, G,
        K=Dk, V=Dv, BLOCK=block_size,
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype)
