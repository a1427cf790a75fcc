"""Selection attention, forward: Triton kernels and their launcher.

Two schedules of the same computation (../shared/SPEC.md):

- group-centric (NSA paper, Fig. 3), `selection_fwd_group_kernel`: one program per (query token,
  KV head, tile of up to 64 of that KV head's G query heads). It loads the tile's query rows
  [BG, Dk] once, then streams every selected block's K [BS, Dk] and V [BS, Dv] once for all
  of them: the K/V traffic of a row is paid once per row, not once per query head.
- per-head, `selection_fwd_head_kernel`: one program per (query token, query head), one query row
  against the same blocks; K/V are read G times per row (from L2 with luck).

Both read the *canonical* selection (`nsa_ext.selection.canonical_blocks`): each row's set sorted
ascending, de-duplicated, causally trimmed and -1 padded, with its count `num_blocks`. So a program
loops over exactly `num_blocks[row]` entries, never reads an index out of bounds, never counts a
block twice, and every block it visits holds at least one visible key (its first one,
block * block_size <= pos): the running max of the online softmax is finite after the first chunk,
so no `-inf - -inf` arises and the loop needs no guard. Inside a block the only mask is the causal
one, key j visible iff j <= pos; since pos < TK it also keeps every K/V load inside the sequence.
A block is streamed in chunks of BS keys (BS >= 16 for tl.dot, so a block_size below 16 is padded
and masked; a large one is cut into block_size / BS chunks, one flat loop the pipeliner can see).

Writes o [B, TQ, HQ, Dv] in q's dtype and lse [B, TQ, HQ] in fp32 (natural log; -inf and o = 0 for
a row that attends to no key). Accumulation is fp32; scores use exp2 with log2(e) folded into the
scale. Offsets are 64-bit (program ids and block numbers are widened before any multiply), so K/V
beyond 2^31 elements are addressed correctly.
"""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from nsa_ext.device import elapsed_ms

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # ln(2), read inside the kernels

# A call with fewer programs than this runs one fixed config instead of autotuning: small
# launches (decode) are latency-bound anyway. A launch inside a CUDA-graph capture does too
# (benchmarking there would fail); warm a shape up before capturing it to get its tuned config.
LARGE_PROGRAMS = 4096


def autotuned(programs: int, threshold: int = None, dtype: torch.dtype = None) -> bool:
    """The LARGE heuristic of every autotuned kernel: does a launch of `programs` programs (of
    inputs in `dtype`) pick its config by timing? Not below `threshold` (LARGE_PROGRAMS by
    default), never under torch.use_deterministic_algorithms(True): the configs differ in chunk
    sizes and warps, i.e. in the order of the floating-point sums, and a pick by timing may
    differ between processes, so only the fixed default configs make o, lse, dq, dk, dv bitwise
    the same from one process to the next (within a process the pick is cached, and runs agree
    either way) -- and never for fp32 inputs: fp32 is the accuracy dtype (full-precision dots,
    no tensor cores), and tuning its configs cost an fp32 training call on the H200 120 s of
    compiling (T = 2k: forward 18 configs, dQ 12, dK/dV 6); with the tuned winners as fp32's
    fixed configs its first call took 15 s and its step the same time (twenty-sixth session,
    notes/backward.md)."""
    if torch.are_deterministic_algorithms_enabled() or dtype == torch.float32:
        return False
    return programs >= (LARGE_PROGRAMS if threshold is None else threshold)


# A tuned config's time: triton.testing.do_bench (>= 5 runs to estimate, then ~25 ms of warm-up
# and ~100 ms of repeats, at least one of each) -- except for a launch that is long itself. There
# do_bench still runs each config ~7 times: a 1M-token training step on one H200 had not finished
# its first call after 170 s and was still tuning the forward's 18 configs at 70 s
# (notes/cp_h200x2.txt). A launch over LONG_LAUNCH_MS is timed once after one warm-up run
# (which compiles the config): a long launch averages over its own many programs, so one run
# ranks the configs as well.
LONG_LAUNCH_MS = 20.0


