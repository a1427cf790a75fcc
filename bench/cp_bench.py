"""Context-parallel selection attention: weak scaling of nsa_ext.distributed.selection_attention.

W GPUs on a W*T-token sequence (each rank T tokens) beside 1 GPU on T tokens (plain
nsa_ext.selection_attention, measured on rank 0 in the same launch while the other ranks wait),
forward and forward+backward, with the pieces of the distributed call timed on their own: the
K/V all-gather, the local kernel on the reachable prefix (TQ = T, TK = (rank+1)*T; the slowest
rank), the dK/dV reduce-scatter (with its zero padding). bf16, HQ=64, H=4, D=128, 16 selected
blocks of 64 (bench/common.py's `random` causal selection) unless told otherwise. Times are
medians over iterations that start together on every rank (a barrier before each); a W-GPU time
is the slowest rank's. Peak memory is torch.cuda.max_memory_allocated per rank over the timed
calls (the largest rank's).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --standalone --nproc_per_node=2 bench/cp_bench.py --T 131072 262144 --out cp.json
    # the same with the work rebalanced by each rank's measured local time (balance=):
    #   ... bench/cp_bench.py --T 131072 262144 --balance measured
    # and where each rank's time goes in that step (torch.profiler, one table per rank):
    #   ... bench/cp_bench.py --T 131072 --balance measured --profile cp_profile/
    # the longest sequence that trains: one launch per length (an out-of-memory rank would leave
    # the others waiting in a collective), doubling T until it fails:
    #   2 GPUs: torchrun --nproc_per_node=2 ... --T $T --modes train --no-baseline --no-parts
    #   1 GPU:  torchrun --nproc_per_node=1 ... --T $T --modes train --only-baseline
    # a CPU smoke run of the script itself (gloo):
    torchrun --standalone --nproc_per_node=2 bench/cp_bench.py --device cpu --T 512 --HQ 4 --D 32
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

# The 2xH200 device machine leaves NVLink multicast off; keep it off in these processes too.
for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nsa_ext  # noqa: E402
import nsa_ext.distributed as cp  # noqa: E402
from nsa_ext.device import elapsed_ms  # noqa: E402
from bench.common import PATTERNS, Shape, environment, make_block_indices, make_qkv  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Clock:
    """Milliseconds of one call: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> float:
        return elapsed_ms(fn, self.cuda)


def median_ms(fn, clock: Clock, iters: int, warmup: int, together: bool) -> float:
    """Median time of fn; with together=True every iteration starts after a barrier, and the
    result is the slowest rank's median."""
    if together:
        return max(median_per_rank(fn, clock, iters, warmup))
    return _median(fn, clock, iters, warmup, False)


_START = time.perf_counter()


def progress(message: str) -> None:
    """Rank 0's stages on stderr with the seconds since start: a launch killed by a timeout still
    says how far it got (a 1-GPU 1M-token run was cut at 140 s twice with no row printed)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[cp_bench {time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr,
              flush=True)


def median_per_rank(fn, clock: Clock, iters: int, warmup: int) -> list:
    """Every rank's median time of fn (iterations started together, after a barrier), in rank
    order: where the slowest rank's time comes from."""
    mine = torch.tensor([_median(fn, clock, iters, warmup, True)], dtype=torch.float64,
                        device=DEVICE)
    every = torch.empty(dist.get_world_size(), dtype=torch.float64, device=DEVICE)
    dist.all_gather_into_tensor(every, mine)
    return every.tolist()


def _median(fn, clock: Clock, iters: int, warmup: int, together: bool) -> float:
    for _ in range(warmup):
        fn()
    clock.sync()
    times = []
    for _ in range(iters):
        if together:
            dist.barrier()
            clock.sync()
        times.append(clock.time(fn))
    return statistics.median(times)


