"""Selection attention on this machine: every nsa_ext backend beside the public alternatives,
all measured in the same run.

    python bench/bench_selection.py                 # the default set (GPU: one run, < 8 minutes)
    python bench/bench_selection.py --quick         # a few cases
    python bench/bench_selection.py --cases prefill,decode --patterns random --out /tmp/b
    python bench/bench_selection.py --full          # more sizes (G = 3, 6, 16; T = 128k; ...)
    python bench/bench_selection.py --schedules     # the Triton forward schedules (~3 GPU minutes)

Rows of each case (bf16 on a GPU):
  nsa:cuda, nsa:cuda-row, nsa:cuda-tile, nsa:triton, nsa:triton-row,
  nsa:triton-tile, nsa:triton-kv, nsa:triton-head, nsa:sdpa
        nsa_ext.selection_attention(..., backend=NAME). nsa:cuda-row / -tile force the CUDA
        backend's schedules (row: its mma.sync kernel; tile: the SM 9.0 wgmma + TMA kernel).
        nsa:triton is the Triton backend with its
        forward schedule chosen per call (NSA_SEL_SCHEDULE=auto; the case line says which);
        nsa:triton-row / -tile / -kv force one schedule (NSA_SEL_SCHEDULE=row|tile|kv: prefill
        and chunked rows only, decode and training rows are n/a); nsa:triton-head is the row
        schedule's per-head variant (NSA_SEL_TRITON_GROUP=0). The per-architecture thresholds are set to 0 for these rows
        (NSA_SEL_TRITON_MIN_L=0, NSA_SEL_CUDA_MIN_L=0) so a named backend is measured wherever it
        can run; the case line says what backend="auto" would pick with the configured thresholds.
        A backend that cannot serve the case shows "n/a: <its reasons from nsa_ext.explain>".
  fla   fla-core's fla.ops.nsa.parallel.parallel_nsa_fwd (training: parallel_nsa with autograd,
        its fused backward); "n/a" when fla-core is not installed.
  dense:cudnn, dense:flash
        dense causal torch SDPA (enable_gqa) under sdpa_kernel(CUDNN_ATTENTION / FLASH_ATTENTION):
        the full attention NSA's selection branch replaces. Its TFLOP/s count its own dense pairs.
  flex  FlexAttention with a mask_mod that looks each key's block up in a dense [B, H, TQ, NB] bool
        membership table (causal too). The BlockMask is built from each 64-query tile's union of
        selected blocks (BlockMask.from_kv_blocks); building the table and the BlockMask is
        EXCLUDED from the time and reported in the row's note (mask build ms).
  floor/row, floor/tile
        the bench's own Triton kernel that only reads the selected K/V blocks: once per
        (query, KV head) row, and once per tile of 64 neighbouring queries counting each distinct
        block once; no arithmetic beyond a sum into a tiny output. Every row's time is also shown
        as a multiple of these floors.

Columns: ms (median, triton.testing.do_bench: warm-up, L2 flushed before each call; small cases
rotate several input sets; with --rounds N each case's rows are measured N times in turns and
each row shows its median round, every round's time in its note), TFLOP/s on attended pairs (2 * (Dk + Dv) per (query head, key) pair,
= 4 * D * pairs; a training step counts 3.5x: backward = 2.5x forward, FlashAttention's
convention), GB/s of gathered K/V (the row-wise bytes: every row reading its selected blocks; the
tile floor shows its own bytes), time / fla's, time / each floor, peak extra memory
(torch.cuda.max_memory_allocated over one call, minus what was allocated before it). Decode and
chunk rows add to the note (and the JSON) the call as an eager user meets it: "eager X us/call"
(up to 100 calls back to back, no graph, one synchronisation) and "host Y us" (the enqueue alone), and
decode rows a CUDA-graph replay.

On a CPU it runs a small honest version: packed SDPA, the fp32 reference and dense SDPA on small
shapes (Triton, in the interpreter, only with --triton-interpret), and says it is a CPU run.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

if "--triton-interpret" in sys.argv[1:]:
    # Triton reads TRITON_INTERPRET when it is imported and when kernels are decorated: set it
    # before anything imports Triton (torch may).
    os.environ["TRITON_INTERPRET"] = "1"

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.common import Shape, Work, environ, fmt_tokens, short_error  # noqa: E402

CASE_GROUPS = ("prefill", "groups", "dk192", "decode", "chunked", "train")
GROUP_PRIORITY = ("prefill", "decode", "groups", "chunked", "dk192", "train")   # run order
# nsa:auto: what a user gets (backend="auto": the dispatcher's order, and the tile schedule's
# measured backend, which named-backend rows never use).
NSA_ROWS = ("nsa:auto", "nsa:cuda", "nsa:cuda-row", "nsa:cuda-tile", "nsa:triton", "nsa:triton-row", "nsa:triton-tile", "nsa:triton-kv",
            "nsa:triton-head", "nsa:sdpa")
SCHEDULE_ROWS = {"nsa:auto": "auto", "nsa:triton": "auto", "nsa:triton-row": "row", "nsa:triton-tile": "tile",
                 "nsa:triton-kv": "kv", "nsa:triton-head": "row",
                 "nsa:cuda-row": "row", "nsa:cuda-tile": "tile"}
ANCHOR_ROWS = ("fla", "dense:cudnn", "dense:flash", "flex")
FLOOR_ROWS = ("floor/row", "floor/tile")
# Measured in this order (floors and fla first, so the ratios exist), printed in ROW_ORDER.
ROW_ORDER = NSA_ROWS + ("nsa:reference",) + ANCHOR_ROWS + ("dense:cpu",) + FLOOR_ROWS
MEASURE_ORDER = FLOOR_ROWS + ("fla",) + NSA_ROWS + ("nsa:reference", "dense:cudnn", "dense:flash",
                                                     "dense:cpu", "flex")
THRESHOLD_ENV = {"NSA_SEL_TRITON_MIN_L": "0", "NSA_SEL_CUDA_MIN_L": "0"}


class NotApplicable(Exception):
    """This row cannot run for this case; the message says why."""


@dataclass(frozen=True)
class CaseSpec:
    group: str
    label: str
    shape: Shape
    train: bool = False
    x: int = 0                    # abscissa for the plot (T)


@dataclass
class Row:
    case: str
    group: str
    pattern: str
    backend: str
    mode: str                     # "fwd" or "fwd+bwd"
    status: str = "ok"            # ok | n/a | error | skipped
    ms: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    vs_fla: Optional[float] = None
    x_floor_row: Optional[float] = None
    x_floor_tile: Optional[float] = None
    peak_mib: Optional[float] = None
    note: str = ""
    wall_s: Optional[float] = None  # wall time this row took in the bench (compile, autotune included)
    graph_ms: Optional[float] = None  # decode: the same call replayed from a CUDA graph
    eager_us: Optional[float] = None  # decode / chunk: one eager call (no graph), us
    host_us: Optional[float] = None   # ... of which the host's enqueue, us
    sm_mhz: Optional[int] = None      # GPU: the SM clock right after the row was timed
    power_w: Optional[float] = None   # ... NVML's board power then (None without NVML)
    power_cap: Optional[bool] = None  # ... whether the power limit held the clock down then


# ----------------------------------------------------------------------------------------------
# Cases

def _prefill_shape(T, HQ=64, H=4, D=128, S=16, Dv=None, B=1):
    return Shape(B=B, TQ=T, TK=T, HQ=HQ, H=H, Dk=D, Dv=Dv or D, S=S)


SCHEDULE_PRESET_ROWS = ("fla", "floor/row", "floor/tile", "nsa:triton", "nsa:triton-row",
                        "nsa:triton-tile", "nsa:triton-kv", "nsa:cuda", "nsa:cuda-tile")


def gpu_cases(full: bool, quick: bool, schedules: bool = False) -> List[CaseSpec]:
    k = 1024
    cases: List[CaseSpec] = []
    if schedules:
        # The forward schedules (issue 12): G = 16 at 8k, 16k and 32k, G = 1, 4, 8 at 32k, and
        # G = 4, 8 at 8k: where the tile kernels' union crossovers (sel_*tile_max_union_pct) fall
        # on `random` selections (small T: smaller unions).
        return ([CaseSpec("prefill", f"prefill T={T}k", _prefill_shape(T * k), x=T * k) for T in (8, 16, 32)]
                + [CaseSpec("groups", f"G={G} T=32k", _prefill_shape(32 * k, HQ=4 * G), x=32 * k)
                   for G in (1, 4, 8)]
                + [CaseSpec("groups", f"G={G} T=8k", _prefill_shape(8 * k, HQ=4 * G), x=8 * k)
                   for G in (4, 8)])
    if quick:
        return [
            CaseSpec("prefill", "prefill T=8k", _prefill_shape(8 * k), x=8 * k),
            CaseSpec("prefill", "prefill T=32k", _prefill_shape(32 * k), x=32 * k),
            CaseSpec("groups", "G=4 T=32k", _prefill_shape(32 * k, HQ=16), x=32 * k),
            CaseSpec("decode", "decode B=1 TK=64k", Shape(1, 1, 64 * k, 64, 4, 128, 128, 16), x=64 * k),
            CaseSpec("decode", "decode B=128 TK=8k", Shape(128, 1, 8 * k, 64, 4, 128, 128, 16), x=8 * k),
            CaseSpec("train", "train T=8k", _prefill_shape(8 * k), train=True, x=8 * k),
        ]
    for T in (8, 16, 32, 64) + ((128,) if full else ()):
        cases.append(CaseSpec("prefill", f"prefill T={T}k", _prefill_shape(T * k), x=T * k))
    for G in ((1, 2, 3, 4, 6, 8, 16) if full else (1, 2, 4, 8)):
        cases.append(CaseSpec("groups", f"G={G} T=32k", _prefill_shape(32 * k, HQ=4 * G), x=32 * k))
    cases.append(CaseSpec("dk192", "Dk=192 Dv=128 T=32k", _prefill_shape(32 * k, D=192, Dv=128), x=32 * k))
    decode_b = (1, 8, 32, 128) if full else (1, 32, 128)
    for TK in (8, 64):
        for B in decode_b:
            cases.append(CaseSpec("decode", f"decode B={B} TK={TK}k",
                                  Shape(B, 1, TK * k, 64, 4, 128, 128, 16), x=TK * k))
    cases.append(CaseSpec("chunked", "chunk TQ=512 TK=32k", Shape(1, 512, 32 * k, 64, 4, 128, 128, 16), x=32 * k))
    for T in (8, 32) + ((64,) if full else ()):
        cases.append(CaseSpec("train", f"train T={T}k", _prefill_shape(T * k), train=True, x=T * k))
    return cases


def cpu_cases(full: bool, quick: bool, schedules: bool = False) -> List[CaseSpec]:
    """Small shapes: the whole default CPU run stays well under 2 minutes on 2 cores."""
    def pre(T, HQ=16, H=2, D=64, Dv=None):
        return Shape(1, T, T, HQ, H, D, Dv or D, 8)

    if schedules:
        return [CaseSpec("prefill", "prefill T=256", Shape(1, 256, 256, 8, 2, 32, 32, 4, 16), x=256),
                CaseSpec("groups", "G=1 T=256", Shape(1, 256, 256, 2, 2, 32, 32, 4, 16), x=256)]

    if quick:
        return [CaseSpec("prefill", "prefill T=512", pre(512), x=512),
                CaseSpec("decode", "decode B=4 TK=2048", Shape(4, 1, 2048, 16, 2, 64, 64, 8), x=2048)]
    cases = [CaseSpec("prefill", f"prefill T={T}", pre(T), x=T) for T in (256, 512, 1024)]
    cases += [CaseSpec("groups", f"G={G} T=512", pre(512, HQ=2 * G), x=512) for G in (1, 4)]
    cases.append(CaseSpec("dk192", "Dk=96 Dv=64 T=512", pre(512, D=96, Dv=64), x=512))
    cases += [CaseSpec("decode", f"decode B={B} TK=2048", Shape(B, 1, 2048, 16, 2, 64, 64, 8), x=2048)
              for B in (1, 8)]
    cases.append(CaseSpec("chunked", "chunk TQ=128 TK=1024", Shape(1, 128, 1024, 16, 2, 64, 64, 8), x=1024))
    cases.append(CaseSpec("train", "train T=256", pre(256), train=True, x=256))
    return cases


def rows_for(case: CaseSpec, device: torch.device) -> List[str]:
    """Every row of a case; those that cannot run here say so as "n/a" (cheaply)."""
    rows = list(NSA_ROWS) + ["fla", "dense:cudnn", "dense:flash"]
    if device.type != "cuda":
        rows += ["nsa:reference", "dense:cpu"]
    if case.train:
        rows.remove("dense:flash")
    else:
        rows += ["flex"] + list(FLOOR_ROWS)
    return rows


# ----------------------------------------------------------------------------------------------
# Row builders: each returns (callable, grad_to_none, note) for one input set

@dataclass
class InputSet:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    block_indices: torch.Tensor
    unions: torch.Tensor
    grad_out: Optional[torch.Tensor] = None


@dataclass
class Context:
    case: CaseSpec
    pattern: str
    device: torch.device
    dtype: torch.dtype
    sets: List[InputSet]
    work: Work
    scale: float
    full: bool = False
    cache: Dict[str, object] = field(default_factory=dict)

    @property
    def shape(self) -> Shape:
        return self.case.shape


def _nsa_decision_reason(s: InputSet, ctx: Context, backend: str) -> Optional[str]:
    import nsa_ext

    try:
        decision = nsa_ext.explain(s.q, s.k, s.v, s.block_indices, ctx.shape.block_size, backend=backend)
    except Exception as err:  # invalid arguments would be a bench bug: show it
        return f"explain raised {short_error(err)}"
    chosen = getattr(decision, "chosen", None)
    if chosen:
        return None
    reasons = getattr(decision, "reasons", None)
    if isinstance(reasons, dict):
        why = reasons.get(backend) or [r for rs in reasons.values() for r in (rs or [])]
        return "; ".join(str(r) for r in why) or "no reason given"
    return str(decision).splitlines()[-1] if decision is not None else "no backend"


def build_nsa(ctx: Context, s: InputSet, backend: str):
    import nsa_ext

    reason = _nsa_decision_reason(s, ctx, backend)
    if reason:
        raise NotApplicable(reason)
    bs = ctx.shape.block_size
    if not ctx.case.train:
        return (lambda: nsa_ext.selection_attention(s.q, s.k, s.v, s.block_indices, bs, backend=backend)), None

    def step():
        o = nsa_ext.selection_attention(s.q, s.k, s.v, s.block_indices, bs, backend=backend)
        o.backward(s.grad_out)
        return o

    return step, [s.q, s.k, s.v]


def _fla(device: torch.device):
    if device.type != "cuda":
        raise NotApplicable("fla-core's kernels need CUDA")
    try:
        from fla.ops.nsa import parallel as fla_parallel
    except Exception as err:
        raise NotApplicable(f"fla-core not importable ({short_error(err, 80)}); pip install fla-core")
    return fla_parallel


def build_fla(ctx: Context, s: InputSet):
    fla_parallel = _fla(s.q.device)
    sh = ctx.shape
    block_indices = s.block_indices.long()         # fla's documented LongTensor (made untimed)
    if not ctx.case.train:
        return (lambda: fla_parallel.parallel_nsa_fwd(s.q, s.k, s.v, block_indices, sh.S,
                                                       sh.block_size, ctx.scale)), None

    def step():
        o = fla_parallel.parallel_nsa(s.q, s.k, s.v, block_indices=block_indices, block_counts=sh.S,
                                      block_size=sh.block_size, scale=ctx.scale)
        o.backward(s.grad_out)
        return o

    return step, [s.q, s.k, s.v]


def _dense_mask_args(sh: Shape):
    if sh.TQ == sh.TK:
        return {"is_causal": True}
    if sh.TQ == 1:
        return {}                       # the last query sees every key
    from torch.nn.attention.bias import causal_lower_right

    return {"attn_mask": causal_lower_right(sh.TQ, sh.TK)}


EXPAND_LIMIT_BYTES = 16 << 30


def build_dense(ctx: Context, s: InputSet, kernel: Optional[str]):
    """Dense causal SDPA on [B, heads, T, D] views of the inputs (no copy). The sdpa_kernel
    context is entered once around the whole measurement (measure_row), not per call."""
    import torch.nn.functional as F

    sh = ctx.shape
    mask = _dense_mask_args(sh)
    q, k, v = (t.transpose(1, 2) for t in (s.q, s.k, s.v))   # [B, heads, T, D] views, no copy
    if kernel is None:
        context = contextlib.nullcontext
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[kernel]

        def context():
            return sdpa_kernel(backend)

    state = {"k": k, "v": v, "gqa": True}

    def attend():
        return F.scaled_dot_product_attention(q, state["k"], state["v"], scale=ctx.scale,
                                              enable_gqa=state["gqa"], **mask)

    grads = [s.q, s.k, s.v] if ctx.case.train else None
    try:
        with context():
            attend()
    except RuntimeError as err:
        # No GQA in this kernel: expand K/V to the HQ query heads once, outside the time.
        expanded_bytes = sh.B * sh.TK * sh.HQ * (sh.Dk + sh.Dv) * q.element_size()
        if sh.G == 1 or expanded_bytes > EXPAND_LIMIT_BYTES:
            raise
        state["k"], state["v"] = (t.repeat_interleave(sh.G, dim=1).detach().requires_grad_(ctx.case.train)
                                  for t in (k, v))
        state["gqa"] = False
        with context():
            attend()
        ctx.cache["dense_note"] = f"K/V expanded to HQ heads outside the time (with GQA: {short_error(err, 60)})"
        if grads:
            grads = [s.q, state["k"], state["v"]]
    if not ctx.case.train:
        return attend, None, context

    def step():
        o = attend()
        o.backward(s.grad_out.transpose(1, 2))
        return o

    return step, grads, context


_FLEX = {}


def build_flex(ctx: Context, s: InputSet):
    if ctx.device.type != "cuda":
        raise NotApplicable("run on CUDA only here (CPU flex compiles C++ for minutes)")
    if ctx.case.train:
        raise NotApplicable("not in this bench's training rows")
    if ctx.shape.TQ < 64:
        raise NotApplicable("decode: not measured (flex's decoding kernel compiles per shape)")
    if ctx.case.group not in ("prefill", "chunked") and not ctx.full:
        raise NotApplicable("prefill and chunked cases only (a compile per shape); --full adds it here")
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError as err:
        raise NotApplicable(f"FlexAttention not in this torch ({err})")
    if "compiled" not in _FLEX:
        # One compile per shape; never fall back to eager flex (it materialises the scores).
        for name, value in (("cache_size_limit", 64), ("recompile_limit", 64),
                            ("accumulated_cache_size_limit", 512), ("accumulated_recompile_limit", 512)):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, value)
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    return flex_fn(ctx, s, _FLEX["compiled"], BlockMask)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flex_fn(ctx: Context, s: InputSet, flex, BlockMask):
    """The FlexAttention call for one input set (`flex`: compiled flex_attention, or eager in tests)."""
    sh = ctx.shape
    bs, G, offset = sh.block_size, sh.G, sh.TK - sh.TQ
    _sync(ctx.device)
    start = time.perf_counter()
    # Membership table [B, H, TQ, NB]: what a PyTorch user's mask_mod looks up.
    member = torch.zeros(sh.B, sh.TQ, sh.H, sh.num_kv_blocks + 1, dtype=torch.bool, device=ctx.device)
    idx = s.block_indices.to(torch.int64)
    member.scatter_(3, torch.where(idx >= 0, idx, sh.num_kv_blocks), True)
    member = member[..., :sh.num_kv_blocks].permute(0, 2, 1, 3).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return member[b, h // G, q_idx, kv_idx // bs] & (kv_idx <= q_idx + offset)

    # BlockMask from the union of each 64-query tile's blocks (all partial: mask_mod decides).
    # kv_indices is padded to the number of KV blocks: older torch sizes its dense transposition
    # by the last dimension.
    unions = s.unions.permute(0, 2, 1, 3)                                  # [B, H, tiles, U]
    counts = (unions >= 0).sum(-1).to(torch.int32)
    kv_indices = torch.zeros(*unions.shape[:3], sh.num_kv_blocks, dtype=torch.int32, device=ctx.device)
    kv_indices[..., :unions.shape[-1]] = torch.where(unions >= 0, unions, 0)
    counts = counts.repeat_interleave(G, dim=1).contiguous()              # [B, HQ, tiles]
    kv_indices = kv_indices.repeat_interleave(G, dim=1).contiguous()      # [B, HQ, tiles, NB]
    kwargs = {}
    try:
        import inspect

        params = inspect.signature(BlockMask.from_kv_blocks).parameters
        if "seq_lengths" in params:
            kwargs["seq_lengths"] = (sh.TQ, sh.TK)
        if "compute_q_blocks" in params:
            kwargs["compute_q_blocks"] = False                             # forward only
    except (TypeError, ValueError):
        pass
    block_mask = BlockMask.from_kv_blocks(counts, kv_indices, BLOCK_SIZE=(common.TILE, bs),
                                          mask_mod=mask_mod, **kwargs)
    _sync(ctx.device)
    build_ms = (time.perf_counter() - start) * 1e3
    q, k, v = (t.transpose(1, 2) for t in (s.q, s.k, s.v))
    state = {"options": {"BLOCK_M": common.TILE, "BLOCK_N": bs}}

    def attend():
        return flex(q, k, v, block_mask=block_mask, scale=ctx.scale, enable_gqa=True,
                    kernel_options=state["options"])

    try:
        attend()
    except Exception as err:   # kernel_options this torch does not take: its defaults
        state["options"] = None
        attend()
        ctx.cache["flex_note"] = f"default kernel options ({short_error(err, 60)})"

    ctx.cache["flex_build_ms"] = build_ms
    return attend, None


def build_floor(ctx: Context, s: InputSet, which: str):
    if ctx.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise NotApplicable("the floor kernel is Triton: CUDA, or --triton-interpret")
    lists = s.block_indices if which == "row" else s.unions
    return common.gather_floor_fn(s.k, s.v, lists, ctx.shape.block_size), None


def build(ctx: Context, s: InputSet, name: str):
    if name == "nsa:triton-head" and ctx.case.group == "dk192" and ctx.device.type == "cuda" and not ctx.full:
        raise NotApplicable("not in the default run: its autotune at 267 ms a call took 80 s of the "
                            "one-call budget (first H100 run: 266.9 ms, 18x group-centric); --full runs it")
    if name == "nsa:triton-head" and ctx.case.train and ctx.device.type == "cuda" and not ctx.full:
        raise NotApplicable("training: the Triton backward recomputes group-centric whatever the variant, "
                            "so only the forward differs (prefill rows); --full runs it")
    if name in ("nsa:triton-row", "nsa:triton-tile", "nsa:triton-kv", "nsa:cuda-row",
                "nsa:cuda-tile") and \
            (ctx.case.train or ctx.shape.TQ < 64):
        raise NotApplicable("forced forward schedules are prefill rows (decode takes split-KV under "
                            "auto; training's time is mostly the backward)")
    if name.startswith("nsa:"):
        backend = name.split(":", 1)[1]
        backend = backend.split("-", 1)[0]          # triton-tile, cuda-row: a forced schedule
        return build_nsa(ctx, s, backend)
    if name == "fla":
        return build_fla(ctx, s)
    if name.startswith("dense:"):
        kernel = name.split(":", 1)[1]
        if kernel != "cpu" and ctx.device.type != "cuda":
            raise NotApplicable("needs CUDA")
        if kernel == "flash" and ctx.shape.Dk != ctx.shape.Dv:
            raise NotApplicable("FlashAttention needs Dk == Dv")
        return build_dense(ctx, s, None if kernel == "cpu" else kernel)
    if name == "flex":
        return build_flex(ctx, s)
    if name.startswith("floor/"):
        return build_floor(ctx, s, name.split("/", 1)[1])
    raise ValueError(name)


def row_env(name: str) -> Dict[str, Optional[str]]:
    env = dict(THRESHOLD_ENV)
    if name in SCHEDULE_ROWS:
        env["NSA_SEL_SCHEDULE"] = SCHEDULE_ROWS[name]
        env["NSA_SEL_TRITON_GROUP"] = "1"
    if name == "nsa:triton-head":
        env["NSA_SEL_TRITON_GROUP"] = "0"
    return env


# ----------------------------------------------------------------------------------------------
# Running a case

def make_context(case: CaseSpec, pattern: str, device, dtype, seed: int, full: bool = False) -> Context:
    sh = case.shape
    elem = torch.tensor([], dtype=dtype).element_size()
    input_bytes = elem * (sh.B * sh.TQ * sh.HQ * sh.Dk + sh.B * sh.TK * sh.H * (sh.Dk + sh.Dv)) + \
        4 * sh.B * sh.TQ * sh.H * sh.S
    num_sets = 1 if case.train else common.rotation_sets(input_bytes, device)
    sets = []
    for i in range(num_sets):
        block_indices = common.make_block_indices(sh, pattern, device=device, seed=seed + 7919 * i)
        unions = common.tile_unions(block_indices)
        q, k, v = common.make_qkv(sh, dtype, device, seed=seed + 7919 * i, requires_grad=case.train)
        grad_out = None
        if case.train:
            g = torch.Generator(device=device)
            g.manual_seed(seed + 13)
            grad_out = torch.randn(sh.B, sh.TQ, sh.HQ, sh.Dv, device=device, generator=g).to(dtype)
        sets.append(InputSet(q, k, v, block_indices, unions, grad_out))
    work = common.measure_work(sh, sets[0].block_indices, sets[0].unions, elem)
    return Context(case, pattern, torch.device(device), dtype, sets, work, sh.Dk ** -0.5, full)


def auto_choice(ctx: Context, original_env: Dict[str, Optional[str]]) -> str:
    try:
        import nsa_ext

        s = ctx.sets[0]
        with environ(**original_env):
            decision = nsa_ext.explain(s.q, s.k, s.v, s.block_indices, ctx.shape.block_size)
        chosen = str(getattr(decision, "chosen", None) or "none")
        tile_backend = getattr(decision, "tile_backend", None)
    except Exception as err:
        return f"unknown ({short_error(err, 60)})"
    if tile_backend and tile_backend != chosen:   # e.g. Triton handing its tile calls to the extension
        chosen += f", its tile schedule on {tile_backend}"
    return f"{chosen}; nsa:triton's schedule: {triton_schedule(ctx)}"


def triton_schedule(ctx: Context) -> str:
    """The forward schedule the nsa:triton row runs (auto's choice) and the overlap statistic."""
    try:
        import nsa_ext

        s = ctx.sets[0]
        with environ(**row_env("nsa:triton")):
            decision = nsa_ext.explain(s.q, s.k, s.v, s.block_indices, ctx.shape.block_size,
                                       backend="triton")
        lines = getattr(decision, "details", {}).get("triton", [])
        if not lines:
            return "n/a"
        chosen = lines[0].split("(")[0].replace("schedule:", "").strip()
        stats = [line.split("statistics:", 1)[1].strip() for line in lines if "statistics:" in line]
        ratio = [part for part in (stats[0].split(", ") if stats else []) if "union/selections" in part]
        return chosen + (f" ({ratio[0]})" if ratio else "")
    except Exception as err:
        return f"unknown ({short_error(err, 60)})"


CHECKED = ("nsa:cuda", *SCHEDULE_ROWS, "nsa:reference", "fla", "flex")


def check_output(ctx: Context, name: str, result) -> str:
    """SPEC.md's error of a forward row's output against packed SDPA on the same inputs (set 0):
    max |o - o_sdpa| / max(1, |o_sdpa|). Catches a mis-called anchor (scale, layout, semantics)."""
    if ctx.case.train or name not in CHECKED:
        return ""
    try:
        import nsa_ext

        if "sdpa_o" not in ctx.cache:
            s = ctx.sets[0]
            with environ(**THRESHOLD_ENV), torch.no_grad():
                ctx.cache["sdpa_o"] = nsa_ext.selection_attention(s.q, s.k, s.v, s.block_indices,
                                                                  ctx.shape.block_size, backend="sdpa")
        ref = ctx.cache["sdpa_o"]
        o = result[0] if isinstance(result, (tuple, list)) else result
        if name == "flex":
            o = o.transpose(1, 2)
        err = ((o.float() - ref.float()).abs() / ref.float().abs().clamp_min(1.0)).max().item()
        bad = not math.isfinite(err) or err > 0.05
        return f"{'MISMATCH ' if bad else ''}err {err:.1e} vs sdpa"
    except Exception as err:
        return f"check failed ({short_error(err, 60)})"


# Decode rows also timed as a CUDA-graph replay (launch overhead gone): the rows whose call has no
# host synchronisation. Packed SDPA syncs (its bucketing) and is not captured.
GRAPH_ROWS = ("nsa:cuda", "nsa:triton", "nsa:triton-head", "fla", "dense:cudnn", "dense:flash")
# Decode and chunk rows also timed as eager calls, one after another without a graph (how most
# inference loops and training code call): the whole call and the host's enqueue alone, us
# (bench/common.py eager_times; bench/eager_bench.py breaks the host time into stages).
EAGER_GROUPS = ("decode", "chunked")
EAGER_CALLS = 100        # at most; fewer where a call takes over 0.5 ms (~50 ms a run)


def graph_time(fn: Callable, timer: common.Timer):
    """(median ms of a CUDA-graph replay of `fn`, note); (None, why) when capture fails."""
    try:
        graph, keep = common.capture_graph(fn)
        ms, _, _ = timer.measure(graph.replay)
        del keep, graph
        return ms, f"graph {ms * 1e3:.1f} us"
    except Exception as err:
        torch.cuda.synchronize()
        return None, f"graph capture failed ({short_error(err, 60)})"


def measure_row(ctx: Context, name: str, timer: common.Timer) -> Row:
    mode = "fwd+bwd" if ctx.case.train else "fwd"
    row = Row(ctx.case.label, ctx.case.group, ctx.pattern, name, mode)
    try:
        ctx.cache.pop("dense_note", None)
        with environ(**row_env(name)), contextlib.ExitStack() as stack:
            fns, grads = [], []
            for s in ctx.sets:
                built = build(ctx, s, name)
                fns.append(built[0])
                grads.extend(built[1] or [])
            if len(built) > 2:            # a context to hold around the measurement (sdpa_kernel)
                stack.enter_context(built[2]())
            fn = common.cycle(fns)
            first = fns[0]()       # compile / autotune every set before timing (not timed)
            check = check_output(ctx, name, first)
            del first
            for f in fns[1:]:
                f()
            if grads:
                for t in grads:
                    t.grad = None
            row.ms, row.peak_mib, row.note = timer.measure(fn, grad_to_none=grads or None)
            state = common.gpu_state_after(ctx.device)
            if state:
                row.sm_mhz, row.power_w = state.get("sm_mhz"), state.get("power_w")
                row.power_cap = state.get("power_cap")
                row.note = "; ".join(x for x in (row.note, "after: " + common.gpu_state_note(state)) if x)
            if name in GRAPH_ROWS and ctx.shape.TQ == 1 and ctx.device.type == "cuda":
                row.graph_ms, graph_note = graph_time(fns[0], timer)
                row.note = "; ".join(x for x in (row.note, graph_note) if x)
            if ctx.case.group in EAGER_GROUPS and name not in ("nsa:reference", "dense:cpu"):
                calls = max(10, min(EAGER_CALLS, int(50 / max(row.ms, 1e-3))))
                times = common.eager_times(fns[0], ctx.device, calls=calls, repeats=3)
                row.eager_us, row.host_us = times["eager_us"], times["host_us"]
                row.note = "; ".join(x for x in (row.note, f"eager {row.eager_us:.1f} us/call, "
                                                           f"host {row.host_us:.1f} us") if x)
            row.note = "; ".join(x for x in (check, ctx.cache.get("dense_note", "") if name.startswith("dense") else "",
                                             row.note) if x)
    except NotApplicable as err:
        row.status, row.note = "n/a", str(err)
    except torch.cuda.OutOfMemoryError as err:
        row.status, row.note = "n/a", "out of memory: " + short_error(err, 100)
    except Exception as err:
        row.status, row.note = "error", short_error(err)
    finally:
        for s in ctx.sets:
            for t in (s.q, s.k, s.v):
                t.grad = None
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    if name == "flex" and "flex_build_ms" in ctx.cache and row.status == "ok":
        row.note = "; ".join(x for x in (f"mask build {ctx.cache['flex_build_ms']:.1f} ms (excluded)",
                                         ctx.cache.get("flex_note", ""), row.note) if x)
    return row


def median_round(measured: List[Row]) -> Row:
    """One row from its rounds: the round of median time (the lower middle of an even count),
    its note naming every round's time; a round that failed or was skipped wins, so that an
    error is never hidden behind a good round."""
    bad = [r for r in measured if r.status != "ok" or not r.ms]
    if bad or len(measured) == 1:
        return bad[0] if bad else measured[0]
    ordered = sorted(measured, key=lambda r: r.ms)
    row = ordered[(len(ordered) - 1) // 2]
    times = "/".join(f"{r.ms:.4g}" for r in measured)
    row.note = "; ".join(x for x in (f"median of {len(measured)} rounds ({times} ms)", row.note) if x)
    row.wall_s = round(sum(r.wall_s or 0.0 for r in measured), 2)
    return row


def fill_metrics(rows: List[Row], ctx: Context) -> None:
    by_name = {r.backend: r for r in rows if r.status == "ok" and r.ms}
    sh = ctx.shape
    fla = by_name.get("fla")
    floor_row, floor_tile = by_name.get("floor/row"), by_name.get("floor/tile")
    for r in rows:
        if r.status != "ok" or not r.ms:
            continue
        seconds = r.ms * 1e-3
        dense = r.backend.startswith("dense:")
        if not r.backend.startswith("floor/"):     # the floors do no arithmetic: no TFLOP/s
            r.tflops = ctx.work.flops(sh.Dk, sh.Dv, dense=dense, backward=ctx.case.train) / seconds / 1e12
        if not dense:
            nbytes = ctx.work.tile_bytes if r.backend == "floor/tile" else ctx.work.row_bytes
            r.gbps = nbytes / seconds / 1e9
        if fla is not None:
            r.vs_fla = r.ms / fla.ms
        if floor_row is not None:
            r.x_floor_row = r.ms / floor_row.ms
        if floor_tile is not None:
            r.x_floor_tile = r.ms / floor_tile.ms


# ----------------------------------------------------------------------------------------------
# Output

def _num(value, fmt) -> str:
    if value is None:
        width = "".join(ch for ch in fmt.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width or 1))
    return format(value, fmt)


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def case_line(ctx: Context, auto: str) -> str:
    sh, w = ctx.shape, ctx.work
    return (f"== {ctx.case.label} | {ctx.pattern} | B={sh.B} TQ={sh.TQ} TK={sh.TK} HQ={sh.HQ} H={sh.H} "
            f"G={sh.G} Dk={sh.Dk} Dv={sh.Dv} S={sh.S}x{sh.block_size} | pairs {_si(w.pairs)}, "
            f"K/V read per row {_si(w.row_bytes)}B, per tile {_si(w.tile_bytes)}B "
            f"(union {w.mean_union:.1f} blocks, adjacent rows' Jaccard {w.jaccard:.2f}) | "
            f"sets {len(ctx.sets)} | auto -> {auto}")


HEADER_COLS = (f"{'backend':<17}{'mode':<8}{'ms':>10} {'TFLOP/s':>8} {'GB/s':>8} {'vs fla':>7} "
               f"{'x fl/row':>8} {'x fl/tile':>9} {'peak MiB':>8}  note")


def format_row(r: Row) -> str:
    if r.status != "ok":
        return f"{r.backend:<17}{r.mode:<8}{r.status + ': ' + r.note}"
    return (f"{r.backend:<17}{r.mode:<8}{_num(r.ms, '10.4f')} {_num(r.tflops, '8.3g')} "
            f"{_num(r.gbps, '8.4g')} {_num(r.vs_fla, '7.2f')} {_num(r.x_floor_row, '8.2f')} "
            f"{_num(r.x_floor_tile, '9.2f')} {_num(r.peak_mib, '8.0f')}  {r.note}".rstrip())


def header_text(env: Dict[str, object], copy_bw, args, device) -> str:
    lines = []
    kind = "GPU" if device.type == "cuda" else "CPU"
    if device.type == "cuda":
        lines.append(f"nsa_ext selection bench -- GPU run: {env.get('gpu')} (SM {env.get('sm')}, "
                     f"{env.get('sm_count')} SMs, {env.get('gpu_memory_gib')} GiB, L2 {env.get('l2_mib')} MiB, "
                     f"driver {env.get('driver')})")
        if env.get("sm_clock_max_mhz"):
            lines.append(f"SM clock up to {env['sm_clock_max_mhz']} MHz, power limit {env['power_limit_w']} W: "
                         f"a row's note ends with NVML's SM clock and board power right after it ('power cap': "
                         f"NVML's power-cap reason for a lower clock was active then)")
    else:
        lines.append(f"nsa_ext selection bench -- CPU run (no CUDA GPU): {env.get('cpu')}, "
                     f"{env.get('cpu_threads')} threads. Small shapes; NOT a GPU performance number.")
    lines.append(f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn', '-')}), "
                 f"Triton {env.get('triton')}, nsa_ext {env.get('nsa_ext')} (git {env.get('git_commit')}), "
                 f"fla-core {env.get('fla_core')}, Python {env.get('python')}, {env.get('date_utc')}")
    ext = env.get("nsa_ext_cuda_extension")
    if isinstance(ext, dict):
        built = "built" if ext.get("built") else f"not built ({ext.get('reason', '?')})"
        extra = {k: v for k, v in ext.items() if k not in ("built", "reason")}
        lines.append(f"CUDA extension: {built}" + (f" {extra}" if extra else ""))
    if copy_bw:
        lines.append(f"{kind} copy bandwidth: {copy_bw['gbps']:.0f} GB/s (read+write; "
                     f"{copy_bw['bytes'] / (1 << 20):.0f} MiB copied in {copy_bw['ms']:.3f} ms)")
    if "host_launch_us_start" in env:
        lines.append(f"host: {env['host_launch_us_start']} us to enqueue a tiny op (the anchor of "
                     f"host-bound rows; measured again at the end)")
    lines.append(f"dtype {str(args.dtype).replace('torch.', '')}; timing: "
                 + ("triton.testing.do_bench median (L2 flushed per call)" if device.type == "cuda"
                    else "perf_counter median")
                 + (f", median of {args.rounds} rounds taken in turns" if args.rounds > 1 else "")
                 + f"; thresholds forced to 0 for named backends "
                 f"({', '.join(f'{k}={v}' for k, v in THRESHOLD_ENV.items())}); flex: mask build excluded")
    return "\n".join(lines)


def summary_text(rows: List[Row], contexts: List[tuple]) -> str:
    names = [n for n in ROW_ORDER if any(r.backend == n for r in rows)]
    short = {"nsa:triton": "triton", "nsa:triton-row": "trit-row", "nsa:triton-tile": "trit-tile",
             "nsa:triton-kv": "trit-kv", "nsa:triton-head": "trit-head", "nsa:reference": "ref",
             "dense:cudnn": "cudnn", "dense:flash": "flash", "dense:cpu": "dense", "floor/row": "fl/row",
             "floor/tile": "fl/tile"}
    head = f"{'case':<22}{'pattern':<10}" + "".join(f"{short.get(n, n.replace('nsa:', '')):>10}" for n in names)
    lines = ["summary: median ms per row (n/a: cannot serve; err: failed; skip: time budget; -: not a row here)", head]
    for label, pattern in contexts:
        cells = []
        for n in names:
            match = [r for r in rows if r.case == label and r.pattern == pattern and r.backend == n]
            if match and match[0].status == "ok":
                cells.append(_num(match[0].ms, "10.3f"))
            else:
                mark = {"n/a": "n/a", "error": "err", "skipped": "skip"}.get(match[0].status, "?") if match else "-"
                cells.append(f"{mark:>10}")
        lines.append(f"{label:<22}{pattern:<10}" + "".join(cells))
    clocks = [r.sm_mhz for r in rows if r.status == "ok" and r.sm_mhz]
    if clocks:
        capped = sum(1 for r in rows if r.status == "ok" and r.power_cap)
        lines.append(f"SM clock right after the rows: {min(clocks)}-{max(clocks)} MHz "
                     f"(median {statistics.median(clocks):.0f}); under the power cap after {capped} of "
                     f"{len(clocks)} rows")
    return "\n".join(lines)


def write_csv(path: Path, rows: List[Row]) -> None:
    fields = list(Row.__dataclass_fields__)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: getattr(r, k) for k in fields})


