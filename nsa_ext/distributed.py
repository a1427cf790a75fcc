"""Context-parallel selection attention over torch.distributed.

Each rank of a process group holds one contiguous shard of the sequence: rank r (rank order =
sequence order) has the queries, keys and values at absolute positions r*T_local ..
(r+1)*T_local - 1, and `block_indices` that name blocks of the whole sequence. Rank r's causal
queries can reach only keys 0 .. (r+1)*T_local - 1, so once K/V are all-gathered, rank r's share
of the work is exactly SPEC.md's `TQ < TK` call ("queries are the last TQ of TK keys") with
TQ = T_local and TK = (r+1)*T_local: the public `nsa_ext.selection_attention` on the gathered
prefix computes it, through the normal dispatcher, with no new contract. Blocks past the prefix
are out of range for that call and ignored, which is what causality does to them in the whole
sequence's call; the set semantics (first occurrence, -1 padding, block_counts) are per row and
do not care where the row lives.

Backward: the local call's dK/dV cover the gathered prefix; zero-padded to the whole gathered
length they are reduce-scattered (sum) back to the ranks that own those keys. NSA's selection
suits this layout: every query does the same work (S blocks), so equal contiguous shards are
balanced without the zig-zag orders dense causal attention needs, and K/V are 1/G of Q, so
moving them is cheap next to the queries' work.

Variable-length batches: the ranks shard the packed token axis ([1, total, ...], or [total, ...]
without the batch dim) and pass the whole batch's `cu_seqlens_q`. Sequence i's part on rank r is
its tokens in [r*T_local, (r+1)*T_local); with K/V gathered up to (r+1)*T_local, those queries
are the last ones of the sequence's keys truncated at the shard's end, which SPEC.md's varlen call
already expresses: per sequence, local TQ_i = the tokens in the shard, local TK_i = the tokens
from the sequence's start to the shard's end (0 for sequences starting later). Block numbers stay
per sequence; a block past the truncation holds only keys after every local query, which
causality drops in the whole batch's call too. No block alignment of the shards is needed there.

Balance: equal shards are equal work only where every query costs the same. Selections without
locality (uniformly random blocks) cost more per query the more keys they spread over, so the
last rank is the slowest (notes: 1.28x at 2 x 128k on an H200). `balance=` takes each rank's
relative cost per query (e.g. each rank's local time in an unbalanced step): the global query
order is then cut into W contiguous ranges of equal estimated cost (a query's estimate: its
shard's number, tilted along the shard by the neighbours' numbers, since the cost grows inside a
shard too), rounded to block_size, and
rank r computes range r, the queries it does not own moved to it and their o / lse (and in the
backward dO in, dQ out) moved back by all-to-all. Range r's queries are the last ones of the keys
up to its end, so its local call is again SPEC.md's `TQ < TK` form, on a longer prefix.

Every collective is one of torch.distributed's (NCCL on GPUs, gloo on CPUs). Before the first
collective that could block, the ranks exchange a small description of their call (shapes,
dtype, options, and any local error text) in one all-gather, so a bad input on any rank raises
the same ValueError on every rank instead of leaving the others waiting.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .api import selection_attention as _selection_attention
from .call import BACKEND_NAMES, _check_cu_seqlens, _check_cu_values, describe_call

__all__ = ["selection_attention"]

# Newer torch names these collectives *_single and deprecates the old names. Both are called
# here with the concatenated form ([world * n, ...] <-> [n, ...]), which every backend takes.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# Which device types a process-group backend's collectives are used with here.
_BACKEND_DEVICE_TYPES = {"nccl": ("cuda",), "gloo": ("cpu",), "xccl": ("xpu",)}

_DTYPE_IDS = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}

# The per-rank description exchanged before any other collective: int64 fields, then the
# local error text (utf-8, cut to _MESSAGE_BYTES).
_FIELDS = ("error", "B", "T_local", "HQ", "H", "Dk", "Dv", "S", "block_size", "dtype",
           "block_counts_kind", "block_counts_int", "scale_bits", "backend", "grad_flags",
           "batchless", "cu_n", "cu_hash", "balance_n", "balance_hash")
_MESSAGE_BYTES = 1024
_PREFIX = "nsa_ext.distributed.selection_attention"

# A field that differs between ranks, and the argument to blame for it.
_MUST_MATCH = (
    ("T_local", "q", "shard length T_local"),
    ("B", "q", "batch size B"),
    ("HQ", "q", "query heads HQ"),
    ("H", "k", "KV heads H"),
    ("Dk", "q", "head dim Dk"),
    ("Dv", "v", "head dim Dv"),
    ("S", "block_indices", "selection width S"),
    ("dtype", "q", "dtype"),
    ("block_size", "block_size", "block_size"),
    ("block_counts_kind", "block_counts", "kind of block_counts (None, int or tensor)"),
    ("block_counts_int", "block_counts", "int block_counts"),
    ("scale", "scale", "scale"),
    ("backend", "backend", "backend"),
    ("grad_flags", "q/k/v", "tensors that require grad"),
    ("batchless", "q", "layout ([1, T_local, ...] or [T_local, ...])"),
    ("cu_n", "cu_seqlens_q", "number of sequences (0: not varlen)"),
    ("cu_hash", "cu_seqlens_q", "the batch's cu_seqlens_q (a checksum of its values)"),
    ("balance_n", "balance", "number of per-rank costs (0: None)"),
    ("balance_hash", "balance", "per-rank costs (a checksum of their values)"),
)


@dataclass(frozen=True)
class _Plan:
    """What the autograd function needs besides tensors."""

    group: object          # the ProcessGroup
    rank: int              # rank in the group = index of this shard in the sequence
    world: int
    block_size: int
    block_counts_int: Optional[int]
    scale: Optional[float]
    backend: str
    cu_seqlens_q: Optional[torch.Tensor] = None   # the local call's (varlen), on q's device
    cu_seqlens_k: Optional[torch.Tensor] = None
    # With balance: every rank's query range [ranges[r], ranges[r+1]) of the global order
    ranges: Optional[tuple] = None


def _resolve_group(group):
    """A ProcessGroup (None = the default group) from a ProcessGroup or a 1-d DeviceMesh."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{_PREFIX}: group: torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - old torch
        DeviceMesh = ()
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"{_PREFIX}: group: expected a 1-d DeviceMesh (the context-parallel "
                             f"dimension, e.g. mesh['cp']), got one of shape {tuple(group.shape)}")
        group = group.get_group()
    if group is None:
        group = dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError(f"{_PREFIX}: group: this process (global rank {dist.get_rank()}) is not "
                         "a member of the group")
    return group


