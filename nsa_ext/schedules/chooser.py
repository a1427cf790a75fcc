"""Which forward schedule runs a call, and why (readable through `nsa_ext.explain`).

Forced (`NSA_SEL_SCHEDULE` / `runtime.sel_schedule` = row | tile | kv): that schedule, or
`ScheduleUnavailableError` naming why it cannot serve the call (no silent fallback, as for a
named backend). `auto`:

1. Calls too small to fill the GPU (decode) take the row schedule's split-KV kernel: decided by
   the backend from shapes alone, so a CUDA-graph decode step never reads device values here.
2. Otherwise each schedule that can serve the call gets a predicted time from a cost model of
   what it moves and computes (below), and the smallest wins. The model needs two counts from
   the device: the selections (sum of the canonical rows' lengths) and the tile unions' sizes
   relative to their selections: on CUDA, from the whole union (one launch before the sync,
   which the tile schedule then reuses; up to `tiles.UNION_BEFORE_SYNC_BYTES`), else measured
   on a sample of ~256 tiles per KV head (`tiles.sampled_overlap`). Reading them is one host
   synchronisation,
   taken only here and only outside CUDA-graph capture; during a capture the counts are the
   shape bounds (every row full, no overlap), so `tile` is not chosen there.

Where `runtime.thresholds.<arch>` holds measured crossovers (the H200 bench of 2026-11-30 for
sm90), they decide instead of the cost model's ranking:
- `sel_tile_min_rows`: calls with fewer (batch x query x KV head) rows read no statistic on
  the host and never take `tile` here (its union pre-pass, launched after the statistic's sync,
  cost 0.55-0.8 ms of host time that the GPU waits for: at T = 8k that is more than the tile
  saves). Where the CUDA extension's Hopper kernel serves such a call, the CUDA backend lets the
  device choose instead (`nsa_ext_cuda::selection_fwd_auto`: both kernels enqueued behind the
  union, each gated on the same counts and the same crossover; backends/cuda.py device_choice),
  which costs no sync;
- `sel_tile_max_union_pct`: `tile` when the sampled union is at most this % of the selections
  (the model pattern, 15 %, won 1.5-2.7x; random, 67-79 %, lost 1.1-1.6x against row);
- `sel_kv_max_g`: otherwise `kv` for G up to this (G = 1 random at 32k: kv 3.29 ms, row 7.77),
  else `row`; for those G, `tile` only at a union of at most `sel_kv_tile_max_union_pct` %
  (G = 1: 64-token tiles; model 3 % took tile 0.87 ms vs kv 3.27, random 23 % kv 3.29 vs tile 4.19).
- `sel_cuda_tile_max_union_pct` (optional): replaces `sel_tile_max_union_pct` where the tile
  schedule runs on the CUDA extension's Hopper kernel (`tile_backend="cuda"`), which wins up to
  larger unions than Triton's tile kernel (H200, G = 16, random: the CUDA tile kernel beat Triton's
  row schedule at union 61 % (8k) and 71 % (16k), tied at 79 % (32k), lost at 83 % (64k)).

The cost model (per call; bytes and flops are exact counts, the rates are per-architecture
constants that `configs/base.yaml` `runtime.thresholds.<arch>` may override as integers:
`sel_l2_gbps`, `sel_hbm_gbps`, `sel_mma_tflops` (tiles of fewer than 64 rows: mma.sync),
`sel_wgmma_tflops` (64 rows or more on SM 9.0, where Triton issues wgmma)):
- row: each (row, selected block) pair loads the block (2 * BLOCK * D bytes from L2) and runs
  its dots on max(16, G) padded rows;
- tile: each (tile, union block) loads the block once and runs the dots on all the tile's rows
  (masked ones too), plus the union pre-pass;
- kv: each (row, selected block) pair moves G query rows in and G fp32 partial rows out and
  back (HBM), each work item loads its block once and runs dots on all its rows, plus the
  inverse-index pre-pass.
Time = max(bytes / bandwidth, flops / MMA rate) + pre-pass. Crude, but it ranks the schedules
by the quantities that decide them (G, overlap, head dims); measured crossovers refine the
rates. The row schedule is measured at its floor while the others' times are predictions, so
another schedule must be predicted faster than row by a margin (`sel_row_margin_pct`, default
85: at most 85% of row's time) to be chosen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..call import SelectionCall
from ..config import Settings
from ..device import DeviceFacts
from . import SCHEDULES, Prepared, schedule_module

# Rates (H100/H200 class, bf16): effective L2 -> SM gather bandwidth, HBM bandwidth, the MMA
# throughput of a Triton kernel with 16-row tiles (mma.sync) and with 64-row tiles on SM 9.0
# (wgmma). fp32 (ieee dots) runs at ~1/16 the MMA rate.
DEFAULT_RATES = {"sel_l2_gbps": 8000, "sel_hbm_gbps": 3500, "sel_mma_tflops": 250,
                 "sel_wgmma_tflops": 450, "sel_row_margin_pct": 85}


class ScheduleUnavailableError(ValueError):
    """The forced schedule cannot serve this call; the message says why."""


@dataclass(frozen=True)
class ScheduleChoice:
    chosen: str
    requested: str                                      # auto | row | tile | kv
    why: str
    reasons: Dict[str, List[str]] = field(default_factory=dict)   # schedule -> why not
    predicted_ms: Dict[str, float] = field(default_factory=dict)
    stats: Dict[str, float] = field(default_factory=dict)

    def lines(self) -> List[str]:
        out = [f"schedule: {self.chosen} ({self.why})"]
        if self.stats:
            out.append("  statistics: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float)
                                                    else f"{k} {v}" for k, v in self.stats.items()))
        for name in SCHEDULES:
            if name == self.chosen:
                continue
            for reason in self.reasons.get(name, []):
                out.append(f"  {name}: {reason}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _rates(settings: Settings, facts: DeviceFacts) -> Dict[str, float]:
    measured = settings.thresholds.get(facts.arch or "", {})
    return {key: float(measured.get(key, value)) for key, value in DEFAULT_RATES.items()}


def _may_sync(call: SelectionCall) -> bool:
    return not (call.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def predicted_ms(call: SelectionCall, selections: float, unions: Optional[float],
                 rates: Dict[str, float], wgmma: bool = True) -> Dict[str, float]:
    """Predicted time of each schedule in ms (see the module docstring)."""
    from triton_ref.selection_fwd import group_tile
    from triton_ref.selection_kv import item_shape
    from triton_ref.selection_tile import rows_block, tile_shape

    G, bs = call.group_size, call.block_size
    Dk, Dv = call.head_dim_qk, call.head_dim_v
    elem = call.q.element_size()
    l2 = rates["sel_l2_gbps"] * 1e9
    hbm = rates["sel_hbm_gbps"] * 1e9
    slow = 16 if call.dtype == torch.float32 else 1
    mma16 = rates["sel_mma_tflops"] * 1e12 / slow
    mma64 = (rates["sel_wgmma_tflops"] if wgmma else rates["sel_mma_tflops"]) * 1e12 / slow

    def mma(rows):
        return mma64 if rows >= 64 else mma16
    block_bytes = bs * (Dk + Dv) * elem
    block_flops = 2.0 * bs * (Dk + Dv)          # per query row
    entries = call.batch * call.seqlen_q * call.num_heads_kv * call.num_selected
    out = {}

    BG = group_tile(G)
    copies = -(-G // BG)
    out["row"] = max(selections * copies * block_bytes / l2,
                     selections * copies * BG * block_flops / mma(BG))

    if unions is not None:
        QT, GT = tile_shape(G)
        tiles = -(-G // GT)
        prepass = entries * 8 * 6 / hbm               # a segmented sort, cumsum and scatter
        BM = rows_block(QT, GT)
        out["tile"] = max(unions * tiles * block_bytes / l2,
                          unions * tiles * BM * block_flops / mma(BM)) + prepass

    per_item, GT = item_shape(G)
    tiles = -(-G // GT)
    items = selections / per_item + call.num_heads_kv * call.batch * -(-call.seqlen_k // bs)
    moved = selections * G * (Dk * elem + 2 * (Dv + 1) * 4)
    prepass = entries * 8 * 10 / hbm                  # the index's sort and work items
    BM = rows_block(per_item, GT)
    out["kv"] = max(items * tiles * block_bytes / l2 + moved / hbm,
                    items * tiles * BM * block_flops / mma(BM)) + prepass
    return {name: seconds * 1e3 for name, seconds in out.items()}


def pick(times: Dict[str, float], able, margin_pct: float) -> str:
    """The schedule to run given predicted `times` (ms) for the `able` ones: the fastest, where
    a schedule other than row must be predicted at most `margin_pct`% of row's time."""
    able = [name for name in SCHEDULES if name in able and name in times]
    best = min(able, key=lambda name: (times[name], SCHEDULES.index(name)))
    if best != "row" and "row" in able and times[best] > times["row"] * margin_pct / 100:
        return "row"
    return best


