"""What the Triton backward's autotuning costs and picks: one training call (forward + backward
through nsa_ext) per case, then, for each autotuned kernel of triton_ref, the time of every config
it timed (sorted) and the wall time of the first call (compiles + tuning) against the second.
Run on a GPU; the cases are the bench's training rows and tests/test_random_calls.py's decode
draws (the suite's slowest tests tune the dK/dV kernel's 18 configs there).

    python3 scripts/autotune_timings.py --cases train8k,train8k_g4,decode9
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import nsa_ext                      # noqa: E402
import triton_ref.selection_bwd as sb   # noqa: E402
import triton_ref.selection_fwd as sf   # noqa: E402


def autotuners():
    """name -> the Autotuner inside each autotuned kernel of the Triton backend."""
    found = {}
    for mod in (sf, sb):
        for name, obj in vars(mod).items():
            inner = obj
            while inner is not None and not isinstance(inner, triton.runtime.Autotuner):
                inner = getattr(inner, "fn", None)
            if inner is not None:
                found[name] = inner
    return found


def train_case(T, HQ, H, pattern, dtype):
    from bench import common     # not tests/common.py
    sh = common.Shape(B=1, TQ=T, TK=T, HQ=HQ, H=H, Dk=128, Dv=128, S=16)
    idx = common.make_block_indices(sh, pattern, device="cuda", seed=0)
    q, k, v = common.make_qkv(sh, dtype, "cuda", seed=0, requires_grad=True)
    return (q, k, v, idx, 64), {}


def decode_case(seed, dtype):
    import test_random_calls as rc
    case = rc.random_case(20_000 + seed, dtype, "cuda", kernel_shapes=False, decode=True)
    q, k, v = (t.detach().requires_grad_() for t in (case.q, case.k, case.v))
    return (q, k, v, case.block_indices, case.block_size), case.kwargs()


CASES = {
    "train8k": lambda: train_case(8192, 64, 4, "random", torch.bfloat16),
    "train8k_model": lambda: train_case(8192, 64, 4, "model", torch.bfloat16),
    "train8k_g4": lambda: train_case(8192, 16, 4, "random", torch.bfloat16),
    "train128k": lambda: train_case(131072, 64, 4, "random", torch.bfloat16),
    # fp32 takes other dK/dV configs (triton_ref/selection_bwd.py _prune_dkdv: 8 warps only)
    "train2k_fp32": lambda: train_case(2048, 64, 4, "random", torch.float32),
    "decode9": lambda: decode_case(9, torch.float16),
    "decode9_bf16": lambda: decode_case(9, torch.bfloat16),
}


def step(args, kwargs, backend):
    o = nsa_ext.selection_attention(*args, **kwargs, backend=backend)
    torch.autograd.grad(o, args[:3], torch.ones_like(o))
    torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="train8k,train8k_model,train8k_g4,decode9")
    ap.add_argument("--backend", default="auto")
    a = ap.parse_args()
    tuners = autotuners()
    for name in a.cases.split(","):
        args, kwargs = CASES[name]()
        before = {k: dict(getattr(t, "cache", {})) for k, t in tuners.items()}
        t0 = time.perf_counter()
        step(args, kwargs, a.backend)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        step(args, kwargs, a.backend)
        second = time.perf_counter() - t0
        print(f"== {name}: first call {first:.1f} s, second {1e3 * second:.2f} ms", flush=True)
        for kname, t in tuners.items():
            new = {k: c for k, c in getattr(t, "cache", {}).items() if k not in before[kname]}
            if not new:
                continue
            timings = getattr(t, "configs_timings", None) or {}
            print(f"  {kname}: key {list(new)[-1]} -> {list(new.values())[-1]}")
            ranked = sorted(timings.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], list) else kv[1])
            for cfg, ms in ranked:
                ms = ms[0] if isinstance(ms, list) else ms
                print(f"    {ms:9.4f} ms  {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
