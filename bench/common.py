"""Shared pieces of the benches: inputs (selection patterns), the work each case represents,
timing, peak memory, environment header, progress, and the bench's own gather-floor kernel.

Nothing here imports `nsa_ext` at module load, so the helpers (and the CPU test that uses them)
work while the package is half-built; the benches import it themselves.

Selection patterns, both duplicate-free and causal (every selected block holds at least one key
the query may see), so fla's kernel, which counts a repeated block twice, computes the same
function as ours:
  - `random`: block 0, the query's own block, then random distinct earlier blocks: the worst case
    for reuse between neighbouring queries (NSA paper, fla's tests).
  - `clustered`: the 64 queries of a query tile draw from one shared pool of S - 2 + SPARE earlier
    blocks, each query keeping S - 2 of them: neighbours share most blocks, as NSA's
    compressed-attention scores make them.
  - `model`: what a trained model's selection looks like: NSA's top-k over block scores, with
    block 0 and the two local blocks (own, own - 1) forced as NSA does. The scores are
    q_t . k_block / sqrt(d) + bias_block over a d = 32 feature space, with queries drifting
    smoothly along the sequence (linear interpolation between random knots every MODEL_KNOT
    positions, plus MODEL_NOISE of fresh noise per token) and a per-block bias (blocks every
    query likes, as attention sinks are). Tuned so adjacent rows share ~90% of their blocks
    (S = 16 of 64: mean Jaccard 0.93 at T = 8k, 0.90 at 32k; 64-query tiles select 23 / 30
    distinct blocks), as published selection dumps show (87-94% at 8k); the bench reports both
    per case.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
TILE = 64            # queries per tile for the tile-wise gather floor and the clustered pattern
CLUSTER_SPARE = 4    # extra blocks in a clustered tile's shared pool
PATTERNS = ("random", "clustered", "model")
MODEL_DIM, MODEL_KNOT, MODEL_NOISE, MODEL_BIAS = 32, 64, 0.07, 1.0


# ----------------------------------------------------------------------------------------------
# Inputs

@dataclass(frozen=True)
class Shape:
    B: int
    TQ: int
    TK: int
    HQ: int
    H: int
    Dk: int
    Dv: int
    S: int               # selected blocks per row
    block_size: int = 64

    @property
    def G(self) -> int:
        return self.HQ // self.H

    @property
    def selected_len(self) -> int:
        return self.S * self.block_size

    @property
    def num_kv_blocks(self) -> int:
        return math.ceil(self.TK / self.block_size)


def _rows_per_chunk(width: int, budget_elems: int = 1 << 25) -> int:
    return max(1, budget_elems // max(1, width))


# Past this many random keys (rows x blocks) the exact sampler below costs minutes (1M queries
# over 2M keys: 4M rows x 32k blocks = 1.4e11 keys), so rows with many candidates sample by
# drawing with replacement instead (_distinct_by_draws). Below it the exact sampler keeps every
# committed bench input as it was.
EXACT_SAMPLER_MAX_KEYS = 1 << 34


def _distinct_exact(limit: torch.Tensor, count: int, width: int, generator) -> torch.Tensor:
    """[R, count]: random keys for every candidate in [1, limit), the `count` largest (top-k);
    -1 where a row has fewer than `count` candidates. `width` > every limit - 1."""
    R = limit.shape[0]
    device = limit.device
    out = torch.empty(R, count, dtype=torch.int64, device=device)
    step = _rows_per_chunk(width)
    cand = torch.arange(width, device=device)
    for lo in range(0, R, step):
        lim = limit[lo:lo + step]
        keys = torch.rand(lim.shape[0], width, device=device, generator=generator)
        ok = (cand >= 1) & (cand < lim[:, None])
        keys = torch.where(ok, keys, torch.full_like(keys, -1.0))
        vals, idx = keys.topk(count, dim=-1)
        out[lo:lo + step] = torch.where(vals >= 0, idx, torch.full_like(idx, -1))
    return out


def _distinct_by_draws(limit: torch.Tensor, count: int, generator) -> torch.Tensor:
    """[R, count] distinct integers in [1, limit) per row, each row a uniform random subset, for
    rows with limit - 1 >= 4 * count: 4 * count draws with replacement, their distinct values
    in random order, the first `count` kept (a row short of `count` distinct values, rare, is
    drawn again exactly)."""
    R = limit.shape[0]
    device = limit.device
    draws_per_row = 4 * count
    out = torch.empty(R, count, dtype=torch.int64, device=device)
    step = _rows_per_chunk(draws_per_row)
    for lo in range(0, R, step):
        lim = limit[lo:lo + step]
        n = lim.shape[0]
        draws = 1 + (torch.rand(n, draws_per_row, device=device, generator=generator)
                     * (lim[:, None] - 1)).long().clamp_max(lim[:, None] - 2)
        values, _ = draws.sort(dim=-1)
        repeat = torch.zeros_like(values, dtype=torch.bool)
        repeat[:, 1:] = values[:, 1:] == values[:, :-1]
        keys = torch.rand(n, draws_per_row, device=device, generator=generator)
        keys = torch.where(repeat, torch.full_like(keys, -1.0), keys)   # each value once
        vals, pick = keys.topk(count, dim=-1)
        chosen = values.gather(-1, pick)
        short = (vals < 0).any(dim=-1)
        if bool(short.any()):
            rows = short.nonzero().squeeze(1)
            width = int(lim[rows].max())
            chosen[rows] = _distinct_exact(lim[rows], count, width, generator)
        out[lo:lo + step] = chosen
    return out


def _distinct_below(limit: torch.Tensor, count: int, num_blocks: int, generator) -> torch.Tensor:
    """[R, count] distinct random integers in [1, limit) per row (limit [R]), -1 where a row has
    fewer than `count` candidates. Random keys + top-k: vectorised sampling without replacement."""
    R = limit.shape[0]
    if count == 0:
        return torch.empty(R, 0, dtype=torch.int64, device=limit.device)
    width = max(num_blocks, count + 1)
    if R * width <= EXACT_SAMPLER_MAX_KEYS:
        return _distinct_exact(limit, count, width, generator)
    wide = limit - 1 >= 4 * count
    out = torch.empty(R, count, dtype=torch.int64, device=limit.device)
    rows = wide.nonzero().squeeze(1)
    out[rows] = _distinct_by_draws(limit[rows], count, generator)
    rows = (~wide).nonzero().squeeze(1)
    out[rows] = _distinct_exact(limit[rows], count, min(width, 4 * count + 2), generator)
    return out


def make_block_indices(shape: Shape, pattern: str, *, device="cpu", seed: int = 0) -> torch.Tensor:
    """[B, TQ, H, S] int32 selection for `pattern` ("random" or "clustered"); -1 pads short rows."""
    B, TQ, TK, H, S, bs = shape.B, shape.TQ, shape.TK, shape.H, shape.S, shape.block_size
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    pos = torch.arange(TQ, device=device) + (TK - TQ)                      # [TQ] absolute position
    own = pos // bs                                                        # [TQ] own block
    nb = shape.num_kv_blocks
    fixed = torch.stack([torch.zeros_like(own), torch.where(own > 0, own, -1)], -1)  # [TQ, 2]
    fixed = fixed[None, :, None, :].expand(B, TQ, H, 2)
    if S <= 2:
        out = fixed[..., :S]
        return out.to(torch.int32).contiguous()
    extra = S - 2
    if pattern == "random":
        limit = own[None, :, None].expand(B, TQ, H).reshape(-1)
        rest = _distinct_below(limit, extra, nb, generator).reshape(B, TQ, H, extra)
    elif pattern == "clustered":
        # One pool per (batch, query tile, head), drawn below the tile's first query's own block,
        # so every pooled block is visible to every query of the tile.
        num_tiles = math.ceil(TQ / TILE)
        tile_first = torch.arange(num_tiles, device=device) * TILE
        tile_limit = own[tile_first]                                      # [num_tiles]
        pool_size = extra + CLUSTER_SPARE
        limit = tile_limit[None, :, None].expand(B, num_tiles, H).reshape(-1)
        pool = _distinct_below(limit, pool_size, nb, generator).reshape(B, num_tiles, H, pool_size)
        pool = pool.repeat_interleave(TILE, dim=1)[:, :TQ]                 # [B, TQ, H, pool]
        keys = torch.rand(B, TQ, H, pool_size, device=device, generator=generator)
        keys = torch.where(pool >= 0, keys, torch.full_like(keys, -1.0))   # valid entries first
        pick = keys.topk(extra, dim=-1).indices
        rest = pool.gather(-1, pick)
    elif pattern == "model":
        rest = _model_rest(B, TQ, H, extra, pos, own, nb, generator)
    else:
        raise ValueError(f"pattern: expected one of {', '.join(PATTERNS)}, got {pattern!r}")
    return torch.cat([fixed, rest], dim=-1).to(torch.int32).contiguous()


def _model_rest(B, TQ, H, extra, pos, own, nb, generator, chunk: int = 4096) -> torch.Tensor:
    """[B, TQ, H, extra]: block own - 1 (the second local block), then the top extra - 1 blocks
    of [1, own - 2] by the `model` pattern's scores; -1 where a row has fewer candidates."""
    device = pos.device
    dim = MODEL_DIM
    knots = torch.randn(B, H, int(pos.max().item()) // MODEL_KNOT + 2, dim, device=device,
                        generator=generator)
    kc = torch.randn(B, H, nb, dim, device=device, generator=generator) / math.sqrt(dim)
    bias = MODEL_BIAS * torch.randn(B, H, nb, device=device, generator=generator)
    cand = torch.arange(nb, device=device)
    out = []
    for lo in range(0, TQ, chunk):
        p = pos[lo:lo + chunk].to(torch.float32) / MODEL_KNOT
        i0 = p.floor().long()
        w = (p - i0)[None, None, :, None]
        q = knots[:, :, i0] * (1 - w) + knots[:, :, i0 + 1] * w          # [B, H, n, dim]
        q = q + MODEL_NOISE * torch.randn(q.shape, device=device, generator=generator)
        score = torch.einsum("bhtd,bhnd->bthn", q, kc) + bias[:, None]    # [B, n, H, nb]
        o = own[lo:lo + chunk]
        ok = (cand[None, :] >= 1) & (cand[None, :] < (o[:, None] - 1))   # [n, nb]
        score = torch.where(ok[None, :, None, :], score, torch.full_like(score, float("-inf")))
        local = torch.where(o >= 2, o - 1, -1)[None, :, None, None].expand(B, -1, H, 1)
        if extra > 1:
            top = score.topk(min(extra - 1, nb), dim=-1)
            picked = torch.where(torch.isfinite(top.values), top.indices, -1)
            if picked.shape[-1] < extra - 1:
                pad = torch.full((*picked.shape[:-1], extra - 1 - picked.shape[-1]), -1,
                                 dtype=picked.dtype, device=device)
                picked = torch.cat([picked, pad], dim=-1)
            out.append(torch.cat([local, picked], dim=-1))
        else:
            out.append(local)
    return torch.cat(out, dim=1)


