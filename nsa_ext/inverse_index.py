"""The inverse index of a call's selection: for each KV block, the queries that chose it.

The canonical rows (`selection.canonical_blocks`) say, per (batch, query token, KV head), which
blocks a query reads. Schedules that own a block instead of a query (the KV-outer dK/dV backward,
the `kv` forward schedule) need the transpose: per *bucket* = (batch, KV head, block slot), the
query tokens whose canonical set holds that block, as CSR (`offsets`, `tokens`).

Block slots. Dense calls: slot n is block n of every batch element (`ceil(TK / block_size)`
slots). Varlen calls (B == 1): the blocks of all sequences side by side, sequence i's block n at
slot `first_slot[i] + n`; their number depends on the data, so the index is sized by the bound
`ceil(total_k / block_size) + num_seqs` (each sequence adds at most one partial block) and the
slots past the real ones hold no keys. `slot_key_start` / `slot_key_end` / `slot_seq_start`
give each slot's keys along k's T axis and its sequence's first key.

Why the order makes sums deterministic: an entry's sort key is `bucket * TQ + token`, unique per
entry (canonical rows hold a block at most once), so the sorted order is one fixed permutation
whatever sort algorithm runs, and within a bucket the tokens are ascending. A kernel that walks a
bucket's list front to back and adds into registers therefore adds in the same order on every
run, and partial sums over fixed chunks of the list (`work_items`) are merged in chunk order.

Built with a handful of PyTorch ops on the call's device: no host synchronisation, no
data-dependent allocation (every size is a bound known from shapes), so it can run inside a CUDA
graph capture. Memory: `tokens` holds B*TQ*H*S int32 entries (the canonical rows' own size),
`offsets` one int64 per bucket; sorting keys take 8 bytes per entry transiently.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .call import SelectionCall
from .selection import RowGeometry


@dataclass(frozen=True)
class InverseIndex:
    offsets: torch.Tensor         # [B * H * slots + 1] int64: bucket i holds tokens[offsets[i]:offsets[i+1]]
    tokens: torch.Tensor          # [B * TQ * H * S] int32: query tokens along q's T axis, ascending per bucket
    entries: torch.Tensor         # [B * TQ * H * S] int32/64: where each listed (token, block) sits in
                                  # the canonical rows, ((b * TQ + t) * H + h) * S + s
    slot_key_start: torch.Tensor  # [slots] int64: first key of the slot's block along k's T axis
    slot_key_end: torch.Tensor    # [slots] int64: one past the block's last key (its sequence's end)
    slot_seq_start: torch.Tensor  # [slots] int64: first key of the slot's sequence
    batch: int
    heads: int
    slots: int

    @property
    def num_buckets(self) -> int:
        return self.batch * self.heads * self.slots

    @property
    def capacity(self) -> int:
        return self.tokens.numel()


def _slots(call: SelectionCall):
    """(slots, slot_key_start, slot_key_end, slot_seq_start, first_slot_of_each_sequence)."""
    bs, device = call.block_size, call.device
    if not call.is_varlen:
        slots = max(1, -(-call.seqlen_k // bs))
        start = torch.arange(slots, device=device, dtype=torch.int64) * bs
        end = torch.full((slots,), call.seqlen_k, device=device, dtype=torch.int64)
        return slots, start, end, torch.zeros_like(start), None
    cu_k = call.cu_seqlens_k.to(torch.int64)
    len_k = cu_k[1:] - cu_k[:-1]
    nblk = (len_k + bs - 1) // bs
    slot_end = torch.cumsum(nblk, 0)                      # [N]: one past each sequence's last slot
    first_slot = slot_end - nblk
    slots = max(1, -(-call.seqlen_k // bs) + call.num_seqs)
    s = torch.arange(slots, device=device, dtype=torch.int64)
    seq = torch.searchsorted(slot_end, s, right=True)     # == N past the real slots
    real = seq < call.num_seqs
    seq_c = seq.clamp(max=call.num_seqs - 1)
    seq_start = cu_k[seq_c]
    start = seq_start + (s - first_slot[seq_c]) * bs
    zero = torch.zeros_like(s)
    return (slots, torch.where(real, start, zero), torch.where(real, cu_k[seq_c + 1], zero),
            torch.where(real, seq_start, zero), first_slot)


def build_inverse_index(call: SelectionCall, geometry: RowGeometry, blocks: torch.Tensor,
                        num_blocks: torch.Tensor) -> InverseIndex:
    """The inverse of the canonical rows `blocks [B, TQ, H, S]` (sorted, -1 padded) of `call`."""
    B, TQ, H, S = blocks.shape
    device = blocks.device
    slots, key_start, key_end, seq_start, first_slot = _slots(call)
    num_buckets = B * H * slots
    # Sort keys bucket * TQ + token; 32-bit where they fit (a radix sort of half the passes).
    key_dtype = torch.int32 if (num_buckets + 1) * TQ < 2 ** 31 else torch.int64
    blk = blocks.to(key_dtype)
    if first_slot is not None:       # varlen: block n of a token's sequence -> its slot
        blk = blk + first_slot.to(key_dtype)[geometry.seq.reshape(B, TQ)][:, :, None, None]
    # [B, TQ, H, 1]: (b * H + h) * slots * TQ + t, the part of the key that is not the block
    base = ((torch.arange(B, device=device, dtype=key_dtype)[:, None, None] * H
             + torch.arange(H, device=device, dtype=key_dtype)[None, None, :]) * (slots * TQ)
            + torch.arange(TQ, device=device, dtype=key_dtype)[None, :, None]).unsqueeze(-1)
    sort_key = torch.where(blocks >= 0, base + blk * TQ, num_buckets * TQ).reshape(-1)
    # Unique keys (past offsets[-1] only the unused sentinels repeat): one order whatever the
    # algorithm, so `entries` is fixed too.
    sort_key, entries = sort_key.sort()
    tokens = (sort_key % TQ).to(torch.int32)
    if entries.numel() < 2 ** 31:
        entries = entries.to(torch.int32)
    offsets = torch.searchsorted(
        sort_key, torch.arange(0, (num_buckets + 1) * TQ, TQ, device=device, dtype=key_dtype))
    return InverseIndex(offsets, tokens, entries, key_start, key_end, seq_start, B, H, slots)


@dataclass(frozen=True)
class WorkItems:
    """A bucket's list cut into items of at most `per_item` tokens, so that a block every query
    chose (block 0 in NSA) does not become one program as long as a thousand others.

    Item i serves bucket `bucket[i]` (== num_buckets for the unused items past the end: the grid
    is sized by the bound, not by the data) over tokens[start[i]:end[i]]; bucket j's partial
    results live in items first_item[j] .. first_item[j] + num_items[j] - 1, merged in that order.
    """
    bucket: torch.Tensor       # [max_items] int32
    start: torch.Tensor        # [max_items] int64
    end: torch.Tensor          # [max_items] int64
    first_item: torch.Tensor   # [num_buckets] int64
    num_items: torch.Tensor    # [num_buckets] int64
    per_item: int

    @property
    def max_items(self) -> int:
        return self.bucket.numel()


def work_items(index: InverseIndex, per_item: int, interpret: bool = False) -> WorkItems:
    """Cut each bucket's list into items of `per_item` tokens: one Triton launch
    (triton_ref/inverse_index.py; interpreted on the CPU). At most
    `ceil(capacity / per_item) + num_buckets` items (each bucket adds at most one partial item)."""
    import triton_ref.inverse_index as kernels

    device = index.offsets.device
    max_items = -(-index.capacity // per_item) + index.num_buckets
    first_item = torch.empty(index.num_buckets, device=device, dtype=torch.int64)
    num_items = torch.empty_like(first_item)
    bucket = torch.empty(max_items, device=device, dtype=torch.int32)
    start = torch.empty(max_items, device=device, dtype=torch.int64)
    end = torch.empty_like(start)
    kernel = kernels.work_items_kernel
    if interpret or device.type != "cuda":
        kernel = _interpreted(kernel)
    kernel[(1,)](index.offsets, first_item, num_items, bucket, start, end, index.num_buckets,
                 max_items, per_item, CHUNK=1024)
    return WorkItems(bucket, start, end, first_item, num_items, per_item)


_interpreted_kernels = {}


def _interpreted(kernel):
    """The kernel run by Triton's CPU interpreter, whatever TRITON_INTERPRET said at import."""
    if kernel not in _interpreted_kernels:
        from triton.runtime.interpreter import InterpretedFunction

        _interpreted_kernels[kernel] = InterpretedFunction(kernel.fn)
    return _interpreted_kernels[kernel]