def slowest(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def peak_gib(fn, clock: Clock, together: bool) -> float:
    """Peak allocated memory of one call (the largest rank's), GiB; nan on a CPU."""
    if not clock.cuda:
        return float("nan")
    clock.sync()
    torch.cuda.reset_peak_memory_stats()
    fn()
    clock.sync()
    peak = torch.cuda.max_memory_allocated() / (1 << 30)
    return slowest(peak) if together else peak


def profile_step(fn, clock: Clock, path: Path) -> None:
    """One call of fn under torch.profiler (after a barrier), this rank's table of kernels and ops
    by device time written to path."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
    dist.barrier()
    clock.sync()
    with profile(activities=activities) as prof:
        fn()
        clock.sync()
    key = "cuda_time_total" if clock.cuda else "cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))


def inputs(args, TQ: int, TK: int, seed: int, requires_grad: bool):
    shape = Shape(B=1, TQ=TQ, TK=TK, HQ=args.HQ, H=args.H, Dk=args.D, Dv=args.D, S=args.S,
                  block_size=args.block_size)
    q, k, v = make_qkv(shape, DTYPES[args.dtype], DEVICE, seed=seed)
    # the queries are the last TQ of TK keys: keep only this rank's own keys for the
    # distributed call (the caller slices), all TK for the plain one
    block_indices = make_block_indices(shape, args.pattern, device=DEVICE, seed=seed)
    grad_o = torch.randn_like(q)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, block_indices, grad_o


def step(call, q, k, v, grad_o, train: bool):
    def run():
        if train:
            q.grad = k.grad = v.grad = None
            call(q, k, v).backward(grad_o)
        else:
            with torch.no_grad():
                call(q, k, v)
    return run


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[131072, 262144],
                        help="tokens per GPU (the W-GPU run has W*T)")
    parser.add_argument("--modes", nargs="+", default=["fwd", "train"], choices=["fwd", "train"])
    parser.add_argument("--no-baseline", action="store_true", help="skip the 1-GPU rows")
    parser.add_argument("--only-baseline", action="store_true",
                        help="only the 1-GPU rows (with --nproc_per_node=1: the 1-GPU length limit)")
    parser.add_argument("--no-parts", action="store_true", help="skip the per-piece timings")
    parser.add_argument("--HQ", type=int, default=64)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--S", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--pattern", default="random", choices=list(PATTERNS),
                        help="selection pattern (bench/common.py); random is the worst case")
    parser.add_argument("--balance", default=None,
                        help="also time the W-GPU call with balance= (nsa_ext.distributed): "
                             "'measured' = each rank's local time of this row's unbalanced call "
                             "(needs the per-piece timings), or one comma-separated cost per rank")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also run torch.profiler over one W-GPU step (the balanced one where "
                             "--balance is given) and write each rank's kernel table to DIR: where "
                             "a rank's time goes, collectives included")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=None, help="JSON file (written by rank 0)")
    parser.add_argument("--stacks-every", type=float, default=120.0,
                        help="every this many seconds, each rank prints its Python stack to stderr "
                             "(0: never): a launch cut by a timeout shows where it was (a 1-GPU 1M "
                             "run was in the Triton autotuner, notes/cp_h200x2.txt)")
    args = parser.parse_args()
    if args.stacks_every > 0:
        faulthandler.dump_traceback_later(args.stacks_every, repeat=True, file=sys.stderr)

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        DEVICE = torch.device("cuda", local_rank)
    else:
        DEVICE = torch.device("cpu")
    if args.device == "cuda":
        dist.init_process_group("nccl", timeout=timedelta(minutes=30), device_id=DEVICE)
    else:
        dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    clock = Clock(DEVICE)
    env = environment(DEVICE)
    env.update(world_size=world, backend=str(dist.get_backend()), pattern=args.pattern,
               multicast_env={k: os.environ.get(k) for k in
                              ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                               "NVSHMEM_DISABLE_NVLS")})
    if rank == 0:
        print(f"# {env.get('gpu', env.get('cpu'))} x{world} | torch {env['torch']} | "
              f"nsa_ext {env['nsa_ext']} | {args.dtype} HQ={args.HQ} H={args.H} D={args.D} "
              f"S={args.S} block={args.block_size} backend={args.backend} pattern={args.pattern} | commit {env['git_commit']}")
    bs = args.block_size
    rows = []

    def plain(block_indices):
        return lambda q, k, v: nsa_ext.selection_attention(q, k, v, block_indices, bs,
                                                           backend=args.backend)

    for T in args.T:
        for mode in args.modes:
            train = mode == "train"
            row = {"T_per_gpu": T, "mode": mode, "world": world, "T_total": world * T}
            if not args.no_baseline:
                # 1 GPU on T tokens, on rank 0; the others wait at the barrier below
                if rank == 0:
                    progress(f"1 GPU, T={T} {mode}: inputs")
                    q, k, v, bi, go = inputs(args, T, T, seed=T, requires_grad=train)
                    run = step(plain(bi), q, k, v, go, train)
                    progress(f"1 GPU, T={T} {mode}: first call")
                    run()
                    clock.sync()
                    progress(f"1 GPU, T={T} {mode}: timing")
                    row["one_gpu_ms"] = median_ms(run, clock, args.iters, args.warmup, False)
                    row["one_gpu_peak_gib"] = peak_gib(run, clock, False)
                    del q, k, v, bi, go, run
                    if clock.cuda:
                        torch.cuda.empty_cache()
                if world > 1:
                    dist.barrier()
            if args.only_baseline:
                rows.append(row)
                if rank == 0:
                    print_row(row)
                continue
            # W GPUs on W*T tokens: this rank's shard
            progress(f"{world} GPUs, T={T}/GPU {mode}: inputs")
            q, k_all, v_all, bi, go = inputs(args, T, (rank + 1) * T, seed=T + 1 + rank,
                                             requires_grad=False)
            k, v = (t[:, rank * T:].contiguous() for t in (k_all, v_all))
            del k_all, v_all
            for t in (q, k, v):
                t.requires_grad_(train)

            def distributed(q, k, v, balance=None):
                return cp.selection_attention(q, k, v, bi, bs, backend=args.backend,
                                              balance=balance)

            run = step(distributed, q, k, v, go, train)
            progress(f"{world} GPUs, T={T}/GPU {mode}: timing")
            row["world_ms"] = median_ms(run, clock, args.iters, args.warmup, True)
            row["world_peak_gib"] = peak_gib(run, clock, True)
            if args.profile and not args.balance:
                profile_step(run, clock, Path(args.profile) / f"T{T}_{mode}_rank{rank}.txt")
            if not args.no_parts:
                group = dist.group.WORLD
                kd, vd = k.detach(), v.detach()
                row["all_gather_ms"] = median_ms(
                    lambda: cp.gather_kv_prefix(kd, vd, rank, world, group), clock, args.iters,
                    args.warmup, True)
                k_prefix, v_prefix = (t.detach().clone() for t in
                                      cp.gather_kv_prefix(kd, vd, rank, world, group))
                for t in (k_prefix, v_prefix):
                    t.requires_grad_(train)
                qd = q.detach().requires_grad_(train)
                row["local_kernel_ms_per_rank"] = median_per_rank(
                    step(lambda q_, k_, v_: plain(bi)(q_, k_prefix, v_prefix), qd, k_prefix,
                         v_prefix, go, train), clock, args.iters, args.warmup)
                row["local_kernel_ms"] = max(row["local_kernel_ms_per_rank"])
                if train:
                    dk, dv = (torch.randn_like(t) for t in (k_prefix, v_prefix))
                    row["reduce_scatter_ms"] = median_ms(
                        lambda: cp.reduce_scatter_prefix([dk, dv], rank, world, group), clock,
                        args.iters, args.warmup, True)
                    del dk, dv
                del k_prefix, v_prefix, qd
            if args.balance:
                costs = (row.get("local_kernel_ms_per_rank") if args.balance == "measured"
                         else [float(c) for c in args.balance.split(",")])
                if costs:
                    progress(f"{world} GPUs, T={T}/GPU {mode}: timing with balance={costs}")
                    row["balance"] = list(costs)
                    balanced = step(lambda q_, k_, v_: distributed(q_, k_, v_, costs), q, k, v,
                                    go, train)
                    row["world_balanced_ms_per_rank"] = median_per_rank(
                        balanced, clock, args.iters, args.warmup)
                    row["world_balanced_ms"] = max(row["world_balanced_ms_per_rank"])
                    row["world_balanced_peak_gib"] = peak_gib(balanced, clock, True)
                    if args.profile:
                        profile_step(balanced, clock, Path(args.profile) /
                                     f"T{T}_{mode}_balanced_rank{rank}.txt")
                    del balanced
            if not args.no_baseline:    # rank 0's numbers, on every rank
                one = torch.tensor([row.get("one_gpu_ms", 0.0), row.get("one_gpu_peak_gib", 0.0)],
                                   dtype=torch.float64, device=DEVICE)
                dist.broadcast(one, 0)
                row["one_gpu_ms"], row["one_gpu_peak_gib"] = one.tolist()
                row["ratio"] = row["world_ms"] / row["one_gpu_ms"]
                if "world_balanced_ms" in row:
                    row["ratio_balanced"] = row["world_balanced_ms"] / row["one_gpu_ms"]
            rows.append(row)
            del q, k, v, bi, go, run
            if clock.cuda:
                torch.cuda.empty_cache()
            if rank == 0:
                print_row(row)

    if rank == 0 and args.out:
        Path(args.out).write_text(json.dumps({"environment": env, "args": vars(args),
                                              "rows": rows}, indent=2))
        print(f"wrote {args.out}")
    faulthandler.cancel_dump_traceback_later()
    dist.barrier()                 # no rank leaves while another is still in a collective
    dist.destroy_process_group()
    # Then leave without the interpreter's finalization: on the 2-core CI machine rank 0
    # aborted ("terminate called without an active exception", exit -6) after it had written
    # its rows (the likely cause: gloo work objects freed during finalization, as
    # pytorch/pytorch#179291 describes; not confirmed here). Everything is written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def print_row(row: dict) -> None:
    def ms(key):
        return f"{row[key]:.3f}" if key in row else "-"

    def gib(key):
        return f"{row[key]:.2f}" if key in row else "-"

    if not hasattr(print_row, "header"):
        print_row.header = True
        print("| T/GPU | mode | 1 GPU on T, ms | W GPUs on W*T, ms | ratio | all-gather ms | "
              "local kernel ms (slowest; per rank) | reduce-scatter ms | peak GiB 1 GPU | "
              "peak GiB/rank W GPUs |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ratio = f"{row['ratio']:.3f}" if "ratio" in row else "-"
    local = ms("local_kernel_ms")
    if "local_kernel_ms_per_rank" in row:        # every rank's, the slowest first in the column
        local += " (" + " / ".join(f"{t:.3f}" for t in row["local_kernel_ms_per_rank"]) + ")"
    print(f"| {row['T_per_gpu']} | {row['mode']} | {ms('one_gpu_ms')} | {ms('world_ms')} "
          f"(W={row['world']}) | {ratio} | {ms('all_gather_ms')} | {local} | "
          f"{ms('reduce_scatter_ms')} | {gib('one_gpu_peak_gib')} | {gib('world_peak_gib')} |",
          flush=True)
    if "world_balanced_ms" in row:
        costs = ", ".join(f"{c:.3g}" for c in row["balance"])
        ratio = f"{row['ratio_balanced']:.3f}" if "ratio_balanced" in row else "-"
        per_rank = " / ".join(f"{t:.3f}" for t in row.get("world_balanced_ms_per_rank", []))
        print(f"|   balance=[{costs}] | {row['mode']} | {ms('one_gpu_ms')} | "
              f"{ms('world_balanced_ms')} (W={row['world']}) | {ratio} | | ({per_rank}) | | | "
              f"{gib('world_balanced_peak_gib')} |", flush=True)


if __name__ == "__main__":
    main()
