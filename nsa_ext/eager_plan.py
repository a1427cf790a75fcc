"""Eager calls' launch plans: the second call with the same metadata skips straight to the kernels.

A plain eager call (no gradient wanted, no tracing, no dispatch mode, plain tensors; see
api.selection_attention) spends most of its host time above the kernels: validation
(describe_call), the dispatcher, the backend's per-call preparation. All of that depends only on
the call's metadata -- shapes, strides, dtypes and devices of the tensors, the scalar arguments,
the settings -- so the first call with given metadata runs it (validating exactly as any call
does, raising the same errors) and keeps what the chosen backend needs to launch again: a
`launch(q, k, v, block_indices)` closure from the backend's `eager_launch(call, settings,
facts)`. Later calls with the same metadata build the key (~5 us) and call the closure.

Why this is not a second statement of the contract: nothing is checked here. The key holds every
input describe_call reads except tensor values, and the only value check of the contract
(cu_seqlens increasing) belongs to varlen calls, which never take a plan. A backend's launcher
may still decline a call at run time (returns None: e.g. a misaligned pointer), and the caller
then takes the full path.

Not planned: calls with a block_counts tensor or cu_seqlens, calls during a CUDA-graph capture
(a plan's cached tensors must not come from a capture's memory pool, and the dispatcher's order
differs there), calls with NSA_DEBUG_* logging on (the logs are per call), backends without
`eager_launch`, and schedules whose choice reads tensor values (the Hopper tile chooser).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .call import _metadata
from .config import load_settings
from .device import device_facts
from .dispatch import backend_module, capturing

# key -> (Settings object the plan was made under, launch closure or None = no plan for it).
_PLANS: dict = {}
_MAX_PLANS = 64

Launch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Optional[tuple]]


def _key(q, k, v, block_indices, block_count, block_size, scale, backend, need_lse) -> tuple:
    """What SelectionCall.dispatch_key holds, read off the raw arguments of a planned call."""
    return (_metadata(q), _metadata(k), _metadata(v), _metadata(block_indices), block_count,
            block_size, scale, backend, need_lse)


def _make(q, k, v, block_indices, block_count, block_size, scale, backend, need_lse,
          settings) -> Optional[Launch]:
    from .ops import plan

    call, decision = plan(q, k, v, block_indices, None, block_count, None, None, block_size,
                          scale, backend, need_lse)
    make = getattr(backend_module(decision.chosen), "eager_launch", None)
    # A launcher takes later calls' tensors as they come: only dense layouts get one (describe_call
    # copies a strided last dim and widens an empty selection, which a launcher would not).
    if make is None or call.batchless or block_indices.shape[-1] == 0 or \
            not all(t.is_contiguous() for t in (q, k, v, block_indices)):
        return None
    return make(call, settings, device_facts(call.device))


def run(q, k, v, block_indices, block_count, block_size, scale, backend, need_lse):
    """(o, lse) from the plan of this call's metadata, or None where the call takes the full
    path (no plan for it, or its launcher declined). The caller has checked that the call is a
    plain eager one without block_counts tensor and cu_seqlens."""
    settings = load_settings()
    if settings.debug or capturing(q.device):
        return None
    key = _key(q, k, v, block_indices, block_count, block_size, scale, backend, need_lse)
    entry = _PLANS.get(key)
    if entry is None or entry[0] is not settings:
        launch = _make(q, k, v, block_indices, block_count, block_size, scale, backend,
                       need_lse, settings)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = entry = (settings, launch)
    launch = entry[1]
    return None if launch is None else launch(q, k, v, block_indices)


def clear() -> None:
    """Forget every plan (tests; a plan otherwise lives until 64 others replace the lot)."""
    _PLANS.clear()