def adjacent_jaccard(block_indices: torch.Tensor, skip: int = 256) -> float:
    """Mean Jaccard similarity of the selected sets of adjacent query rows (same KV head),
    leaving out the first `skip` rows (which have few blocks to choose from)."""
    idx = block_indices[:, skip:] if block_indices.shape[1] > skip + 1 else block_indices
    a, b = idx[:, 1:], idx[:, :-1]
    if a.numel() == 0:
        return 1.0
    inter = ((a.unsqueeze(-1) == b.unsqueeze(-2)) & (a >= 0).unsqueeze(-1)).any(-1).sum(-1).float()
    union = (a >= 0).sum(-1).float() + (b >= 0).sum(-1).float() - inter
    return (inter / union.clamp(min=1)).mean().item()


def add_prefill_arguments(parser, T: int = 32768) -> None:
    """--T, --G and --pattern of the profiling scripts' one prefill call (prefill_inputs)."""
    parser.add_argument("--T", type=int, default=T)
    parser.add_argument("--G", type=int, default=16, help="query heads per KV head (H = 4)")
    parser.add_argument("--pattern", default="model", choices=list(PATTERNS))


def prefill_inputs(args, device="cuda"):
    """(q, k, v, block_indices) of the bench's prefill shape at args.T, args.G, args.pattern:
    bf16, B = 1, HQ = 4G, H = 4, D = 128, 16 blocks of 64."""
    shape = Shape(B=1, TQ=args.T, TK=args.T, HQ=4 * args.G, H=4, Dk=128, Dv=128, S=16,
                  block_size=64)
    q, k, v = make_qkv(shape, torch.bfloat16, device)
    return q, k, v, make_block_indices(shape, args.pattern, device=device)


