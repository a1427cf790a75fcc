"""Calls for compute-sanitizer: the Triton forward schedules (tile, kv and row forced) on messy
selections — the same cases as scripts/sanitize_cuda.py, read from there.

    compute-sanitizer --tool memcheck python scripts/sanitize_schedules.py
    compute-sanitizer --tool racecheck python scripts/sanitize_schedules.py --small

Each output is also checked against the fp32 reference (a run the sanitizer passes but that
computes garbage still fails, exit 1).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

from common import make_case, spec_errors, TOLERANCES  # noqa: E402
from sanitize_cuda import CASES  # noqa: E402
from nsa_ext.backends import triton as triton_backend  # noqa: E402
from nsa_ext.call import describe_call  # noqa: E402
from nsa_ext.reference import reference_forward  # noqa: E402
from nsa_ext.schedules.chooser import ScheduleUnavailableError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="first three cases only (racecheck is slow)")
    parser.add_argument("--schedules", default="tile,kv,row")
    args = parser.parse_args()
    failures = 0
    for name, kwargs, _ in CASES[:3] if args.small else CASES:
        case = make_case(device="cuda", seed=len(name), **kwargs)
        rows = case.block_indices.shape[1]
        case.block_indices[:, : max(1, rows // 5)] = -1        # rows with nothing selected
        case.block_indices[..., -1] = 0                        # a block every query chose
        call = describe_call(*case.args(), **case.kwargs(), need_lse=True)
        ref_call = describe_call(case.q.float(), case.k.float(), case.v.float(),
                                 case.block_indices, case.block_size, **case.kwargs(), need_lse=True)
        o_ref = reference_forward(ref_call)[0]
        for schedule in args.schedules.split(","):
            os.environ["NSA_SEL_SCHEDULE"] = schedule
            try:
                o, _ = triton_backend.forward(call)
                torch.cuda.synchronize()
            except ScheduleUnavailableError as exc:  # a forced schedule that cannot serve says why
                print(f"{name:28s} {schedule:5s} not served: {str(exc).splitlines()[0][:90]}")
                continue
            mean_err, max_err = spec_errors(o, o_ref.to(o.dtype))
            mean_tol, max_tol = TOLERANCES[o.dtype]
            ok = mean_err <= mean_tol and max_err <= max_tol
            failures += not ok
            print(f"{name:28s} {schedule:5s} mean_err={mean_err:.2e} max_err={max_err:.2e} "
                  f"{'ok' if ok else 'FAIL'}")
    print("sanitize_schedules:", "all ok" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
