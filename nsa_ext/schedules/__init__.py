"""The Triton backend's forward schedules, each a module with one face, and the one chooser.

A schedule computes the whole contract (SPEC.md) for the calls it serves; they differ in which
loop is outer and so in what they read:

| schedule | module | one program | reads per (query row, selected block) |
| --- | --- | --- | --- |
| `row` | row.py | a query token x KV head (and its G query heads) | the block, every time |
| `tile` | tile.py | QT neighbouring tokens x KV head | the block once per tile that chose it |
| `kv` | kv.py | a KV block x head x chunk of the queries that chose it | the query, a partial o |

Face of a schedule module: `NAME`, `reasons_unsupported(call, settings, facts) -> list[str]`,
`forward(prepared) -> (o, lse, launch)` and `reads(prepared, launch) -> int` (keys loaded, for
the `sel.triton.reads` log; costs a host sync). `Prepared` holds what every schedule starts from
(the canonical rows and the row geometry) and caches what some share (the tile unions, which are
both the tile schedule's input and the chooser's overlap statistic).

The chooser (`chooser.py`) forces a schedule from `NSA_SEL_SCHEDULE` / `runtime.sel_schedule`
or, under `auto`, picks the one its cost model predicts fastest, and says why the others were
not taken; `explain()` prints it under the Triton backend.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from ..call import SelectionCall
from ..config import Settings
from ..selection import RowGeometry

SCHEDULES = ("row", "tile", "kv")


def schedule_module(name: str):
    return importlib.import_module(f"nsa_ext.schedules.{name}")


@dataclass
class Prepared:
    """One call's inputs to every schedule: canonical rows, geometry, and cached extras."""
    call: SelectionCall
    settings: Settings
    geometry: RowGeometry
    blocks: torch.Tensor          # [B, TQ, H, S] int32 canonical rows
    num_blocks: torch.Tensor      # [B, TQ, H] int32
    interpret: bool
    cache: Dict[str, object] = field(default_factory=dict)

    @property
    def pos(self) -> Optional[torch.Tensor]:
        return self.geometry.pos if self.call.is_varlen else None

    @property
    def k_offset(self) -> Optional[torch.Tensor]:
        return self.geometry.k_offset if self.call.is_varlen else None

    def union(self, tokens_per_tile: int):
        """The tile unions for tiles of `tokens_per_tile` tokens (computed once per call)."""
        key = f"union{tokens_per_tile}"
        if key not in self.cache:
            from .tiles import tile_unions

            self.cache[key] = tile_unions(self.call, self.geometry, self.blocks, tokens_per_tile)
        return self.cache[key]


@dataclass(frozen=True)
class Launch:
    variant: str                  # "group" / "head" (row), "tile", "kv"
    grid: tuple
    detail: Dict[str, object] = field(default_factory=dict)


__all__ = ["SCHEDULES", "Prepared", "Launch", "schedule_module"]