def tuning_bench(kernel_call, quantiles=None, **kwargs):
    """The autotuner's timing of one config (Triton's `do_bench` hook): one warm-up run, one
    timed run, and Triton's do_bench only for a launch shorter than LONG_LAUNCH_MS."""
    kernel_call()
    ms = elapsed_ms(kernel_call, torch.cuda.is_available())
    if ms < LONG_LAUNCH_MS:
        return triton.testing.do_bench(kernel_call, quantiles=quantiles, **kwargs)
    return [ms] * len(quantiles) if quantiles else ms


def autotune(**kwargs):
    """triton.autotune with tuning_bench where this Triton takes a `do_bench` (3.4 and later)."""
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        kwargs.setdefault("do_bench", tuning_bench)
    return triton.autotune(**kwargs)


# BS: keys per loop step (a block of more keys is streamed in BLOCK / BS chunks; one of fewer
# than 16 is padded to 16, the smallest tl.dot operand).
TUNING_CONFIGS = [triton.Config({"BS": bs}, num_warps=w, num_stages=st)
                  for bs in (16, 32, 64) for w in (2, 4, 8) for st in (1, 2, 3)]


def group_tile(G: int) -> int:
    """Query heads per group-centric program (the BG heuristic): G padded to 16..64."""
    return min(64, max(16, triton.next_power_of_2(G)))


def default_chunk(block_size: int, K: int, V: int) -> int:
    """BS of the untuned config: a whole block up to 64 keys (32 beside a 256-wide head tile)."""
    widest = max(triton.next_power_of_2(K), triton.next_power_of_2(V))
    return max(16, min(block_size, 64 if widest <= 128 else 32))


def _chunk(args) -> int:
    """default_chunk from a launch's arguments (a heuristic of selection_split.py)."""
    return default_chunk(args["BLOCK"], args["K"], args["V"])


def untuned(args) -> bool:
    """Launch the default config: a small launch, or one being captured into a CUDA graph."""
    return not args["LARGE"] or (args["q"].is_cuda and torch.cuda.is_current_stream_capturing())


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    block = args["BLOCK"]
    if untuned(args):
        # fp32 (full-precision dots, never tuned) at one stage: 5.87 ms against 6.34 at two
        # (H200, T = 2k, HQ = 64, G = 16, d 128, random; the twenty-sixth session's tuning).
        stages = 1 if args["DOT_PRECISION"] == "ieee" else 2
        return [triton.Config({"BS": default_chunk(block, args["K"], args["V"])},
                              num_warps=4, num_stages=stages)]
    # Chunks of at most one block, at least 32 keys once blocks have 64 or more.
    usable = {max(16, min(block, 64))} | ({32} if block >= 64 else set())
    return [c for c in configs if c.kwargs["BS"] in usable]


_HEURISTICS = {
    "BK": lambda args: max(16, triton.next_power_of_2(args["K"])),
    "BV": lambda args: max(16, triton.next_power_of_2(args["V"])),
    "IS_VARLEN": lambda args: args["pos"] is not None,
    # fp32 inputs need full-precision dots to meet SPEC.md's fp32 tolerance (tf32 would not).
    "DOT_PRECISION": lambda args: "ieee" if args["q"].dtype == torch.float32 else "tf32",
}


@triton.jit
def query_of_program(pid, TQ, TK, heads, pos, k_offset, IS_VARLEN: tl.constexpr):
    """The query a program serves when its id runs over (batch, head, token), token fastest
    (neighbouring programs share block 0 and their own block in L2): (i_b, i_h, i_t, tok, p_abs,
    kv_start) with tok = i_b * TQ + i_t, p_abs the query's key position within its sequence and
    kv_start the sequence's first key along k's T axis (varlen: read from pos and k_offset)."""
    i_t = pid % TQ
    i_bh = pid // TQ
    i_b = i_bh // heads
    i_h = i_bh % heads
    tok = i_b * TQ + i_t
    if IS_VARLEN:
        p_abs = tl.load(pos + tok)
        kv_start = tl.load(k_offset + tok)
    else:
        p_abs = i_t + TK - TQ
        kv_start = i_t * 0
    return i_b, i_h, i_t, tok, p_abs, kv_start


