"""Decode (TQ = 1) at memory speed: nsa_ext's split-KV paths beside fla's parallel_nsa_fwd.

HQ=64, H=4, D=128, 16 selected blocks of 64, bf16, B in {1, 32, 128}, TK in {8k, 64k}. Every
time is a median from triton.testing.do_bench after warm-up; "graph" rows replay a CUDA graph of
the same call (do_bench_cudagraph), which removes Python and launch overhead for both sides.
"cuda graph us" is the same graph timing for the CUDA extension's path
(`selection_attention(..., backend="cuda")`, its own split-KV choice); empty when the extension
cannot serve the call here.
Bytes/s counts the K/V of the selected blocks each row reads: B * H * 16 * 64 * (Dk + Dv) * 2 B.

    python bench/decode_bench.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nsa_ext  # noqa: E402
from triton_ref.selection_split import choose_num_splits, selection_split_fwd  # noqa: E402

HQ, H, D, S, BS = 64, 4, 128, 16, 64


def decode_selection(B: int, TK: int, generator) -> torch.Tensor:
    """[B, 1, H, S] for the last position: block 0, the own block, 14 distinct earlier blocks."""
    own = (TK - 1) // BS
    rows = []
    for _ in range(B * H):
        earlier = torch.randperm(max(own - 1, 1), generator=generator)[:S - 2] + 1
        rows.append(torch.cat([torch.tensor([0, own]), earlier]))
    return torch.stack(rows).reshape(B, 1, H, S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    try:
        from fla.ops.nsa.parallel import parallel_nsa_fwd
    except ImportError as err:
        parallel_nsa_fwd = None
        print(f"fla-core is not installed ({err}): its column is empty")
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name} | torch {torch.__version__} | triton {triton.__version__} | "
          f"nsa_ext {nsa_ext.__version__} | bf16 HQ={HQ} H={H} D={D} S={S} block={BS} TQ=1")
    header = ("B", "TK", "splits", "ours kernel us", "ours API us", "ours graph us",
              "cuda graph us", "fla us", "fla graph us", "ours graph GB/s", "fla/ours (graph)",
              "max |o - o_fla|")
    print(" | ".join(header))
    results = []
    g = torch.Generator().manual_seed(0)
    for B in (1, 32, 128):
        for TK in (8192, 65536):
            q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, TK, H, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(B, TK, H, D, device="cuda", dtype=torch.bfloat16)
            bi = decode_selection(B, TK, g).cuda()
            scale = D ** -0.5
            splits = choose_num_splits(B * H, S, props.multi_processor_count)

            def kernel():
                return selection_split_fwd(q, k, v, bi, scale=scale, block_size=BS,
                                           num_splits=splits)

            def api():
                return nsa_ext.selection_attention(q, k, v, bi, BS, backend="triton")

            o_ours = api()
            row = {"B": B, "TK": TK, "splits": splits,
                   "kernel_us": do_bench(kernel, return_mode="median") * 1e3,
                   "api_us": do_bench(api, return_mode="median") * 1e3,
                   "graph_us": do_bench_cudagraph(api, return_mode="median") * 1e3}

            def cuda_api():
                return nsa_ext.selection_attention(q, k, v, bi, BS, backend="cuda")

            try:
                cuda_api()
                row["cuda_graph_us"] = do_bench_cudagraph(cuda_api, return_mode="median") * 1e3
            except (ValueError, RuntimeError) as err:   # extension missing or refusing the call
                row["cuda_error"] = str(err).splitlines()[0]
                if len(results) == 0:
                    print(f"CUDA extension path unavailable: {row['cuda_error']}")
            if parallel_nsa_fwd is not None:
                def fla():
                    return parallel_nsa_fwd(q, k, v, bi, S, BS, scale)

                o_fla = fla()[0]
                row["max_abs_diff_vs_fla"] = (o_ours.float() - o_fla.float()).abs().max().item()
                row["fla_us"] = do_bench(fla, return_mode="median") * 1e3
                row["fla_graph_us"] = do_bench_cudagraph(fla, return_mode="median") * 1e3
            kv_bytes = B * H * S * BS * 2 * D * 2
            row["graph_GBps"] = kv_bytes / (row["graph_us"] * 1e-6) / 1e9
            results.append(row)
            ratio = row.get("fla_graph_us", float("nan")) / row["graph_us"]
            print(f"{B} | {TK} | {splits} | {row['kernel_us']:.1f} | {row['api_us']:.1f} | "
                  f"{row['graph_us']:.1f} | {row.get('cuda_graph_us', float('nan')):.1f} | "
                  f"{row.get('fla_us', float('nan')):.1f} | "
                  f"{row.get('fla_graph_us', float('nan')):.1f} | {row['graph_GBps']:.0f} | "
                  f"{ratio:.2f}x | {row.get('max_abs_diff_vs_fla', float('nan')):.3g}")
            del q, k, v
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({"device": props.name, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
