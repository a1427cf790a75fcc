"""One prefill call of the tile schedule, for Nsight Compute: the bench's shape and selection
pattern (bf16, HQ=64, H=4, D=128, 16 of 64; `model` by default), warm-up calls first, then one
call inside an NVTX range that ncu can select.

    ncu --nvtx --nvtx-include "profiled/" --set full --import-source yes -o $OUT/tile \
        python scripts/profile_tile.py --backend cuda --T 32768
    python scripts/profile_tile.py --backend triton       # the Triton tile kernel instead

Prints the call's time (CUDA events, median of --iters calls) and what ran; notes/hopper.md says
what the profile is for. `--kernels` adds each kernel's GPU time over --iters calls
(torch.profiler): the tile kernel beside the canonical rows and the unions
(notes/kernels_h200_s13.txt came from the same table, under NSA_SEL_SCHEDULE=auto).
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NSA_SEL_SCHEDULE", "tile")

import torch  # noqa: E402

import nsa_ext  # noqa: E402
from bench.common import add_prefill_arguments, prefill_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda", choices=["cuda", "triton"])
    add_prefill_arguments(parser, T=32768)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--kernels", action="store_true",
                        help="a torch.profiler table of the kernels' GPU time over --iters calls")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_tile.py: needs a CUDA GPU")
    q, k, v, block_indices = prefill_inputs(args)
    decision = nsa_ext.explain(q, k, v, block_indices, 64, backend=args.backend)
    print(decision)

    def call():
        return nsa_ext.selection_attention(q, k, v, block_indices, 64, backend=args.backend)

    for _ in range(3):
        call()
    times = []
    for _ in range(args.iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.nvtx.range_push("profiled")
    call()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print(f"{args.backend} tile, {args.pattern} T={args.T} G={args.G}: median "
          f"{statistics.median(times):.3f} ms over {args.iters} calls (CUDA events)")
    if args.kernels:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                call()
            torch.cuda.synchronize()
        print(f"# kernels of {args.iters} calls (divide by {args.iters} for one call)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