@triton.jit
def group_queries(q, i_b, i_t, i_h, i_g, G, stride_qb, stride_qt, stride_qh, o_k,
                  K: tl.constexpr, BG: tl.constexpr):
    """Tile i_g of up to BG of KV head i_h's G query heads at token i_t of batch i_b: (heads [BG]
    query-head numbers, m_g [BG] which are real, b_q [BG, BK] their queries). Padded rows (beyond
    G) are zeros, harmless in the dots and never stored. Shared by the group-centric forward, the
    split-KV forward and the dq kernel."""
    o_g = i_g * BG + tl.arange(0, BG)
    m_g = o_g < G
    heads = i_h * G + o_g
    b_q = tl.load(q + i_b * stride_qb + i_t * stride_qt + heads[:, None] * stride_qh + o_k[None, :],
                  mask=m_g[:, None] & (o_k < K)[None, :], other=0.0)
    return heads, m_g, b_q


@triton.jit
def selected_chunk(row_blocks, it, o_s, p_abs, BLOCK: tl.constexpr, BS: tl.constexpr,
                   NC: tl.constexpr):
    """Step `it` of a row's walk over its canonical blocks, NC chunks of BS keys per block:
    (j [BS] key positions from the sequence's first key, m_j [BS] visible ones). Canonical
    entries are in range and causally trimmed, so the only masks are causality and, where a
    chunk is wider than a block, the keys past the block's end. Shared by the row kernels of the
    forward and the dq kernel of the backward."""
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
    return j, m_j


