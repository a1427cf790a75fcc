"""One GPU, the local calls of context parallelism: where a pattern's weak scaling goes.

Weak scaling compares W GPUs on W*T tokens with 1 GPU on T (bench/cp_bench.py); the W-GPU time
is the last rank's local call, TQ = T queries that are the last T of TK = W*T keys. This script
times, on one GPU and in one process, the three shapes that comparison rests on -- 1 GPU on T
(TQ = TK = T), the last rank of 2 (TQ = T, TK = 2T), 1 GPU on 2T (TQ = TK = 2T) -- through `auto`
and with every backend's forward schedule forced (NSA_SEL_SCHEDULE), forward only, median ms of
triton.testing.do_bench (L2 flushed before each call). It answers two questions no 2-GPU run
can: does the last rank's call take the schedule that is fastest for its shape, and how much of
its cost over the T call is the shape itself (keys spread over twice the range).

    python bench/cp_local_shapes.py --T 131072 --pattern random [--rounds 2] [--log-auto]
        [--paths auto/auto triton/row] [--key-splits 2 4] [--out shapes.json]

`--key-splits N`: also time the call as N `auto` calls, each keeping only the selected blocks in
one N-th of the key range (the others -1), their (o, lse) merged through the lse in fp32: an
experiment for the last rank, whose keys span twice the 1-GPU call's range (notes/cp_h200x2.txt:
does a pass over a smaller range gather faster, by more than the merge costs?).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nsa_ext  # noqa: E402
from bench.common import PATTERNS, Shape, make_block_indices, make_qkv  # noqa: E402

PATHS = (("auto", "auto"), ("triton", "row"), ("triton", "tile"), ("triton", "kv"),
         ("cuda", "row"), ("cuda", "tile"))


def log_auto(q, k, v, bi, block_size) -> None:
    """One auto call with NSA_DEBUG_LOG=1: its sel.* records (dispatch, schedule, launch)."""
    import logging

    logger = logging.getLogger("nsa_ext")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  log: %(message)s"))
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    os.environ["NSA_DEBUG_LOG"] = "1"
    try:
        with torch.no_grad():
            nsa_ext.selection_attention(q, k, v, bi, block_size)
        torch.cuda.synchronize()
    finally:
        os.environ.pop("NSA_DEBUG_LOG", None)
        logger.removeHandler(handler)
        logger.setLevel(level)


def merge_partials(parts):
    """(o, lse) of attention over the union of disjoint key sets from each set's (o, lse):
    weights exp(lse_i - lse) in fp32 (a part with no key has lse -inf and weight 0)."""
    lse = parts[0][1]
    for _, part_lse in parts[1:]:
        lse = torch.logaddexp(lse, part_lse)
    finite = torch.isfinite(lse)
    o = None
    for part_o, part_lse in parts:
        weight = torch.where(finite, torch.exp(part_lse - lse), torch.zeros_like(lse))
        term = part_o.float() * weight[..., None]
        o = term if o is None else o + term
    return o.to(parts[0][0].dtype), lse


def key_split_indices(bi, num_blocks: int, splits: int):
    """The selection cut into `splits` passes over equal ranges of block numbers (-1 elsewhere)."""
    edges = [num_blocks * i // splits for i in range(splits + 1)]
    return [torch.where((bi >= lo) & (bi < hi), bi, torch.full_like(bi, -1))
            for lo, hi in zip(edges[:-1], edges[1:])]


def key_split_call(q, k, v, parts_bi, block_size):
    with torch.no_grad():
        return merge_partials([nsa_ext.selection_attention(q, k, v, part, block_size,
                                                           return_lse=True)
                               for part in parts_bi])


def time_key_split(q, k, v, bi, block_size, splits: int) -> float:
    import triton.testing

    parts_bi = key_split_indices(bi, -(-k.shape[1] // block_size), splits)
    key_split_call(q, k, v, parts_bi, block_size)
    return float(triton.testing.do_bench(lambda: key_split_call(q, k, v, parts_bi, block_size),
                                         warmup=25, rep=200, return_mode="median"))


def time_path(q, k, v, bi, block_size, backend, schedule) -> float:
    import triton.testing

    os.environ["NSA_SEL_SCHEDULE"] = schedule
    try:
        def call():
            with torch.no_grad():
                nsa_ext.selection_attention(q, k, v, bi, block_size, backend=backend)
        call()
        return float(triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median"))
    except (ValueError, RuntimeError) as err:
        print(f"  {backend}/{schedule}: n/a ({str(err).splitlines()[0][:100]})")
        return float("nan")
    finally:
        os.environ.pop("NSA_SEL_SCHEDULE", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[131072])
    parser.add_argument("--pattern", default="random", choices=list(PATTERNS))
    parser.add_argument("--HQ", type=int, default=64)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--S", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--out", default=None)
    parser.add_argument("--paths", nargs="+", default=None,
                        help="backend/schedule pairs to time (default: all of PATHS)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every path this many times in turns and keep the best (a "
                             "process's first measurement can run at other clocks)")
    parser.add_argument("--key-splits", type=int, nargs="*", default=[],
                        help="also time auto as this many passes over parts of the key range")
    parser.add_argument("--log-auto", action="store_true",
                        help="print one auto call's sel.* log records per shape")
    args = parser.parse_args()
    device = torch.device("cuda")
    paths = PATHS if args.paths is None else tuple(tuple(p.split("/")) for p in args.paths)
    paths = paths + tuple(("auto", f"key-split {n}") for n in args.key_splits)
    rows = []
    print(f"# {torch.cuda.get_device_name(device)} | bf16 HQ={args.HQ} H={args.H} D={args.D} "
          f"S={args.S} block={args.block_size} pattern={args.pattern} | forward ms (median)")
    print("| shape | TQ | TK | " + " | ".join(f"{b}/{s}" for b, s in paths) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in paths) + " |")
    for T in args.T:
        for label, TQ, TK in (("1 GPU on T", T, T), ("last rank of 2", T, 2 * T),
                              ("1 GPU on 2T", 2 * T, 2 * T)):
            shape = Shape(B=1, TQ=TQ, TK=TK, HQ=args.HQ, H=args.H, Dk=args.D, Dv=args.D,
                          S=args.S, block_size=args.block_size)
            q, k, v = make_qkv(shape, torch.bfloat16, device, seed=T)
            bi = make_block_indices(shape, args.pattern, device=device, seed=T)
            if args.log_auto:
                log_auto(q, k, v, bi, args.block_size)
            times = {f"{b}/{s}": [] for b, s in paths}
            for _ in range(args.rounds):
                for b, s in paths:
                    times[f"{b}/{s}"].append(
                        time_key_split(q, k, v, bi, args.block_size, int(s.split()[1]))
                        if s.startswith("key-split") else
                        time_path(q, k, v, bi, args.block_size, b, s))
            row = {"T": T, "shape": label, "TQ": TQ, "TK": TK, "rounds_ms": times,
                   "ms": {key: min(values) for key, values in times.items()}}
            rows.append(row)
            print(f"| {label} (T={T}) | {TQ} | {TK} | " +
                  " | ".join(f"{row['ms'][f'{b}/{s}']:.3f}" for b, s in paths) + " |",
                  flush=True)
            if args.rounds > 1:
                print("  rounds: " + "; ".join(f"{key} " + " ".join(f"{t:.3f}" for t in values)
                                               for key, values in times.items()), flush=True)
            del q, k, v, bi
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