def make_qkv(shape: Shape, dtype, device, *, seed: int = 0, requires_grad: bool = False):
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + 1)

    def rnd(*size):
        t = torch.randn(*size, device=device, dtype=torch.float32, generator=generator).to(dtype)
        return t.requires_grad_(requires_grad)

    q = rnd(shape.B, shape.TQ, shape.HQ, shape.Dk)
    k = rnd(shape.B, shape.TK, shape.H, shape.Dk)
    v = rnd(shape.B, shape.TK, shape.H, shape.Dv)
    return q, k, v


# ----------------------------------------------------------------------------------------------
# The work a case represents

def tile_unions(block_indices: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """[B, num_tiles, H, U] int32: the distinct valid blocks selected by any query of each tile of
    `tile` neighbouring queries (per KV head), sorted, padded with -1; U = the largest union."""
    B, TQ, H, S = block_indices.shape
    num_tiles = math.ceil(TQ / tile)
    idx = block_indices.to(torch.int64)
    if num_tiles * tile != TQ:
        pad = torch.full((B, num_tiles * tile - TQ, H, S), -1, dtype=idx.dtype, device=idx.device)
        idx = torch.cat([idx, pad], dim=1)
    idx = idx.reshape(B, num_tiles, tile, H, S).permute(0, 1, 3, 2, 4).reshape(B, num_tiles, H, tile * S)
    sentinel = torch.iinfo(torch.int64).max
    ordered = torch.where(idx >= 0, idx, sentinel).sort(dim=-1).values
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    ordered = torch.where(repeat, sentinel, ordered).sort(dim=-1).values
    width = max(1, int((ordered != sentinel).sum(-1).max().item()))
    ordered = ordered[..., :width]
    return torch.where(ordered == sentinel, -1, ordered).to(torch.int32).contiguous()


@dataclass(frozen=True)
class Work:
    pairs: int              # attended (query head, key) pairs, summed over query heads
    dense_pairs: int        # causal dense pairs, summed over query heads
    row_bytes: int          # K/V bytes if every (query, KV head) row reads its selected blocks
    tile_bytes: int         # K/V bytes if each tile of 64 queries reads each distinct block once
    rows: int
    mean_union: float       # distinct blocks per tile (and KV head), on average
    jaccard: float = 1.0    # mean Jaccard similarity of adjacent rows' selections

    def flops(self, dk: int, dv: int, dense: bool = False, backward: bool = False) -> float:
        """2 * (Dk + Dv) per pair (= 4 * D * pairs when Dk == Dv); a backward pass counts 2.5x
        the forward (FlashAttention's convention), so forward + backward is 3.5x."""
        pairs = self.dense_pairs if dense else self.pairs
        return 2.0 * (dk + dv) * pairs * (3.5 if backward else 1.0)


def measure_work(shape: Shape, block_indices: torch.Tensor, unions: torch.Tensor, elem: int) -> Work:
    """Exact counts for a duplicate-free causal selection (what make_block_indices produces)."""
    bs = shape.block_size
    pos = (torch.arange(shape.TQ, device=block_indices.device) + (shape.TK - shape.TQ))
    idx = block_indices.to(torch.int64)
    valid = idx >= 0
    keys = (pos[None, :, None, None] - idx * bs + 1).clamp(0, bs)
    keys = torch.where(valid, keys, 0)
    pairs = int(keys.sum().item()) * shape.G
    dense_pairs = int((pos + 1).sum().item()) * shape.HQ * shape.B
    token_bytes = bs * (shape.Dk + shape.Dv) * elem
    row_blocks = int(valid.sum().item())
    tile_blocks = int((unions >= 0).sum().item())
    num_unions = unions.shape[0] * unions.shape[1] * unions.shape[2]
    return Work(pairs=pairs, dense_pairs=dense_pairs, row_bytes=row_blocks * token_bytes,
                tile_bytes=tile_blocks * token_bytes, rows=shape.B * shape.TQ * shape.H,
                mean_union=tile_blocks / max(1, num_unions),
                jaccard=adjacent_jaccard(block_indices))


# ----------------------------------------------------------------------------------------------
# The gather floor: a kernel that only reads the selected K/V blocks

_floor_kernel = None


def _get_floor_kernel():
    """Built lazily so importing this module never needs Triton (and TRITON_INTERPRET can be set
    by the caller first)."""
    global _floor_kernel
    if _floor_kernel is not None:
        return _floor_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def gather_floor_kernel(k, v, lists, out, TK, H: tl.constexpr, L, W,
                            DK: tl.constexpr, DV: tl.constexpr,
                            BDK: tl.constexpr, BDV: tl.constexpr, BS: tl.constexpr):
        """One program reads one listed block: its K tile [BS, DK] and V tile [BS, DV], and writes
        one fp32 (the sum, so the loads stay). `lists` is [B, L, H, W]: per (batch, list, KV head)
        W block numbers, -1 = nothing to read (masked loads touch no memory)."""
        pid = tl.program_id(0).to(tl.int64)
        row = pid // W                       # (b * L + l) * H + h
        h = row % H
        b = row // (L * H)
        blk = tl.load(lists + pid).to(tl.int64)
        tok = blk * BS + tl.arange(0, BS)    # [BS]
        m_tok = (blk >= 0) & (tok < TK)
        base = (b * TK + tok) * H + h        # [BS] token row in [B * TK * H]
        o_dk = tl.arange(0, BDK)
        o_dv = tl.arange(0, BDV)
        # [BS, BDK], [BS, BDV]
        b_k = tl.load(k + base[:, None] * DK + o_dk[None, :],
                      mask=m_tok[:, None] & (o_dk[None, :] < DK), other=0.0)
        b_v = tl.load(v + base[:, None] * DV + o_dv[None, :],
                      mask=m_tok[:, None] & (o_dv[None, :] < DV), other=0.0)
        total = tl.sum(tl.sum(b_k.to(tl.float32), 1), 0) + tl.sum(tl.sum(b_v.to(tl.float32), 1), 0)
        tl.store(out + pid, total)

    _floor_kernel = gather_floor_kernel
    return _floor_kernel


def gather_floor_fn(k: torch.Tensor, v: torch.Tensor, lists: torch.Tensor, block_size: int):
    """A callable reading every listed block of k/v once. lists: [B, L, H, W] int32."""
    import triton

    kernel = _get_floor_kernel()
    B, TK, H, DK = k.shape
    DV = v.shape[-1]
    _, L, _, W = lists.shape
    lists = lists.contiguous()
    out = torch.empty(lists.numel(), dtype=torch.float32, device=k.device)
    grid = (lists.numel(),)
    bdk, bdv = triton.next_power_of_2(DK), triton.next_power_of_2(DV)

    def run():
        kernel[grid](k, v, lists, out, TK, H, L, W, DK, DV, bdk, bdv, block_size, num_warps=4)
        return out

    return run


# ----------------------------------------------------------------------------------------------
# Timing and memory

class Timer:
    """Median time of a callable, in ms, and the peak memory of one call.

    CUDA: triton.testing.do_bench (events around each call, L2 flushed before each call, after
    warm-up), median. A slow row (one call over `slow_ms`, e.g. packed SDPA's training step at
    32k) is instead the median of 3 calls timed the same way (events, L2 flushed), since do_bench
    would spend ~8 calls on it; the row's note says so. CPU: perf_counter, median of repeated calls.
    """

    def __init__(self, device: torch.device, warmup_ms: float = 10, rep_ms: float = 50,
                 cpu_budget_s: float = 1.0, slow_ms: float = 150.0):
        self.device = torch.device(device)
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.cpu_budget_s = cpu_budget_s
        self.slow_ms = slow_ms
        self._flush = None

    def __call__(self, fn: Callable, grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
        return self.measure(fn, grad_to_none)[0]

    def _once_cuda(self, fn, grad_to_none) -> float:
        if self._flush is None:
            self._flush = torch.empty(256 << 20, dtype=torch.int8, device=self.device)
        for t in grad_to_none or ():
            t.grad = None
        self._flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize(self.device)
        del result
        return start.elapsed_time(end)

    def measure(self, fn: Callable, grad_to_none: Optional[Sequence[torch.Tensor]] = None):
        """(ms, peak extra MiB or None, note). `fn` must already be compiled / autotuned."""
        if self.device.type == "cuda":
            from triton.testing import do_bench

            torch.cuda.synchronize(self.device)
            if self._flush is None:
                self._flush = torch.empty(256 << 20, dtype=torch.int8, device=self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            first = self._once_cuda(fn, grad_to_none)
            peak = (torch.cuda.max_memory_allocated(self.device) - base) / (1 << 20)
            if first > self.slow_ms:
                samples = [first] + [self._once_cuda(fn, grad_to_none) for _ in range(2)]
                return statistics.median(samples), peak, "median of 3 calls (slow row)"
            ms = do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=grad_to_none,
                          return_mode="median")
            return float(ms), peak, ""
        times: List[float] = []
        start = time.perf_counter()
        fn()  # warm-up
        first = time.perf_counter() - start
        # A slow call (the Triton interpreter, a large reference) is timed once more, not 3x.
        least = 1 if first > self.cpu_budget_s / 2 else 3
        deadline = time.perf_counter() + self.cpu_budget_s
        while len(times) < least or (time.perf_counter() < deadline and len(times) < 50):
            for t in grad_to_none or ():
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), None, ""


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def capture_graph(fn: Callable, warmup: int = 2):
    """(a CUDA graph holding one call of `fn`, that call's output, kept alive by the caller). `fn`
    runs `warmup` times on a side stream first, as torch.cuda.graph asks: lazy initialisation,
    the allocator's pools and tuned kernels are in place before the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def eager_times(fn: Callable, device, calls: int, repeats: int = 5) -> Dict[str, float]:
    """Eager calls without a graph: {"eager_us": whole call (enqueue + the GPU's work, synchronised
    once per run), "host_us": enqueue time alone}, each the best of `repeats` runs of `calls`
    calls after a warm-up (bench/eager_bench.py, and the decode / chunk rows of the main bench)."""
    for _ in range(min(10, calls)):
        fn()
    sync(device)
    eager, host = [], []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        enqueued = time.perf_counter()
        sync(device)
        done = time.perf_counter()
        host.append((enqueued - start) / calls * 1e6)
        eager.append((done - start) / calls * 1e6)
    return {"eager_us": min(eager), "host_us": min(host)}


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: Optional[int] = None) -> Dict[str, float]:
    """A large device-to-device copy; GB/s counts bytes read plus bytes written."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return {"bytes": nbytes, "ms": ms, "gbps": 2 * nbytes / (ms * 1e-3) / 1e9}


def host_launch_us(device: torch.device, launches: int = 2000, rounds: int = 3) -> float:
    """Host microseconds to enqueue one tiny op (an in-place add on one element): the anchor for
    rows bound by host time (eager calls, auto's chooser, short kernels), as the copy bandwidth
    is for rows bound by memory. Timed before any synchronisation (the queue of tiny kernels does
    not fill), best of `rounds`. Measured at a run's start and end, a difference says the host
    slowed down during the run."""
    device = torch.device(device)
    x = torch.zeros(1, device=device)
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(launches):
            x.add_(1)
        best = min(best, (time.perf_counter() - t0) / launches * 1e6)
        sync(device)
    return best


def cycle(fns: Sequence[Callable]) -> Callable:
    """Rotate among input sets (each its own callable), so a small case is not timed from L2."""
    if len(fns) == 1:
        return fns[0]
    state = {"i": 0}

    def run():
        i = state["i"]
        state["i"] = (i + 1) % len(fns)
        return fns[i]()

    return run


def rotation_sets(input_bytes: int, device: torch.device, limit: int = 8) -> int:
    """How many input sets keep the working set well above L2 (1 off CUDA)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    if input_bytes >= 2 * l2:
        return 1
    return max(1, min(limit, math.ceil(3 * l2 / max(1, input_bytes))))


@contextlib.contextmanager
def environ(**values: Optional[str]):
    """Set (or with None, remove) environment variables inside the block."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----------------------------------------------------------------------------------------------
# Environment header and progress

def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def _git_commit() -> str:
    if os.environ.get("NSA_BENCH_GIT_COMMIT"):      # a copy of the tree without .git (device runs)
        return os.environ["NSA_BENCH_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + (" (with local changes)" if dirty else "") if out.returncode == 0 else "unknown"
    except Exception:
        return "unknown"


def environment(device: torch.device) -> Dict[str, object]:
    device = torch.device(device)
    env: Dict[str, object] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "git_commit": _git_commit(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as err:
        env["triton"] = f"not importable ({type(err).__name__})"
    try:
        import nsa_ext

        env["nsa_ext"] = nsa_ext.__version__
        try:
            ext = nsa_ext.backend_info().get("cuda_extension", {})
            env["nsa_ext_cuda_extension"] = ext
        except Exception as err:
            env["nsa_ext_cuda_extension"] = f"backend_info failed: {err}"
    except Exception as err:
        env["nsa_ext"] = f"not importable ({type(err).__name__}: {err})"
    env["fla_core"] = _version("fla-core")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "device": "cuda",
            "gpu": props.name,
            "sm": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / (1 << 30), 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / (1 << 20), 1),
            "cudnn": torch.backends.cudnn.version(),
        })
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else "unknown"
        except Exception:
            env["driver"] = "unknown"
        env.update(gpu_clock_limits(device))
    else:
        env.update({"device": "cpu", "cpu": platform.processor() or platform.machine(),
                    "cpu_threads": torch.get_num_threads()})
    return env


