"""nsa_ext.distributed.selection_attention: each rank's shard of o, lse, dq, dk, dv against one
process running nsa_ext.selection_attention on the whole sequence; bad input raises the same
ValueError on every rank (no hang); DeviceMesh and sub-groups.

The ranks are real processes (torch.multiprocessing, spawn) in a gloo group on 127.0.0.1 (NCCL
on GPUs, test marked `gpu`); a launch that does not finish in time fails the test. Each launch
runs several cases, since starting the processes costs more than the cases.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nsa_ext
import nsa_ext.distributed
from common import assert_close_to_reference, make_case

# A hung collective fails the test instead of the CI job. On GPUs the first calls compile and
# autotune Triton kernels, one rank possibly while the other already waits in a collective.
LAUNCH_TIMEOUT_S = {"gloo": 180, "nccl": 900}
GROUP_TIMEOUT_S = {"gloo": 60, "nccl": 600}
# The device machine leaves NVLink multicast off; processes this test starts keep it off too.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}


# ---------------------------------------------------------------------------- the launcher

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, job, args, result_dir):
    os.environ.update(NO_MULTICAST_ENV)
    torch.set_num_threads(1)
    extra = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        extra = dict(device_id=torch.device("cuda", rank))
    result = None
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=GROUP_TIMEOUT_S[backend]),
                                **extra)
        result = ("ok", JOBS[job](rank, world, *args))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test
        result = ("error", traceback.format_exc())
    finally:
        with open(os.path.join(result_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, job: str, *args, backend: str = "gloo"):
    """Run JOBS[job](rank, world, *args) on `world` new processes of one process group; return
    the per-rank results. A rank that raises, exits or hangs fails the calling test."""
    try:
        return _launch(world, job, args, backend)
    except AssertionError as e:
        # the free port was taken between _free_port() and rank 0's bind: once more, another port
        if "address already in use" not in str(e).lower():
            raise
    return _launch(world, job, args, backend)


def _launch(world, job, args, backend):
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as result_dir:
        procs = [ctx.Process(target=_worker, args=(r, world, port, backend, job, args, result_dir))
                 for r in range(world)]
        saved = {k: os.environ.get(k) for k in NO_MULTICAST_ENV}
        os.environ.update(NO_MULTICAST_ENV)
        try:
            for p in procs:
                p.start()
        finally:
            for k, val in saved.items():
                if val is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = val
        limit = LAUNCH_TIMEOUT_S[backend]
        deadline = time.monotonic() + limit
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        assert not hung, f"ranks {hung} still running after {limit}s (a hang)"
        results = []
        for r in range(world):
            path = os.path.join(result_dir, f"{r}.pkl")
            assert os.path.exists(path), f"rank {r} exited with code {procs[r].exitcode} and no result"
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            assert status == "ok", f"rank {r} failed:\n{value}"
            results.append(value)
        return results


# ---------------------------------------------------------------------------- the cases

def causal_indices(g, B, T, H, S, block_size):
    """[B, T, H, S] random blocks each query can see (its own block included), with repeats."""
    reachable = (torch.arange(T) // block_size + 1).view(1, T, 1, 1)
    return (torch.rand(B, T, H, S, generator=g) * reachable).long()


def full_case(spec: dict, world: int, device="cpu"):
    """The whole sequence's inputs (a packed varlen batch where spec["seqlens"] says, summing
    to world x T_local, with "cu_seqlens_q" in the returned dict), and the gradients fed back
    for o and lse."""
    T = world * spec["T_local"]
    shape = dict(seqlens=spec["seqlens"]) if "seqlens" in spec else dict(B=spec.get("B", 1), TQ=T)
    case = make_case(HQ=spec["HQ"], H=spec["H"], Dk=spec["Dk"],
                     Dv=spec.get("Dv"), S=spec["S"], block_size=spec["block_size"],
                     block_counts=spec.get("block_counts"), seed=spec["seed"],
                     dtype=spec.get("dtype", torch.float32), **shape)
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    if spec.get("indices") == "causal":
        case.block_indices = causal_indices(g, case.q.shape[0], T, spec["H"], spec["S"],
                                            spec["block_size"])
    B, _, HQ, _ = case.q.shape
    grad_o = torch.randn(B, T, HQ, case.v.shape[-1], generator=g).to(case.q.dtype)
    grad_lse = torch.randn(B, T, HQ, generator=g) * 0.3
    moved = {name: getattr(case, name).to(device) for name in ("q", "k", "v", "block_indices")}
    if "seqlens" in spec:
        assert case.q.shape[1] == T, "seqlens must sum to world x T_local"
        moved["cu_seqlens_q"] = case.cu_seqlens_q.to(device)
    counts = case.block_counts
    if isinstance(counts, torch.Tensor):
        counts = counts.to(device)
    return moved, counts, grad_o.to(device), grad_lse.to(device)


def loss_of(o, lse, grad_o, grad_lse):
    finite = torch.isfinite(lse)
    return (o * grad_o).sum() + (lse[finite] * grad_lse[finite]).sum()


def grads_of(*tensors):
    return [None if x is None else x.detach().cpu() for x in tensors]


def one_process(spec, world, device="cpu"):
    """nsa_ext.selection_attention on the whole sequence: o, lse, dq, dk, dv."""
    t, counts, grad_o, grad_lse = full_case(spec, world, device)
    q, k, v = (t[n].detach().clone().requires_grad_() for n in "qkv")
    o, lse = nsa_ext.selection_attention(q, k, v, t["block_indices"], spec["block_size"],
                                         block_counts=counts, backend=spec["backend"],
                                         cu_seqlens_q=t.get("cu_seqlens_q"), return_lse=True)
    loss_of(o, lse, grad_o, grad_lse).backward()
    return grads_of(o, lse, q.grad, k.grad, v.grad)


def shard(x, rank, T_local):
    return x[:, rank * T_local:(rank + 1) * T_local]


def _sharded_call(spec, rank, world, group=None, device="cpu"):
    """This rank's o, lse, dq, dk, dv from the distributed call (None for a tensor that does
    not require grad: spec["grad_of"] names those that do, default "qkv")."""
    t, counts, grad_o, grad_lse = full_case(spec, world, device)
    T_local = spec["T_local"]
    grad_of = spec.get("grad_of", "qkv")
    q, k, v = (shard(t[n], rank, T_local).detach().clone().requires_grad_(n in grad_of)
               for n in "qkv")
    block_indices = shard(t["block_indices"], rank, T_local)
    if isinstance(counts, torch.Tensor):
        counts = shard(counts, rank, T_local)
    batchless = spec.get("batchless", False)        # varlen in FlashAttention's [total, ...]
    if batchless:
        q, k, v = (x.detach()[0].requires_grad_(x.requires_grad) for x in (q, k, v))
        block_indices = block_indices[0]
        counts = counts[0] if isinstance(counts, torch.Tensor) else counts
    with torch.set_grad_enabled(bool(grad_of)):
        o, lse = nsa_ext.distributed.selection_attention(
            q, k, v, block_indices, spec["block_size"], group=group, block_counts=counts,
            backend=spec["backend"], cu_seqlens_q=t.get("cu_seqlens_q"), return_lse=True,
            balance=spec.get("balance"))
    if batchless:
        assert o.dim() == 3 and lse.dim() == 2
    if grad_of and batchless:
        loss_of(o, lse, shard(grad_o, rank, T_local)[0], shard(grad_lse, rank, T_local)[0]).backward()
        return [None if x is None else x.unsqueeze(0) for x in
                grads_of(o, lse, q.grad, k.grad, v.grad)]
    if grad_of:
        loss_of(o, lse, shard(grad_o, rank, T_local), shard(grad_lse, rank, T_local)).backward()
    else:
        assert o.grad_fn is None and lse.grad_fn is None
    return grads_of(o, lse, q.grad, k.grad, v.grad)


def job_sharded(rank, world, specs, device_kind="cpu"):
    device = f"cuda:{rank}" if device_kind == "cuda" else "cpu"
    results = []
    for spec in specs:
        first = _sharded_call(spec, rank, world, device=device)
        if spec.get("repeat"):   # run to run: bitwise the same (SPEC.md, determinism)
            again = _sharded_call(spec, rank, world, device=device)
            assert all(a is b is None or torch.equal(a, b) for a, b in zip(first, again)), spec
        results.append(first)
    return results


def job_errors(rank, world, cases):
    """Each bad call must raise ValueError on every rank; a good call afterwards must still
    work (the ranks did not fall out of step)."""
    messages = []
    for kind in cases:
        T_local, block_size, extra = 32, 16, {}
        device = "cpu"
        if kind == "unequal" and rank == world - 1:
            T_local = 16
        if kind == "not_multiple":
            T_local = 24
        if kind == "device" and rank == 0:
            device = "meta"
        if kind == "varlen_length":   # the batch's packed length is world x T_local, not T_local
            extra = dict(cu_seqlens_q=torch.tensor([0, T_local], dtype=torch.int32))
        if kind == "varlen_differs" and rank == 1:
            extra = dict(cu_seqlens_q=torch.tensor([0, 7, 64], dtype=torch.int32))
        elif kind == "varlen_differs":
            extra = dict(cu_seqlens_q=torch.tensor([0, 9, 64], dtype=torch.int32))
        if kind == "varlen_k":
            extra = dict(cu_seqlens_q=torch.tensor([0, 9, 64], dtype=torch.int32),
                         cu_seqlens_k=torch.tensor([0, 10, 64], dtype=torch.int32))
        if kind == "dtype" and rank == 1:
            extra = dict(dtype=torch.float16)
        if kind == "balance_length":
            extra = dict(balance=[1.0])
        if kind == "balance_differs":
            extra = dict(balance=[1.0, 2.0 + rank])
        if kind == "balance_varlen":
            extra = dict(balance=[1.0, 2.0], cu_seqlens_q=torch.tensor([0, 9, 64], dtype=torch.int32))
        dtype = extra.pop("dtype", torch.float32)
        q = torch.randn(1, T_local, 4, 16, dtype=dtype, device=device)
        k = torch.randn(1, T_local, 2, 16, dtype=dtype, device=device)
        v = torch.randn(1, T_local, 2, 16, dtype=dtype, device=device)
        block_indices = torch.zeros(1, T_local, 2, 2, dtype=torch.long, device=device)
        if kind == "grad" and rank == 1:     # rank 1 would wait in a backward rank 0 never runs
            q.requires_grad_()
        try:
            nsa_ext.distributed.selection_attention(q, k, v, block_indices, block_size, **extra)
        except ValueError as e:
            messages.append(str(e))
        else:
            messages.append(None)
    _sharded_call(dict(T_local=32, HQ=4, H=2, Dk=16, S=2, block_size=16, seed=3,
                       backend="sdpa"), rank, world)
    return messages


def job_mesh_and_subgroup(rank, world, spec):
    """A 1-d slice of a 2-d DeviceMesh over all ranks, then a sub-group of the last two ranks
    (so the group's rank 0 is global rank 1, and global rank 0 sits out)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "cp"))
    with_mesh = _sharded_call(spec, rank, world, group=mesh["cp"])
    members = list(range(1, world))
    sub = dist.new_group(members)
    with_sub = None
    if rank in members:
        with_sub = _sharded_call(spec, rank - 1, len(members), group=sub)
    try:
        nsa_ext.distributed.selection_attention(*(torch.zeros(1, 16, 1, 8),) * 3,
                                                torch.zeros(1, 16, 1, 1, dtype=torch.long), 16,
                                                group=mesh)
    except ValueError as e:
        mesh_error = str(e)
    else:
        mesh_error = None
    return with_mesh, with_sub, mesh_error


def job_parts(rank, world, parts):
    """Several jobs in one launch: {name: result}."""
    return {name: JOBS[name](rank, world, *args) for name, args in parts}


JOBS = {"sharded": job_sharded, "errors": job_errors, "mesh": job_mesh_and_subgroup,
        "parts": job_parts}


# ---------------------------------------------------------------------------- the tests

def base(**kw):
    spec = dict(T_local=32, HQ=4, H=2, Dk=16, S=3, block_size=8, seed=0, backend="sdpa")
    spec.update(kw)
    return spec


def random_specs(seed, n):
    """Seeded random calls: block sizes 1-32, G = 1, 3, 5, Dk != Dv, B up to 2, causal or messy
    indices, block_counts kinds, every CPU backend (S >= 1 and counts >= 1, so that the whole
    sequence's gradients are not all zero)."""
    rnd = random.Random(seed)
    specs = []
    for i in range(n):
        bs = rnd.choice([1, 2, 4, 16, 32])
        S = rnd.choice([1, 2, 3, 5])
        H, G = rnd.choice([1, 2]), rnd.choice([1, 3, 5])
        specs.append(base(T_local=bs * rnd.randint(1, max(1, 40 // bs)), HQ=H * G, H=H,
                          Dk=rnd.choice([8, 24]), Dv=rnd.choice([None, 8, 32]), S=S, block_size=bs,
                          B=rnd.choice([1, 2]), seed=100 * seed + i,
                          backend=rnd.choice(["sdpa", "reference", "auto"]),
                          block_counts=rnd.choice([None, "tensor", rnd.randint(1, S + 1)]),
                          indices="causal"))
    return specs


CASES = {
    2: [base(indices="causal", repeat=True),                              # random valid blocks
        base(seed=1),                                                     # -1, repeats, out of range
        base(HQ=16, H=1, Dk=32, Dv=16, S=4, seed=2, block_counts="tensor"),   # G = 16
        base(B=2, HQ=3, H=3, seed=4, block_counts=2, backend="reference"),    # G = 1, B = 2
        base(seed=9, grad_of="q"),                                        # no dK/dV exchange
        base(seed=10, grad_of=""),                                        # inference
        # varlen: sequences across the shard boundary, an empty one, blocks cut by it
        base(seqlens=[37, 0, 20, 7], HQ=8, H=2, block_size=4, S=4, seed=11, repeat=True),
        base(seqlens=[64], HQ=4, H=1, block_size=16, S=3, seed=12, block_counts="tensor",
             backend="reference"),
        base(seqlens=[5, 40, 19], seed=13, batchless=True, backend="auto"),
        # balance: rank 1's first queries computed on rank 0 (and the reverse), B = 2, G = 16,
        # a block_counts tensor, gradients of q only, inference
        base(indices="causal", seed=20, balance=[1, 3], repeat=True),
        base(seed=21, balance=[1000, 1], backend="auto"),
        base(HQ=16, H=1, Dk=32, Dv=16, S=4, seed=22, block_counts="tensor", balance=[1, 2]),
        base(B=2, HQ=3, H=3, seed=23, block_counts=2, backend="reference", balance=[1, 1.5]),
        base(seed=24, grad_of="q", balance=[1, 3]),
        base(seed=25, grad_of="", balance=[1, 3]),
        ],
    3: [base(indices="causal", T_local=16, seed=5),
        base(HQ=16, H=1, S=5, block_size=16, seed=6, block_counts="tensor"),
        base(HQ=2, H=2, Dk=24, Dv=40, seed=7, repeat=True),                   # G = 1, Dv != Dk
        base(seqlens=[3, 70, 0, 1, 22], HQ=6, H=2, block_size=8, S=5, seed=14),  # spans 3 ranks
        base(seqlens=[32, 32, 32], block_size=2, seed=15, block_counts=2),       # on the seams
        # balance: rank 0's range spans all three shards; then rank 2's range is empty
        base(indices="causal", HQ=16, H=1, S=5, block_size=16, seed=26, block_counts="tensor",
             balance=[1, 1, 1e6], repeat=True),
        base(T_local=16, block_size=16, seed=27, balance=[1, 1, 100]),
        base(indices="causal", T_local=16, seed=28, balance=[1, 2, 3], backend="auto"),
        ],
}
CASES[2] += random_specs(1, 6)
CASES[3] += random_specs(2, 4)


def check_against_one_process(spec, world, per_rank, device="cpu"):
    o, lse, dq, dk, dv = one_process(spec, world, device)
    T_local = spec["T_local"]
    assert dk.abs().max() > 0 and dq.abs().max() > 0
    for rank, (o_r, lse_r, dq_r, dk_r, dv_r) in enumerate(per_rank):
        dtype = o_r.dtype
        assert_close_to_reference(o_r, shard(o, rank, T_local), dtype, lse_r,
                                  shard(lse, rank, T_local))
        atol, rtol = (2e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)
        for name, got, want in (("dq", dq_r, dq), ("dk", dk_r, dk), ("dv", dv_r, dv)):
            if name[1] not in spec.get("grad_of", "qkv"):
                assert got is None, (spec, rank, name)
                continue
            want = shard(want, rank, T_local)
            assert got.shape == want.shape, (name, got.shape, want.shape)
            assert torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol), \
                (spec, rank, name, (got.float() - want.float()).abs().max())


ERROR_CASES = {
    "unequal": ("rank 1", "q:", "T_local"),
    "not_multiple": ("rank 0", "rank 1", "q:", "multiple of block_size"),
    "device": ("rank 0", "q:", "meta", "gloo"),
    "varlen_length": ("rank 0", "cu_seqlens_q", "packed length 64", "got 32"),
    "varlen_differs": ("rank 1", "cu_seqlens_q", "checksum"),
    "varlen_k": ("rank 0", "cu_seqlens_k", "equal cu_seqlens_q"),
    "dtype": ("rank 1", "q:", "dtype"),
    "grad": ("rank 1", "q/k/v", "require grad"),
    "balance_length": ("rank 0", "rank 1", "balance", "2 positive finite numbers"),
    "balance_differs": ("rank 1", "balance", "checksum"),
    "balance_varlen": ("rank 0", "balance", "cu_seqlens_q"),
}


MESH_SPEC = base(indices="causal", T_local=16, seed=8)

# One launch per group size (starting the processes costs more than the cases); the tests below
# read their parts of it.
LAUNCHES = {2: [("sharded", (CASES[2],)), ("errors", (list(ERROR_CASES),))],
            3: [("sharded", (CASES[3],)), ("mesh", (MESH_SPEC,))]}


@pytest.fixture(scope="module")
def launched():
    """launched(world, part) -> that part's per-rank results; each launch runs once."""
    done = {}

    def get(world, part):
        if world not in done:
            try:
                done[world] = run_ranks(world, "parts", LAUNCHES[world])
            except AssertionError as e:   # every test of this launch fails with the cause
                done[world] = e
        if isinstance(done[world], AssertionError):
            raise done[world]
        return [per_rank[part] for per_rank in done[world]]
    return get


@pytest.mark.parametrize("world", [2, 3])
def test_shards_match_one_process(launched, world):
    results = launched(world, "sharded")
    for i, spec in enumerate(CASES[world]):
        check_against_one_process(spec, world, [results[r][i] for r in range(world)])


def test_bad_input_raises_on_every_rank(launched):
    cases = list(ERROR_CASES)
    messages = launched(2, "errors")
    for rank, per_case in enumerate(messages):
        for kind, message in zip(cases, per_case):
            assert message is not None, f"rank {rank}: {kind} did not raise"
            for needle in ERROR_CASES[kind]:
                assert needle in message, (rank, kind, message)
    # every rank raised the same error, apart from which rank it says it is
    for kind_index in range(len(cases)):
        texts = {m[kind_index].split("this is rank")[0] for m in messages}
        assert len(texts) == 1, texts


def test_device_mesh_and_subgroup(launched):
    world, spec = 3, MESH_SPEC
    results = launched(world, "mesh")
    check_against_one_process(spec, world, [r[0] for r in results])
    check_against_one_process(spec, world - 1, [r[1] for r in results[1:]])
    assert results[0][1] is None
    for r in results:
        assert r[2] is not None and "1-d DeviceMesh" in r[2]


def test_query_ranges():
    """balance's cut of the global query order: the shards themselves for equal costs; else
    monotone, on multiples of the alignment, each range's estimated cost near 1/W of the whole,
    where a query's estimated cost is a line inside its shard whose mean is the shard's cost."""
    ranges = nsa_ext.distributed._query_ranges
    assert ranges([2.0, 2.0, 2.0], 64, 3, 16) == (0, 64, 128, 192)
    # [1, 3], T = 32: shard 1's first x queries cost x + x^2 / 32 (mean 3, slope 2 / 32); rank 0
    # needs 32 of them: x = 19.8, rounded to 16 (the constant model gave 40)
    assert ranges([1.0, 3.0], 32, 2, 8) == (0, 48, 64)
    assert ranges([1000.0, 1.0], 32, 2, 8) == (0, 16, 64)
    assert ranges([1.0, 1.0, 100.0], 16, 3, 16) == (0, 32, 48, 48)      # an empty last range
    check = nsa_ext.distributed._check_balance
    assert check(torch.tensor([1.0, 2.5]), 2) == (1.0, 2.5)
    for bad in ("12", [1.0], [1.0, 0.0], [1.0, float("nan")], [1.0, None], 3.0):
        with pytest.raises(ValueError, match="balance"):
            check(bad, 2)
    rnd = random.Random(0)
    for _ in range(200):
        world, align = rnd.randint(2, 6), rnd.choice([1, 16, 64])
        T = align * rnd.randint(1, 20)
        costs = [rnd.uniform(0.5, 3.0) for _ in range(world)]
        dens = nsa_ext.distributed._shard_densities(costs, T)
        per_query = [c + g * (p % T + 0.5 - T / 2) for p in range(world * T)
                     for c, g in [dens[p // T]]]
        for s in range(world):       # the line's mean is the caller's cost; no query is free
            assert sum(per_query[s * T:(s + 1) * T]) == pytest.approx(costs[s] * T)
            assert min(per_query[s * T:(s + 1) * T]) >= costs[s] / 2 - 1e-9
        cut = ranges(costs, T, world, align)
        assert cut[0] == 0 and cut[-1] == world * T
        assert all(a <= b for a, b in zip(cut, cut[1:])) and all(a % align == 0 for a in cut)
        share = sum(costs) * T / world
        for r in range(world):       # off by at most the rounding at both ends
            got = sum(per_query[cut[r]:cut[r + 1]])
            assert abs(got - share) <= 1.5 * max(costs) * align + 1e-6


@pytest.mark.parametrize("name,types", [("gloo", ("cpu",)), ("nccl", ("cuda",)),
                                        ("cpu:gloo,cuda:nccl", ("cpu", "cuda"))])
def test_group_device_types(monkeypatch, name, types):
    """Which devices a group's backend serves (bad-device errors, where the rank check runs)."""
    monkeypatch.setattr(dist, "get_backend", lambda group=None: name)
    assert nsa_ext.distributed._group_device_types(None) == types
    if "cpu" in types:   # the rank check stays off the GPU wherever the group serves the CPU
        assert nsa_ext.distributed._exchange_device(types, torch.zeros(1)).type == "cpu"


def test_cp_bench_runs_on_cpu(tmp_path):
    """bench/cp_bench.py under torchrun, 2 gloo ranks, a tiny shape: it runs and writes its rows
    (no timing assertions), so a GPU run does not find a broken script."""
    out = tmp_path / "cp.json"
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(repo / "bench" / "cp_bench.py"), "--device", "cpu", "--dtype", "fp32",
           "--T", "64", "--HQ", "2", "--H", "1", "--D", "16", "--S", "2", "--block-size", "16",
           "--iters", "1", "--warmup", "0", "--balance", "measured", "--out", str(out)]
    env = {**os.environ, **NO_MULTICAST_ENV, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S["gloo"],
                         env=env)
    if run.returncode != 0 and "terminate called without an active exception" in run.stderr:
        # Seen in full-suite runs on the 2-core CI machine, never in 6 runs alone: a rank
        # aborted inside gloo (exit -6), once after it had written every row (the script now
        # leaves without the interpreter's finalization, see its end). One more launch, so a
        # real failure of the script still fails here.
        run = subprocess.run(cmd, capture_output=True, text=True,
                             timeout=LAUNCH_TIMEOUT_S["gloo"], env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["world"], r["T_total"]) for r in rows] == [("fwd", 2, 128), ("train", 2, 128)]
    for key in ("one_gpu_ms", "world_ms", "ratio", "all_gather_ms", "local_kernel_ms",
                "world_balanced_ms", "ratio_balanced"):
        assert all(r[key] > 0 for r in rows), key
    assert rows[1]["reduce_scatter_ms"] > 0
    for r in rows:                        # every rank's local call, the column its slowest
        assert len(r["local_kernel_ms_per_rank"]) == 2
        assert r["local_kernel_ms"] == max(r["local_kernel_ms_per_rank"])
        assert r["balance"] == r["local_kernel_ms_per_rank"]     # --balance measured


@pytest.mark.gpu
def test_nccl_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    specs = [base(indices="causal", T_local=256, HQ=16, H=1, Dk=64, S=4, block_size=64,
                  backend="auto", repeat=True),
             base(T_local=256, HQ=16, H=1, Dk=128, S=8, block_size=64, seed=1,
                  block_counts="tensor", backend="sdpa"),
             base(indices="causal", T_local=1024, HQ=64, H=4, Dk=128, S=16, block_size=64,
                  seed=2, backend="auto", dtype=torch.bfloat16, repeat=True),
             base(seqlens=[300, 0, 700, 24], T_local=512, HQ=16, H=1, Dk=64, S=4,
                  block_size=64, seed=3, backend="auto", repeat=True),      # varlen
             base(indices="causal", T_local=1024, HQ=64, H=4, Dk=128, S=16, block_size=64,
                  seed=4, backend="auto", dtype=torch.bfloat16, balance=[1, 1.3],
                  repeat=True)]                                             # balance
    results = run_ranks(2, "sharded", specs, "cuda", backend="nccl")
    for i, spec in enumerate(specs):
        check_against_one_process(spec, 2, [results[r][i] for r in range(2)], device="cuda")
