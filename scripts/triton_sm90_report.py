"""What the Triton kernels compile to on SM 9.0, without a GPU: per launch config, the seconds
the compile took, the shared memory, registers and spills, and how many K/V loads the software
pipeliner turned into asynchronous copies (a load it leaves synchronous waits its whole latency
every iteration). Forward (tile, row) and backward (dq, dkdv) kernels, in bf16, fp16 or fp32
(fp32: full-precision dots, whose tuning once took minutes of ptxas, notes/backward.md).

`triton.compile` with a GPUTarget builds the kernel as a launch would (pointers and strides
marked 16-divisible, as a launch with aligned tensors and strides specialises them; without
that hint no load becomes a cp.async copy), and the ptxas that ships with Triton reports
registers and spills (compile seconds are real only where Triton's cache did not hold the
kernel yet: TRITON_CACHE_DIR=<empty dir>). A development tool: the numbers are the local
Triton's (the device may run another version), and occupancy follows from them only roughly.

    python scripts/triton_sm90_report.py [--kernels tile,row,dq,dkdv] [--head-dims 64,128,256]
                                         [--dtype bf16|fp16|fp32]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from triton_ref import selection_bwd, selection_fwd, selection_tile  # noqa: E402

# Pointer arguments: "IN" takes the inputs' dtype (--dtype); the rest are fixed.
POINTERS = {"q": "IN", "k": "IN", "v": "IN", "o": "IN", "do": "IN", "dq": "IN", "dk": "IN",
            "dv": "IN", "lse": "fp32", "delta": "fp32", "dk_part": "fp32", "dv_part": "fp32",
            "blocks": "i32", "num_blocks": "i32", "union": "i64", "union_count": "i32",
            "tokens": "i32", "entries": "i32", "item_bucket": "i32", "item_start": "i32",
            "item_end": "i32", "num_items": "i32", "slot_key_start": "i64",
            "slot_key_end": "i64", "slot_seq_start": "i64"}


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn           # through @triton.heuristics and @triton.autotune
    return kernel


def compile_sm90(kernel, constexprs: dict, num_warps: int, num_stages: int, dtype: str = "bf16"):
    jit = _jit(kernel)
    constexprs = {name: value for name, value in constexprs.items() if name in jit.arg_names}
    signature = {}
    for name in jit.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = "*" + (dtype if POINTERS[name] == "IN" else POINTERS[name])
        elif name in ("qk_scale", "scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name.startswith("stride") else "i32"
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(jit.arg_names)
                 if signature[name].startswith("*") or name.startswith("stride")}
    source = ASTSource(jit, signature, constexprs=dict(constexprs), attrs=divisible)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def ptxas_report(compiled) -> str:
    ptxas = Path(os.path.dirname(triton.backends.nvidia.__file__)) / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        out = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return f"{regs.group(1) if regs else '?'} registers, {spills.group(1) if spills else '?'} B spilled"


def kernels(head_dim: int, dtype: str = "bf16"):
    """(name, kernel, constexprs, configs) of the forward and backward kernels at G = 16,
    block 64, as a tuned (LARGE) launch of `dtype` inputs specialises them (fp32 launches are
    never tuned: of its configs they run the untuned default alone)."""
    common = dict(K=head_dim, V=head_dim, BLOCK=64, BK=head_dim, BV=head_dim, IS_VARLEN=False,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", LARGE=True, pos=None,
                  k_offset=None)
    tile = dict(common, QT=4, GT=16, BM=64, BS=selection_tile.chunk_size(64, head_dim, head_dim))
    row = dict(common, BG=16, BS=selection_fwd.default_chunk(64, head_dim, head_dim))
    yield "tile", selection_tile.selection_tile_kernel, tile, [
        (c.num_warps, c.num_stages) for c in selection_tile.ROWS_CONFIGS]
    yield "row", selection_fwd.selection_fwd_group_kernel, row, sorted(
        {(c.num_warps, c.num_stages) for c in selection_fwd.TUNING_CONFIGS
         if c.kwargs["BS"] == row["BS"]})
    dq = dict(common, BG=16, BS=selection_bwd.bwd_chunk(64, head_dim, head_dim, dtype == "fp32"))
    yield "dq", selection_bwd.selection_bwd_dq_kernel, dq, sorted(
        {(c.num_warps, c.num_stages) for c in selection_bwd.DQ_CONFIGS
         if c.kwargs["BS"] == dq["BS"]})
    # dK/dV: every BM its pruning keeps for this dtype and width (the first launch's tuning)
    dkdv = dict(common, BN=selection_bwd.dkdv_keys(64, head_dim, head_dim), DKDV=True,
                DQ_PARTIALS=False, dq_part=None)
    kept = selection_bwd._prune_dkdv(selection_bwd.DKDV_CONFIGS, {"q": torch.empty(0)}, **dkdv)
    for bm in sorted({c.kwargs["BM"] for c in kept}):
        yield f"dkdv BM={bm}", selection_bwd.selection_bwd_dkdv_kernel, dict(dkdv, BM=bm), sorted(
            {(c.num_warps, c.num_stages) for c in kept if c.kwargs["BM"] == bm})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="tile,row")
    parser.add_argument("--head-dims", default="128")
    parser.add_argument("--configs", type=int, default=None, help="at most this many per kernel")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    args = parser.parse_args(argv)
    wanted = set(args.kernels.split(","))
    print(f"inputs {args.dtype}; Triton {triton.__version__}")
    print("| kernel | head dim | warps x stages | compile s | shared memory | ptxas | 2-d async copies in the IR (K/V, all stages) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        for name, kernel, constexprs, configs in kernels(head_dim, args.dtype):
            if name.split(" ")[0] not in wanted:
                continue
            for warps, stages in configs[:args.configs]:
                t0 = time.perf_counter()
                compiled = compile_sm90(kernel, constexprs, warps, stages, args.dtype)
                seconds = time.perf_counter() - t0
                copies = len(re.findall(r"async_copy_global_to_local[^\n]*tensor<\d+x\d+x",
                                        compiled.asm["ttgir"]))
                print(f"| {name} | {head_dim} | {warps} x {stages} | {seconds:.1f} | "
                      f"{compiled.metadata.shared // 1024} KB | {ptxas_report(compiled)} | "
                      f"{copies} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
