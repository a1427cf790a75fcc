"""Calls for compute-sanitizer: every CUDA-extension kernel path on messy selections.

    compute-sanitizer --tool memcheck python scripts/sanitize_cuda.py
    compute-sanitizer --tool racecheck python scripts/sanitize_cuda.py --small

Each call mixes valid blocks, repeats, -1 padding, other negative and out-of-range entries
(tests/common.py: messy_indices), plus rows with nothing selected; the set covers one, two and
four row tiles per thread block (G = 3, 16, 24, 80), varlen with ragged and chunked sequences,
block_counts, Dk=192/Dv=128, d=256, fp32, and split-KV decode with forced slice counts (empty
slices included; on SM 9.0 a one-wave decode merges its slices in thread-block clusters); on
SM 9.0 the Hopper tile kernel forced, and `selection_fwd_auto` (the schedule chosen on the
device) with its crossover at 0 % and 100 % (the row kernel runs and the tile kernel returns at
once, then the other way round). Each output is also checked against the fp32 reference, so a
run that the sanitizer passes but that computes garbage still fails (exit 1).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common import make_case, spec_errors, TOLERANCES  # noqa: E402
from nsa_ext import _ext  # noqa: E402
from nsa_ext.backends import cuda as cuda_backend  # noqa: E402
from nsa_ext.call import describe_call  # noqa: E402
from nsa_ext.reference import reference_forward  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CASES = [
    # name, make_case arguments, forced num_splits (None: the backend's choice)
    ("G16 bf16 d128", dict(B=2, TQ=96, HQ=32, H=2, Dk=128, S=6, block_size=16, dtype=BF16), None),
    ("G3 fp16 d64 varlen", dict(seqlens=[37, 1, 70, 13], HQ=6, H=2, Dk=64, S=5, block_size=32,
                                dtype=FP16), None),
    ("G24 bf16 two tiles", dict(B=1, TQ=50, HQ=48, H=2, Dk=64, S=4, block_size=16, dtype=BF16), None),
    ("G80 bf16 four tiles x2", dict(B=1, TQ=40, HQ=80, H=1, Dk=128, S=3, block_size=16, dtype=BF16),
     None),
    ("dk192 dv128 counts", dict(B=2, TQ=64, HQ=8, H=2, Dk=192, Dv=128, S=6, block_size=64,
                                dtype=BF16, block_counts="tensor"), None),
    ("d256 fp16", dict(B=1, TQ=80, HQ=16, H=1, Dk=256, S=3, block_size=16, dtype=FP16), None),
    ("varlen chunked", dict(seqlens=[5, 1, 20], seqlens_k=[170, 16, 20], HQ=6, H=2, Dk=64, S=5,
                            block_size=16, dtype=BF16), None),
    ("fp32", dict(B=1, TQ=40, HQ=8, H=2, Dk=96, S=4, block_size=16, dtype=FP32), None),
    ("decode G16 split 5", dict(B=3, TQ=1, TK=900, HQ=32, H=2, Dk=128, S=12, block_size=32,
                                dtype=BF16), 5),
    # SM 9.0: one-wave decodes merge their slices in thread-block clusters (16, a non-portable
    # size, and 7 on d256's one block per SM).
    ("decode G8 cluster of 16", dict(B=1, TQ=1, TK=1200, HQ=8, H=1, Dk=64, S=16, block_size=64,
                                     dtype=FP16), 16),
    ("decode G16 d256 cluster of 7", dict(B=2, TQ=1, TK=700, HQ=16, H=1, Dk=256, S=14,
                                          block_size=32, dtype=BF16), 7),
    ("decode G64 split 16", dict(B=2, TQ=2, TK=333, HQ=128, H=2, Dk=192, Dv=128, S=6,
                                 block_size=32, dtype=BF16), 16),
    ("decode fp32 split 3", dict(B=2, TQ=1, TK=500, HQ=4, H=2, Dk=64, S=8, block_size=16,
                                 dtype=FP32), 3),
]


# The Hopper tile kernel (SM 9.0, csrc/hopper/), forced: G = 1, 3, 16, 64, d256, dk192/dv128,
# block 128, varlen ragged and chunked (block_size a multiple of 64, as it needs).
TILE_CASES = [
    ("tile G1 bf16 d64", dict(B=2, TQ=150, HQ=2, H=2, Dk=64, S=5, block_size=64, dtype=BF16)),
    ("tile G3 fp16 varlen", dict(seqlens=[37, 1, 170, 13], HQ=6, H=2, Dk=128, S=5,
                                 block_size=64, dtype=FP16)),
    ("tile G16 bf16 d256", dict(B=1, TQ=96, HQ=16, H=1, Dk=256, S=3, block_size=64, dtype=BF16)),
    ("tile G64 dk192 bs128", dict(B=1, TQ=80, HQ=64, H=1, Dk=192, Dv=128, S=3, block_size=128,
                                  dtype=BF16)),
    ("tile varlen chunked", dict(seqlens=[5, 1, 20], seqlens_k=[170, 16, 200], HQ=8, H=2, Dk=128,
                                 S=5, block_size=64, dtype=BF16)),
]


def run(case, num_splits):
    call = describe_call(*case.args(), **case.kwargs(), need_lse=True)
    o, _ = cuda_backend.forward(call, force_splits=num_splits)
    torch.cuda.synchronize()
    ref_call = describe_call(case.q.float(), case.k.float(), case.v.float(), case.block_indices,
                             case.block_size, **case.kwargs(), need_lse=True)
    return o, reference_forward(ref_call)[0]


def run_device_choice(case, pct):
    """selection_fwd_auto with tile_max_union_pct = pct: 0 runs the row kernel, 100 the tile
    kernel (a union never holds more blocks than its rows selected)."""
    from nsa_ext.selection import canonical_op_args, row_geometry

    call = describe_call(*case.args(), **case.kwargs(), need_lse=True)
    geometry = row_geometry(call)
    indices, _, counts, limit, _ = canonical_op_args(call, geometry)
    o, _ = torch.ops.nsa_ext_cuda.selection_fwd_auto(
        call.q.contiguous(), call.k.contiguous(), call.v.contiguous(), indices, counts, limit,
        geometry.pos.contiguous(), geometry.k_offset.contiguous(), call.block_size, call.scale,
        pct, 0)
    torch.cuda.synchronize()
    ref_call = describe_call(case.q.float(), case.k.float(), case.v.float(), case.block_indices,
                             case.block_size, **case.kwargs(), need_lse=True)
    return o, reference_forward(ref_call)[0]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="first three cases only (racecheck is slow)")
    parser.add_argument("--only", default=None,
                        help="only the cases whose name contains this text (e.g. 'cluster')")
    args = parser.parse_args()
    if not _ext.available():
        print("CUDA extension not available:", _ext.unavailable_reason())
        return 1
    failures = 0
    cases = CASES[:3] if args.small else CASES
    if torch.cuda.get_device_capability() == (9, 0) and _ext.build_info().get("hopper_tile"):
        # --small keeps a G >= 4 case: selection_fwd_auto's fused canonical-rows + union kernel.
        tile_cases = TILE_CASES[:3] if args.small else TILE_CASES
        cases = cases + [(name, kw, "tile") for name, kw in tile_cases]
        if _ext.has_fwd_auto():
            cases = cases + [(f"device {pct}% {name[5:]}", kw, f"device{pct}")
                             for pct in (0, 100) for name, kw in tile_cases]
    if args.only:
        cases = [c for c in CASES + cases if args.only in c[0]]
        cases = list({c[0]: c for c in cases}.values())
    for name, kwargs, splits in cases:
        os.environ["NSA_SEL_SCHEDULE"] = "tile" if splits == "tile" else "auto"
        device_pct = int(splits[6:]) if str(splits).startswith("device") else None
        splits = 1 if splits == "tile" or device_pct is not None else splits
        case = make_case(device="cuda", seed=len(name), **kwargs)
        # Rows with nothing selected: the first fifth of the query tokens, or in a one-token
        # decode KV head 0's row (blanking the token would leave the call nothing to compute).
        bi = case.block_indices.reshape(-1, *case.block_indices.shape[-2:])
        if bi.shape[0] >= 2:
            bi[: max(1, bi.shape[0] // 5)] = -1
        elif bi.shape[1] >= 2:
            bi[:, 0] = -1
        case.block_indices = bi.reshape(case.block_indices.shape)
        o, o_ref = run(case, splits) if device_pct is None else run_device_choice(case, device_pct)
        mean_err, max_err = spec_errors(o, o_ref.to(o.dtype))
        mean_tol, max_tol = TOLERANCES[o.dtype]
        ok = mean_err <= mean_tol and max_err <= max_tol
        failures += not ok
        print(f"{name:28s} splits={splits} mean_err={mean_err:.2e} max_err={max_err:.2e} "
              f"{'ok' if ok else 'FAIL'}")
    print("sanitize_cuda:", "all ok" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
