"""The reference against a plain Python loop that reads SPEC.md word for word."""
import math

import pytest
import torch

from common import make_case
from nsa_ext.call import describe_call
from nsa_ext.reference import reference_forward


def loop_reference(case):
    """o, lse by scalar loops over (sequence, query, head): slow, obvious, float64."""
    q, k, v, bi = (t.double() if t.is_floating_point() else t for t in
                   (case.q, case.k, case.v, case.block_indices))
    batchless = q.dim() == 3
    if batchless:
        q, k, v, bi = q[None], k[None], v[None], bi[None]
    counts = case.block_counts
    if isinstance(counts, torch.Tensor) and batchless:
        counts = counts[None]
    B, TQ, HQ, Dk = q.shape
    H, S, bs = k.shape[2], bi.shape[3], case.block_size
    G = HQ // H
    scale = case.scale if case.scale is not None else Dk ** -0.5
    if case.cu_seqlens_q is not None:
        cu_q = case.cu_seqlens_q.tolist()
        cu_k = (case.cu_seqlens_k if case.cu_seqlens_k is not None else case.cu_seqlens_q).tolist()
        seqs = [(0, cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]) for i in range(len(cu_q) - 1)]
    else:
        seqs = [(b, 0, TQ, 0, k.shape[1]) for b in range(B)]
    o = torch.zeros(B, TQ, HQ, v.shape[3], dtype=torch.float64)
    lse = torch.full((B, TQ, HQ), -math.inf, dtype=torch.float64)
    for b, q0, q1, k0, k1 in seqs:
        tq, tk = q1 - q0, k1 - k0
        nblocks = math.ceil(tk / bs)
        for t in range(tq):
            p = tk - tq + t
            for hq in range(HQ):
                h = hq // G
                limit = S
                if isinstance(counts, int):
                    limit = counts
                elif isinstance(counts, torch.Tensor):
                    limit = int(counts[b, q0 + t, h])
                chosen = set()
                for i, idx in enumerate(bi[b, q0 + t, h].tolist()):
                    if i < limit and 0 <= idx < nblocks:
                        chosen.add(idx)
                keys = [j for j in range(tk) if j // bs in chosen and j <= p]
                if not keys:
                    continue
                s = torch.stack([scale * (q[b, q0 + t, hq] @ k[b, k0 + j, h]) for j in keys])
                w = torch.softmax(s, 0)
                o[b, q0 + t, hq] = sum(w[n] * v[b, k0 + j, h] for n, j in enumerate(keys))
                lse[b, q0 + t, hq] = torch.logsumexp(s, 0)
    if batchless:
        o, lse = o[0], lse[0]
    return o, lse


CASES = {
    "dense_gqa": dict(B=2, TQ=12, HQ=6, H=2, Dk=8, Dv=4, S=5, block_size=4),
    "decode": dict(B=2, TQ=1, TK=19, HQ=3, H=1, Dk=8, S=6, block_size=4),
    "chunked": dict(B=1, TQ=7, TK=21, HQ=2, H=2, Dk=8, S=4, block_size=8),
    "counts_int": dict(B=1, TQ=10, HQ=2, H=1, Dk=8, S=5, block_size=2, block_counts=2),
    "counts_zero": dict(B=1, TQ=6, HQ=2, H=1, Dk=8, S=3, block_size=2, block_counts=0),
    "counts_tensor": dict(B=2, TQ=9, HQ=4, H=2, Dk=8, S=5, block_size=4, block_counts="tensor"),
    "varlen": dict(seqlens=[5, 1, 8], HQ=4, H=2, Dk=8, S=4, block_size=4),
    "varlen_chunked": dict(seqlens=[3, 1, 4], seqlens_k=[9, 1, 4], HQ=2, H=1, Dk=8, S=4, block_size=4),
    "batchless": dict(seqlens=[4, 6], HQ=2, H=1, Dk=8, S=3, block_size=2, batchless=True),
    "scale": dict(B=1, TQ=8, HQ=2, H=1, Dk=8, S=3, block_size=4, scale=0.37),
}


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_python_loop(name):
    case = make_case(seed=sum(map(ord, name)), **CASES[name])
    call = describe_call(*case.args(), **case.kwargs())
    o, lse = reference_forward(call)
    o_loop, lse_loop = loop_reference(case)
    if call.batchless:
        o, lse = o[0], lse[0]
    assert torch.allclose(o.double(), o_loop, atol=1e-5), (o.double() - o_loop).abs().max()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_loop))
    finite = torch.isfinite(lse_loop)
    assert torch.allclose(lse.double()[finite], lse_loop[finite], atol=1e-5)
    # block_counts=0 leaves every row empty; every other case must see keys somewhere.
    assert finite.any() != (name == "counts_zero")


def test_reference_order_of_entries_does_not_matter():
    case = make_case(B=1, TQ=16, HQ=2, H=1, Dk=8, S=6, block_size=4, seed=3)
    o1, _ = reference_forward(describe_call(*case.args()))
    flipped = case.block_indices.flip(-1)
    o2, _ = reference_forward(describe_call(case.q, case.k, case.v, flipped, case.block_size))
    assert torch.allclose(o1, o2, atol=1e-6)
