"""Calls for compute-sanitizer: the Triton backward (delta, dQ, dK/dV, both merges, the work
items) on messy selections.

    compute-sanitizer --tool memcheck python scripts/sanitize_backward.py
    compute-sanitizer --tool racecheck python scripts/sanitize_backward.py --small

Each call mixes valid blocks, repeats, -1 padding, other negative and out-of-range entries
(tests/common.py: messy_indices), rows with nothing selected, and a block every query chose; the
lists are cut into small work items (partial merges) and dq comes once from the dQ kernel and
once from the dK/dV kernel's partials. Gradients are checked against autograd through the fp32
reference, so a run the sanitizer passes but that computes garbage still fails (exit 1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common import make_case  # noqa: E402
import triton_ref.selection_bwd as bwd  # noqa: E402
from nsa_ext.backends import triton as triton_backend  # noqa: E402
from nsa_ext.call import describe_call  # noqa: E402
from nsa_ext.reference import reference_forward  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (mean, max) of |g - g_ref| / max(1, |g_ref|), as tests/test_triton.py's GRAD_TOLERANCES
TOLERANCES = {FP32: (1e-5, 1e-4), FP16: (2e-3, 2e-2), BF16: (1e-2, 8e-2)}
CASES = [
    ("G16 bf16 d128", dict(B=2, TQ=160, HQ=32, H=2, Dk=128, S=6, block_size=32, dtype=BF16)),
    ("G3 fp16 d64 varlen", dict(seqlens=[37, 1, 70, 13], HQ=6, H=2, Dk=64, S=5, block_size=16,
                                dtype=FP16)),
    ("G80 bf16", dict(B=1, TQ=40, HQ=80, H=1, Dk=64, S=3, block_size=16, dtype=BF16)),
    ("dk192 dv128 counts", dict(B=2, TQ=64, HQ=8, H=2, Dk=192, Dv=128, S=6, block_size=64,
                                dtype=BF16, block_counts="tensor")),
    ("bs128 chunked fp32", dict(B=1, TQ=30, TK=400, HQ=4, H=2, Dk=64, S=3, block_size=128,
                                dtype=FP32)),
    ("varlen chunked", dict(seqlens=[5, 1, 20], seqlens_k=[170, 16, 20], HQ=6, H=2, Dk=64, S=5,
                            block_size=16, dtype=BF16)),
]


def gradients(case, use_reference):
    q, k, v = (t.detach().clone().float().requires_grad_() if use_reference
               else t.detach().clone() for t in (case.q, case.k, case.v))
    call = describe_call(q, k, v, case.block_indices, case.block_size, **case.kwargs(),
                         need_lse=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    grad_o = torch.randn(q.shape[:-1] + (v.shape[-1],), device="cuda", generator=g)
    grad_lse = torch.randn(q.shape[:-1], device="cuda", generator=g) * 0.3
    if not use_reference:
        return triton_backend.backward(call, grad_o.to(q.dtype), grad_lse)
    o, lse = reference_forward(call)
    finite = torch.isfinite(lse)
    ((o * grad_o.to(q.dtype).float()).sum() + (lse[finite] * grad_lse[finite]).sum()).backward()
    return q.grad, k.grad, v.grad


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="first two cases only (racecheck is slow)")
    args = parser.parse_args()
    failures = 0
    bwd.dkdv_tokens_per_item = lambda G, capacity, sm_count: 7      # several items per bucket
    for name, kwargs in CASES[:2] if args.small else CASES:
        case = make_case(device="cuda", seed=len(name), **kwargs)
        rows = case.block_indices.shape[-3]
        case.block_indices[..., -1] = 0                              # a block every query chose
        case.block_indices[..., : max(1, rows // 5), :, :] = -1      # rows with nothing selected
        want = gradients(case, use_reference=True)
        for dq_path, max_g in (("dq kernel", 0), ("dq partials", 1000)):
            bwd.DQ_PARTIALS_MAX_G = max_g
            got = gradients(case, use_reference=False)
            torch.cuda.synchronize()
            mean_tol, max_tol = TOLERANCES[case.q.dtype]
            worst = []
            for a, b in zip(got, want):
                err = (a.double() - b.double()).abs() / b.double().abs().clamp(min=1.0)
                worst.append((err.mean().item(), err.max().item()))
            ok = all(m <= mean_tol and x <= max_tol for m, x in worst)
            failures += not ok
            print(f"{name:22s} {dq_path:12s} " + " ".join(
                f"d{n} {m:.1e}/{x:.1e}" for n, (m, x) in zip("qkv", worst)) + (" ok" if ok else " FAIL"))
    print("sanitize_backward:", "all ok" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
