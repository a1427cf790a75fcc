"""Eager calls (no CUDA graph): what one `selection_attention` call costs the host and the GPU.

Two shapes, bf16, HQ=64, H=4, D=128, 16 selected blocks of 64: decode B=1 TQ=1 TK=64k (block 0,
the own block, 14 random earlier ones), and chunked prefill B=1 TQ=512 TK=32k once per selection
pattern of `--patterns` (default all three of bench/common.py: `random` as the decode row's,
`clustered` and `model`, where neighbouring queries share blocks). Per row, for nsa_ext through
`auto`, `triton` and `cuda` named, `cuda tile` (the cuda backend with NSA_SEL_SCHEDULE=tile: the
Hopper kernel, chunk rows on SM 9.0), and fla's `parallel_nsa_fwd` (fla-core, when importable) in
the same run:

  - eager us/call: wall time of N back-to-back calls with one synchronisation at the end, / N
    (what a model running eagerly pays per call: the larger of host and GPU time);
  - host us/call: the same N calls timed until the last one returns, before the
    synchronisation (the host's enqueue cost; N is small enough that the launch queue never
    fills, so the host is not waiting for the GPU).

`--stages` adds the host-time breakdown of one call (each stage timed in a loop of its own:
argument checks, describe_call, load_settings, device_facts, choose, the backend's forward
enqueue, the custom op's dispatch; for the cuda path also the extension's pieces: each
operator through torch.ops, the direct pybind11 entry, an allocation, a tiny PyTorch kernel) and
`--profile` a torch.profiler table of 20 calls per path and row.
On a machine without a GPU it runs small CPU shapes (packed SDPA), plainly labelled.
`--stub-forward` replaces every backend's forward by one returning preallocated outputs: the
rows then time only the package's Python around the kernels (the GPU rows' shapes on any device;
notes/eager.md's CPU table).

    python bench/eager_bench.py [--patterns random,clustered,model] [--chunk-tq 512,2048]
                                [--stages] [--profile] [--stub-forward] [--out eager.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nsa_ext  # noqa: E402
from nsa_ext import api, ops  # noqa: E402
from nsa_ext.call import describe_call  # noqa: E402
from nsa_ext.config import load_settings  # noqa: E402
from nsa_ext.device import device_facts  # noqa: E402
from nsa_ext.dispatch import backend_module, choose  # noqa: E402
from bench.common import (PATTERNS, Shape, eager_times, host_launch_us,  # noqa: E402
                          make_block_indices, sync)

HQ, H, D, S, BS = 64, 4, 128, 16, 64
ROWS = {"decode B=1 TK=64k": (1, 1, 65536), "chunk TQ=512 TK=32k": (1, 512, 32768)}
CPU_ROWS = {"cpu decode B=1 TK=1k": (1, 1, 1024), "cpu chunk TQ=16 TK=1k": (1, 16, 1024)}
BACKENDS = ("auto", "triton", "cuda")


def make_inputs(B: int, TQ: int, TK: int, device, dtype, seed: int = 0, pattern: str = "random"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, TQ, HQ, D, generator=g).to(device, dtype)
    k = torch.randn(B, TK, H, D, generator=g).to(device, dtype)
    v = torch.randn(B, TK, H, D, generator=g).to(device, dtype)
    if pattern != "random":     # the main bench's patterns (bench/common.py), duplicate-free
        shape = Shape(B=B, TQ=TQ, TK=TK, HQ=HQ, H=H, Dk=D, Dv=D, S=S, block_size=BS)
        return q, k, v, make_block_indices(shape, pattern, device=device, seed=seed)
    # Block 0, the query's own block and S - 2 distinct earlier ones (fla counts a repeat twice).
    pos = torch.arange(TQ) + (TK - TQ)
    own = pos // BS
    rows = []
    for t in range(TQ):
        earlier = torch.randperm(max(int(own[t]) - 1, 1), generator=g)[:S - 2] + 1
        row = torch.cat([torch.tensor([0, int(own[t])]), earlier])
        row = torch.unique(row)
        rows.append(torch.cat([row, row.new_full((S - row.numel(),), -1)]))
    block_indices = torch.stack(rows)[None, :, None, :].expand(B, TQ, H, S)
    return q, k, v, block_indices.to(device=device, dtype=torch.int32).contiguous()


def row_inputs(rows: Dict[str, tuple], patterns: List[str]):
    """(label, B, TQ, TK, pattern) per timed row: the decode rows once (one query: no neighbours
    to share with), every other row once per pattern."""
    out = []
    for label, (B, TQ, TK) in rows.items():
        for pattern in (["random"] if TQ == 1 else patterns):
            out.append((label if TQ == 1 else f"{label} {pattern}", B, TQ, TK, pattern))
    return out


@contextlib.contextmanager
def schedule_forced(schedule: str):
    """NSA_SEL_SCHEDULE=schedule for the calls inside (the settings reader sees it at once)."""
    saved = os.environ.get("NSA_SEL_SCHEDULE")
    os.environ["NSA_SEL_SCHEDULE"] = schedule
    try:
        yield
    finally:
        if saved is None:
            del os.environ["NSA_SEL_SCHEDULE"]
        else:
            os.environ["NSA_SEL_SCHEDULE"] = saved


def loop_us(fn: Callable, device, calls: int = 2000) -> float:
    """Host time of one stage: best of 3 loops of `calls` calls, no synchronisation inside."""
    for _ in range(min(50, calls)):
        fn()
    best = float("inf")
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
        sync(device)
    return best


def stages(q, k, v, block_indices, backend: str, device, calls: int) -> Dict[str, float]:
    """Host time of each stage of one call (us); the stages that launch kernels run `calls`
    times a loop, the others 2000 times."""
    call = describe_call(q, k, v, block_indices, BS)
    settings = load_settings()
    facts = device_facts(call.device)
    decision = choose(call, backend, settings, facts)
    module = backend_module(decision.chosen)
    out = {
        "argument checks (api._op_arguments)": loop_us(
            lambda: api._op_arguments(q, k, v, block_indices, BS, None, None, None, None, backend),
            device),
        "describe_call (validation)": loop_us(lambda: describe_call(q, k, v, block_indices, BS),
                                              device),
        "load_settings": loop_us(load_settings, device),
        "device_facts": loop_us(lambda: device_facts(call.device), device),
        "choose (dispatch, cached)": loop_us(lambda: choose(call, backend, settings, facts), device),
        "plain-eager check (api._plain_eager)": loop_us(
            lambda: api._plain_eager(q, k, v, block_indices, None, None, None), device),
        f"{decision.chosen} forward (enqueue)": loop_us(lambda: module.forward(call), device, calls),
        "run_forward (all of the above but the checks)": loop_us(
            lambda: ops.run_forward(q, k, v, block_indices, None, None, None, None, BS, None,
                                    backend, False), device, calls),
        "custom op (run_forward + op dispatch)": loop_us(
            lambda: ops.selection_attention_op(q, k, v, block_indices, None, None, None, None, BS,
                                               None, backend, False), device, calls),
        "selection_attention (the whole call)": loop_us(
            lambda: nsa_ext.selection_attention(q, k, v, block_indices, BS, backend=backend),
            device, calls),
    }
    return out


def extension_parts(q, k, v, block_indices, device, calls: int) -> Dict[str, float]:
    """Host time (us) of the CUDA extension's pieces on this call's inputs, each in a loop of
    its own: where an eager decode call's enqueue goes below the package's Python (the
    operators through torch.ops, the direct pybind11 entry, the plan's launch closure, and two
    anchors: one allocation and one tiny PyTorch kernel). {} without the extension."""
    from nsa_ext import _ext
    from nsa_ext.backends import cuda
    from nsa_ext.selection import canonical_op_args, row_geometry

    if not _ext.available() or device.type != "cuda":
        return {}
    call = describe_call(q, k, v, block_indices, BS)
    geometry = row_geometry(call)
    args = canonical_op_args(call, geometry)
    if args is None:
        return {}
    splits = cuda.num_splits(call, device_facts(call.device).sm_count)
    pos, k_offset = geometry.pos.contiguous(), geometry.k_offset.contiguous()
    limit, scale = call.block_count_limit, call.scale
    ops_ns = torch.ops.nsa_ext_cuda
    blocks, counts = ops_ns.canonical_blocks.default(block_indices, pos, None, limit, BS)
    tiny = torch.zeros(4, device=device)
    out = {
        "torch.empty (4 floats, cuda)": loop_us(lambda: torch.empty(4, device=device), device),
        "torch.add (tiny, cuda: 1 alloc + 1 launch)": loop_us(lambda: torch.add(tiny, tiny),
                                                               device),
        "torch.ops canonical_blocks (2 allocs, 1 launch)": loop_us(
            lambda: ops_ns.canonical_blocks.default(block_indices, pos, None, limit, BS), device),
        "torch.ops selection_fwd, 1 slice (2 allocs, 1 launch)": loop_us(
            lambda: ops_ns.selection_fwd.default(q, k, v, blocks, counts, pos, k_offset, BS,
                                                 scale, 1), device),
        f"torch.ops selection_fwd, {splits} slices (3 allocs, 2 launches)": loop_us(
            lambda: ops_ns.selection_fwd.default(q, k, v, blocks, counts, pos, k_offset, BS,
                                                 scale, splits), device),
        f"torch.ops selection_fwd_rows, {splits} slices (3 allocs, 3 launches)": loop_us(
            lambda: ops_ns.selection_fwd_rows.default(q, k, v, block_indices, None, limit, pos,
                                                      k_offset, BS, scale, splits), device),
    }
    direct = _ext.direct_rows()
    if direct is not None:
        out[f"pybind11 selection_fwd_rows, {splits} slices"] = loop_us(
            lambda: direct(q, k, v, block_indices, None, limit, pos, k_offset, BS, scale, splits),
            device)
    launch = cuda.eager_launch(call, load_settings(), device_facts(call.device))
    if launch is not None:
        out["the cuda eager plan's launch closure"] = loop_us(
            lambda: launch(q, k, v, block_indices), device)
    return out


class _StubBackend:
    """A backend whose forward returns preallocated outputs of the call's shapes."""
    outputs: Dict[tuple, tuple] = {}

    @classmethod
    def forward(cls, call):
        key = (call.q.shape, call.v.shape[-1], call.dtype, call.device)
        if key not in cls.outputs:
            cls.outputs[key] = (call.q.new_empty(*call.q.shape[:-1], call.v.shape[-1]),
                                call.q.new_empty(call.q.shape[:-1], dtype=torch.float32))
        return cls.outputs[key]