def _group_device_types(group) -> tuple:
    """Device types the group's backend serves, from its name ("nccl", "cpu:gloo,cuda:nccl")."""
    name = str(dist.get_backend(group)).lower()
    types = []
    for part in name.split(","):
        device, _, backend = part.rpartition(":")
        if device:
            types.append(device.strip())
        else:
            types.extend(_BACKEND_DEVICE_TYPES.get(backend.strip(), ()))
    if not types:   # a backend this module has no entry for: ask the group itself
        types = [d.type for d in getattr(group, "_device_types", ())]
    return tuple(dict.fromkeys(types))


def _exchange_device(device_types, q) -> torch.device:
    """The device for the metadata all-gather: the CPU where the group serves it (gloo, or
    "cpu:gloo,cuda:nccl"), since reading the result back from a GPU waits for all the GPU work
    queued before it; else q's device when the group serves it, else one it does."""
    if "cpu" in device_types:
        return torch.device("cpu")
    if isinstance(q, torch.Tensor) and q.device.type in device_types:
        return q.device
    if "cuda" in device_types and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _global_seqlens(cu_seqlens_q, cu_seqlens_k, total: int, device) -> list:
    """The batch's cu_seqlens_q as Python ints, checked by describe_call's own cu_seqlens checks
    against the packed length of all shards (cu_seqlens_k, if given, must be the same: q, k and
    v shard the same tokens)."""
    if cu_seqlens_q is None:
        raise ValueError("cu_seqlens_q: required when cu_seqlens_k is given, got None")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, device)
    _check_cu_values("cu_seqlens_q", cu_seqlens_q, total)
    cu = cu_seqlens_q.tolist()
    if cu_seqlens_k is not None and (not isinstance(cu_seqlens_k, torch.Tensor)
                                     or cu_seqlens_k.tolist() != cu):
        raise ValueError("cu_seqlens_k: across ranks q, k and v shard the same tokens, so it must "
                         "be None or equal cu_seqlens_q")
    return cu


def _local_seqlens(cu: list, rank: int, T_local: int):
    """(cu_seqlens_q, cu_seqlens_k) of rank `rank`'s local call, as lists: per sequence, its
    tokens in the shard and its tokens from its start to the shard's end."""
    start, end = rank * T_local, (rank + 1) * T_local
    local_q, local_k = [0], [0]
    for a, b in zip(cu, cu[1:]):
        local_q.append(local_q[-1] + max(0, min(b, end) - max(a, start)))
        local_k.append(local_k[-1] + max(0, min(b, end) - a))
    return local_q, local_k


# The local calls' cu_seqlens tensors, kept per (batch, rank, shard length, device): the same
# tensors again on the next step, so the local call's value checks (a host read each) run once.
_LOCAL_CU: dict = {}


def _local_cu(cu: list, rank: int, T_local: int, device: torch.device):
    key = (tuple(cu), rank, T_local, str(device))
    if key not in _LOCAL_CU:
        if len(_LOCAL_CU) >= 16:
            _LOCAL_CU.clear()
        _LOCAL_CU[key] = tuple(torch.tensor(c, dtype=torch.int64, device=device)
                               for c in _local_seqlens(cu, rank, T_local))
    return _LOCAL_CU[key]