MEASURED_KEYS = ("sel_tile_min_rows", "sel_tile_max_union_pct", "sel_kv_max_g",
                 "sel_kv_tile_max_union_pct")
CUDA_TILE_UNION_KEY = "sel_cuda_tile_max_union_pct"      # optional, see the module docstring


def tile_union_limit(call: SelectionCall, able, crossovers, cuda_tile: bool = False):
    """(the largest union / selections, in %, at which auto takes tile; the key it came from)."""
    if "kv" in able and call.group_size <= crossovers["sel_kv_max_g"]:
        key = "sel_kv_tile_max_union_pct"
    elif cuda_tile and CUDA_TILE_UNION_KEY in crossovers:
        key = CUDA_TILE_UNION_KEY
    else:
        key = "sel_tile_max_union_pct"
    return crossovers[key], key


def pick_measured(call: SelectionCall, ratio: Optional[float], able, crossovers,
                  cuda_tile: bool = False) -> str:
    """The schedule by the measured crossovers (module docstring); `ratio` = sampled union /
    selections, None when not read; `cuda_tile`: the tile schedule would run on the CUDA Hopper
    kernel."""
    limit, key = tile_union_limit(call, able, crossovers, cuda_tile)
    if "tile" in able and ratio is not None and ratio * 100 <= limit:
        return "tile"
    return "kv" if key == "sel_kv_tile_max_union_pct" else "row"


