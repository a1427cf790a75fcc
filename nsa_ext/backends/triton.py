"""The Triton backend: the selection kernels of `triton_ref/selection_fwd.py`.

Preprocessing is `canonical_blocks` (sorted, de-duplicated, causally trimmed rows with their
counts), so the kernels stream exactly the set SPEC.md defines. The forward has three schedules
(nsa_ext/schedules, chosen per call by its chooser or forced by `NSA_SEL_SCHEDULE`): `row`, the
group-centric kernel (one program per query token and KV head, K/V read once for the G query
heads; per-head with `NSA_SEL_TRITON_GROUP=0`), `tile` (neighbouring queries load each block of
their union once) and `kv` (KV-outer partials over the inverse index, merged in a fixed order).
Calls with too few rows to fill the GPU (decode, small batches) take the row schedule's split-KV
kernel of `triton_ref/selection_split.py` (each row's entries cut into slices, merged through
their lse), decided from shapes alone. No data-dependent allocation; no host synchronisation on the split-KV path
or with a forced schedule (auto reads the overlap statistic once per prefill call large enough
for the tile schedule, outside CUDA-graph capture); with `NSA_DEBUG_TRITON=1` or `NSA_DEBUG_LOG=1` it logs `sel.triton.launch` and
`sel.triton.reads`, whose counts cost a host sync.

`backward` runs the deterministic kernels of `triton_ref/selection_bwd.py` (no atomics: dq
query-outer, dk/dv KV-outer over the inverse index of `nsa_ext/inverse_index.py`), reusing the
forward's o and lse when they were kept.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from ..call import SelectionCall
from ..config import Settings, load_settings
from ..device import DeviceFacts, device_facts, on_device
from ..inverse_index import build_inverse_index, work_items
from ..logs import log_event
from ..policy import kernel_path_reasons
from ..selection import RowGeometry, canonical_blocks, row_geometry

NAME = "triton"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256      # one [rows, 256] tile per operand; wider heads would need a split loop
MAX_PROGRAMS = 2 ** 31 - 1


@functools.lru_cache(maxsize=None)
def _import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401

        import triton_ref.selection_fwd  # noqa: F401
    except Exception as err:  # ImportError, or a broken install raising something else
        return f"{type(err).__name__}: {err}"
    return None


def reasons_unsupported(call: SelectionCall, settings: Settings, facts: DeviceFacts) -> list[str]:
    reasons = []
    error = _import_error()
    if error is not None:
        reasons.append(f"triton is not importable ({error}); install triton to use this backend")
    if facts.kind != "cuda" and not settings.triton_interpret:
        reasons.append(f"device is {facts.kind}: the Triton kernels need a CUDA GPU "
                       f"(or TRITON_INTERPRET=1, the CPU interpreter, for tests)")
    reasons.extend(kernel_path_reasons(facts, settings, "Triton kernel"))
    if call.dtype not in DTYPES:
        reasons.append(f"dtype {str(call.dtype).replace('torch.', '')} is not served: "
                       f"float16, bfloat16 or float32")
    for name, size in (("Dk", call.head_dim_qk), ("Dv", call.head_dim_v)):
        if not 1 <= size <= MAX_HEAD_DIM:
            reasons.append(f"head dim {name}={size} is not served: 1..{MAX_HEAD_DIM}")
    programs = call.batch * call.seqlen_q * call.num_heads_q
    if programs > MAX_PROGRAMS:
        reasons.append(f"B * TQ * HQ = {programs} exceeds the grid limit {MAX_PROGRAMS}")
    return reasons


def auto_preferences(call: SelectionCall, settings: Settings, facts: DeviceFacts) -> list[str]:
    """Why `auto` prefers another backend for a call the kernels can compute (a named
    backend="triton" runs it anyway): the switch and the length threshold only steer auto."""
    preferences = []
    if not settings.use_triton_sel:
        preferences.append("the Triton selection kernel is turned off for auto "
                           "(NSA_USE_TRITON_SEL=0 or runtime.use_triton_sel: false)")
    min_len = settings.min_len("triton", facts.arch)
    if call.selected_len < min_len:
        preferences.append(f"selected length {call.selected_len} tokens per row is below the "
                           f"Triton threshold {min_len} (NSA_SEL_TRITON_MIN_L / "
                           f"runtime.sel_triton_min_L): packed SDPA measured faster there")
    return preferences


def _reads(call: SelectionCall, geometry: RowGeometry, blocks, num_blocks, group: bool):
    """K/V tokens the kernel loads, beside what packed SDPA gathers (host sync: debug only).

    A kernel loads exactly the visible keys of each selected block (its loads are masked by
    j <= pos), once per row for group-centric (once per tile of 64 heads when G > 64) and once
    per query head for per-head. Packed SDPA gathers num_blocks * block_size tokens per row.
    """
    from triton_ref.selection_fwd import group_tile

    bs = call.block_size
    start = blocks.to(torch.int64) * bs
    visible = (geometry.pos[:, :, None, None] - start + 1).clamp(max=bs)
    visible = torch.where(blocks >= 0, visible, torch.zeros_like(visible))
    G = call.group_size
    copies = -(-G // group_tile(G)) if group else G
    visible_tokens = int(visible.sum().item())
    sdpa_tokens = int(num_blocks.to(torch.int64).sum().item()) * bs
    return visible_tokens * copies, sdpa_tokens, copies


# Below this many waves of programs over the SMs (decode, small batches) the split-KV kernel
# runs instead: it cuts each row's entries into slices to fill the GPU, and applies the set
# semantics in-kernel, so a decode step is one or two launches with no preprocessing.
SPLIT_BELOW_WAVES = 4


def _num_splits(call: SelectionCall, interpret: bool) -> int:
    """0 for the main kernels, else the number of slices per row for the split-KV kernel."""
    if interpret or call.device.type != "cuda":
        return 0
    from triton_ref.selection_fwd import group_tile
    from triton_ref.selection_split import choose_num_splits

    sm_count = device_facts(call.device).sm_count
    G = call.group_size
    work = call.batch * call.seqlen_q * call.num_heads_kv * -(-G // group_tile(G))
    if work >= SPLIT_BELOW_WAVES * sm_count:
        return 0
    return choose_num_splits(work, call.num_selected, sm_count)


def _prepare(call: SelectionCall, settings: Settings, geometry: Optional[RowGeometry],
             interpret: bool):
    from ..schedules import Prepared

    geometry = geometry or row_geometry(call)
    blocks, num_blocks = canonical_blocks(call, geometry)
    return Prepared(call, settings, geometry, blocks, num_blocks, interpret)


def explain_schedule(call: SelectionCall, settings: Settings, facts: DeviceFacts,
                     tile_backend: Optional[str] = None) -> list[str]:
    """Which forward schedule (nsa_ext/schedules) would run this call, and why not the others.
    Computes the canonical rows and, under auto, the overlap statistic (a host sync).
    `tile_backend`: auto's backend for the tile schedule (Decision.tile_backend)."""
    from ..schedules.chooser import ScheduleUnavailableError, choose_schedule

    interpret = settings.triton_interpret or call.device.type != "cuda"
    split = settings.sel_schedule in ("auto", "row") and bool(_num_splits(call, interpret))
    if tile_backend == "cuda" and not split:     # forward's device_runner (ops.run_forward)
        from . import cuda

        pct = cuda.device_choice(call, settings, facts)
        if pct is not None and cuda.num_splits(call, facts.sm_count) == 1:
            return ["handed to the CUDA extension, whose device chooses the schedule:"] + \
                cuda.device_choice_lines(call, settings, facts, pct)
    prep = None if split else _prepare(call, settings, None, interpret)
    try:
        return choose_schedule(call, settings, facts, prep, split,
                               tile_backend=tile_backend).lines()
    except ScheduleUnavailableError as err:
        return [f"schedule: none ({err})"]