def _shard_densities(costs, T_local: int) -> list:
    """Per shard s, (c, g): the estimated cost of the query at offset x of the shard is
    c + g * (x - T_local / 2), a line whose mean over the shard is costs[s] (the caller's number)
    and whose slope is the costs' own trend (central difference of the neighbours' costs, one-
    sided at the ends), capped so every query keeps at least half of the mean (no negative
    costs). On random selections the cost per query grows along the sequence, inside a shard too:
    the first queries a rank hands down are cheaper than its mean (notes/cp_h200x2.txt)."""
    W, out = len(costs), []
    for s, c in enumerate(costs):
        lo, hi = costs[max(s - 1, 0)], costs[min(s + 1, W - 1)]
        span = min(s + 1, W - 1) - max(s - 1, 0)
        g = (hi - lo) / (span * T_local) if span else 0.0
        cap = c / T_local                       # |g| * T_local / 2 <= c / 2
        out.append((c, max(-cap, min(cap, g))))
    return out


def _query_ranges(costs, T_local: int, world: int, align: int) -> tuple:
    """W + 1 boundaries 0 = a_0 <= a_1 <= ... <= a_W = W * T_local of the global query order such
    that each range [a_r, a_r+1) holds about 1/W of the estimated cost (_shard_densities: a query
    of shard s costs costs[s] on average, more towards the neighbour that costs more); inner
    boundaries rounded to a multiple of `align` (every shard boundary is one, so equal costs give
    the shards themselves)."""
    dens = _shard_densities(costs, T_local)
    half = T_local / 2

    def within(s, x):                                 # cost of shard s's queries [0, x)
        c, g = dens[s]
        return c * x + g * (x * x / 2 - half * x)

    total = sum(costs) * T_local
    bounds, cum, s = [0], 0.0, 0
    for r in range(1, world):
        want = total * r / world
        while s < world - 1 and cum + costs[s] * T_local < want:
            cum += costs[s] * T_local
            s += 1
        lo, hi = 0.0, float(T_local)                   # within() is increasing on [0, T_local]
        for _ in range(64):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cum + within(s, mid) < want else (lo, mid)
        a = s * T_local + min(T_local, max(0, round(lo / align) * align))
        bounds.append(max(a, bounds[-1]))
    bounds.append(world * T_local)
    return tuple(bounds)


def _check_balance(balance, world: int) -> tuple:
    """balance as a tuple of `world` positive finite floats (ValueError otherwise)."""
    try:
        if isinstance(balance, (str, bytes)):
            raise TypeError
        costs = tuple(float(c) for c in balance)
    except (TypeError, ValueError):
        raise ValueError(f"balance: expected None or a sequence of {world} positive numbers (each "
                         f"rank's cost per query), got {balance!r}") from None
    if len(costs) != world or not all(math.isfinite(c) and c > 0 for c in costs):
        raise ValueError(f"balance: expected {world} positive finite numbers (one per rank of "
                         f"the group), got {list(costs)}")
    return costs


def _local_description(q, k, v, block_indices, block_size, block_counts, scale, backend,
                       cu_seqlens_q, cu_seqlens_k, device_types, backend_name, world,
                       balance=None):
    """(fields, error message or "", the batch's cu_seqlens as a list or None) of this rank's
    call. Never raises for bad tensors: the error travels to every rank first."""
    fields = dict.fromkeys(_FIELDS, 0)
    try:
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {', '.join(BACKEND_NAMES)}, got {backend!r}")
        for name, t in (("q", q), ("k", k), ("v", v), ("block_indices", block_indices)):
            if isinstance(t, torch.Tensor) and t.device.type not in device_types:
                raise ValueError(f"{name}: a tensor on {t.device}, but the process group's backend "
                                 f"({backend_name}) serves {', '.join(device_types) or 'no device'}")
        varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
        batchless = varlen and isinstance(q, torch.Tensor) and q.dim() == 3
        if batchless:
            q, k, v, block_indices = (t.unsqueeze(0) if isinstance(t, torch.Tensor) else t
                                      for t in (q, k, v, block_indices))
            if isinstance(block_counts, torch.Tensor):
                block_counts = block_counts.unsqueeze(0)
        call = describe_call(q, k, v, block_indices, block_size, block_counts=block_counts,
                             scale=scale)
        B, T_local, HQ, Dk = q.shape
        if k.shape[1] != T_local:
            raise ValueError(f"k: expected the shard length of q (T_local={T_local}), got "
                             f"{list(k.shape)}")
        cu = None
        if varlen:
            if B != 1:
                raise ValueError(f"cu_seqlens_q: the varlen layout needs B == 1 (or no batch "
                                 f"dim), got q {list(q.shape)}")
            cu = _global_seqlens(cu_seqlens_q, cu_seqlens_k, world * T_local, q.device)
        elif T_local % call.block_size:
            raise ValueError(f"q: shard length T_local={T_local} is not a multiple of "
                             f"block_size={call.block_size}")
        costs = None
        if balance is not None:
            costs = _check_balance(balance, world)
            if varlen:
                raise ValueError("balance: not supported with cu_seqlens_q yet (varlen shards "
                                 "are balanced by token count)")
        counts_kind = (0 if block_counts is None
                       else 2 if isinstance(block_counts, torch.Tensor) else 1)
        grad = torch.is_grad_enabled()
        fields.update(
            B=B, T_local=T_local, HQ=HQ, H=k.shape[2], Dk=Dk, Dv=v.shape[3],
            S=block_indices.shape[3], block_size=call.block_size, dtype=_DTYPE_IDS[q.dtype],
            block_counts_kind=counts_kind,
            block_counts_int=int(block_counts) if counts_kind == 1 else 0,
            scale_bits=struct.unpack("<q", struct.pack("<d", call.scale))[0],
            backend=BACKEND_NAMES.index(backend),
            grad_flags=sum(1 << i for i, t in enumerate((q, k, v)) if grad and t.requires_grad),
            batchless=int(batchless), cu_n=len(cu) - 1 if cu else 0,
            cu_hash=sum((i + 1) * c for i, c in enumerate(cu)) % (1 << 61) if cu else 0,
            balance_n=len(costs) if costs else 0,
            balance_hash=zlib.crc32(struct.pack(f"<{len(costs)}d", *costs)) if costs else 0)
        return fields, "", cu
    except (ValueError, TypeError) as e:
        fields["error"] = 1
        return fields, str(e), None