# --- The GPU's clock and power state right after a timed row -----------------------------------
# A GPU at its board power limit lowers its SM clock: the H200 ran the model-32k prefill at ~691 of
# its 700 W and ~1.74 GHz instead of 1.98 (notes/hopper.md, nineteenth session), so a row's time
# moves with the power state of the run. The bench records that state (NVML's) after each GPU row.

# NVML's clocks-event reason bits (nvml.h): software power cap, hardware power brake; software
# thermal, hardware thermal, hardware slowdown.
POWER_CAP_REASONS = 0x4 | 0x80
THERMAL_REASONS = 0x20 | 0x40 | 0x8


def _nvml_handle(device):
    import pynvml  # noqa: F401  (nvidia-ml-py; torch's helper below needs it)

    return torch.cuda._get_pynvml_handler(torch.device(device))   # honours CUDA_VISIBLE_DEVICES


def power_state(device) -> Optional[Dict[str, object]]:
    """NVML's SM clock (MHz) and board power (W) now, each over NVML's own sample window, the
    enforced power limit (W) and whether NVML names a power or a thermal reason for a lower clock
    (its reasons are sticky over a window: the power cap shows after a 321 W row too); None
    without NVML. (A clock64 spin timed with CUDA events read 1.9-3.6 GHz on the H200, above its
    1980 MHz maximum: SM cycles counted that way are not this clock, so the bench asks NVML.)"""
    try:
        import pynvml

        handle = _nvml_handle(device)
        reasons_of = (getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                      or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons)
        reasons = int(reasons_of(handle))
        return {"sm_mhz": int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                "power_w": round(pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3, 1),
                "limit_w": round(pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3),
                "power_cap": bool(reasons & POWER_CAP_REASONS),
                "thermal": bool(reasons & THERMAL_REASONS)}
    except Exception:
        return None


