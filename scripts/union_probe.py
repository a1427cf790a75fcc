"""Times triton_ref/tile_union.py's kernel alone per (tiles per program, num_warps) on a CUDA GPU
(model pattern, T = 32k, H = 4, S = 16; G = 16, 4, 1), checking that every setting gives the same
unions and totals. notes/schedules.md has the twelfth session's run (H200).

    python scripts/union_probe.py
"""
import sys

import torch
import triton
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from triton.testing import do_bench
from bench.common import Shape, make_block_indices
from triton_ref.tile_union import tile_union
T, H, S, bs = 32768, 4, 16, 64
shape = Shape(B=1, TQ=T, TK=T, HQ=64, H=H, Dk=128, Dv=128, S=S, block_size=bs)
bi = make_block_indices(shape, "model", device="cuda").to(torch.int32)
blocks = torch.sort(torch.where(bi < 0, torch.iinfo(torch.int32).max, bi), dim=-1).values
blocks = torch.where(blocks == torch.iinfo(torch.int32).max, -1, blocks).contiguous()
k_offset = torch.zeros(1, T, dtype=torch.int64, device="cuda")
for G in (16, 4, 1):
    QT = 64 // G
    ref, res = None, []
    for tpp in (1, 2, 4, 8):
        for nw in (1, 2, 4, 8):
            if QT * S * tpp > 8192 or QT * S * tpp // (32 * nw) > 8:
                continue
            totals = torch.zeros(2, dtype=torch.int64, device="cuda")
            def run():
                totals.zero_()
                return tile_union(blocks, k_offset, bs, QT, totals=totals, tiles_per_program=tpp, num_warps=nw)
            out = run(); torch.cuda.synchronize()
            out = (out[0].clone(), out[1].clone(), totals.clone())
            ref = ref or out
            same = all(torch.equal(a, b) for a, b in zip(ref, out))
            res.append(f"tpp={tpp},nw={nw}: {do_bench(run, warmup=25, rep=200)*1000:.1f}{'' if same else ' DIFFERENT'}")
    print(f"G={G} width={QT*S} us:", "  ".join(res), flush=True)