def forward(call: SelectionCall, tile_runner: Optional[Callable] = None,
            device_runner: Optional[Callable] = None):
    """(o [B, TQ, HQ, Dv] in q's dtype, lse [B, TQ, HQ] float32), launched on the call's device.
    `tile_runner(prepared) -> (o, lse)`: what runs the tile schedule where it is chosen instead
    of Triton's kernel (auto's measured tile backend, nsa_ext/dispatch.py CUDA_TILE_KEY);
    `device_runner(call) -> (o, lse) or None`: that backend's path for the calls whose schedule
    the device chooses (backends/cuda.py forward_device_choice), tried first on unsplit calls."""
    with on_device(call.device):
        return _forward(call, tile_runner, device_runner)


def _forward(call: SelectionCall, tile_runner: Optional[Callable] = None,
             device_runner: Optional[Callable] = None):
    """(o [B, TQ, HQ, Dv] in q's dtype, lse [B, TQ, HQ] float32).

    The schedule (nsa_ext/schedules: row, tile, kv) is `NSA_SEL_SCHEDULE`'s, or under auto the
    chooser's; the row schedule takes the split-KV kernel for calls too small to fill the GPU."""
    from ..schedules import schedule_module
    from ..schedules.chooser import choose_schedule

    settings = load_settings()
    interpret = settings.triton_interpret or call.device.type != "cuda"
    splits = _num_splits(call, interpret) if settings.sel_schedule in ("auto", "row") else 0
    varlen = call.is_varlen
    geometry = row_geometry(call) if (varlen or settings.debug or not splits) else None
    prep = schedule = launch = None
    if splits:
        from triton_ref.selection_split import selection_split_fwd

        o, lse = selection_split_fwd(
            call.q, call.k, call.v, call.block_indices, scale=call.scale,
            block_size=call.block_size, block_counts=call.block_counts,
            count_limit=call.block_count_limit, pos=geometry.pos if varlen else None,
            k_offset=geometry.k_offset if varlen else None, num_splits=splits)
        variant, grid, group = "split", (call.batch * call.seqlen_q * call.num_heads_kv, splits), True
        chosen = "row"
    else:
        handed = device_runner(call) if device_runner is not None else None
        if handed is not None:
            if settings.debug:
                log_event("sel.triton.launch", variant="handed to the CUDA extension's "
                          "device-chosen schedule (selection_fwd_auto)", schedule="row or tile",
                          rows=call.batch * call.seqlen_q * call.num_heads_kv,
                          G=call.group_size, dtype=str(call.dtype).replace("torch.", ""))
            return handed
        prep = _prepare(call, settings, geometry, interpret)
        chosen = choose_schedule(call, settings, device_facts(call.device), prep, detail=False,
                                 tile_backend="cuda" if tile_runner is not None else None).chosen
        if chosen == "tile" and tile_runner is not None:
            if settings.debug:
                log_event("sel.triton.launch", variant="tile, handed to the CUDA tile kernel",
                          schedule=chosen, rows=call.batch * call.seqlen_q * call.num_heads_kv,
                          G=call.group_size, dtype=str(call.dtype).replace("torch.", ""))
            return tile_runner(prep)
        schedule = schedule_module(chosen)
        o, lse, launch = schedule.forward(prep)
        variant, grid, group = launch.variant, launch.grid, launch.variant != "head"
    if settings.debug:
        log_event("sel.triton.launch", variant=variant, schedule=chosen, grid=grid,
                  rows=call.batch * call.seqlen_q * call.num_heads_kv, G=call.group_size,
                  dtype=str(call.dtype).replace("torch.", ""))
        blocks, num_blocks = canonical_blocks(call, geometry)
        kv_tokens_read, sdpa_tokens, copies = _reads(call, geometry, blocks, num_blocks, group)
        if schedule is not None:          # what the schedule loads, per visible key
            visible = kv_tokens_read // max(copies, 1)
            kv_tokens_read = schedule.reads(prep, launch)
            copies = round(kv_tokens_read / visible, 4) if visible else 0.0
        log_event("sel.triton.reads", variant=variant, schedule=chosen,
                  kv_tokens_read=kv_tokens_read, sdpa_tokens=sdpa_tokens, reads_per_row=copies)
    return o, lse