def gpu_state_after(device) -> Optional[Dict[str, object]]:
    """power_state right after a timed row, while the row's power state holds; None off CUDA or
    without NVML."""
    if torch.device(device).type != "cuda":
        return None
    return power_state(device)


def gpu_state_note(state: Optional[Dict[str, object]]) -> str:
    """'SM 1740 MHz, 691/700 W, power cap' (the parts known), '' for no state."""
    if not state:
        return ""
    parts = []
    if state.get("sm_mhz") is not None:
        parts.append(f"SM {state['sm_mhz']} MHz")
    if state.get("power_w") is not None:
        parts.append(f"{state['power_w']:.0f}/{state['limit_w']} W")
    parts += [name.replace("_", " ") for name in ("power_cap", "thermal") if state.get(name)]
    return ", ".join(parts)


def gpu_clock_limits(device) -> Dict[str, object]:
    """The SM clock's maximum (MHz) and the enforced power limit (W) from NVML; {} without it."""
    try:
        import pynvml

        handle = _nvml_handle(device)
        return {"sm_clock_max_mhz": int(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                "power_limit_w": round(pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3)}
    except Exception:
        return {}


class Progress:
    """tqdm over the rows when importable, else a plain counter on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total = total
        self.count = 0
        self.enabled = enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                self.bar = None

    def step(self, label: str) -> None:
        self.count += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label[:60], refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.count}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def short_error(err: BaseException, limit: int = 160) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    first = text[0] if text else type(err).__name__
    return first if len(first) <= limit else first[:limit - 3] + "..."


def dump_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def fmt_tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
