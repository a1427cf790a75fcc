"""The dispatcher: one priority list, each backend's reasons, one decision.

Shaped like xformers' fmha dispatch: a backend can serve a call when its
`reasons_unsupported(call, settings, facts)` is empty (real incapacities: device, dtype, head
dim, build, the SM 8.9 policy); "auto" takes the first backend in `PRIORITY` that can serve the
call and has no `auto_preferences` against it (the length thresholds and switches of
configs/base.yaml, which say where another backend is faster); a named backend serves every call
it can, whatever the preferences say, and raises with its reasons otherwise (never a silent
fallback). "Why was SDPA chosen?" is answered by printing `explain(...)`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .call import BACKEND_NAMES, SelectionCall
from .config import Settings, load_settings
from .device import DeviceFacts, device_facts

# Fastest first, per the bench (H100, bf16; notes/bench_h100.txt): in NSA prefill 8k-64k the
# Triton group-centric kernel ran at 0.76-0.79x fla's time and the CUDA extension at 0.82-0.83x,
# packed SDPA at ~20x; in a CUDA-graph decode step Triton's split-KV path is one kernel (5.9 us
# at B=1 vs the CUDA path's 29.1 us). So Triton first, CUDA where Triton cannot serve (not
# importable, or turned off by NSA_USE_TRITON_SEL=0).
# "reference" is never chosen by "auto": it exists for tests.
PRIORITY = ("triton", "cuda", "sdpa")
# Per architecture the bench decides whether the CUDA extension goes before Triton:
# `runtime.thresholds.<arch>.sel_cuda_first` (0 or 1), written by
# `bench/threshold_optimizer.py --from-bench bench_selection.json` from the auto rows of both
# backends in one run (H200, 2026-11-30: CUDA faster on 2 of 24 prefill rows, geometric mean
# 1.11x Triton's time, so 0; notes/bench_h200_hopper.txt).
CUDA_FIRST_KEY = "sel_cuda_first"
# Eager calls (no CUDA-graph capture) of at most this many rows (B * TQ * H) put the CUDA
# extension first: there the host's enqueue is the call's cost, and the extension's row path is
# one operator call where Triton's launcher costs ~3x as much (H200, bench/eager_bench.py:
# decode B=1 TK=64k 138 vs 351 us, chunk TQ=512 TK=32k 164 vs 263 us, notes/eager.md). Inside a
# capture the host cost vanishes and the order above holds (Triton's split-KV decode replays
# faster); a Triton kernel first compiled inside a capture works (scripts/capture_probe.py).
# `threshold_optimizer.py --from-bench` rewrites it from a bench run's decode, chunk and prefill
# rows (eager times where measured).
CUDA_FIRST_EAGER_ROWS_KEY = "sel_cuda_first_eager_rows"
# Per architecture, whether a call that Triton serves under auto and whose chosen schedule is
# `tile` runs the CUDA extension's Hopper tile kernel instead of Triton's (0 or 1). The order
# above is metadata-only, but which schedule a call takes depends on its indices (the chooser
# reads the union statistic), and the two backends rank differently per schedule (H200,
# 2026-11-30: the CUDA tile kernel 1.20-1.24x faster than Triton's on every model / clustered
# prefill row, while Triton's row kernel is 2-8 % faster than the CUDA row kernel on random
# prefill; notes/hopper.md). So the tile schedule gets its own measured backend:
# `threshold_optimizer.py --from-bench` writes it from the bench's nsa:cuda-tile and
# nsa:triton-tile rows. Triton hands the call over after its chooser picked tile, with the
# chooser's canonical rows and union (nsa_ext/backends/triton.py); a named backend always runs
# its own kernels. Calls whose choice is between row and tile alone (below `sel_tile_min_rows`,
# where Triton's chooser never takes tile, and above it for groups past `sel_kv_max_g`) go to
# the CUDA extension's device-chosen schedule instead (backends/cuda.py device_choice: row or
# tile picked on the device by the same crossover, no host sync), so that auto gains the tile
# kernel eager or captured and a prefill no longer waits for the host -- at the price of the
# CUDA row kernel where the device picks row.
CUDA_TILE_KEY = "sel_cuda_first_tile"


def capturing(device) -> bool:
    """Is the current CUDA stream being captured into a graph (False off CUDA)?"""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def priority(settings: Settings, facts: DeviceFacts, call: Optional[SelectionCall] = None) -> tuple:
    """PRIORITY, with cuda before triton where the architecture's measurements say so: for
    every call (`sel_cuda_first`) or for eager calls of few rows (`sel_cuda_first_eager_rows`)."""
    return _ordered(settings, facts, call)[0]


def _ordered(settings: Settings, facts: DeviceFacts, call: Optional[SelectionCall]):
    """(auto's backend order, why it is that order) for `call`."""
    measured = settings.thresholds.get(facts.arch or "", {})
    if int(measured.get(CUDA_FIRST_KEY, 0)):
        return ("cuda", "triton", "sdpa"), (f"runtime.thresholds.{facts.arch}.{CUDA_FIRST_KEY} "
                                            f"puts the CUDA extension first")
    eager_rows = measured.get(CUDA_FIRST_EAGER_ROWS_KEY)
    if call is None or eager_rows is None:
        return PRIORITY, "the default order"
    rows = call.batch * call.seqlen_q * call.num_heads_kv
    where = f"runtime.thresholds.{facts.arch}.{CUDA_FIRST_EAGER_ROWS_KEY} = {eager_rows}"
    if rows > int(eager_rows):
        return PRIORITY, f"the default order ({rows} rows > {where})"
    if capturing(call.device):
        return PRIORITY, (f"the default order inside a CUDA-graph capture (eagerly, {rows} rows "
                          f"<= {where} would put the CUDA extension first)")
    return ("cuda", "triton", "sdpa"), (f"CUDA extension first: an eager call of {rows} rows <= "
                                        f"{where} (inside a CUDA-graph capture Triton stays "
                                        f"first)")


_MODULES = {"cuda": "cuda", "triton": "triton", "sdpa": "sdpa_packed", "reference": "reference"}


_LOADED: dict = {}


def backend_module(name: str):
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(f"nsa_ext.backends.{_MODULES[name]}")
    return module


class BackendUnavailableError(ValueError):
    """The named backend cannot serve this call; the message lists why."""


@dataclass(frozen=True)
class Decision:
    chosen: Optional[str]
    requested: str
    reasons: Dict[str, List[str]] = field(default_factory=dict)   # backend -> why it cannot
    call_summary: str = ""
    device: str = ""
    preferences: Dict[str, List[str]] = field(default_factory=dict)  # backend -> why auto skips it
    details: Dict[str, List[str]] = field(default_factory=dict)  # backend -> how it would run (explain)
    order: str = ""                   # auto's order of the backends, and why (explain)
    tile_backend: Optional[str] = None  # runs the tile schedule of the chosen backend's calls
    tile_why: str = ""

    def __str__(self) -> str:
        lines = [f"nsa_ext selection_attention: {self.call_summary}",
                 f"device: {self.device}; requested backend: {self.requested}; "
                 f"chosen: {self.chosen or 'none'}"]
        if self.order:
            lines.append(f"order: {self.order}")
        if self.tile_why:
            lines.append(f"tile schedule: {self.tile_why}")
        for name, why in self.reasons.items():
            if not why:
                lines.append(f"  {name}: can serve this call")
            for reason in why:
                lines.append(f"  {name}: {reason}")
            for preference in self.preferences.get(name, ()):
                lines.append(f"  {name}: auto's preference, not a limit: {preference}")
            for detail in self.details.get(name, ()):
                lines.append(f"  {name}: {detail}")
        return "\n".join(lines)


def _preferences(module, call, settings, facts) -> List[str]:
    prefer = getattr(module, "auto_preferences", None)
    return list(prefer(call, settings, facts)) if prefer is not None else []


def decide(call: SelectionCall, requested: str = "auto", settings: Optional[Settings] = None,
           facts: Optional[DeviceFacts] = None) -> Decision:
    """Which backend serves `call`, and every considered backend's reasons (no exception)."""
    if requested not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {', '.join(BACKEND_NAMES)}, got {requested!r}")
    settings = settings if settings is not None else load_settings()
    facts = facts if facts is not None else device_facts(call.device)
    if requested == "auto":
        names, why = _ordered(settings, facts, call)
        order = f"{', '.join(names)} ({why})"
    else:
        names, order = (requested,), ""
    reasons: Dict[str, List[str]] = {}
    preferences: Dict[str, List[str]] = {}
    for name in names:
        try:
            module = backend_module(name)
        except ImportError as err:
            reasons[name] = [f"the backend module failed to import ({type(err).__name__}: {err})"]
            continue
        reasons[name] = list(module.reasons_unsupported(call, settings, facts))
        preferences[name] = _preferences(module, call, settings, facts)
    able = [name for name in names if not reasons[name]]
    if requested == "auto":
        # Preferences steer auto; where every able backend has one, the first able still serves.
        preferred = [name for name in able if not preferences[name]]
        chosen = (preferred or able or [None])[0]
    else:
        chosen = able[0] if able else None
    tile_backend, tile_why = (_tile_backend(call, settings, facts, chosen)
                              if requested == "auto" else (None, ""))
    return Decision(chosen, requested, reasons, call.summary(), facts.describe(), preferences,
                    order=order, tile_backend=tile_backend, tile_why=tile_why)


def _tile_backend(call: SelectionCall, settings: Settings, facts: DeviceFacts,
                  chosen: Optional[str]):
    """(the backend that runs the tile schedule when auto's `chosen` backend picks it, or None
    for `chosen` itself; why), per CUDA_TILE_KEY."""
    key = f"runtime.thresholds.{facts.arch}.{CUDA_TILE_KEY}"
    if chosen != "triton" or not int(settings.thresholds.get(facts.arch or "", {})
                                     .get(CUDA_TILE_KEY, 0)):
        return None, ""
    try:
        cuda = backend_module("cuda")
    except ImportError as err:
        return None, f"Triton's own ({key} = 1, but the CUDA backend failed to import: {err})"
    why_not = list(cuda.reasons_unsupported(call, settings, facts)) + \
        list(cuda.tile_reasons(call, facts))
    if why_not:
        return None, f"Triton's own ({key} = 1, but the CUDA tile kernel cannot: {'; '.join(why_not)})"
    return "cuda", (f"where the chooser picks tile, the CUDA extension's Hopper tile kernel runs "
                    f"it ({key} = 1)")


# Decisions of earlier calls, keyed on the call's metadata (SelectionCall.dispatch_key), the
# requested backend, the Settings object, the device facts and whether a CUDA graph is being
# captured (priority's eager order): every call runs `choose`, and
# asking every backend for its reasons and preferences again costs ~10 us of host time. The
# Settings object is the one load_settings caches per environment, so a changed flag or config
# file gives another object, hence another key.
_DECISIONS: dict = {}
_MAX_DECISIONS = 512


def choose(call: SelectionCall, requested: str = "auto", settings: Optional[Settings] = None,
           facts: Optional[DeviceFacts] = None) -> Decision:
    """Like `decide` (cached on the call's metadata, the settings and the device facts), but
    raises BackendUnavailableError when no backend can serve the call."""
    settings = settings if settings is not None else load_settings()
    facts = facts if facts is not None else device_facts(call.device)
    key = (call.dispatch_key(), requested, id(settings), facts, capturing(call.device))
    cached = _DECISIONS.get(key)
    if cached is not None and cached[0] is settings:
        decision = cached[1]
    else:
        decision = decide(call, requested, settings, facts)
        if len(_DECISIONS) >= _MAX_DECISIONS:
            _DECISIONS.clear()
        _DECISIONS[key] = (settings, decision)     # the object keeps id(settings) unique
    if decision.chosen is None:
        if requested == "auto":
            raise BackendUnavailableError(f"backend='auto': no backend can serve this call\n{decision}")
        why = "; ".join(decision.reasons[requested])
        raise BackendUnavailableError(f"backend={requested!r} cannot serve this call: {why}\n{decision}")
    return decision


def backward_backend(call: SelectionCall, forward_backend: str, settings: Optional[Settings] = None,
                     facts: Optional[DeviceFacts] = None) -> str:
    """The backend whose `backward` computes the gradients of a call `forward_backend` ran:
    that backend itself when it has a backward, else the one it names (GRADIENTS_BY), else the
    first backend of PRIORITY that has one, can serve the call and has no auto preference
    against it (packed SDPA always can)."""
    forward_module = backend_module(forward_backend)
    if hasattr(forward_module, "backward"):
        return forward_backend
    if getattr(forward_module, "GRADIENTS_BY", None):
        return forward_module.GRADIENTS_BY
    settings = settings if settings is not None else load_settings()
    facts = facts if facts is not None else device_facts(call.device)
    for name in PRIORITY:
        try:
            module = backend_module(name)
        except ImportError:
            continue
        if hasattr(module, "backward") and not module.reasons_unsupported(call, settings, facts) \
                and not _preferences(module, call, settings, facts):
            return name
    return "sdpa"

