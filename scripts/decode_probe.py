"""Decode (TQ = 1) inside CUDA graphs: which path of the CUDA extension is fastest, beside Triton's.

HQ=64, H=4, D=128, 16 random blocks of 64, bf16; B in 1, 8, 32, 128; TK 8k and 64k. Each variant is
one call captured in a graph, replayed under triton.testing.do_bench (L2 flushed; median of three
runs, us): the API with backend "triton" and "cuda"; the CUDA operators on geometry made before the
capture (`rows_op`: canonical rows + row forward + merge at the backend's split count, `rows_op_s1`
unsplit; `auto_op_tile`: selection_fwd_auto with the tile kernel chosen; `tile_kernel`: the tile
kernel on precomputed unions). `d` is the largest |o - o_triton|. Then torch.profiler's kernel
times over 20 replays (B = 1, 32, 128, TK = 8k). `--splits` instead: `rows_op` at each forced
slice count beside the backend's choice and Triton, per B (TK = 8k). `--ncu` instead: one eager
call per backend and B inside an NVTX range `profiled` (after warm-up; cuda, then triton), for Nsight Compute.
GPU only (notes/eager.md, twenty-first session):

    python scripts/decode_probe.py > $OUT/decode_probe.txt
    python scripts/decode_probe.py --splits 1,2,4,8,16 --batches 1,4,8,16,32,64,128
    ncu --nvtx --nvtx-include "profiled/" --set full -o $OUT/decode \
        python scripts/decode_probe.py --ncu --batches 1,32
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

HQ, H, D, S, BS = 64, 4, 128, 16, 64


def replay_us(fn):
    """(median us of three do_bench runs of a graph replay of fn, fn's output in the graph)."""
    import triton.testing

    from bench.common import capture_graph

    fn()
    torch.cuda.synchronize()
    graph, out = capture_graph(fn, warmup=3)
    graph.replay()
    torch.cuda.synchronize()
    times = [triton.testing.do_bench(graph.replay, warmup=50, rep=200) for _ in range(3)]
    return sorted(times)[1] * 1e3, out


class Case:
    """One decode call's inputs and the CUDA operators' arguments, made outside any capture."""

    def __init__(self, B: int, TK: int):
        from bench.common import Shape, make_block_indices, make_qkv
        from nsa_ext.call import describe_call
        from nsa_ext.selection import canonical_op_args, row_geometry

        shape = Shape(B=B, TQ=1, TK=TK, HQ=HQ, H=H, Dk=D, Dv=D, S=S, block_size=BS)
        self.q, self.k, self.v = make_qkv(shape, torch.bfloat16, "cuda")
        self.bi = make_block_indices(shape, "random", device="cuda")
        self.call = describe_call(self.q, self.k, self.v, self.bi, BS)
        self.geometry = row_geometry(self.call)
        self.indices, self.pos, self.counts, self.limit, _ = canonical_op_args(self.call,
                                                                                self.geometry)
        self.k_offset = self.geometry.k_offset.contiguous()

    def api(self, backend):
        import nsa_ext

        return lambda: nsa_ext.selection_attention(self.q, self.k, self.v, self.bi, BS,
                                                   backend=backend)

    def rows_op(self, splits):
        return lambda: torch.ops.nsa_ext_cuda.selection_fwd_rows(
            self.q, self.k, self.v, self.indices, self.counts, self.limit, self.pos, self.k_offset,
            BS, self.call.scale, splits)


def first(out):
    return out[0] if isinstance(out, tuple) else out


def paths() -> None:
    from nsa_ext.backends import cuda
    from nsa_ext.config import load_settings
    from nsa_ext.device import device_facts
    from nsa_ext.selection import canonical_blocks

    facts = device_facts(torch.device("cuda"))
    for TK in (8192, 65536):
        for B in (1, 8, 32, 128):
            c = Case(B, TK)
            blocks, num_blocks = canonical_blocks(c.call, c.geometry)
            prep = cuda.prepared(c.call, load_settings(), c.geometry, blocks, num_blocks)
            prep.union(64 // c.call.group_size)
            splits = cuda.num_splits(c.call, facts.sm_count)
            res = {"triton": replay_us(c.api("triton")), "cuda_api": replay_us(c.api("cuda")),
                   "rows_op": replay_us(c.rows_op(splits)), "rows_op_s1": replay_us(c.rows_op(1)),
                   "auto_op_tile": replay_us(lambda: torch.ops.nsa_ext_cuda.selection_fwd_auto(
                       c.q, c.k, c.v, c.indices, c.counts, c.limit, c.pos, c.k_offset, BS,
                       c.call.scale, 100, 0)),
                   "tile_kernel": replay_us(lambda: cuda.run_tile(prep))}
            ref = first(res["triton"][1]).float()
            line = [f"{name} {us:.1f}us (d {(first(out).float() - ref).abs().max().item():.1e})"
                    for name, (us, out) in res.items()]
            print(f"TK={TK} B={B} splits={splits}: " + " | ".join(line), flush=True)


def warmed_calls(batches):
    """(B, backend, the API call) for each B (TK = 8k) and backend, each called three times."""
    for B in batches:
        c = Case(B, 8192)
        for backend in ("cuda", "triton"):
            fn = c.api(backend)
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            yield B, backend, fn


def profile_kernels() -> None:
    from torch.profiler import ProfilerActivity, profile

    from bench.common import capture_graph

    for B, backend, fn in warmed_calls((1, 32, 128)):
        graph, _ = capture_graph(fn, warmup=0)
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
            for _ in range(20):
                graph.replay()
            torch.cuda.synchronize()
        rows = [(e.key[:60], e.device_time_total / e.count, e.count)
                for e in prof.key_averages() if e.device_time_total > 0]
        print(f"B={B} {backend}: " + " | ".join(f"{n} {t:.1f}us x{k}" for n, t, k in rows),
              flush=True)


def split_sweep(counts, batches) -> None:
    from nsa_ext.backends import cuda
    from nsa_ext.device import device_facts

    facts = device_facts(torch.device("cuda"))
    for B in batches:
        c = Case(B, 8192)
        chosen = cuda.num_splits(c.call, facts.sm_count)
        triton_us, ref = replay_us(c.api("triton"))
        parts = []
        for n in counts:
            us, out = replay_us(c.rows_op(n))
            diff = (first(out).float() - first(ref).float()).abs().max().item()
            parts.append(f"s{n} {us:.1f}" + ("" if diff < 1e-2 else f" (d {diff:.1e})"))
        print(f"B={B}: chosen s{chosen} | triton {triton_us:.1f} | " + " | ".join(parts), flush=True)


def ncu_calls(batches) -> None:
    for B, backend, fn in warmed_calls(batches):
        torch.cuda.nvtx.range_push("profiled")
        fn()
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        print(f"B={B} {backend}: profiled one call", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", default=None, help="slice counts to force, comma-separated")
    parser.add_argument("--batches", default="1,4,8,16,32,64,128")
    parser.add_argument("--ncu", action="store_true",
                        help="one eager call per backend and B in NVTX ranges, for Nsight Compute")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_probe.py: needs a CUDA GPU with the extension built")
    import triton

    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton "
          f"{triton.__version__} | bf16 HQ={HQ} H={H} D={D} S={S} block={BS} TQ=1 random", flush=True)
    batches = [int(x) for x in args.batches.split(",")]
    if args.ncu:
        ncu_calls(batches)
        return
    if args.splits:
        split_sweep([int(x) for x in args.splits.split(",")],
                    [int(x) for x in args.batches.split(",")])
        return
    paths()
    profile_kernels()


if __name__ == "__main__":
    main()