@contextlib.contextmanager
def stubbed_forwards():
    """Every backend's forward returns preallocated outputs (the dispatcher still decides)."""
    global backend_module
    saved = ops.backend_module, backend_module
    ops.backend_module = backend_module = lambda name: _StubBackend
    try:
        yield
    finally:
        ops.backend_module, backend_module = saved


def fla_forward() -> Optional[Callable]:
    try:
        from fla.ops.nsa.parallel import parallel_nsa_fwd
    except Exception as err:        # not installed, or failing at import
        print(f"# fla-core is not importable ({type(err).__name__}: {err}): its column is empty")
        return None
    return parallel_nsa_fwd


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per timed run")
    parser.add_argument("--patterns", default=",".join(PATTERNS),
                        help="comma list of the chunk rows' selection patterns "
                             f"({', '.join(PATTERNS)}; decode rows: random)")
    parser.add_argument("--stages", action="store_true", help="host-time breakdown per stage")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of 20 calls per path and row")
    parser.add_argument("--stub-forward", action="store_true",
                        help="backends return preallocated outputs: host path only")
    parser.add_argument("--chunk-tq", default="512",
                        help="comma list of the chunk rows' query lengths (TK=32k each)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    unknown = sorted(set(args.patterns) - set(PATTERNS))
    if unknown or not args.patterns:
        parser.error(f"--patterns: expected a comma list of {', '.join(PATTERNS)}, got "
                     f"{', '.join(unknown) or 'nothing'}")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu or args.stub_forward else torch.float32
    rows = ROWS if gpu or args.stub_forward else CPU_ROWS
    if gpu or args.stub_forward:
        rows = {label: shape for label, shape in rows.items() if shape[1] == 1}
        for tq in (int(x) for x in args.chunk_tq.split(",") if x.strip()):
            rows[f"chunk TQ={tq} TK=32k"] = (1, tq, 32768)
    where = (torch.cuda.get_device_name(device) if gpu
             else "CPU (small shapes, packed SDPA only: not the GPU numbers)")
    if args.stub_forward:
        where = (f"{torch.cuda.get_device_name(device) if gpu else 'CPU'}, the backends' "
                 f"forward stubbed: host path only")
    with stubbed_forwards() if args.stub_forward else contextlib.nullcontext():
        return run(args, device, dtype, rows, where)


def run(args, device, dtype, rows, where) -> dict:
    gpu = device.type == "cuda"
    host_us = host_launch_us(device)       # the anchor of host time (bench/common.py)
    print(f"# eager calls on {where} | torch {torch.__version__} | nsa_ext {nsa_ext.__version__} | "
          f"{str(dtype).replace('torch.', '')} HQ={HQ} H={H} D={D} S={S} block={BS} | "
          f"{args.calls} calls per run, best of 5 rounds taken in turns | "
          f"host: {host_us:.2f} us to enqueue a tiny op")
    fla = fla_forward() if gpu and not args.stub_forward else None
    results = {"device": where, "host_launch_us": round(host_us, 2), "rows": []}
    print("| row | path | eager us/call | host us/call | chosen |")
    print("| --- | --- | --- | --- | --- |")
    for label, B, TQ, TK, pattern in row_inputs(rows, args.patterns):
        q, k, v, block_indices = make_inputs(B, TQ, TK, device, dtype, pattern=pattern)
        scale = D ** -0.5
        # Every path of the row is timed in turns (5 rounds, best per path), so a slow start of
        # the process (clocks ramping, first calls) does not land on whichever path runs first.
        timed = []                                   # (entry, call)
        for backend in BACKENDS if gpu or args.stub_forward else ("auto",):
            decision = nsa_ext.explain(q, k, v, block_indices, BS, backend=backend)
            if decision.chosen is None:
                why = "; ".join(decision.reasons[backend])[:120]
                timed.append(({"row": label, "path": backend, "error": why}, None))
                continue

            def call(backend=backend):
                return nsa_ext.selection_attention(q, k, v, block_indices, BS, backend=backend)

            timed.append(({"row": label, "path": backend, "chosen": decision.chosen}, call))
        if gpu and not args.stub_forward and TQ > 1:
            # The Hopper tile kernel forced (chunk rows): what auto would pay if it chose tile.
            with schedule_forced("tile"):
                decision = nsa_ext.explain(q, k, v, block_indices, BS, backend="cuda")
            if decision.chosen is not None:
                def tile_call():
                    with schedule_forced("tile"):
                        return nsa_ext.selection_attention(q, k, v, block_indices, BS,
                                                           backend="cuda")

                timed.append(({"row": label, "path": "cuda tile", "chosen": "cuda"}, tile_call))
        if fla is not None:
            def fla_call():
                return fla(q, k, v, block_indices, S, BS, scale)

            timed.append(({"row": label, "path": "fla"}, fla_call))
        for _ in range(5):
            for entry, fn in timed:
                if fn is None:
                    continue
                times = eager_times(fn, device, args.calls, repeats=1)
                for key, value in times.items():
                    entry[key] = min(entry.get(key, value), value)
        for entry, fn in timed:
            if fn is None:
                print(f"| {label} | {entry['path']} | n/a | n/a | {entry['error']} |")
            else:
                name = "fla parallel_nsa_fwd" if entry["path"] == "fla" else entry["path"]
                print(f"| {label} | {name} | {entry['eager_us']:.1f} | {entry['host_us']:.1f} | "
                      f"{entry.get('chosen', 'fla')} |")
            if args.stages and fn is not None and entry["path"] in BACKENDS:
                entry["stages_us"] = stages(q, k, v, block_indices, entry["path"], device,
                                            args.calls)
                if entry["path"] == "cuda":
                    entry["stages_us"].update(extension_parts(q, k, v, block_indices, device,
                                                              args.calls))
            results["rows"].append(entry)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            # Every path of the row (where its host time goes, and its kernels' GPU time).
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
            for entry, fn in timed:
                if fn is None:
                    continue
                with profile(activities=activities) as prof:
                    for _ in range(20):
                        fn()
                    sync(device)
                print(f"\n# torch.profiler, 20 calls, {label}, path {entry['path']}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        del q, k, v, block_indices
        if gpu:
            torch.cuda.empty_cache()
    if args.stages:
        for entry in results["rows"]:
            if "stages_us" in entry:
                print(f"\n# host us per stage, {entry['row']}, backend={entry['path']} "
                      f"(each stage timed in its own loop; nested stages include the ones above)")
                for stage, us in entry["stages_us"].items():
                    print(f"  {stage:52s} {us:8.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
