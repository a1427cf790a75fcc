"""The CUDA row kernel on eager prefills, for A/B runs of a kernel change: NSA_SEL_SCHEDULE=row,
backend "cuda", B = 1, T = 8k, random selection of 16 blocks of 64, D = 128, bf16, G = 16 / 64 / 2
(one, four and one row tiles). do_bench median of three runs (L2 flushed), us. GPU only
(notes/eager.md, twenty-third session):

    python scripts/row_probe.py > $OUT/row_probe.txt
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["NSA_SEL_SCHEDULE"] = "row"

import torch  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("row_probe.py: needs a CUDA GPU with the extension built")
    import triton.testing

    import nsa_ext
    from bench.common import Shape, make_block_indices, make_qkv

    for T, HQ, H in ((8192, 64, 4), (8192, 256, 4), (8192, 8, 4)):
        shape = Shape(B=1, TQ=T, TK=T, HQ=HQ, H=H, Dk=128, Dv=128, S=16, block_size=64)
        q, k, v = make_qkv(shape, torch.bfloat16, "cuda")
        bi = make_block_indices(shape, "random", device="cuda")

        def call():
            return nsa_ext.selection_attention(q, k, v, bi, 64, backend="cuda")

        for _ in range(3):
            call()
        torch.cuda.synchronize()
        us = sorted(triton.testing.do_bench(call, warmup=25, rep=100) for _ in range(3))[1] * 1e3
        print(f"row cuda T={T} HQ={HQ} H={H}: {us:.1f} us", flush=True)


if __name__ == "__main__":
    main()
