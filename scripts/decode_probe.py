"""Decode (TQ = 1) inside CUDA graphs: which path of the CUDA extension is fastest, beside Triton's.

HQ=64, H=4, D=128, 16 random blocks of 64, bf16; B in 1, 8, 32, 128; TK 8k and 64k. Each variant is
one call captured in a graph, replayed under triton.testing.do_bench (L2 flushed; median of three
runs, us): the API with backend "triton" and "cuda"; the CUDA operators on geometry made before the
capture (`rows_op`: canonical rows + row forward + merge at the backend's split count, `rows_op_s1`
unsplit; `auto_op_tile`: selection_fwd_auto with the tile kernel chosen; `tile_kernel`: the tile
kernel on precomputed unions). `d` is the largest |o - o_triton|. Then torch.profiler's kernel
times over 20 replays (B = 1, 32, 128, TK = 8k). GPU only (notes/eager.md, twenty-first session):

    python scripts/decode_probe.py > $OUT/decode_probe.txt
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch, triton.testing
import nsa_ext
from bench.common import Shape, make_block_indices, make_qkv
from nsa_ext.backends import cuda
from nsa_ext.call import describe_call
from nsa_ext.config import load_settings
from nsa_ext.device import device_facts
from nsa_ext.selection import canonical_blocks, row_geometry, canonical_op_args

def replay_us(fn):
    fn(); torch.cuda.synchronize()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay(); torch.cuda.synchronize()
    ts = [triton.testing.do_bench(g.replay, warmup=50, rep=200) for _ in range(3)]
    return sorted(ts)[1] * 1e3, out

facts = device_facts(torch.device("cuda"))
for TK in (8192, 65536):
  for B in (1, 8, 32, 128):
    shape = Shape(B=B, TQ=1, TK=TK, HQ=64, H=4, Dk=128, Dv=128, S=16, block_size=64)
    q, k, v = make_qkv(shape, torch.bfloat16, "cuda")
    bi = make_block_indices(shape, "random", device="cuda")
    call = describe_call(q, k, v, bi, 64)
    geometry = row_geometry(call)
    blocks, num_blocks = canonical_blocks(call, geometry)
    prep = cuda.prepared(call, load_settings(), geometry, blocks, num_blocks)
    prep.union(64 // 16)
    indices, pos, counts, limit, bs = canonical_op_args(call, geometry)
    koff = geometry.k_offset.contiguous()
    splits = cuda.num_splits(call, facts.sm_count)
    res = {}
    res["triton"] = replay_us(lambda: nsa_ext.selection_attention(q, k, v, bi, 64, backend="triton"))
    res["cuda_api"] = replay_us(lambda: nsa_ext.selection_attention(q, k, v, bi, 64, backend="cuda"))
    res["rows_op"] = replay_us(lambda: torch.ops.nsa_ext_cuda.selection_fwd_rows(q, k, v, indices, counts, limit, pos, koff, 64, call.scale, splits))
    res["rows_op_s1"] = replay_us(lambda: torch.ops.nsa_ext_cuda.selection_fwd_rows(q, k, v, indices, counts, limit, pos, koff, 64, call.scale, 1))
    res["auto_op_tile"] = replay_us(lambda: torch.ops.nsa_ext_cuda.selection_fwd_auto(q, k, v, indices, counts, limit, pos, koff, 64, call.scale, 100, 0))
    res["tile_kernel"] = replay_us(lambda: cuda.run_tile(prep))
    ref = res["triton"][1]
    ref = ref[0] if isinstance(ref, tuple) else ref
    line = []
    for name, (us, out) in res.items():
        o = out[0] if isinstance(out, tuple) else out
        d = (o.float() - ref.float()).abs().max().item()
        line.append(f"{name} {us:.1f}us (d {d:.1e})")
    print(f"TK={TK} B={B} splits={splits}: " + " | ".join(line), flush=True)

# Kernel times inside graph replays (torch.profiler, 20 replays), B = 1 / 32 / 128, TK = 8k.
from torch.profiler import profile, ProfilerActivity
for B in (1, 32, 128):
    shape = Shape(B=B, TQ=1, TK=8192, HQ=64, H=4, Dk=128, Dv=128, S=16, block_size=64)
    q, k, v = make_qkv(shape, torch.bfloat16, "cuda")
    bi = make_block_indices(shape, "random", device="cuda")
    for backend in ("cuda", "triton"):
        fn = lambda: nsa_ext.selection_attention(q, k, v, bi, 64, backend=backend)
        for _ in range(3): fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        for _ in range(5): g.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                g.replay()
            torch.cuda.synchronize()
        rows = [(e.key[:60], e.device_time_total / e.count, e.count) for e in prof.key_averages() if e.device_time_total > 0]
        print(f"B={B} {backend}: " + " | ".join(f"{n} {t:.1f}us x{c}" for n, t, c in rows), flush=True)