def _exchange_and_check(fields: dict, message: str, group, rank: int, world: int,
                        device) -> None:
    """All-gather every rank's description; raise the same ValueError on every rank when any
    rank's call is bad or the ranks' calls disagree."""
    head = torch.tensor([fields[f] for f in _FIELDS], dtype=torch.int64)
    text = message.encode("utf-8")[:_MESSAGE_BYTES]
    mine = torch.zeros(head.numel() * 8 + _MESSAGE_BYTES, dtype=torch.uint8)
    mine[:head.numel() * 8] = head.view(torch.uint8)
    if text:
        mine[head.numel() * 8:head.numel() * 8 + len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    everyone = torch.empty(world * mine.numel(), dtype=torch.uint8, device=device)
    _all_gather(everyone, mine.to(device), group=group)
    everyone = everyone.cpu().view(world, mine.numel())
    heads = everyone[:, :head.numel() * 8].contiguous().view(torch.int64)
    table = [dict(zip(_FIELDS, row.tolist())) for row in heads]
    for row in table:
        row["scale"] = row.pop("scale_bits")

    problems = []
    for r in range(world):
        if table[r]["error"]:
            text = bytes(everyone[r, head.numel() * 8:].tolist()).rstrip(b"\0").decode("utf-8", "replace")
            problems.append(f"rank {r}: {text}")
    good = [r for r in range(world) if not table[r]["error"]]
    if good:
        first = good[0]
        for key, argument, what in _MUST_MATCH:
            for r in good[1:]:
                if table[r][key] != table[first][key]:
                    mine_value, theirs = table[r][key], table[first][key]
                    if key == "scale":
                        mine_value, theirs = (struct.unpack("<d", struct.pack("<q", x))[0]
                                              for x in (mine_value, theirs))
                    if key == "dtype":
                        names = {i: str(d).replace("torch.", "") for d, i in _DTYPE_IDS.items()}
                        mine_value, theirs = names[mine_value], names[theirs]
                    if key == "backend":
                        mine_value, theirs = BACKEND_NAMES[mine_value], BACKEND_NAMES[theirs]
                    if key == "grad_flags":   # every rank must take part in the backward
                        mine_value, theirs = (", ".join(n for i, n in enumerate("qkv") if x >> i & 1)
                                              or "none" for x in (mine_value, theirs))
                    problems.append(f"rank {r}: {argument}: {what}: {mine_value}, on rank "
                                    f"{first}: {theirs} (every rank passes its shard of one call)")
            if len(problems) > 8:
                break
    if problems:
        raise ValueError(f"{_PREFIX} (raised on every rank; this is rank {rank} of {world}): "
                         + "; ".join(problems))


def _issue_kv_gather(k: torch.Tensor, v: torch.Tensor, world: int, group):
    """Start the all-gather of K and V (both issued, neither waited on): (works, stacks), each
    stack [world, B, T_local, H, D]."""
    works, stacks = [], []
    for t in (k, v):
        stack = t.new_empty(world, *t.shape)
        # the concatenated form [world * B, ...] (gloo takes no other), same memory
        works.append(_all_gather(stack.flatten(0, 1), t.contiguous(), group=group, async_op=True))
        stacks.append(stack)
    return works, stacks


def _gathered_prefix(stacks, prefix: int):
    """The first `prefix` tokens of the whole sequence from the gathered stacks: [B, prefix, H, D]
    each, a view of the buffer with B == 1, else one copy."""
    out = []
    for s in stacks:
        _, B, T_local, H, D = s.shape
        chunks = max(1, -(-prefix // T_local))
        out.append(s[:chunks].transpose(0, 1).reshape(B, chunks * T_local, H, D)[:, :prefix])
    return tuple(out)


def gather_kv_prefix(k: torch.Tensor, v: torch.Tensor, rank: int, world: int, group,
                     prefix: Optional[int] = None):
    """All-gather K and V (both issued before either is waited on) and return the first `prefix`
    tokens of the whole sequence (default (rank+1)*T_local: what rank `rank`'s own causal queries
    can reach): [B, prefix, H, D] each. With B == 1 the prefix is a view of the gathered buffer;
    otherwise it is one copy of the prefix."""
    works, stacks = _issue_kv_gather(k, v, world, group)
    for work in works:
        work.wait()
    return _gathered_prefix(stacks, (rank + 1) * k.shape[1] if prefix is None else prefix)


def reduce_scatter_prefix(grads, rank: int, world: int, group, T_local: Optional[int] = None):
    """Sum the prefix gradients [B, prefix, H, D] of every rank (prefix: (rank+1)*T_local unless
    T_local is given) into each owner's shard [B, T_local, H, D]: zero-pad to the whole gathered
    length and reduce-scatter (one collective per tensor, issued together). The sum is the
    backend's reduce-scatter, in a fixed order fixed by the group and the message size, so
    gradients are the same from run to run."""
    works, outs = [], []
    for g in grads:
        B, prefix, H, D = g.shape
        T = T_local if T_local is not None else prefix // (rank + 1)
        padded = g.new_zeros(world, B, T, H, D)             # chunk i goes to rank i
        full, rest = divmod(prefix, T)
        padded[:full].copy_(g[:, :full * T].reshape(B, full, T, H, D).transpose(0, 1))
        if rest:
            padded[full, :, :rest].copy_(g[:, full * T:])
        out = g.new_empty(B, T, H, D)
        works.append(_reduce_scatter(out, padded.flatten(0, 1), group=group, async_op=True))
        outs.append(out)
    for work in works:
        work.wait()
    return outs


@dataclass(frozen=True)
class _Layout:
    """Which queries this rank computes (balance) and how rows move. Global query order;
    `calls`: (start, end, source) per local call, in sequence order, each the last end - start
    queries of the keys 0 .. end - 1 (SPEC.md's TQ < TK form); source "left" / "right" = rows of
    lower / higher shards, "own" = this shard's. send / recv: rows of this shard to each rank's
    range, rows of this range from each shard (own entry included), in rank order."""

    calls: tuple
    send: tuple
    recv: tuple
    moves: bool         # any row changes rank (else no row exchange at all)


def _layout(ranges, rank: int, world: int, T_local: int) -> _Layout:
    lo, hi = rank * T_local, (rank + 1) * T_local
    if ranges is None:
        return _Layout(calls=((lo, hi, "own"),), send=(), recv=(), moves=False)
    a, b = ranges[rank], ranges[rank + 1]

    def overlap(x0, x1, y0, y1):
        return max(0, min(x1, y1) - max(x0, y0))
    send = tuple(overlap(lo, hi, ranges[r], ranges[r + 1]) for r in range(world))
    recv = tuple(overlap(a, b, s * T_local, (s + 1) * T_local) for s in range(world))
    calls = tuple((x, y, kind) for x, y, kind in ((a, min(b, lo), "left"),
                                                  (max(a, lo), min(b, hi), "own"),
                                                  (max(a, hi), b, "right")) if y > x)
    return _Layout(calls=calls, send=send, recv=recv, moves=True)


def _moved(counts, rank: int) -> list:
    """Per-rank row counts with this rank's own entry zeroed (it never goes through a collective)."""
    return [0 if r == rank else n for r, n in enumerate(counts)]


def _all_to_all_rows(outgoing, send, recv, rank: int, group):
    """Start one all-to-all of token rows ([n, B, ...], rows on dim 0): send[r] rows to rank r,
    recv[s] rows from rank s, this rank's own entries skipped. Returns (work, incoming)."""
    send, recv = _moved(send, rank), _moved(recv, rank)
    incoming = outgoing.new_empty(sum(recv), *outgoing.shape[1:])
    work = dist.all_to_all_single(incoming, outgoing.contiguous(), output_split_sizes=recv,
                                  input_split_sizes=send, group=group, async_op=True)
    return work, incoming


def _issue_rows(tensors, send, recv, rank: int, group):
    """Start moving token rows (dim 1 of [B, n, ...]) between ranks: rows [0, n) of each tensor
    minus this rank's own piece go out in order, send[r] to rank r (send[rank] stays: the caller
    keeps it); recv[s] rows come from rank s (recv[rank] ignored). Returns (works, incoming),
    incoming[i] the received rows [sum recv - recv[rank], B, ...] of tensor i, from lower ranks
    first; None passes through."""
    start = sum(send[:rank])
    works, incoming = [], []
    for t in tensors:
        if t is None:
            incoming.append(None)
            continue
        rows = t.transpose(0, 1)                            # [n, B, ...]: rows on dim 0
        parts = [p for p in (rows[:start], rows[start + send[rank]:]) if p.shape[0]]
        outgoing = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else rows[:0]
        work, into = _all_to_all_rows(outgoing, send, recv, rank, group)
        works.append(work)
        incoming.append(into)
    return works, incoming


def _rows_back(ctx, *per_call, empties):
    """Each argument: one tensor per local call ([B, rows of the call, ...], in call order);
    returns, per argument, this shard's tensor [B, T_local, ...]: the rows of the "own" call stay,
    the "left" / "right" calls' rows go back to their shards, and this shard's rows computed on
    other ranks come in (one all-to-all per argument, all issued before any is waited on).
    empties: per argument, zero rows [0, B, ...] of its shape and dtype (this rank's own rows
    where none of them is computed here)."""
    plan, lay = ctx.plan, ctx.layout
    kinds = [kind for _, _, kind in lay.calls]
    if not lay.moves:                                       # one "own" call: the shard itself
        return [tensors[0] for tensors in per_call]
    works, pending = [], []
    for tensors, empty in zip(per_call, empties):
        rows = {kind: t.transpose(0, 1) for kind, t in zip(kinds, tensors)}
        moved = [rows[k] for k in ("left", "right") if k in rows]
        own = rows.get("own", empty)
        outgoing = moved[0] if len(moved) == 1 else torch.cat(moved) if moved else own[:0]
        # back: this range's rows to the shards they came from, this shard's rows from the ranges
        work, incoming = _all_to_all_rows(outgoing, lay.recv, lay.send, plan.rank, plan.group)
        works.append(work)
        pending.append((own, incoming))
    _wait(works)
    lower = sum(lay.send[:plan.rank])        # this shard's first rows were computed by lower ranks
    out = []
    for own, incoming in pending:
        pieces = [p for p in (incoming[:lower], own, incoming[lower:]) if p.shape[0]] or [own]
        out.append((pieces[0] if len(pieces) == 1 else torch.cat(pieces)).transpose(0, 1))
    return out


def _wait(works):
    for work in works:
        work.wait()


class _ContextParallelSelection(torch.autograd.Function):
    """Gather K/V, run the public call on this rank's queries over the keys they reach, keep
    its autograd graph for the backward (torch.autograd.grad through the public op),
    reduce-scatter dK/dV. With balance (plan.ranges) this rank's range may hold rows of other
    shards ("left" / "right" calls): their q come in by all-to-all and their o / lse go back
    (dO in, dQ out in the backward)."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_counts, plan: _Plan, need_grad: bool):
        ctx.set_materialize_grads(False)
        ctx.plan = plan
        B, T_local = q.shape[:2]
        lay = _layout(plan.ranges, plan.rank, plan.world, T_local)
        ctx.layout = lay
        kv_works, stacks = _issue_kv_gather(k, v, plan.world, plan.group)
        row_works, incoming = ([], (None, None, None)) if not lay.moves else _issue_rows(
            (q, block_indices, block_counts), lay.send, lay.recv, plan.rank, plan.group)
        wants = [need_grad and ctx.needs_input_grad[i] for i in range(3)]
        kwargs = dict(scale=plan.scale, backend=plan.backend, return_lse=True,
                      cu_seqlens_q=plan.cu_seqlens_q, cu_seqlens_k=plan.cu_seqlens_k)
        n_left = sum(y - x for x, y, kind in lay.calls if kind == "left")
        gathered_leaves = None
        outs = []                      # per call: (o, lse, q leaf)
        grad_mode = torch.enable_grad() if need_grad else torch.no_grad()

        def call(x, y, kind, k_keys, v_keys):
            if kind == "own":
                sl = slice(x - plan.rank * T_local, y - plan.rank * T_local)
                q_c, bi_c = q[:, sl], block_indices[:, sl]
                bc_c = None if block_counts is None else block_counts[:, sl]
            else:
                sl = slice(0, y - x) if kind == "left" else slice(n_left, n_left + y - x)
                q_c, bi_c = (t[sl].transpose(0, 1) for t in incoming[:2])
                bc_c = None if incoming[2] is None else incoming[2][sl].transpose(0, 1)
            counts = bc_c if bc_c is not None else plan.block_counts_int
            with grad_mode:
                q_leaf = q_c.detach().requires_grad_(wants[0])
                o, lse = _selection_attention(q_leaf, k_keys[:, :y], v_keys[:, :y], bi_c,
                                              plan.block_size, block_counts=counts, **kwargs)
            outs.append((o, lse, q_leaf))

        # Every call waits for the collectives first. Rank 0's own rows need no other rank's keys
        # and were once computed while the collectives ran: on 2 H200s its kernel then held the
        # SMs that rank 0's NCCL kernels needed, and rank 1 waited for the K/V rank 0 sends until
        # rank 0's call ended (256k tokens per GPU: 165.7 ms instead of 102.3, notes).
        _wait(kv_works)
        _wait(row_works)
        if lay.calls:
            prefix = max(y for _, y, _ in lay.calls)
            gathered_leaves = tuple(t.detach().requires_grad_(w) for t, w in
                                    zip(_gathered_prefix(stacks, prefix), wants[1:]))
            for c in lay.calls:
                call(*c, *gathered_leaves)
        ctx.graph = (outs, gathered_leaves) if need_grad else None
        ctx.shapes = (B, T_local, q.shape[2], v.shape[3])
        ctx.kv_dims = ((k.shape[2], k.shape[3]), (v.shape[2], v.shape[3]))
        ctx.dtype, ctx.device, ctx.q_dim = q.dtype, q.device, q.shape[3]
        HQ, Dv = q.shape[2], v.shape[3]
        o, lse = _rows_back(ctx, [out[0].detach() for out in outs],
                            [out[1].detach() for out in outs],
                            empties=(q.new_empty(0, B, HQ, Dv),
                                     q.new_empty(0, B, HQ, dtype=torch.float32)))
        return o.contiguous(), lse.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_o, grad_lse):
        plan, lay = ctx.plan, ctx.layout
        outs, gathered_leaves = ctx.graph
        ctx.graph = None
        B, T_local, HQ, Dv = ctx.shapes
        if lay.moves:
            # Every rank takes part in the same exchanges whatever its own outputs fed.
            if grad_o is None:
                grad_o = torch.zeros(B, T_local, HQ, Dv, dtype=ctx.dtype, device=ctx.device)
            if grad_lse is None:
                grad_lse = torch.zeros(B, T_local, HQ, dtype=torch.float32, device=ctx.device)
            works, incoming = _issue_rows((grad_o, grad_lse), lay.send, lay.recv, plan.rank,
                                          plan.group)
            _wait(works)
        n_left = sum(y - x for x, y, kind in lay.calls if kind == "left")
        outputs, grads_out = [], []
        for (x, y, kind), (o, lse, _) in zip(lay.calls, outs):
            if kind == "own":
                sl = slice(x - plan.rank * T_local, y - plan.rank * T_local)
                g_o = None if grad_o is None else grad_o[:, sl]
                g_lse = None if grad_lse is None else grad_lse[:, sl]
            else:
                sl = slice(0, y - x) if kind == "left" else slice(n_left, n_left + y - x)
                g_o, g_lse = (t[sl].transpose(0, 1) for t in incoming)
            for t, g in ((o, g_o), (lse, g_lse)):
                if g is not None:
                    outputs.append(t)
                    grads_out.append(g)
        leaves = [leaf for _, _, leaf in outs] + list(gathered_leaves or ())
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = torch.autograd.grad(outputs, wanted, grads_out, allow_unused=True) \
            if outputs and wanted else [None] * len(wanted)
        by_leaf = dict(zip(map(id, wanted), grads))

        def grad_of(leaf):
            if not leaf.requires_grad:
                return None
            g = by_leaf[id(leaf)]
            return torch.zeros_like(leaf) if g is None else g

        want_q, want_k, want_v = ctx.needs_input_grad[:3]
        dq = None
        if want_q:
            dq = _rows_back(ctx, [grad_of(out[2]) for out in outs],
                            empties=(torch.empty(0, B, HQ, ctx.q_dim, dtype=ctx.dtype,
                                                 device=ctx.device),))[0].contiguous()
        # dK / dV over the keys this rank's calls reached (one leaf, shared by the calls),
        # reduce-scattered to the owners. Every rank takes part even when its own contribution
        # is zero (the exchange made sure the ranks agree on which of k and v need gradients).
        reduced = []
        for i, want in ((0, want_k), (1, want_v)):
            if want and gathered_leaves is not None:
                reduced.append(grad_of(gathered_leaves[i]))
            elif want:                                      # no call here: a zero contribution
                H, D = ctx.kv_dims[i]
                reduced.append(torch.zeros(B, T_local, H, D, dtype=ctx.dtype, device=ctx.device))
        reduced = iter(reduce_scatter_prefix(reduced, plan.rank, plan.world, plan.group, T_local)
                       if reduced else ())
        dk = next(reduced) if want_k else None
        dv = next(reduced) if want_v else None
        return dq, dk, dv, None, None, None, None


def selection_attention(q, k, v, block_indices, block_size=64, *, group=None, block_counts=None,
                        scale=None, backend="auto", return_lse=False, cu_seqlens_q=None,
                        cu_seqlens_k=None, balance=None):
    """Context-parallel NSA selection attention: `nsa_ext.selection_attention` (SPEC.md) where
    each rank of `group` passes its contiguous shard of the sequence.

    Call it on every rank of the group with the same arguments except the shards. Rank r of the
    group (rank order = sequence order) holds the tokens r*T_local .. (r+1)*T_local - 1 (of the
    sequence, or with cu_seqlens of the packed batch).

    Args:
        q: [B, T_local, HQ, Dk] this rank's queries (fp16/bf16/fp32); varlen: [1, T_local, HQ, Dk]
            or [T_local, HQ, Dk].
        k: [B, T_local, H, Dk] this rank's keys; v: [B, T_local, H, Dv] its values.
        block_indices: [B, T_local, H, S] int32/int64, **global** block numbers of the whole
            sequence (varlen: of each query's own sequence, as in SPEC.md); a set per row: -1
            padding, out-of-range entries and repeats ignored.
        block_size: tokens per block, a positive power of two; a dense T_local must be a
            multiple of it (varlen shards may cut a block: blocks are per sequence).
        group: a ProcessGroup (None: the default group) or a 1-d DeviceMesh (its group).
            NCCL for CUDA tensors, gloo for CPU tensors.
        block_counts: None, an int, or this rank's [B, T_local, H] integer tensor.
        scale, backend: as in `nsa_ext.selection_attention` (the local call goes through the
            normal dispatcher; backend="auto" may pick differently per rank).
        return_lse: also return this rank's lse [B, T_local, HQ] float32 (differentiable).
        cu_seqlens_q: [N+1] cumulative sequence lengths of the **whole** packed batch (the same
            on every rank; its last entry is world x T_local): a sequence may start, end or lie
            anywhere, across shard boundaries, and be empty.
        cu_seqlens_k: None or equal to cu_seqlens_q (q, k and v shard the same tokens).
        balance: None (each rank computes its own queries: balanced when every query costs the
            same, as with selections that have locality, like trained models') or one positive
            number per rank, the same on every rank: the relative cost of one query of each
            rank's shard, e.g. each rank's local time in an unbalanced step (on 2 H200s with
            uniformly random selections the last rank's queries cost ~1.3x the first's). The
            global query order is then cut into contiguous ranges of equal estimated cost
            (boundaries multiples of block_size) and rank r computes range r: queries move to it
            and o / lse (dO / dQ in the backward) back to their owners by all-to-all. The
            results do not depend on it beyond rounding. Dense layout only (varlen: ValueError).

    Returns:
        This rank's shard of o [B, T_local, HQ, Dv] (and lse with return_lse=True).

    Every rank all-gathers K and V (each keeps the prefix its queries can reach, for the
    backward too) and the backward reduce-scatters dK/dV, so every rank must run the forward
    and, when gradients are wanted, the backward through its output. Bad input on any rank
    (unequal shard lengths, a dense shard length that is not a multiple of block_size, tensors
    on a device the group's backend does not serve, differing shapes, dtypes, options or
    cu_seqlens) raises the same ValueError, naming the rank and the argument, on every rank.
    Varlen calls read cu_seqlens_q on the host (the local call's sequence lengths follow from it).
    With an NCCL-only group the rank check reads a small GPU all-gather back to the host, which
    waits for the GPU work queued before the call; a group made with
    init_process_group("cpu:gloo,cuda:nccl") runs the check on the CPU instead.
    Not traceable by torch.compile (eager collectives): call it outside compiled regions.
    """
    group = _resolve_group(group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device_types = _group_device_types(group)
    fields, message, cu = _local_description(q, k, v, block_indices, block_size, block_counts,
                                             scale, backend, cu_seqlens_q, cu_seqlens_k,
                                             device_types, str(dist.get_backend(group)), world,
                                             balance)
    _exchange_and_check(fields, message, group, rank, world, _exchange_device(device_types, q))

    batchless = bool(fields["batchless"])
    if batchless:                     # [T_local, ...]: the local call takes fla's [1, T_local, ...]
        q, k, v, block_indices = (t.unsqueeze(0) for t in (q, k, v, block_indices))
        if isinstance(block_counts, torch.Tensor):
            block_counts = block_counts.unsqueeze(0)
    local_cu = (None, None) if cu is None else _local_cu(cu, rank, fields["T_local"], q.device)
    counts_tensor = block_counts if isinstance(block_counts, torch.Tensor) else None
    counts_int = None if block_counts is None or counts_tensor is not None else int(block_counts)
    ranges = None
    if balance is not None:
        ranges = _query_ranges(_check_balance(balance, world), fields["T_local"], world,
                               fields["block_size"])
        if ranges == tuple(r * fields["T_local"] for r in range(world + 1)):
            ranges = None                                   # the shards themselves
    plan = _Plan(group=group, rank=rank, world=world, block_size=int(block_size),
                 block_counts_int=counts_int, scale=None if scale is None else float(scale),
                 backend=backend, cu_seqlens_q=local_cu[0], cu_seqlens_k=local_cu[1],
                 ranges=ranges)
    need_grad = fields["grad_flags"] != 0
    o, lse = _ContextParallelSelection.apply(q, k, v, block_indices, counts_tensor, plan,
                                             need_grad)
    if batchless:
        o, lse = o.squeeze(0), lse.squeeze(0)
    return (o, lse) if return_lse else o
