"""The inverse index (nsa_ext/inverse_index.py) against a plain Python construction from the
canonical rows, and its work items against the lists they cut."""
import pytest
import torch

from common import import_triton_for_the_interpreter, make_case
from nsa_ext.call import describe_call
from nsa_ext.inverse_index import build_inverse_index, work_items
from nsa_ext.selection import canonical_blocks_torch, row_geometry


INTERPRETER = import_triton_for_the_interpreter()
CUDA = torch.cuda.is_available()


@pytest.fixture
def kernels_here(monkeypatch):
    """Work items are one Triton launch: on the GPU, or interpreted on a CPU machine."""
    if not CUDA:
        if not INTERPRETER:
            pytest.skip("Triton cannot interpret kernels in this process")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cuda" if CUDA else "cpu"


def _call(case):
    return describe_call(*case.args(), **case.kwargs())


def _python_index(call, blocks):
    """{(b, h, slot): [tokens ascending]} and each slot's (key_start, key_end, seq_start)."""
    B, TQ, H, S = blocks.shape
    bs = call.block_size
    if call.is_varlen:
        cu_q = call.cu_seqlens_q.tolist()
        cu_k = call.cu_seqlens_k.tolist()
        slot_of, keys, first = {}, [], 0
        for i in range(len(cu_q) - 1):
            nblk = -(-(cu_k[i + 1] - cu_k[i]) // bs)
            for n in range(nblk):
                slot_of[(i, n)] = first + n
                keys.append((cu_k[i] + n * bs, cu_k[i + 1], cu_k[i]))
            first += nblk
        seq_of = [next(i for i in range(len(cu_q) - 1) if cu_q[i] <= t < cu_q[i + 1]) for t in range(TQ)]
    else:
        nblk = -(-call.seqlen_k // bs)
        slot_of = {(0, n): n for n in range(nblk)}
        keys = [(n * bs, call.seqlen_k, 0) for n in range(nblk)]
        seq_of = [0] * TQ
    lists = {}
    for b in range(B):
        for t in range(TQ):
            for h in range(H):
                for blk in blocks[b, t, h].tolist():
                    if blk >= 0:
                        lists.setdefault((b, h, slot_of[(seq_of[t], blk)]), []).append(t)
    return lists, keys


CASES = [
    dict(B=2, TQ=37, TK=37, H=3, S=5, block_size=8),
    dict(B=1, TQ=20, TK=70, H=2, S=4, block_size=16),                 # TQ < TK
    dict(seqlens=[5, 19, 1, 33], seqlens_k=[9, 19, 30, 33], H=2, S=6, block_size=8),
    dict(B=1, TQ=16, TK=16, H=1, S=3, block_size=4, block_counts="tensor"),
    dict(B=1, TQ=12, TK=40, H=2, S=4, block_size=8, block_counts=0),  # every row empty
]


@pytest.mark.parametrize("kw", CASES)
def test_index_matches_python_construction(kw):
    case = make_case(HQ=kw.get("H", 1) * 2, Dk=8, **kw)
    call = _call(case)
    geometry = row_geometry(call)
    blocks, num_blocks = canonical_blocks_torch(call, geometry)
    index = build_inverse_index(call, geometry, blocks, num_blocks)
    lists, keys = _python_index(call, blocks)
    B, TQ, H, S = blocks.shape
    assert index.capacity == blocks.numel()
    assert index.offsets[-1].item() == int(num_blocks.sum())
    nonempty = 0
    for b in range(B):
        for h in range(H):
            for slot in range(index.slots):
                i = (b * H + h) * index.slots + slot
                lo, hi = index.offsets[i].item(), index.offsets[i + 1].item()
                got = index.tokens[lo:hi].tolist()
                assert got == lists.get((b, h, slot), []), (b, h, slot)
                for e in range(lo, hi):    # each entry points back at its place in the rows
                    flat = index.entries[e].item()
                    t, s = (flat // S) // H % TQ, flat % S
                    assert (flat // S) // H // TQ == b and (flat // S) % H == h
                    assert t == index.tokens[e].item()
                    assert blocks[b, t, h, s].item() >= 0
                    if not call.is_varlen:
                        assert blocks[b, t, h, s].item() == slot
                nonempty += bool(got)
    assert nonempty == len(lists)
    for slot in range(index.slots):
        want = keys[slot] if slot < len(keys) else (0, 0, 0)
        got = (index.slot_key_start[slot].item(), index.slot_key_end[slot].item(),
               index.slot_seq_start[slot].item())
        assert got == want, slot


@pytest.mark.parametrize("per_item", [1, 3, 16])
def test_work_items_cut_every_list_in_order(kernels_here, per_item):
    case = make_case(B=2, TQ=40, TK=40, HQ=4, H=2, Dk=8, S=6, block_size=8, seed=3,
                     device=kernels_here)
    call = _call(case)
    geometry = row_geometry(call)
    blocks, num_blocks = canonical_blocks_torch(call, geometry)
    index = build_inverse_index(call, geometry, blocks, num_blocks)
    items = work_items(index, per_item)
    assert items.max_items == -(-index.capacity // per_item) + index.num_buckets
    for bucket in range(index.num_buckets):
        lo, hi = index.offsets[bucket].item(), index.offsets[bucket + 1].item()
        first, n = items.first_item[bucket].item(), items.num_items[bucket].item()
        assert n == -(-(hi - lo) // per_item)
        covered = []
        for i in range(first, first + n):
            assert items.bucket[i].item() == bucket
            covered.extend(range(items.start[i].item(), items.end[i].item()))
            assert 0 < items.end[i].item() - items.start[i].item() <= per_item
        assert covered == list(range(lo, hi))
    used = int(items.num_items.sum())
    assert used <= items.max_items
    assert (items.bucket[used:] == index.num_buckets).all()
