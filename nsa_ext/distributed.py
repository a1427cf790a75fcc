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
order is then cut into W contiguous ranges of equal estimated cost, rounded to block_size, and
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


def _query_ranges(costs, T_local: int, world: int, align: int) -> tuple:
    """W + 1 boundaries 0 = a_0 <= a_1 <= ... <= a_W = W * T_local of the global query order such
    that each range [a_r, a_r+1) holds about 1/W of the estimated cost, where a query of shard s
    costs costs[s]; inner boundaries rounded to a multiple of `align` (every shard boundary is
    one, so equal costs give the shards themselves)."""
    total = sum(costs) * T_local
    bounds, cum, s = [0], 0.0, 0
    for r in range(1, world):
        want = total * r / world
        while s < world - 1 and cum + costs[s] * T_local < want:
            cum += costs[s] * T_local
            s += 1
        inside = (want - cum) / costs[s]                       # queries into shard s
        a = s * T_local + min(T_local, max(0, round(inside / align) * align))
        bounds.append(max(a, bounds[-1]))
    bounds.append(world * T_local)
    return tuple(bounds)


def _check_balance(balance, world: int) -> tuple:
    """balance as a tuple of `world` positive finite floats (ValueError otherwise)."""
    try:
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


def gather_kv_prefix(k: torch.Tensor, v: torch.Tensor, rank: int, world: int, group,
                     prefix: Optional[int] = None):
    """All-gather K and V (both issued before either is waited on) and return the first `prefix`
    tokens of the whole sequence (default (rank+1)*T_local: what rank `rank`'s own causal queries
    can reach): [B, prefix, H, D] each. With B == 1 the prefix is a view of the gathered buffer;
    otherwise it is one copy of the prefix."""
    works, stacks = [], []
    for t in (k, v):
        stack = t.new_empty(world, *t.shape)               # [world, B, T_local, H, D]
        # the concatenated form [world * B, ...] (gloo takes no other), same memory
        works.append(_all_gather(stack.flatten(0, 1), t.contiguous(), group=group, async_op=True))
        stacks.append(stack)
    for work in works:
        work.wait()
    B, T_local, H = k.shape[:3]
    if prefix is None:
        prefix = (rank + 1) * T_local
    chunks = -(-prefix // T_local)
    return tuple(s[:chunks].transpose(0, 1).reshape(B, chunks * T_local, H, s.shape[-1])[:, :prefix]
                 for s in stacks)


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


def _row_splits(ranges: tuple, rank: int, T_local: int, world: int):
    """(send, recv) token counts of the all-to-all that moves queries from their owners to the
    ranks that compute them: send[r] = this shard's tokens in range r, recv[s] = range rank's
    tokens in shard s (both ordered, so the pieces concatenate in sequence order)."""
    def overlap(a0, a1, b0, b1):
        return max(0, min(a1, b1) - max(a0, b0))
    mine = (rank * T_local, (rank + 1) * T_local)
    send = [overlap(*mine, ranges[r], ranges[r + 1]) for r in range(world)]
    recv = [overlap(ranges[rank], ranges[rank + 1], s * T_local, (s + 1) * T_local)
            for s in range(world)]
    return send, recv


def _exchange_rows(tensors, send, recv, rank: int, group):
    """Move token rows (dim 1 of each [B, n, ...] tensor) between ranks: send[r] of this rank's
    rows, in order, to rank r; recv[s] rows, in order, from rank s. This rank's own piece
    (send[rank] == recv[rank] rows) stays where it is: a result that is only that piece is a view,
    and only the moved rows go through the all-to-all (one per tensor, all issued before any is
    waited on). None passes through."""
    send_moved = [0 if r == rank else n for r, n in enumerate(send)]
    recv_moved = [0 if r == rank else n for r, n in enumerate(recv)]
    starts = [sum(send[:r]) for r in range(len(send))]
    works, pending = [], []
    for t in tensors:
        if t is None:
            pending.append(None)
            continue
        rows = t.transpose(0, 1)                            # [n, B, ...]: rows on dim 0
        own = rows[starts[rank]:starts[rank] + send[rank]]
        moved = [rows[starts[r]:starts[r] + n] for r, n in enumerate(send_moved) if n]
        outgoing = (moved[0] if len(moved) == 1 else torch.cat(moved) if moved
                    else rows[:0]).contiguous()
        incoming = rows.new_empty(sum(recv_moved), *rows.shape[1:])
        works.append(dist.all_to_all_single(incoming, outgoing, output_split_sizes=recv_moved,
                                            input_split_sizes=send_moved, group=group,
                                            async_op=True))
        pending.append((own, incoming))
    for work in works:
        work.wait()
    outs = []
    for item in pending:
        if item is None:
            outs.append(None)
            continue
        own, incoming = item
        pieces = list(incoming.split(recv_moved))
        pieces[rank] = own
        pieces = [p for p in pieces if p.shape[0]] or [own]
        outs.append((pieces[0] if len(pieces) == 1 else torch.cat(pieces)).transpose(0, 1))
    return outs


class _ContextParallelSelection(torch.autograd.Function):
    """Gather K/V, run the public call on this rank's prefix, keep its autograd graph for the
    backward (torch.autograd.grad through the public op), reduce-scatter dK/dV. With
    plan.ranges (balance), the queries of this rank's range come in first and their o / lse go
    back to their owners (and dO in, dQ out in the backward)."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_counts, plan: _Plan, need_grad: bool):
        ctx.set_materialize_grads(False)
        ctx.plan = plan
        B, T_local = q.shape[:2]
        prefix = None if plan.ranges is None else plan.ranges[plan.rank + 1]
        k_prefix, v_prefix = gather_kv_prefix(k, v, plan.rank, plan.world, plan.group, prefix)
        counts = block_counts if block_counts is not None else plan.block_counts_int
        if plan.ranges is not None:
            ctx.splits = _row_splits(plan.ranges, plan.rank, T_local, plan.world)
            ctx.shard_shapes = ((B, T_local, q.shape[2], v.shape[3]), (B, T_local, q.shape[2]))
            q, block_indices, block_counts = _exchange_rows(
                (q, block_indices, block_counts), *ctx.splits, plan.rank, plan.group)
            counts = block_counts if block_counts is not None else plan.block_counts_int
        kwargs = dict(block_counts=counts, scale=plan.scale, backend=plan.backend, return_lse=True,
                      cu_seqlens_q=plan.cu_seqlens_q, cu_seqlens_k=plan.cu_seqlens_k)
        empty = q.shape[1] == 0          # a range with no queries (balance): nothing to call
        with torch.enable_grad() if need_grad else torch.no_grad():
            leaves = (q.detach().requires_grad_(need_grad and ctx.needs_input_grad[0]),
                      k_prefix.detach().requires_grad_(need_grad and ctx.needs_input_grad[1]),
                      v_prefix.detach().requires_grad_(need_grad and ctx.needs_input_grad[2]))
            if empty:
                o = q.new_zeros(B, 0, q.shape[2], v.shape[3])
                lse = q.new_zeros(B, 0, q.shape[2], dtype=torch.float32)
            else:
                o, lse = _selection_attention(*leaves, block_indices, plan.block_size, **kwargs)
        ctx.graph = (o, lse, leaves, empty) if need_grad else None
        o, lse = o.detach(), lse.detach()
        if plan.ranges is not None:      # back to the owners
            send, recv = ctx.splits
            o, lse = _exchange_rows((o, lse), recv, send, plan.rank, plan.group)
            o, lse = o.contiguous(), lse.contiguous()
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_o, grad_lse):
        plan = ctx.plan
        o, lse, leaves, empty = ctx.graph
        ctx.graph = None
        if plan.ranges is not None:
            # Every rank takes part in the same exchanges whatever its own outputs fed.
            o_shape, lse_shape = ctx.shard_shapes
            grad_o = o.new_zeros(o_shape) if grad_o is None else grad_o
            grad_lse = lse.new_zeros(lse_shape) if grad_lse is None else grad_lse
            grad_o, grad_lse = _exchange_rows((grad_o, grad_lse), *ctx.splits, plan.rank,
                                              plan.group)
        outputs = [t for t, g in ((o, grad_o), (lse, grad_lse)) if g is not None]
        grads_out = [g for g in (grad_o, grad_lse) if g is not None]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = torch.autograd.grad(outputs, wanted, grads_out, allow_unused=True) \
            if outputs and wanted and not empty else [None] * len(wanted)
        by_leaf = dict(zip(map(id, wanted), grads))
        dq, dk_prefix, dv_prefix = (None if not leaf.requires_grad
                                    else by_leaf[id(leaf)] if by_leaf[id(leaf)] is not None
                                    else torch.zeros_like(leaf) for leaf in leaves)
        if plan.ranges is not None and dq is not None:      # dQ back to the owners
            send, recv = ctx.splits
            dq = _exchange_rows((dq,), recv, send, plan.rank, plan.group)[0].contiguous()
        # Every rank takes part in the reduce-scatter even when its own contribution is zero
        # (the exchange made sure the ranks agree on which of k and v need gradients).
        kv = [g for g in (dk_prefix, dv_prefix) if g is not None]
        T_local = None if plan.ranges is None else plan.ranges[-1] // plan.world
        reduced = iter(reduce_scatter_prefix(kv, plan.rank, plan.world, plan.group, T_local)
                       if kv else ())
        dk = next(reduced) if dk_prefix is not None else None
        dv = next(reduced) if dv_prefix is not None else None
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