def write_plot(path: Path, rows: List[Row], cases: List[CaseSpec], env) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    x_of = {c.label: c.x for c in cases}
    groups = [("prefill", p) for p in common.PATTERNS] + [("train", "random")]
    panels = [(g, p) for g, p in groups
              if any(r.group == g and r.pattern == p and r.status == "ok" for r in rows)]
    if not panels:
        return "no timed prefill rows: no plot"
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (group, pattern) in zip(axes[0], panels):
        for name in ROW_ORDER:
            pts = sorted((x_of[r.case], r.ms) for r in rows if r.group == group and r.pattern == pattern
                         and r.backend == name and r.status == "ok")
            if pts:
                style = "--" if name.startswith(("floor", "dense")) else "-"
                color = plt.get_cmap("tab20")(ROW_ORDER.index(name) % 20)   # one colour per row, every panel
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name, color=color)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{group} ({pattern})" + (" fwd+bwd" if group == "train" else " fwd"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    where = env.get("gpu") or "CPU"
    fig.suptitle(f"NSA selection attention on {where}: time vs T (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few cases only")
    parser.add_argument("--full", action="store_true", help="more sizes (G=3,6,16; T=128k; ...)")
    parser.add_argument("--schedules", action="store_true",
                        help="the Triton forward schedules: T=8k/32k and G=1,4,8 at 32k, every pattern, "
                             "rows " + ",".join(SCHEDULE_PRESET_ROWS) + " (unless --backends)")
    parser.add_argument("--cases", default=",".join(CASE_GROUPS),
                        help=f"comma list of case groups: {','.join(CASE_GROUPS)}")
    parser.add_argument("--patterns", default=None,
                        help="comma list of random,clustered (default: GPU random everywhere and "
                             "clustered for prefill; CPU both)")
    parser.add_argument("--backends", default="", help="comma list of rows to run (default: all)")
    parser.add_argument("--out", default=str(_REPO / "bench" / "results"), help="output directory")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bf16 (GPU default), fp16 or fp32 (CPU default)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new rows after this many seconds (default: GPU 400, CPU 100)")
    parser.add_argument("--triton-interpret", action="store_true",
                        help="CPU only: also run the Triton rows in the interpreter (slow)")
    parser.add_argument("--warmup-ms", type=float, default=10)
    parser.add_argument("--rep-ms", type=float, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each case's rows this many times in turns (A B C, A B C, ...) "
                             "and report each row's median round, the rounds in its note: drifts "
                             "of the GPU's clock between rows then fall on every row alike")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: at least 1, got {args.rounds}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.dtype not in dtypes:
        parser.error(f"--dtype: expected one of {', '.join(dtypes)}, got {args.dtype!r}")
    args.dtype = dtypes[args.dtype]
    args.default_patterns = args.patterns is None
    if args.patterns is None:
        args.patterns = ",".join(common.PATTERNS)
    for name, allowed in (("cases", CASE_GROUPS), ("patterns", common.PATTERNS)):
        values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad:
            parser.error(f"--{name}: unknown {bad}; expected some of {','.join(allowed)}")
        setattr(args, name, values)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.budget_s is None:
        args.budget_s = (170.0 if args.schedules else 400.0) if args.device == "cuda" else 100.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    # sdpa_kernel(...) makes torch explain every kernel it did not pick, once per shape.
    warnings.filterwarnings("ignore", message=".*(kernel not used|has been runtime disabled|requires q,k,v).*")
    device = torch.device(args.device)
    if args.triton_interpret:
        if device.type == "cuda":
            print("--triton-interpret is for CPU runs; ignored on CUDA", file=sys.stderr)
        else:
            os.environ["TRITON_INTERPRET"] = "1"     # before Triton kernels are defined
    original_env = {k: os.environ.get(k)
                    for k in list(THRESHOLD_ENV) + ["NSA_SEL_TRITON_GROUP", "NSA_SEL_SCHEDULE",
                                                    "NSA_SEL_HOPPER_DEEP"]}
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    env = common.environment(device)
    timer = common.Timer(device, args.warmup_ms, args.rep_ms, cpu_budget_s=0.5)
    try:
        copy_bw = common.copy_bandwidth(device, timer)
    except Exception as err:
        copy_bw = None
        print(f"copy bandwidth: failed ({short_error(err)})", file=sys.stderr)
    env["host_launch_us_start"] = round(common.host_launch_us(device), 2)
    header = header_text(env, copy_bw, args, device)
    print(header, flush=True)

    all_cases = (gpu_cases(args.full, args.quick, args.schedules) if device.type == "cuda"
                 else cpu_cases(args.full, args.quick, args.schedules))
    if args.schedules and not args.backends:
        args.backends = list(SCHEDULE_PRESET_ROWS)
    cases = [c for c in all_cases if c.group in args.cases]
    # One query per row (decode): a tile is one query, so `clustered` would equal `random`.
    work_items = [(c, p) for c in cases for p in args.patterns if not (p == "clustered" and c.shape.TQ < 64)]
    if device.type == "cuda" and args.default_patterns and not (args.full or args.schedules):
        # The one-call GPU budget: clustered for the prefill cases only (--patterns or --full for all).
        work_items = [(c, p) for c, p in work_items if p == "random" or c.group == "prefill"]
    # Random first (the issues' targets), in GROUP_PRIORITY order; then clustered.
    work_items.sort(key=lambda cp: (common.PATTERNS.index(cp[1]), GROUP_PRIORITY.index(cp[0].group)))
    if args.schedules:
        # Case by case (every pattern of a case together), the G sweep on random and model only.
        if args.default_patterns:
            work_items = [(c, p) for c, p in work_items if not (c.group == "groups" and p == "clustered")]
        work_items.sort(key=lambda cp: (cases.index(cp[0]), common.PATTERNS.index(cp[1])))
    plan = [(c, p, [n for n in rows_for(c, device) if not args.backends or n in args.backends])
            for c, p in work_items]
    progress = common.Progress(sum(len(r) for _, _, r in plan), enabled=not args.no_progress)

    rows: List[Row] = []
    blocks: List[str] = []
    case_records = []
    done_contexts = []
    for case, pattern, names in plan:
        over = time.monotonic() - started > args.budget_s
        if over:
            for n in names:
                rows.append(Row(case.label, case.group, pattern, n, "fwd+bwd" if case.train else "fwd",
                                status="skipped", note=f"time budget of {args.budget_s:.0f} s spent"))
                progress.step(f"{case.label} {pattern}: skipped")
            done_contexts.append((case.label, pattern))
            blocks.append(f"== {case.label} | {pattern} | skipped: time budget of {args.budget_s:.0f} s spent")
            continue
        try:
            ctx = make_context(case, pattern, device, args.dtype, args.seed, args.full)
        except Exception as err:
            for n in names:
                rows.append(Row(case.label, case.group, pattern, n, "fwd+bwd" if case.train else "fwd",
                                status="error", note="inputs: " + short_error(err)))
                progress.step(f"{case.label} {pattern}: inputs failed")
            done_contexts.append((case.label, pattern))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        auto = auto_choice(ctx, original_env)
        case_start = time.monotonic()
        rounds: Dict[str, List[Row]] = {name: [] for name in sorted(names, key=MEASURE_ORDER.index)}
        for turn in range(args.rounds):
            for name, measured in rounds.items():
                if time.monotonic() - started > args.budget_s:
                    if turn > 0:
                        continue        # the rounds already taken stand
                    row = Row(case.label, case.group, pattern, name, "fwd+bwd" if case.train else "fwd",
                              status="skipped", note=f"time budget of {args.budget_s:.0f} s spent")
                else:
                    row_start = time.monotonic()
                    row = measure_row(ctx, name, timer)
                    row.wall_s = round(time.monotonic() - row_start, 2)
                measured.append(row)
                if turn == 0:
                    progress.step(f"{case.label} {pattern}: {name}")
        case_rows = [median_round(measured) for measured in rounds.values()]
        fill_metrics(case_rows, ctx)
        case_rows.sort(key=lambda r: ROW_ORDER.index(r.backend))
        rows.extend(case_rows)
        block = "\n".join([case_line(ctx, auto), HEADER_COLS] + [format_row(r) for r in case_rows] +
                          [f"(case: {time.monotonic() - case_start:.0f} s with compiles; "
                           f"{time.monotonic() - started:.0f} s into the run)"])
        blocks.append(block)
        if progress.bar is not None:
            progress.bar.write(block + "\n")
        else:
            print(block + "\n", flush=True)
        union = re.search(r"union/selections ([0-9.eE+-]+)", auto or "")
        case_records.append({"case": case.label, "group": case.group, "pattern": pattern,
                             "shape": vars(case.shape), "train": case.train, "auto": auto,
                             "union_ratio": float(union.group(1)) if union else None,
                             "work": vars(ctx.work), "input_sets": len(ctx.sets)})
        done_contexts.append((case.label, pattern))
        del ctx
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _write_outputs(out, env, copy_bw, header, blocks, rows, case_records, done_contexts, cases, args,
                       started, final=False, plot=len(case_records) % 4 == 0)
    progress.close()
    env["host_launch_us_end"] = round(common.host_launch_us(device), 2)
    summary = summary_text(rows, done_contexts)
    print(summary)
    print(f"host: {env['host_launch_us_start']} us per tiny-op launch at the start, "
          f"{env['host_launch_us_end']} at the end (host-bound rows move with it)")
    messages = _write_outputs(out, env, copy_bw, header, blocks, rows, case_records, done_contexts, cases,
                              args, started, final=True)
    for message in messages:
        print(message)
    print(f"wrote {out}/bench_selection.{{txt,json,csv,png}} in {time.monotonic() - started:.0f} s")
    return 0


def _write_outputs(out: Path, env, copy_bw, header, blocks, rows, case_records, done_contexts, cases, args,
                   started, final: bool, plot: bool = True) -> List[str]:
    text = "\n\n".join([header] + blocks + [summary_text(rows, done_contexts)]) + "\n"
    (out / "bench_selection.txt").write_text(text)
    common.dump_json(out / "bench_selection.json", {
        "environment": env, "copy_bandwidth": copy_bw,
        "settings": {"dtype": str(args.dtype), "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                     "budget_s": args.budget_s, "threshold_env": THRESHOLD_ENV, "quick": args.quick,
                     "full": args.full, "elapsed_s": round(time.monotonic() - started, 1),
                     "complete": final},
        "cases": case_records, "rows": [vars(r) for r in rows]})
    write_csv(out / "bench_selection.csv", rows)
    messages = []
    if final or plot:
        problem = write_plot(out / "bench_selection.png", rows, cases, env)
        if problem:
            messages.append(problem)
    return messages


if __name__ == "__main__":
    sys.exit(main())
