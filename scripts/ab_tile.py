"""A/B of the CUDA tile kernel alone: kernel variants of one build, timed in turns.

The method of the Hopper kernel experiments in notes/hopper.md (earlier sessions rewrote it as a
one-off each time).

A kernel variant under test is compiled beside the current one and picked by an environment
variable that the launcher (csrc/hopper/selection_tile_sm90.cu) reads on every call, e.g.

    const char* ab = std::getenv("NSA_HOPPER_AB");   // temporary, removed before merging
    if (ab != nullptr && ab[0] == '1') return launch<T, DK, DV, ..., /*variant*/ true>(...);

This script times `nsa_ext_cuda::selection_fwd_tile` on precomputed canonical rows and unions
(no chooser, no host sync: the kernel's own time), bf16 d128, with `triton.testing.do_bench`
(L2 flushed before each call), three rounds per mode taken in turns, and prints each mode's
middle round, the ratio to the first mode and the largest output difference (a variant that
only reorders work should be bitwise equal):

    python scripts/ab_tile.py --env NSA_HOPPER_AB --modes 0,1 > $OUT/ab.txt

Without a variant in the build both modes run the same kernel: the spread of the rounds is then
the noise floor of this measurement (notes/hopper.md: one mode's rounds at 3.00 and 3.41 ms).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

# (TQ, TK, pattern, G): the prefill rows of the bench (model / clustered / random 32k, model 8k
# and 64k, a small G) and two chunks (queries at the end of a 32k cache).
CASES = [(32768, 32768, "model", 16), (32768, 32768, "clustered", 16),
         (32768, 32768, "random", 16), (8192, 8192, "model", 16), (65536, 65536, "model", 16),
         (8192, 8192, "model", 4), (512, 32768, "random", 16), (2048, 32768, "model", 16)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="NSA_HOPPER_AB",
                        help="the variable the launcher reads (default NSA_HOPPER_AB)")
    parser.add_argument("--modes", default="0,1", help="its values, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the first three cases only")
    parser.add_argument("--cases", default=None,
                        help="cases instead of the default list, TQ:TK:pattern:G comma-separated "
                             "(e.g. 512:32768:model:16,1024:32768:random:16)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ab_tile.py: needs a CUDA GPU (SM 9.0 with the extension built)")
    import triton.testing

    from bench.common import Shape, make_block_indices, make_qkv
    from nsa_ext.backends import cuda
    from nsa_ext.call import describe_call
    from nsa_ext.config import load_settings
    from nsa_ext.selection import canonical_blocks, row_geometry

    modes = args.modes.split(",")
    print(f"{torch.cuda.get_device_name()}: {args.env} in {modes}, {args.rounds} rounds in turns",
          flush=True)
    cases = CASES[:3] if args.quick else CASES
    if args.cases:
        cases = [(int(a), int(b), c, int(d))
                 for a, b, c, d in (x.split(":") for x in args.cases.split(","))]
    for TQ, TK, pattern, G in cases:
        shape = Shape(B=1, TQ=TQ, TK=TK, HQ=4 * G, H=4, Dk=128, Dv=128, S=16, block_size=64)
        q, k, v = make_qkv(shape, torch.bfloat16, "cuda")
        call = describe_call(q, k, v, make_block_indices(shape, pattern, device="cuda"), 64)
        geometry = row_geometry(call)
        blocks, num_blocks = canonical_blocks(call, geometry)
        prep = cuda.prepared(call, load_settings(), geometry, blocks, num_blocks)
        times = {m: [] for m in modes}
        outs = {}
        for _ in range(args.rounds):
            for m in modes:
                os.environ[args.env] = m
                outs[m] = cuda.run_tile(prep)[0]
                times[m].append(triton.testing.do_bench(lambda: cuda.run_tile(prep),
                                                        warmup=50, rep=300))
        middle = {m: sorted(t)[len(t) // 2] for m, t in times.items()}
        base = modes[0]
        parts = " | ".join(f"{m}: {middle[m]:.4f} ms (rounds "
                           f"{', '.join(f'{x:.4f}' for x in times[m])})" for m in modes)
        ratios = " ".join(f"{m}/{base} {middle[m] / middle[base]:.3f} max|o diff| "
                          f"{(outs[m].float() - outs[base].float()).abs().max().item():.2e}"
                          for m in modes[1:])
        print(f"TQ={TQ} TK={TK} {pattern} G={G}: {parts} | {ratios}", flush=True)
    os.environ.pop(args.env, None)


if __name__ == "__main__":
    main()
