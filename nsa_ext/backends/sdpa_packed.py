"""Packed SDPA: the portable backend (CPU and GPU, every dtype, every head dim).

A row is one (batch, query position, KV head). Each row's selected set (nsa_ext.selection) is
gathered into a contiguous key/value buffer of `num_blocks * block_size` tokens; rows with the
same number of blocks form a bucket, so a bucket needs no padding beyond the causal tail of the
query's own block (masked). One `scaled_dot_product_attention` call per bucket chunk attends the
G query heads of the row (as SDPA's query length) to its buffer: the group shares one gather.

Memory stays bounded: a bucket is cut into chunks whose gathered K/V (plus the fp32 scores for
lse) fit `Settings.sdpa_gather_budget_mb`, so a 64k-token prefill never gathers everything at once.

Gradients: `backward` recomputes each chunk (attention backward written out in fp32) and
adds dk/dv back in a fixed order (a sort-based index_put_, deterministic on CUDA), so the backward pass is bounded by the same budget. Other backends without a backward
kernel use it too (through nsa_ext.ops).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F

from ..call import SelectionCall
from ..config import load_settings
from ..logs import log_event
from ..selection import canonical_blocks, row_geometry

NAME = "sdpa"


def reasons_unsupported(call: SelectionCall, settings, facts) -> List[str]:
    if facts.kind not in ("cpu", "cuda"):
        return [f"device {facts.kind}: packed SDPA is tested on cpu and cuda only"]
    return []


@dataclass
class _Chunk:
    rows: torch.Tensor         # [R] int64: flat row ids (b * TQ + t) * H + h
    key_index: torch.Tensor    # [R, L] int64: flat index into k/v viewed as [B * TK * H, D]
    visible: torch.Tensor      # [R, L] bool: key inside the causal limit


class _Plan:
    """Rows bucketed by their number of selected blocks, and the geometry to gather them."""

    def __init__(self, call: SelectionCall):
        geometry = row_geometry(call)
        blocks, num_blocks = canonical_blocks(call, geometry)
        H = call.num_heads_kv
        self.call = call
        self.blocks = blocks.reshape(-1, call.num_selected).to(torch.int64)   # [rows, S]
        self.num_blocks = num_blocks.reshape(-1)                               # [rows]
        # Per row: absolute query position, key-sequence length and first key's flat token.
        batch_base = (torch.arange(call.batch, device=call.device) * call.seqlen_k)[:, None]
        self.pos = geometry.pos.reshape(-1).repeat_interleave(H)
        self.seqlen_k = geometry.seqlen_k.reshape(-1).repeat_interleave(H)
        self.token_base = (geometry.k_offset + batch_base).reshape(-1).repeat_interleave(H)
        self.head = torch.arange(H, device=call.device).repeat(call.batch * call.seqlen_q)
        # One host sync: the bucket sizes decide the Python loop below.
        self.counts = torch.bincount(self.num_blocks.to(torch.int64),
                                     minlength=call.num_selected + 1).tolist()
        self.order = torch.argsort(self.num_blocks, stable=True)

    def chunks(self, budget_bytes: int) -> Iterator[_Chunk]:
        call = self.call
        bs = call.block_size
        elem = call.q.element_size()
        start = self.counts[0]                       # rows with no block come first: skipped
        token_in_block = torch.arange(bs, device=call.device)
        for n in range(1, len(self.counts)):
            count = self.counts[n]
            if count == 0:
                continue
            length = n * bs
            # K + V gathered (input dtype) and the fp32 scores for lse, per row.
            per_row = length * (call.head_dim_qk + call.head_dim_v) * elem + \
                length * call.group_size * 4 * 5
            rows_per_chunk = max(1, budget_bytes // per_row)
            bucket = self.order[start:start + count]
            start += count
            for lo in range(0, count, rows_per_chunk):
                rows = bucket[lo:lo + rows_per_chunk]
                tokens = (self.blocks[rows, :n, None] * bs + token_in_block).reshape(len(rows), length)
                visible = tokens <= self.pos[rows, None]
                # Masked tokens past the sequence end are clamped so the gather never leaves it.
                tokens = torch.minimum(tokens, self.seqlen_k[rows, None] - 1)
                key_index = (self.token_base[rows, None] + tokens) * call.num_heads_kv + \
                    self.head[rows, None]
                yield _Chunk(rows, key_index, visible)


def _attend_chunk(call: SelectionCall, q_rows, k_flat, v_flat, chunk: _Chunk, need_lse: bool):
    """o [R, G, Dv] (and lse [R, G] fp32) for one chunk; differentiable in its inputs."""
    R, L = chunk.key_index.shape
    q_sel = q_rows[chunk.rows]                                       # [R, G, Dk]
    k_sel = k_flat[chunk.key_index.reshape(-1)].reshape(R, L, -1)    # [R, L, Dk]
    v_sel = v_flat[chunk.key_index.reshape(-1)].reshape(R, L, -1)    # [R, L, Dv]
    mask = chunk.visible[:, None, None, :]                           # [R, 1, 1, L]
    o = F.scaled_dot_product_attention(q_sel.unsqueeze(1), k_sel.unsqueeze(1), v_sel.unsqueeze(1),
                                       attn_mask=mask, scale=call.scale).squeeze(1)
    lse = None
    if need_lse:
        compute = torch.float64 if q_sel.dtype == torch.float64 else torch.float32
        scores = torch.einsum("rgd,rld->rgl", q_sel.to(compute), k_sel.to(compute)) * call.scale
        lse = scores.masked_fill(~chunk.visible[:, None, :], float("-inf")).logsumexp(-1)
    return o, lse


def _flat_inputs(call: SelectionCall):
    G, H = call.group_size, call.num_heads_kv
    q_rows = call.q.reshape(-1, G, call.head_dim_qk)                 # row (b*TQ+t)*H+h -> [G, Dk]
    k_flat = call.k.reshape(-1, call.head_dim_qk)                    # (b*TK+j)*H+h -> [Dk]
    v_flat = call.v.reshape(-1, call.head_dim_v)
    return q_rows, k_flat, v_flat


def _budget(settings) -> int:
    return settings.sdpa_gather_budget_mb * (1 << 20)


def forward(call: SelectionCall):
    settings = load_settings()
    plan = _Plan(call)
    q_rows, k_flat, v_flat = _flat_inputs(call)
    num_rows = q_rows.shape[0]
    o = q_rows.new_zeros(num_rows, call.group_size, call.head_dim_v)
    lse_dtype = torch.float64 if call.dtype == torch.float64 else torch.float32
    lse = torch.full((num_rows, call.group_size), float("-inf"), dtype=lse_dtype, device=call.device)
    gathered = 0
    with torch.no_grad():
        for chunk in plan.chunks(_budget(settings)):
            o_chunk, lse_chunk = _attend_chunk(call, q_rows, k_flat, v_flat, chunk, call.need_lse)
            o.index_copy_(0, chunk.rows, o_chunk)
            if lse_chunk is not None:
                lse.index_copy_(0, chunk.rows, lse_chunk)
            gathered += chunk.key_index.numel()
    if settings.debug:
        log_event("sel.sdpa.buckets", rows=num_rows,
                  buckets={n * call.block_size: c for n, c in enumerate(plan.counts) if c},
                  kv_tokens_gathered=gathered, budget_mb=settings.sdpa_gather_budget_mb)
    shape = (call.batch, call.seqlen_q, call.num_heads_q)
    return o.reshape(*shape, call.head_dim_v), lse.reshape(shape)


def _chunk_gradients(call, q_sel, k_sel, v_sel, visible, grad_o, grad_lse):
    """Attention backward for one gathered chunk, written out (fp32): recomputes P from the
    scores, then dS = P * (dO V^T - rowsum(dO * O) + dlse). Written by hand because an op's
    implementation runs below autograd, where torch.autograd.grad cannot be used."""
    acc = torch.float64 if call.dtype == torch.float64 else torch.float32
    q_sel, k_sel, v_sel, grad_o = (t.to(acc) for t in (q_sel, k_sel, v_sel, grad_o))
    scores = torch.einsum("rgd,rld->rgl", q_sel, k_sel) * call.scale
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)                  # every chunk row sees >= 1 key
    o = torch.einsum("rgl,rld->rgd", probs, v_sel)
    d_probs = torch.einsum("rgd,rld->rgl", grad_o, v_sel)
    d_scores = probs * (d_probs - (grad_o * o).sum(-1, keepdim=True))
    if grad_lse is not None:
        d_scores = d_scores + probs * grad_lse.to(acc)[..., None]
    dq = torch.einsum("rgl,rld->rgd", d_scores, k_sel) * call.scale
    dk = torch.einsum("rgl,rgd->rld", d_scores, q_sel) * call.scale
    dv = torch.einsum("rgl,rgd->rld", probs, grad_o)
    return dq, dk, dv


def backward(call: SelectionCall, grad_o: torch.Tensor, grad_lse: Optional[torch.Tensor],
             o: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None):
    """(dq, dk, dv) by recomputing each chunk; fp32 accumulation for dk, dv in a fixed order.
    The forward's `o` and `lse` are not needed: each chunk recomputes its own."""
    settings = load_settings()
    plan = _Plan(call)
    q_rows, k_flat, v_flat = _flat_inputs(call)
    G = call.group_size
    grad_o_rows = grad_o.reshape(-1, G, call.head_dim_v)
    grad_lse_rows = None if grad_lse is None else grad_lse.reshape(-1, G)
    acc = torch.float64 if call.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q_rows.shape, dtype=call.dtype, device=call.device)
    dk = torch.zeros(k_flat.shape, dtype=acc, device=call.device)
    dv = torch.zeros(v_flat.shape, dtype=acc, device=call.device)
    for chunk in plan.chunks(_budget(settings)):
        R, L = chunk.key_index.shape
        flat_index = chunk.key_index.reshape(-1)
        dq_sel, dk_sel, dv_sel = _chunk_gradients(
            call, q_rows[chunk.rows], k_flat[flat_index].reshape(R, L, -1),
            v_flat[flat_index].reshape(R, L, -1), chunk.visible, grad_o_rows[chunk.rows],
            None if grad_lse_rows is None else grad_lse_rows[chunk.rows])
        dq.index_copy_(0, chunk.rows, dq_sel.to(call.dtype))
        # Clamped (masked) tokens have zero gradient, so adding them is harmless. index_put_ with
        # accumulate=True sorts the indices and adds each index's values in that fixed order on
        # CUDA (index_add_ would use atomics there: last bits varying run to run); chunks run in
        # order on the stream, so the whole sum is deterministic.
        dk.index_put_((flat_index,), dk_sel.reshape(R * L, -1), accumulate=True)
        dv.index_put_((flat_index,), dv_sel.reshape(R * L, -1), accumulate=True)
    return (dq.reshape(call.q.shape), dk.to(call.dtype).reshape(call.k.shape),
            dv.to(call.dtype).reshape(call.v.shape))
