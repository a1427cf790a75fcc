"""One of tests/test_random_calls.py's seeded calls, through each backend in a process of its own
with a time limit: which backend (and which step: explain, forward, forward + backward against
the reference) finishes, fails or never returns. A kernel that never finishes cannot be stopped
from Python, so each backend gets its own process; with --blocking (CUDA_LAUNCH_BLOCKING=1) the
Python stack dumped at the limit names the launch that hangs, not a later synchronisation.

    python3 scripts/random_call_probe.py --kind decode --seed 9 --dtype fp16 --blocking
    (test_random_decode_calls_gpu[9-fp16]: random_case(20000 + 9, ..., decode=True))
"""
import argparse
import faulthandler
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# The seed offsets of the test functions (tests/test_random_calls.py): test seed -> random_case's.
KINDS = {"general": 0, "kernel": 10_000, "decode": 20_000}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def describe(case) -> str:
    def shape(t):
        return None if t is None else (tuple(t.shape), tuple(t.stride()), str(t.dtype))
    counts = case.block_counts
    return (f"q {shape(case.q)} k {shape(case.k)} v {shape(case.v)} "
            f"block_indices {shape(case.block_indices)} block_size {case.block_size} "
            f"block_counts {shape(counts) if hasattr(counts, 'shape') else counts} "
            f"kwargs {sorted(case.kwargs())}")


def run_one(args) -> None:
    """In the child: the case through args.one, step by step, each step's time printed."""
    import torch

    import nsa_ext
    import test_random_calls as rc

    faulthandler.dump_traceback_later(max(1.0, args.timeout - 5), exit=True)
    dtype = getattr(torch, DTYPES[args.dtype])
    case = rc.random_case(KINDS[args.kind] + args.seed, dtype, args.device,
                          kernel_shapes=args.kind == "kernel", decode=args.kind == "decode")
    print("case:", describe(case), flush=True)
    t0 = time.perf_counter()
    print(nsa_ext.explain(*case.args(), **case.kwargs(), backend=args.one), flush=True)
    print(f"explain: {time.perf_counter() - t0:.2f} s", flush=True)
    t0 = time.perf_counter()
    o = nsa_ext.selection_attention(*case.args(), **case.kwargs(), backend=args.one)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"forward: {time.perf_counter() - t0:.2f} s, finite {bool(torch.isfinite(o).all())}",
          flush=True)
    t0 = time.perf_counter()
    served = rc.check_backend(case, args.one, dtype)
    print(f"forward + backward against the reference: {'ok' if served else 'not served'} "
          f"({time.perf_counter() - t0:.2f} s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=sorted(KINDS), default="decode")
    ap.add_argument("--seed", type=int, required=True, help="the test's seed (its parameter id)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--backends", default="auto,triton,cuda")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per backend")
    ap.add_argument("--blocking", action="store_true", help="CUDA_LAUNCH_BLOCKING=1")
    ap.add_argument("--schedule", help="NSA_SEL_SCHEDULE for the calls")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(args)
        return 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.blocking:
        env["CUDA_LAUNCH_BLOCKING"] = "1"
    if args.schedule:
        env["NSA_SEL_SCHEDULE"] = args.schedule
    worst = 0
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--kind", args.kind, "--seed", str(args.seed), "--dtype",
               args.dtype, "--device", args.device, "--timeout", str(args.timeout),
               "--one", backend]
        t0 = time.perf_counter()
        try:
            run = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                 timeout=args.timeout + 30)
            rc, out = run.returncode, run.stdout + run.stderr
        except subprocess.TimeoutExpired as err:     # the child's own dump did not end it
            text = [t.decode(errors="replace") if isinstance(t, bytes) else (t or "")
                    for t in (err.stdout, err.stderr)]
            rc, out = -9, "".join(text) + "\n(killed by the parent)"
        print(f"=== {backend}: exit {rc} after {time.perf_counter() - t0:.1f} s")
        print(out.rstrip())
        worst = worst or rc
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