def measured_crossovers(settings: Settings, facts: DeviceFacts) -> Optional[Dict[str, int]]:
    """The architecture's measured crossovers (MEASURED_KEYS, and CUDA_TILE_UNION_KEY where
    present) from runtime.thresholds.<arch>, or None unless all of MEASURED_KEYS are there."""
    measured = settings.thresholds.get(facts.arch or "", {})
    if not all(key in measured for key in MEASURED_KEYS):
        return None
    return {key: measured[key] for key in MEASURED_KEYS + (CUDA_TILE_UNION_KEY,) if key in measured}


def choose_schedule(call: SelectionCall, settings: Settings, facts: DeviceFacts,
                    prep: Optional[Prepared] = None, split: bool = False,
                    extra_reasons: Optional[Dict[str, List[str]]] = None,
                    detail: bool = True, tile_backend: Optional[str] = None) -> ScheduleChoice:
    """The schedule for `call` (see the module docstring). `prep` gives the canonical rows for
    the statistics (without it, auto uses the shape bounds); `split`: the backend will run the
    split-KV kernel (a small call), which belongs to the row schedule; `extra_reasons`: why the
    calling backend cannot run a schedule (the CUDA backend: kv, and tile off SM 9.0).
    `detail=False` (the backends' forward): where measured crossovers decide, the choice comes
    back without the other schedules' reasons, predicted times and statistics -- the same
    `chosen`, with less Python between the statistic's sync and the kernel's launch, while the
    GPU waits (~35 us at T = 8k on the H200 host); explain() asks for them. `tile_backend`:
    "cuda" where the tile schedule would run on the CUDA Hopper kernel (its own crossover)."""
    requested = settings.sel_schedule
    reasons = {name: list(schedule_module(name).reasons_unsupported(call, settings, facts))
               + list((extra_reasons or {}).get(name, [])) for name in SCHEDULES}
    source = ("NSA_SEL_SCHEDULE" if "sel_schedule" in settings.from_env
              else "runtime.sel_schedule")
    if requested != "auto":
        if reasons[requested]:
            raise ScheduleUnavailableError(
                f"schedule {requested!r} ({source}) cannot serve this call: "
                + "; ".join(reasons[requested]))
        why = f"forced by {source}={requested}"
        others = {name: [f"not requested ({source}={requested})"]
                  for name in SCHEDULES if name != requested}
        return ScheduleChoice(requested, requested, why, others)
    if split:
        why = "too few rows to fill the GPU: the split-KV kernel, no statistics read"
        return ScheduleChoice("row", "auto", why,
                              {name: reasons[name] or ["a small call takes split-KV"]
                               for name in SCHEDULES if name != "row"})

    stats: Dict[str, float] = {}
    bound = float(call.batch * call.seqlen_q * call.num_heads_kv * call.block_count_limit)
    selections, unions = bound, None
    crossovers = measured_crossovers(settings, facts)
    cuda_tile = tile_backend == "cuda"
    rows = call.batch * call.seqlen_q * call.num_heads_kv
    small = crossovers is not None and rows < crossovers["sel_tile_min_rows"]
    if small:
        reasons["tile"] = reasons["tile"] + [
            f"{rows} rows < {crossovers['sel_tile_min_rows']} (runtime.thresholds.{facts.arch}"
            f".sel_tile_min_rows): its statistic and pre-pass cost more than it saves"]
    able = [name for name in SCHEDULES if not reasons[name]]
    if prep is not None and _may_sync(call) and not small:
        from triton_ref.selection_tile import tile_shape

        from .tiles import sampled_overlap, union_before_sync

        QT, _ = tile_shape(call.group_size)
        if not reasons["tile"] and union_before_sync(prep.blocks, QT):
            # The whole union, launched before the sync and kept on `prep`: exact, and the tile
            # kernel can follow the sync at once (no pre-pass left between them). Its launch
            # summed the two counts (`totals`) where Triton built it.
            union = prep.union(QT)
            totals = union.totals if union.totals is not None else torch.stack(
                [prep.num_blocks.sum(dtype=torch.int64), union.counts.sum(dtype=torch.int64)])
            total, unions = totals.tolist()                                          # one sync
            ratio = unions / total if total else 1.0
            if crossovers is not None and not detail:
                return ScheduleChoice(pick_measured(call, ratio, able, crossovers, cuda_tile), "auto",
                                      f"auto: measured crossovers of runtime.thresholds."
                                      f"{facts.arch} (explain() gives the details)")
        else:
            total, union_sample, selected_sample = sampled_overlap(
                call, prep.geometry, prep.blocks, prep.num_blocks, QT).tolist()     # one sync
            ratio = union_sample / selected_sample if selected_sample else 1.0
        selections, unions = float(total), float(total) * ratio
        stats = {"selections": int(total), "tokens_per_tile": QT, "union/selections": ratio}
    elif prep is not None:
        reasons["tile"] = reasons["tile"] + ["its overlap statistic costs a host sync, not "
                                             "taken during CUDA-graph capture"]
    rates = _rates(settings, facts)
    times = predicted_ms(call, selections, unions, rates,
                         wgmma=facts.sm is not None and facts.sm >= (9, 0))
    margin = rates["sel_row_margin_pct"]
    if crossovers is not None:
        chosen = pick_measured(call, stats.get("union/selections"), able, crossovers, cuda_tile)
        limit, key = tile_union_limit(call, able, crossovers, cuda_tile)
        why = (f"auto: measured crossovers of runtime.thresholds.{facts.arch} "
               f"(tile at union/selections <= {limit}% ({key}), "
               f"kv at G <= {crossovers['sel_kv_max_g']}, else row)")
        for name in SCHEDULES:
            if name != chosen and not reasons[name]:
                reasons[name] = [f"not this call's side of the measured crossovers "
                                 f"(cost model: {times.get(name, float('nan')):.3g} ms)"]
        return ScheduleChoice(chosen, "auto", why,
                              {n: r for n, r in reasons.items() if n != chosen}, times, stats)
    chosen = pick(times, able, margin)
    for name in SCHEDULES:
        if name != chosen and not reasons[name] and name in times:
            reasons[name] = [f"predicted {times[name]:.3g} ms vs {times[chosen]:.3g} ms"]
        elif name != chosen and name not in times and not reasons[name]:
            reasons[name] = ["no overlap statistic for this call"]
    why = f"auto: predicted {times[chosen]:.3g} ms, the least"
    if chosen == "row" and min(times.values()) < times["row"]:
        why = (f"auto: predicted {times['row']:.3g} ms; no other schedule predicted at most "
               f"{margin:.0f}% of it")
    return ScheduleChoice(chosen, "auto", why, {n: r for n, r in reasons.items() if n != chosen},
                          times, stats)