@triton.jit
def attend_chunk(b_q, k_base, v_base, j, m_j, o_k, o_v, stride_kt, stride_vt, qk_scale,
                 m_i, l_i, acc, K: tl.constexpr, V: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 MAY_BE_EMPTY: tl.constexpr = False):
    """One online-softmax step of a query tile b_q [BG, BK] over the keys j [BS] (visible where
    m_j): loads K [BS, BK] and V [BS, BV] (masked keys read nothing), returns the updated running
    max m_i [BG] and sum l_i [BG] (log2 domain) and accumulator acc [BG, BV]. Shared by the
    group-centric and the split-KV kernels. MAY_BE_EMPTY: a step may see no key while the
    running max is still -inf (the split kernel masks skipped entries instead of branching),
    so -inf - -inf must not reach exp2."""
    b_k = tl.load(k_base + j[:, None] * stride_kt + o_k[None, :],
                  mask=m_j[:, None] & (o_k < K)[None, :], other=0.0)
    b_v = tl.load(v_base + j[:, None] * stride_vt + o_v[None, :],
                  mask=m_j[:, None] & (o_v < V)[None, :], other=0.0)
    # [BG, BS]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale
    b_s = tl.where(m_j[None, :], b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    m_use = m_new
    if MAY_BE_EMPTY:
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.math.exp2(m_i - m_use)
    b_p = tl.math.exp2(b_s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(b_p, 1)
    # [BG, BV]
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.heuristics({
    **_HEURISTICS,
    "BG": lambda args: group_tile(args["G"]),
    "LARGE": lambda args: autotuned(args["num_blocks"].numel(), dtype=args["q"].dtype),
})
@autotune(configs=TUNING_CONFIGS, key=["BLOCK", "BK", "BV", "BG", "LARGE"],
          prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["TQ", "TK", "S", "H", "G"])
def selection_fwd_group_kernel(
    q, k, v, o, lse,
    blocks,            # [B, TQ, H, S] int32, canonical rows
    num_blocks,        # [B, TQ, H] int32
    pos, k_offset,     # [B, TQ] int64 each (varlen only; None otherwise)
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    qk_scale,          # scale * log2(e)
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
    NC: tl.constexpr = (BLOCK + BS - 1) // BS      # chunks per block

    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_s = tl.arange(0, BS)
    heads, m_g, b_q = group_queries(q, i_b, i_t, i_h, i_g, G, stride_qb, stride_qt, stride_qh,
                                    o_k, K, BG)

    k_base = k + i_b * stride_kb + kv_start * stride_kt + i_h * stride_kh
    v_base = v + i_b * stride_vb + kv_start * stride_vt + i_h * stride_vh
    row_blocks = blocks + row * S

    m_i = tl.full([BG], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BG], dtype=tl.float32)
    acc = tl.zeros([BG, BV], dtype=tl.float32)
    for it in range(n * NC):
        j, m_j = selected_chunk(row_blocks, it, o_s, p_abs, BLOCK, BS, NC)
        m_i, l_i, acc = attend_chunk(b_q, k_base, v_base, j, m_j, o_k, o_v, stride_kt, stride_vt,
                                     qk_scale, m_i, l_i, acc, K, V, DOT_PRECISION)

    # Empty rows: l_i == 0, acc == 0 -> o = 0, lse = -inf.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    b_o = acc / l_safe[:, None]
    b_lse = tl.where(l_i > 0, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    p_o = o + i_b * stride_ob + i_t * stride_ot + heads[:, None] * stride_oh + o_v[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_g[:, None] & (o_v < V)[None, :])
    tl.store(lse + tok * (H * G) + heads, b_lse, mask=m_g)


@triton.heuristics({
    **_HEURISTICS,
    "LARGE": lambda args: autotuned(args["num_blocks"].numel() * args["G"],
                                    dtype=args["q"].dtype),
})
@autotune(configs=TUNING_CONFIGS, key=["BLOCK", "BK", "BV", "LARGE"],
          prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["TQ", "TK", "S", "H", "G"])
def selection_fwd_head_kernel(
    q, k, v, o, lse,
    blocks, num_blocks, pos, k_offset,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    qk_scale,
    TQ, TK, S, H, G,
    K: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BS: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, LARGE: tl.constexpr,
):
    # One query row has no 16 rows for tl.dot: scores and the output are row reductions in fp32.
    i_b, i_hq, i_t, tok, p_abs, kv_start = query_of_program(
        tl.program_id(0).to(tl.int64), TQ, TK, H * G, pos, k_offset, IS_VARLEN)
    i_h = i_hq // G
    row = tok * H + i_h
    n = tl.load(num_blocks + row)
    NC: tl.constexpr = (BLOCK + BS - 1) // BS      # chunks per block

    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_s = tl.arange(0, BS)
    # [BK]
    b_q = tl.load(q + i_b * stride_qb + i_t * stride_qt + i_hq * stride_qh + o_k,
                  mask=o_k < K, other=0.0).to(tl.float32)
    k_base = k + i_b * stride_kb + kv_start * stride_kt + i_h * stride_kh
    v_base = v + i_b * stride_vb + kv_start * stride_vt + i_h * stride_vh
    row_blocks = blocks + row * S

    # The running max and sum are kept as [BS] vectors holding one value, which keeps their
    # type fixed through the loop (a scalar would start as a Python float).
    m_i = tl.full([BS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BS], dtype=tl.float32)
    acc = tl.zeros([BV], dtype=tl.float32)
    for it in range(n * NC):
        j, m_j = selected_chunk(row_blocks, it, o_s, p_abs, BLOCK, BS, NC)
        b_k = tl.load(k_base + j[:, None] * stride_kt + o_k[None, :],
                      mask=m_j[:, None] & (o_k < K)[None, :], other=0.0).to(tl.float32)
        b_v = tl.load(v_base + j[:, None] * stride_vt + o_v[None, :],
                      mask=m_j[:, None] & (o_v < V)[None, :], other=0.0).to(tl.float32)
        # [BS]
        b_s = tl.sum(b_k * b_q[None, :], 1) * qk_scale
        b_s = tl.where(m_j, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 0))
        alpha = tl.math.exp2(m_i - m_new)
        b_p = tl.math.exp2(b_s - m_new)
        l_i = l_i * alpha + tl.sum(b_p, 0)
        # [BV]
        acc = acc * tl.max(alpha, 0) + tl.sum(b_p[:, None] * b_v, 0)
        m_i = m_new

    l_row = tl.max(l_i, 0)
    m_row = tl.max(m_i, 0)
    l_safe = tl.where(l_row > 0, l_row, 1.0)
    b_o = acc / l_safe
    b_lse = tl.where(l_row > 0, (m_row + tl.math.log2(l_safe)) * LN2, float("-inf"))
    tl.store(o + i_b * stride_ob + i_t * stride_ot + i_hq * stride_oh + o_v,
             b_o.to(o.dtype.element_ty), mask=o_v < V)
    tl.store(lse + tok * (H * G) + i_hq, b_lse)


def _python_function(kernel):
    fn = kernel
    while not inspect.isfunction(fn):
        fn = fn.fn
    return fn


_interpreted_cache = {}


def _with_interpreted_helpers(fn):
    """`fn` with the @triton.jit helpers it calls (attend_chunk) swapped for interpreted twins:
    the interpreter runs a kernel's source in its module's globals, where a helper compiled for
    the GPU cannot be called. A copy of the function gets a copy of the globals; the module's own
    stay untouched for the GPU path."""
    import types

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    scope = dict(fn.__globals__)
    for name, value in fn.__globals__.items():
        if isinstance(value, JITFunction):
            scope[name] = InterpretedFunction(_python_function(value))
    twin = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    twin.__kwdefaults__ = fn.__kwdefaults__
    return twin


def _interpreted(kernel):
    """The same kernel run by Triton's CPU interpreter, whatever TRITON_INTERPRET said at import.

    triton.jit picks the interpreter at decoration time from the environment; the tests turn it on
    for their own calls only, so the interpreted twin is built here on demand, with the same
    heuristics and the untuned config (there is nothing to tune on the CPU).
    """
    if kernel not in _interpreted_cache:
        from triton.runtime.interpreter import InterpretedFunction

        fn = _with_interpreted_helpers(_python_function(kernel))
        values = dict(kernel.values)  # the compiled kernel's heuristics
        if "BS" in inspect.signature(fn).parameters and "BS" not in values:
            values["BS"] = _chunk         # autotuned when compiled: the untuned choice here
        _interpreted_cache[kernel] = triton.heuristics(values)(InterpretedFunction(fn))
    return _interpreted_cache[kernel]


def selection_fwd(q, k, v, blocks, num_blocks, *, scale: float, block_size: int,
                  pos=None, k_offset=None, group: bool = True, interpret: bool = False):
    """Launch one forward kernel. Returns (o, lse, grid).

    q [B, TQ, HQ, Dk], k [B, TK, H, Dk], v [B, TK, H, Dv] (last dim contiguous, any other strides);
    blocks [B, TQ, H, S] int32 and num_blocks [B, TQ, H] int32 as `canonical_blocks` makes them;
    pos, k_offset [B, TQ] int64 for varlen (None: dense, query t at TK - TQ + t, keys from 0).
    `group` picks the group-centric kernel, else the per-head one.
    """
    B, TQ, HQ, Dk = q.shape
    _, TK, H, Dv = v.shape
    G = HQ // H
    S = blocks.shape[-1]
    blocks = blocks.contiguous()
    num_blocks = num_blocks.contiguous()
    if pos is not None:
        pos = pos.to(torch.int64).contiguous()
        k_offset = k_offset.to(torch.int64).contiguous()
    o = torch.empty((B, TQ, HQ, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, TQ, HQ), dtype=torch.float32, device=q.device)
    kernel = selection_fwd_group_kernel if group else selection_fwd_head_kernel
    if group:
        grid = (TQ * B * H, triton.cdiv(G, group_tile(G)))
    else:
        grid = (TQ * B * HQ,)
    if interpret:
        kernel = _interpreted(kernel)
    kernel[grid](
        q, k, v, o, lse, blocks, num_blocks, pos, k_offset,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        scale * LOG2E,
        TQ, TK, S, H, G,
        K=Dk, V=Dv, BLOCK=block_size,
    )
    return o, lse, grid


__all__ = ["selection_fwd", "selection_fwd_group_kernel", "selection_fwd_head_kernel",
           "group_tile", "LOG2E"]
