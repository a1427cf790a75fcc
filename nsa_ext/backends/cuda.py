"""The CUDA extension backend: nsa_ext._C's tensor-core kernels (fp16/bf16) and its fp32 path.

Two forward schedules (nsa_ext/schedules; the chooser is the Triton backend's, so both backends
take the same decision from the same statistic and thresholds):
- `row`: one thread block per (query token, KV head), mma.sync (SM 8.0+), split-KV for decode;
- `tile`: on SM 9.0 only (csrc/hopper/, wgmma + TMA), one thread block per 64 / G neighbouring
  query tokens of a KV head walking the union of their selections (G <= 64, block_size a
  multiple of 64, fp16/bf16). Where the tile kernel cannot serve a call, `row` runs.
Under auto, where the tile kernel serves the call, the device picks between them
(`selection_fwd_auto`: both kernels enqueued, each gated on the union's counts;
`device_choice`), so neither an eager chunk nor a prefill waits for the host, and a CUDA graph
captures the choice. The host chooser (one sync on the counts) keeps the calls from the
measured `sel_tile_min_rows` up whose group is small enough for Triton's `kv` schedule to be a
candidate (`sel_kv_max_g`).
`kv` is the Triton backend's alone: forcing it names this backend unable (the dispatcher's auto
then takes Triton), and `auto_preferences` steers auto to Triton where the measured crossovers
pick kv (small G).

The kernels read each row's selected set in canonical form (nsa_ext.selection.canonical_blocks:
sorted, de-duplicated, -1 padded, causally trimmed) and each query's absolute position and key
offset (row_geometry). The row schedule takes both in one operator call,
`torch.ops.nsa_ext_cuda.selection_fwd_rows` (canonical rows + forward + split-KV merge; with
fp16/bf16 each thread block canonicalises its own row, so no separate launch); the tile
schedule computes the canonical rows and the tile unions first (the chooser's statistic reads
them), then calls `selection_fwd_tile`. The backend has no backward of its own: the dispatcher
borrows Triton's (or packed SDPA's where Triton cannot serve).

Decode (TQ = 1, or a few, small B) has too few rows to fill the GPU: below SPLIT_BELOW_WAVES waves
of thread blocks over the SMs the op is asked to cut each row's entries into `num_splits` slices
(split-KV) and merge them; the count follows from shapes and the SM count only, so a decode step
stays capturable in a CUDA graph. On SM 9.0, where the split grid is one wave of the kernel's
two-buffer form (G <= 16, at most 16 slices), each row's slices run as one thread-block cluster
that merges them in shared memory: no merge kernel (csrc/selection_fwd.cuh, cluster_merge).
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional

import torch

from .. import _ext
from ..call import SelectionCall
from ..config import load_settings
from ..device import device_facts
from ..policy import kernel_path_reasons
from ..selection import canonical_blocks, canonical_op_args, row_geometry

NAME = "cuda"

# ADR-2025-08-M4-02: the kernel paths stay off on SM 8.9 (RTX 4090) unless forced.
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _arch_served(sm, archs) -> bool:
    """Does a build for `archs` (["8.0", "9.0+PTX", "9.0a"]) run on compute capability `sm`?
    Machine code runs on its own major version at an equal or higher minor; PTX is JIT-compiled
    for any newer GPU. An arch-specific build (9.0a) runs only on exactly that GPU."""
    for arch in archs:
        text = str(arch)
        ptx = text.endswith("+PTX")
        text = text.replace("+PTX", "")
        specific = text.endswith("a")
        major, minor = (int(x) for x in text.rstrip("a").split("."))
        if specific:
            if tuple(sm) == (major, minor):
                return True
        elif ptx and tuple(sm) >= (major, minor):
            return True
        elif sm[0] == major and sm[1] >= minor:
            return True
    return False


def reasons_unsupported(call: SelectionCall, settings, facts) -> List[str]:
    if not _ext.available():
        return [f"extension not available: {_ext.unavailable_reason()} "
                f"(see python -m nsa_ext.info)"]
    reasons = []
    info = _ext.build_info()
    if facts.kind != "cuda":
        reasons.append(f"device {facts.kind}: the CUDA backend needs a CUDA device")
    elif facts.sm is None:
        reasons.append("compute capability unknown: the kernel needs SM 8.0 or newer")
    else:
        policy = kernel_path_reasons(facts, settings, "CUDA extension")
        reasons.extend(policy)
        archs = info.get("archs", [])
        if tuple(facts.sm) >= (8, 0) and not _arch_served(facts.sm, archs):
            reasons.append(f"built for archs {';'.join(archs)}, none runs on SM "
                           f"{facts.sm[0]}.{facts.sm[1]} ({facts.name}); rebuild with "
                           f"NSA_EXT_CUDA_ARCHS={facts.sm[0]}.{facts.sm[1]}")
    if call.dtype in _HALF_DTYPES:
        pairs = [tuple(p) for p in info.get("head_dims", [])]
        if (call.head_dim_qk, call.head_dim_v) not in pairs:
            built = ", ".join(f"{dk}/{dv}" for dk, dv in pairs)
            reasons.append(f"head dims Dk={call.head_dim_qk}, Dv={call.head_dim_v}: no "
                           f"{str(call.dtype).replace('torch.', '')} kernel instance "
                           f"(built Dk/Dv: {built})")
        if call.head_dim_qk % 8 or call.head_dim_v % 8:
            reasons.append(f"head dims Dk={call.head_dim_qk}, Dv={call.head_dim_v}: must be "
                           f"multiples of 8 (16-byte loads)")
    elif call.dtype == torch.float32:
        limit = int(info.get("fp32_max_head_dim", 256))
        if call.head_dim_qk > limit or call.head_dim_v > limit:
            reasons.append(f"float32 head dims Dk={call.head_dim_qk}, Dv={call.head_dim_v}: "
                           f"the fp32 kernel takes at most {limit}")
    else:
        reasons.append(f"dtype {str(call.dtype).replace('torch.', '')}: the CUDA backend takes "
                       f"float16, bfloat16 and float32")
    min_block = int(info.get("min_block_size", 16))
    if call.block_size < min_block:
        reasons.append(f"block_size {call.block_size}: the kernel takes powers of two >= "
                       f"{min_block}")
    if call.batch * call.seqlen_q >= 2 ** 31 or call.num_heads_kv >= 65536:
        reasons.append(f"grid too large: B*TQ={call.batch * call.seqlen_q}, "
                       f"H={call.num_heads_kv}")
    schedule = settings.sel_schedule
    if schedule == "kv":
        reasons.append("NSA_SEL_SCHEDULE / runtime.sel_schedule = kv: the CUDA backend runs the "
                       "row and tile schedules; kv is the Triton backend's")
    elif schedule == "tile":
        reasons.extend(f"NSA_SEL_SCHEDULE / runtime.sel_schedule = tile: {why}"
                       for why in tile_reasons(call, facts))
    return reasons


def tile_reasons(call: SelectionCall, facts) -> List[str]:
    """Why the Hopper tile kernel (csrc/hopper/) cannot serve `call` ([] when it can)."""
    reasons = []
    if not _ext.build_info().get("hopper_tile", False):
        reasons.append("the extension was built without its Hopper kernel (NSA_EXT_CUDA_ARCHS "
                       "without 9.0)")
    if facts.kind != "cuda" or facts.sm is None or tuple(facts.sm) != (9, 0):
        reasons.append(f"the tile kernel (wgmma, TMA) runs on SM 9.0 only, not on {facts.name}")
    if call.dtype not in _HALF_DTYPES:
        reasons.append(f"dtype {str(call.dtype).replace('torch.', '')}: the tile kernel takes "
                       f"float16 and bfloat16")
    if call.group_size > TILE_ROWS:
        reasons.append(f"G={call.group_size} > {TILE_ROWS}: a tile holds at most 64 query heads")
    if call.block_size % 64:
        reasons.append(f"block_size {call.block_size}: the tile kernel copies 64-key chunks")
    if call.batch * call.seqlen_k >= 2 ** 31:
        reasons.append(f"B*TK={call.batch * call.seqlen_k}: past the copy engine's 32-bit "
                       f"coordinates")
    return reasons


def auto_preferences(call: SelectionCall, settings, facts) -> List[str]:
    """Why `auto` prefers another backend for a call the kernel can compute (a named
    backend="cuda" runs it anyway): the length threshold only steers auto, and so do the
    measured schedule crossovers where they pick `kv`, which only Triton runs."""
    min_len = settings.min_len("cuda", facts.arch)
    if call.selected_len < min_len:
        return [f"selected length {call.selected_len} tokens per row is below the CUDA threshold "
                f"{min_len} (NSA_SEL_CUDA_MIN_L / runtime.sel_cuda_min_L): packed SDPA measured "
                f"faster there"]
    max_g = settings.thresholds.get(facts.arch or "", {}).get("sel_kv_max_g")
    if settings.sel_schedule == "auto" and max_g is not None and call.group_size <= max_g:
        return [f"G={call.group_size} <= {max_g} (runtime.thresholds.{facts.arch}.sel_kv_max_g): "
                f"the kv schedule, which only the Triton backend runs, measured fastest there"]
    return []


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.data_ptr() % 16 == 0 else t.clone()


# Below this many waves of thread blocks over the SMs the kernel splits each row's entries
# (the same bound as nsa_ext/backends/triton.py's).
SPLIT_BELOW_WAVES = 4


def _choose_num_splits_here(work_items: int, num_entries: int, sm_count: int) -> int:
    """triton_ref.selection_split.choose_num_splits without Triton: at most one wave of thread
    blocks, at most one slice per entry, no empty slice."""
    if num_entries <= 1 or sm_count <= 0:
        return 1
    wanted = sm_count // max(work_items, 1)
    splits = max(1, min(wanted, num_entries))
    return -(-num_entries // -(-num_entries // splits))


@functools.lru_cache(maxsize=None)
def _split_chooser() -> Callable[[int, int, int], int]:
    try:
        from triton_ref.selection_split import choose_num_splits
    except ImportError:
        return _choose_num_splits_here
    return choose_num_splits


def row_tiles(call: SelectionCall) -> int:
    """Thread blocks per (query token, KV head) without splitting: the tensor-core kernel takes
    up to 32 query heads in one block and 64 per block past that (32 when Dv > 128); the fp32
    kernel one block per row."""
    G = call.group_size
    if call.dtype == torch.float32 or G <= 32:
        return 1
    return -(-G // (64 if call.head_dim_v <= 128 else 32))


def num_splits(call: SelectionCall, sm_count: int) -> int:
    """Slices per row for the op: 1 unless the grid is under SPLIT_BELOW_WAVES waves; then one
    wave of thread blocks, one per SM (Triton's rule). The row kernel runs two K/V buffers on
    grids of one wave, so a block keeps two stages in flight and fewer slices do: H200 decode
    graph replays, TK = 8k (notes/eager.md, twenty-first session), B = 32 (128 rows) unsplit 32.7
    us against 35.0 in two slices, B = 8 four slices 18.6 against 19.0 in eight, B = 1 sixteen
    slices 13.4. (With one buffer, two blocks per SM had measured best: B = 32 38.0 in two slices
    against 47.3 unsplit.)"""
    work_items = call.batch * call.seqlen_q * call.num_heads_kv * row_tiles(call)
    if sm_count <= 0 or work_items >= SPLIT_BELOW_WAVES * sm_count:
        return 1
    return _split_chooser()(work_items, call.num_selected, sm_count)


TILE_ROWS = 64     # (token, query head) rows of one Hopper tile: 64 // G tokens


def tile_may_run(call: SelectionCall, settings, facts) -> bool:
    """Whether the chooser could pick the Hopper tile kernel for this unsplit call: decided from
    metadata, so the calls it never serves (eager chunks, small prefills: fewer rows than the
    measured `sel_tile_min_rows`) skip the chooser's Python and its statistic."""
    if settings.sel_schedule not in ("auto", "tile") or tile_reasons(call, facts):
        return False
    if settings.sel_schedule == "tile":
        return True
    min_rows = settings.thresholds.get(facts.arch or "", {}).get("sel_tile_min_rows")
    rows = call.batch * call.seqlen_q * call.num_heads_kv
    return min_rows is None or rows >= min_rows


def device_choice(call: SelectionCall, settings, facts) -> Optional[int]:
    """The `tile_max_union_pct` with which `nsa_ext_cuda::selection_fwd_auto` lets the device
    choose this unsplit call's schedule, or None where the host decides (or no choice exists).

    The device chooses under auto for the calls the Hopper tile kernel can serve (SM 9.0,
    S <= 32, more than one query token) whose choice is between row and tile alone: calls with
    fewer rows than the measured `sel_tile_min_rows` (the host chooser reads no statistic there),
    and larger calls whose group is past `sel_kv_max_g` (the host would weigh Triton's kv
    schedule for a smaller one).
    The operator enqueues the canonical rows, the unions with the call's (selections, union
    blocks) and both kernels, each returning at once unless the counts pick it by the same
    crossover the host would apply (CUDA_TILE_UNION_KEY, else sel_tile_max_union_pct). No sync:
    eager calls pay no wait and a CUDA graph captures the choice. The row kernel's gated launch
    is as many blocks as fit at once, striding over the rows, so that it costs a few us when tile
    is chosen (one block per row, 131072 at T = 32k, cost ~83 us: twice the sync it replaces,
    notes/hopper.md, tenth session)."""
    if settings.sel_schedule != "auto" or facts.kind != "cuda" or \
            not 0 < call.num_selected <= _ext.CANONICAL_MAX_SELECTED:
        return None
    # One query token (decode): a tile holds one token, its union is its selection, and the
    # tile side would only add its prologue (a B = 32 decode's unions and empty tile launch were
    # ~5 us of its GPU time on the H200, notes/eager.md): the row schedule, no choice.
    if call.seqlen_q == 1:
        return None
    from ..schedules.chooser import measured_crossovers, tile_union_limit

    crossovers = measured_crossovers(settings, facts)
    if crossovers is None or not _ext.has_fwd_auto() or tile_reasons(call, facts):
        return None
    rows = call.batch * call.seqlen_q * call.num_heads_kv
    if rows >= crossovers["sel_tile_min_rows"] and call.group_size <= crossovers["sel_kv_max_g"]:
        return None
    return int(tile_union_limit(call, ("row", "tile"), crossovers, cuda_tile=True)[0])


def forward_device_choice(call: SelectionCall) -> Optional[tuple]:
    """(o, lse) through `selection_fwd_auto` where `device_choice` says the device chooses this
    call's schedule (and the row kernel would run unsplit), else None: the CUDA backend's own
    path for such calls, and what the Triton backend hands them to under auto where the tile
    schedule's measured backend is this one (dispatch.CUDA_TILE_KEY)."""
    facts = device_facts(call.device)
    settings = load_settings()
    pct = device_choice(call, settings, facts)
    if pct is None or num_splits(call, facts.sm_count) > 1:
        return None
    q, k, v = (_aligned(t.contiguous()) for t in (call.q, call.k, call.v))
    return _run_auto_op(call, row_geometry(call), q, k, v, pct, settings.sel_tile_max_ctas)


def _run_auto_op(call: SelectionCall, geometry, q, k, v, pct: int, max_ctas: int):
    """`selection_fwd_auto` on the call's raw rows (aligned, contiguous q, k, v)."""
    indices, _, counts, limit, _ = canonical_op_args(call, geometry)
    return torch.ops.nsa_ext_cuda.selection_fwd_auto(
        q, k, v, indices, counts, limit, geometry.pos.contiguous(),
        geometry.k_offset.contiguous(), call.block_size, call.scale, pct, max_ctas)


def device_choice_lines(call: SelectionCall, settings, facts, pct: int) -> List[str]:
    """explain()'s lines for a call whose schedule the device chooses, with this call's counts
    (read here: explain may synchronise)."""
    from ..schedules.chooser import measured_crossovers, tile_union_limit
    from ..schedules.tiles import tile_unions

    key = tile_union_limit(call, ("row", "tile"), measured_crossovers(settings, facts),
                           cuda_tile=True)[1]
    geometry = row_geometry(call)
    blocks, num_blocks = canonical_blocks(call, geometry)
    union = tile_unions(call, geometry, blocks, TILE_ROWS // call.group_size)
    selections = int(num_blocks.sum())
    unions = int(union.counts.sum())
    picks_tile = unions * 100 <= pct * selections if selections else pct >= 100
    where = f"runtime.thresholds.{facts.arch}"
    return [f"schedule: {'tile' if picks_tile else 'row'} (chosen on the device: "
            f"nsa_ext_cuda::selection_fwd_auto runs tile where the tile unions hold <= {pct}% "
            f"of the selections ({where}.{key}), else row; no host sync)",
            f"  statistics: selections {selections}, union blocks {unions}, union/selections "
            f"{unions / selections if selections else 1.0:.4g}",
            "  the host chooser is not asked: its choice would be row or tile by the same "
            f"crossover ({call.batch * call.seqlen_q * call.num_heads_kv} rows, G = "
            f"{call.group_size})"]


def tile_forward(*args):
    """torch.ops.nsa_ext_cuda.selection_fwd_tile (a seam for tests to see that it ran)."""
    return torch.ops.nsa_ext_cuda.selection_fwd_tile(*args)


def prepared(call: SelectionCall, settings, geometry, blocks, num_blocks):
    """The schedules' shared inputs (nsa_ext.schedules.Prepared): the chooser may compute the
    tile unions on it before its sync, and the tile path then reuses them."""
    from ..schedules import Prepared

    return Prepared(call, settings, geometry, blocks, num_blocks, interpret=False)


def choose_schedule(call: SelectionCall, settings, facts, prep, detail: bool = True):
    """The chooser's ScheduleChoice for a call this backend runs unsplit, with `kv` (Triton's)
    and, where the Hopper kernel cannot serve, `tile` marked unable (`detail`: see the
    chooser's)."""
    from ..schedules.chooser import choose_schedule as choose

    extra = {"kv": ["the CUDA backend runs row and tile; kv is the Triton backend's"]}
    why_not_tile = tile_reasons(call, facts)
    if why_not_tile:
        extra["tile"] = why_not_tile
    return choose(call, settings, facts, prep, extra_reasons=extra, detail=detail,
                  tile_backend=None if why_not_tile else NAME)


def explain_schedule(call: SelectionCall, settings, facts, tile_backend=None) -> List[str]:
    """Which schedule this backend would run for `call`, and why (a host sync under auto).
    `tile_backend` is the dispatcher's (for Triton's face); this backend's tile is its own."""
    splits = num_splits(call, facts.sm_count) if facts.kind == "cuda" else 1
    if splits > 1:
        return [f"schedule: row (too few rows to fill the GPU: split-KV, {splits} slices a row)"]
    pct = device_choice(call, settings, facts)
    if pct is not None:
        return device_choice_lines(call, settings, facts, pct)
    try:
        geometry = row_geometry(call)
        blocks, num_blocks = canonical_blocks(call, geometry)
        prep = prepared(call, settings, geometry, blocks, num_blocks)
        return choose_schedule(call, settings, facts, prep).lines()
    except ValueError as err:     # ScheduleUnavailableError: a forced schedule it cannot run
        return [f"schedule: none ({err})"]
    except ImportError as err:
        return [f"schedule: row (the chooser needs Triton: {err})"]


def run_tile(prep):
    """(o, lse) of the Hopper tile kernel on a call whose schedule is tile, from the chooser's
    Prepared (canonical rows; the union where the chooser computed it): this backend's tile path,
    and what auto hands Triton where the tile schedule's measured backend is this one
    (nsa_ext/dispatch.py CUDA_TILE_KEY)."""
    call, geometry = prep.call, prep.geometry
    q, k, v = (_aligned(t.contiguous()) for t in (call.q, call.k, call.v))
    QT = TILE_ROWS // call.group_size
    union = prep.union(QT)
    return tile_forward(q, k, v, prep.blocks.contiguous(), prep.num_blocks.contiguous(),
                        geometry.pos.contiguous(), geometry.k_offset.contiguous(), union.starts,
                        union.counts, QT, call.block_size, call.scale,
                        prep.settings.sel_tile_max_ctas)


def forward(call: SelectionCall, force_splits: Optional[int] = None):
    """(o [B, TQ, HQ, Dv] in q's dtype, lse [B, TQ, HQ] float32). `force_splits` replaces the
    split-KV choice (tests and scripts/sanitize_cuda.py drive every slicing through it)."""
    geometry = row_geometry(call)
    # The kernels copy rows 16 bytes at a time: contiguous and 16-byte aligned.
    q, k, v = (_aligned(t.contiguous()) for t in (call.q, call.k, call.v))
    pos = geometry.pos.contiguous()
    k_offset = geometry.k_offset.contiguous()
    facts = device_facts(call.device)
    splits = force_splits or num_splits(call, facts.sm_count)
    if splits == 1:
        settings = load_settings()
        pct = device_choice(call, settings, facts)
        if pct is not None:
            return _run_auto_op(call, geometry, q, k, v, pct, settings.sel_tile_max_ctas)
        if tile_may_run(call, settings, facts):
            blocks, num_blocks = canonical_blocks(call, geometry)
            prep = prepared(call, settings, geometry, blocks, num_blocks)
            if choose_schedule(call, settings, facts, prep, detail=False).chosen == "tile":
                return run_tile(prep)
            return torch.ops.nsa_ext_cuda.selection_fwd(q, k, v, blocks.contiguous(),
                                                        num_blocks.contiguous(), pos, k_offset,
                                                        call.block_size, call.scale, splits)
    # The row schedule: canonical rows and the forward (and merge) in one operator call where
    # the extension's canonical kernel takes the call (S <= 32), else the two steps.
    args = canonical_op_args(call, geometry)
    if args is not None:
        indices, _, counts, limit, _ = args
        return torch.ops.nsa_ext_cuda.selection_fwd_rows(q, k, v, indices, counts, limit, pos,
                                                         k_offset, call.block_size, call.scale,
                                                         splits)
    blocks, num_blocks = canonical_blocks(call, geometry)
    return torch.ops.nsa_ext_cuda.selection_fwd(q, k, v, blocks.contiguous(),
                                                num_blocks.contiguous(), pos, k_offset,
                                                call.block_size, call.scale, splits)


def eager_launch(call: SelectionCall, settings, facts):
    """The launch for later eager calls with `call`'s metadata (nsa_ext/eager_plan.py):
    `launch(q, k, v, block_indices) -> (o, lse)`, one operator call with this call's geometry,
    split count and scalars bound -- the row schedule's, or `selection_fwd_auto` where the
    device chooses the schedule (device_choice); None where `forward` would do more than that
    one call (the host's tile chooser, non-contiguous inputs, varlen, a block_counts tensor, S
    past the canonical kernel)."""
    if call.is_varlen or call.block_counts is not None or facts.kind != "cuda":
        return None
    if not all(t.is_contiguous() for t in (call.q, call.k, call.v, call.block_indices)):
        return None
    splits = num_splits(call, facts.sm_count)
    pct = device_choice(call, settings, facts) if splits == 1 else None
    if splits == 1 and pct is None and tile_may_run(call, settings, facts):
        return None
    geometry = row_geometry(call)
    if canonical_op_args(call, geometry) is None:
        return None
    pos, k_offset = geometry.pos.contiguous(), geometry.k_offset.contiguous()
    limit, block_size, scale = call.block_count_limit, call.block_size, call.scale
    if pct is not None:       # the device's choice of row or tile (device_choice)
        auto = _ext.direct_auto() or torch.ops.nsa_ext_cuda.selection_fwd_auto.default
        max_ctas = settings.sel_tile_max_ctas

        def launch_auto(q, k, v, block_indices):
            if (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15:    # forward would copy
                return None
            return auto(q, k, v, block_indices, None, limit, pos, k_offset, block_size, scale,
                        pct, max_ctas)

        return launch_auto
    # The pybind11 entry skips the dispatcher's boxing of 11 arguments (eager plans serve plain
    # eager calls only); a build without it takes the operator.
    op = _ext.direct_rows() or torch.ops.nsa_ext_cuda.selection_fwd_rows.default

    def launch(q, k, v, block_indices):
        if (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15:    # forward would copy: decline
            return None
        return op(q, k, v, block_indices, None, limit, pos, k_offset, block_size, scale, splits)

    return launch
