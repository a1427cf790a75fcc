"""Quick bench of the CUDA extension's selection forward against fla's parallel_nsa_fwd.

Setting (issue 5): bf16, B=1, HQ=64, H=4 (G=16), D=128, 16 selected blocks of 64 per row, random
causal selection (block 0, the query's own block, random earlier blocks; repeats removed, so
both kernels get the same canonical set), T = 8k, 32k, 64k. Times are triton.testing.do_bench
medians; TFLOP/s = 4 * D * attended (query head, key) pairs / time. Prints a table with the GPU
and versions and writes JSON next to it (--out).

    python bench/cuda_quick.py [--T 8192 32768 65536] [--out bench/results/cuda_quick.json]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch
import triton
import triton.testing

from nsa_ext import _ext
from nsa_ext.backends import cuda as cuda_backend
from nsa_ext.backends import triton as triton_backend
from nsa_ext.call import describe_call
from nsa_ext.selection import canonical_blocks, row_geometry


def make_inputs(T, HQ=64, H=4, D=128, S=16, block_size=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    own = (torch.arange(T, device="cuda") // block_size)[None, :, None, None]      # [1, T, 1, 1]
    rand = torch.rand(1, T, H, S - 2, device="cuda", generator=g)
    earlier = (rand * own).floor().to(torch.int64)                                 # in [0, own)
    idx = torch.cat([torch.zeros_like(own).expand(1, T, H, 1), own.expand(1, T, H, 1), earlier], -1)
    return q, k, v, idx


def attended_pairs(call, blocks, pos):
    """Sum over (token, query head) of the keys attended."""
    valid = blocks >= 0
    keys = (pos[:, :, None, None] - blocks.to(torch.int64) * call.block_size + 1).clamp(
        max=call.block_size)
    per_row = torch.where(valid, keys, torch.zeros_like(keys)).sum()
    return int(per_row.item()) * call.group_size


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--T", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--out", default="bench/results/cuda_quick.json")
    parser.add_argument("--rep", type=int, default=300, help="do_bench rep (ms)")
    args = parser.parse_args()
    assert _ext.available(), _ext.unavailable_reason()
    try:
        from fla.ops.nsa.parallel import parallel_nsa_fwd
        import fla
        fla_version = getattr(fla, "__version__", "?")
    except Exception as err:  # fla is optional: the table says it was not run
        parallel_nsa_fwd, fla_version = None, f"not importable ({type(err).__name__}: {err})"

    props = torch.cuda.get_device_properties(0)
    header = (f"GPU {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
              f"triton {triton.__version__}, fla {fla_version}, nsa_ext._C {_ext.build_info()}")
    print(header)
    rows = []
    D = 128
    for T in args.T:
        q, k, v, idx = make_inputs(T)
        call = describe_call(q, k, v, idx, 64, need_lse=True)
        geometry = row_geometry(call)
        blocks, num_blocks = canonical_blocks(call, geometry)
        pos, k_offset = geometry.pos.contiguous(), geometry.k_offset.contiguous()
        pairs = attended_pairs(call, blocks, geometry.pos)
        op = torch.ops.nsa_ext_cuda.selection_fwd

        def run_op():
            return op(q, k, v, blocks, num_blocks, pos, k_offset, 64, call.scale)

        def run_backend():
            return cuda_backend.forward(call)

        result = {"T": T, "pairs": pairs}
        o_cuda, lse_cuda = run_op()
        result["cuda_ms"] = triton.testing.do_bench(run_op, warmup=50, rep=args.rep,
                                                    return_mode="median")
        result["cuda_backend_ms"] = triton.testing.do_bench(run_backend, warmup=50, rep=args.rep,
                                                            return_mode="median")
        # The Triton backend (canonical_blocks + group kernel), the counterpart of cuda_backend.
        result["triton_backend_ms"] = triton.testing.do_bench(
            lambda: triton_backend.forward(call), warmup=50, rep=args.rep, return_mode="median")
        if parallel_nsa_fwd is not None:
            fla_blocks = blocks.to(torch.int64)

            def run_fla():
                return parallel_nsa_fwd(q, k, v, fla_blocks, 16, 64, call.scale)

            o_fla, lse_fla = run_fla()
            result["max_abs_diff_vs_fla"] = (o_fla.float() - o_cuda.float()).abs().max().item()
            result["fla_ms"] = triton.testing.do_bench(run_fla, warmup=50, rep=args.rep,
                                                       return_mode="median")
        for key in ("cuda_ms", "cuda_backend_ms", "triton_backend_ms", "fla_ms"):
            if key in result:
                result[key.replace("_ms", "_tflops")] = 4 * D * pairs / (result[key] * 1e-3) / 1e12
        rows.append(result)
        del q, k, v, idx, blocks, num_blocks
        torch.cuda.empty_cache()

    print(f"{'T':>6} | {'cuda op ms':>10} {'TFLOP/s':>7} | {'backend ms':>10} | "
          f"{'triton backend ms':>17} | {'fla ms':>8} {'TFLOP/s':>7} | {'cuda/fla':>8} | max|o-o_fla|")
    for r in rows:
        fla_ms = r.get("fla_ms", math.nan)
        print(f"{r['T']:>6} | {r['cuda_ms']:>10.3f} {r['cuda_tflops']:>7.1f} | "
              f"{r['cuda_backend_ms']:>10.3f} | {r['triton_backend_ms']:>17.3f} | {fla_ms:>8.3f} {r.get('fla_tflops', math.nan):>7.1f} | "
              f"{r['cuda_ms'] / fla_ms:>8.2f} | {r.get('max_abs_diff_vs_fla', math.nan):.3g}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, "host": platform.node(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