def backward(call: SelectionCall, grad_o: torch.Tensor, grad_lse: Optional[torch.Tensor],
             o: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None):
    """_backward on the call's device (see `forward`)."""
    with on_device(call.device):
        return _backward(call, grad_o, grad_lse, o, lse)


def _backward(call: SelectionCall, grad_o: torch.Tensor, grad_lse: Optional[torch.Tensor],
              o: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None):
    """(dq, dk, dv) in the inputs' dtype, bitwise the same on every run (no atomics: see
    triton_ref/selection_bwd.py). Give the forward's `o` and `lse` ([B, TQ, HQ, Dv], [B, TQ, HQ]
    fp32) when they were kept: else they are recomputed (one forward launch)."""
    from triton_ref.selection_bwd import dkdv_tokens_per_item, selection_bwd
    from triton_ref.selection_fwd import selection_fwd

    settings = load_settings()
    geometry = row_geometry(call)
    blocks, num_blocks = canonical_blocks(call, geometry)
    index = build_inverse_index(call, geometry, blocks, num_blocks)
    interpret = settings.triton_interpret or call.device.type != "cuda"
    sm_count = 1 if interpret else device_facts(call.device).sm_count
    items = work_items(index, dkdv_tokens_per_item(call.group_size, index.capacity, sm_count),
                       interpret=interpret)
    varlen = call.is_varlen
    launch = dict(scale=call.scale, block_size=call.block_size,
                  pos=geometry.pos if varlen else None,
                  k_offset=geometry.k_offset if varlen else None, interpret=interpret)
    if o is None or lse is None:
        o, lse, _ = selection_fwd(call.q, call.k, call.v, blocks, num_blocks, group=True,
                                  **launch)
    return selection_bwd(call.q, call.k, call.v, o, lse, grad_o, grad_lse, blocks, num_blocks,
                         index, items, **launch)


def eager_launch(call: SelectionCall, settings: Settings, facts: DeviceFacts):
    """The split-KV launch for later eager calls with `call`'s metadata (nsa_ext/eager_plan.py):
    `launch(q, k, v, block_indices) -> (o, lse)` with the slice count and scalars bound; None
    where `forward` runs a schedule (its preparation reads the call's values), under debug
    logging, or for varlen calls and block_counts tensors."""
    if call.is_varlen or call.block_counts is not None or settings.debug:
        return None
    interpret = settings.triton_interpret or call.device.type != "cuda"
    splits = _num_splits(call, interpret) if settings.sel_schedule in ("auto", "row") else 0
    if not splits:
        return None
    from triton_ref.selection_split import SplitLaunch

    # After the first call the plan's kernels launch without Triton's per-call launcher
    # (triton_ref/direct_launch.py): the same kernels and arguments, ~60 us less host time each.
    split = SplitLaunch(scale=call.scale, block_size=call.block_size,
                        count_limit=call.block_count_limit, num_splits=splits)

    def launch(q, k, v, block_indices):
        with on_device(q.device):
            return split(q, k, v, block_indices)

    launch.split = split           # tests read split.direct_launches
    return launch
