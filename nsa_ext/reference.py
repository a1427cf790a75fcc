"""The fp32 reference of SPEC.md: the only other statement of the contract.

Dense and plain on purpose: for each sequence it builds the full boolean mask of which key each
query may see (block membership as a set, causal, in range) and runs a masked softmax in fp32
(fp64 when given fp64, for gradcheck). Memory is O(TQ * HQ * TK) per sequence: for tests, not
for production. It is differentiable in q, k and v.
"""
from __future__ import annotations

import math

import torch

from .call import SelectionCall


def _visible_keys(block_indices, counts, seqlen_q: int, seqlen_k: int, block_size: int):
    """Boolean [tq, H, tk]: may query t of KV-head h see key j? `counts` is [tq, H] or None."""
    tq, H, S = block_indices.shape
    device = block_indices.device
    num_blocks = math.ceil(seqlen_k / block_size)
    idx = block_indices.to(torch.int64)
    valid = (idx >= 0) & (idx < num_blocks)
    if counts is not None:
        valid &= torch.arange(S, device=device) < counts.to(torch.int64).unsqueeze(-1)
    # Membership as a set: scattering True twice for a repeat is still True. Invalid entries
    # land in a spare column that is cut off.
    member = torch.zeros(tq, H, num_blocks + 1, dtype=torch.bool, device=device)
    member.scatter_(2, torch.where(valid, idx, num_blocks), True)
    member = member[..., :num_blocks]
    key = torch.arange(seqlen_k, device=device)
    pos = seqlen_k - seqlen_q + torch.arange(seqlen_q, device=device)
    causal = key[None, :] <= pos[:, None]                                  # [tq, tk]
    return member[:, :, key // block_size] & causal[:, None, :]


def _attend(q, k, v, visible, scale: float):
    """q [tq, HQ, Dk], k [tk, H, Dk], v [tk, H, Dv], visible [tq, H, tk] -> o, lse (compute dtype)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    visible = visible.repeat_interleave(group, dim=1)                       # [tq, HQ, tk]
    scores = torch.einsum("thd,shd->ths", q, k) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.where(visible, torch.exp(scores - row_max), torch.zeros_like(scores))
    denom = weights.sum(dim=-1, keepdim=True)
    # Empty rows: o = 0 and lse = -inf, with no 0/0 anywhere (also in the backward pass).
    safe_denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    o = torch.einsum("ths,shd->thd", weights / safe_denom, v)
    lse = torch.where(denom > 0, torch.log(safe_denom) + row_max,
                      torch.full_like(denom, float("-inf"))).squeeze(-1)
    return o, lse


def reference_forward(call: SelectionCall):
    """(o, lse) for `call`: o in q's dtype, lse in float32 (float64 for float64 inputs)."""
    compute = torch.float64 if call.dtype == torch.float64 else torch.float32
    q, k, v = (t.to(compute) for t in (call.q, call.k, call.v))
    B, TQ, HQ = call.batch, call.seqlen_q, call.num_heads_q
    if call.is_varlen:
        cu_q = call.cu_seqlens_q.tolist()
        cu_k = call.cu_seqlens_k.tolist()
        pieces = [(0, cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]) for i in range(len(cu_q) - 1)]
    else:
        pieces = [(b, 0, TQ, 0, call.seqlen_k) for b in range(B)]
    o_parts, lse_parts = [], []
    for b, q0, q1, k0, k1 in pieces:
        if q1 == q0:
            continue
        counts = None
        if call.block_counts is not None:
            counts = call.block_counts[b, q0:q1]
        elif call.block_count_limit < call.num_selected:
            counts = torch.full((q1 - q0, call.num_heads_kv), call.block_count_limit,
                                device=call.device)
        visible = _visible_keys(call.block_indices[b, q0:q1], counts, q1 - q0, k1 - k0,
                                call.block_size)
        o_seq, lse_seq = _attend(q[b, q0:q1], k[b, k0:k1], v[b, k0:k1], visible, call.scale)
        o_parts.append(o_seq)
        lse_parts.append(lse_seq)
    if call.is_varlen:
        o = torch.cat(o_parts).unsqueeze(0)
        lse = torch.cat(lse_parts).unsqueeze(0)
    else:
        o = torch.stack(o_parts)
        lse = torch.stack(lse_parts)
    return o.to(call.dtype), lse.to(compute if compute == torch.float64 else torch.float32)
