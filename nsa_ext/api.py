"""The public call: validate -> dispatch -> run (autograd through nsa_ext.ops)."""
from __future__ import annotations

from .call import BACKEND_NAMES, describe_call
from .config import load_settings
from .dispatch import Decision, choose, decide
from .logs import log_event
from . import ops


def _check_backend(backend) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {', '.join(BACKEND_NAMES)}, got {backend!r}")


def selection_attention(q, k, v, block_indices, block_size=64, *, block_counts=None, scale=None,
                        cu_seqlens_q=None, cu_seqlens_k=None, backend="auto", return_lse=False):
    """NSA selection attention (SPEC.md): each query attends to the KV blocks selected for its
    KV-head group.

    Args:
        q: [B, TQ, HQ, Dk] fp16/bf16/fp32 (varlen: [1, total_q, HQ, Dk] or [total_q, HQ, Dk]).
        k: [B, TK, H, Dk], same dtype and device; HQ % H == 0, G = HQ // H.
        v: [B, TK, H, Dv]; Dv may differ from Dk.
        block_indices: [B, TQ, H, S] int32/int64: the selected block numbers of each
            (query, KV head); a set: -1 padding, out-of-range entries and repeats are ignored.
        block_size: tokens per KV block, a positive power of two.
        block_counts: None (all S entries), an int, or a [B, TQ, H] integer tensor: only the
            first block_counts entries of a row are used.
        scale: softmax scale; None means Dk ** -0.5.
        cu_seqlens_q, cu_seqlens_k: [N+1] cumulative sequence lengths for a packed variable-length
            batch (cu_seqlens_k defaults to cu_seqlens_q). Queries are the last TQ key positions.
        backend: "auto", "cuda", "triton", "sdpa" or "reference"; a named backend that cannot
            serve the call raises ValueError saying why (see nsa_ext.explain).
        return_lse: also return lse [B, TQ, HQ] float32 (natural log of the softmax denominator).

    Returns:
        o [B, TQ, HQ, Dv] in q's dtype (in the layout given), and lse when return_lse=True.
        A query that sees no key gets o = 0 and lse = -inf.
    """
    _check_backend(backend)
    call = describe_call(q, k, v, block_indices, block_size, block_counts=block_counts,
                         scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         need_lse=return_lse)
    settings = load_settings()
    decision = choose(call, backend, settings)
    if settings.debug:
        log_event("sel.dispatch", backend=decision.chosen, requested=backend,
                  call=decision.call_summary, device=decision.device,
                  reasons={n: r for n, r in decision.reasons.items() if r})
    o, lse = ops.selection_forward(call.q, call.k, call.v, call.block_indices, call.block_counts,
                                   call.block_count_limit, call.cu_seqlens_q, call.cu_seqlens_k,
                                   call.block_size, call.scale, decision.chosen, return_lse)
    if call.batchless:
        o = o.squeeze(0)
        lse = lse.squeeze(0) if return_lse else lse
    return (o, lse) if return_lse else o


def explain(q, k, v, block_indices, block_size=64, *, block_counts=None, scale=None,
            cu_seqlens_q=None, cu_seqlens_k=None, backend="auto", return_lse=False) -> Decision:
    """Which backend `selection_attention` would run with these arguments, and why each other
    backend would not. Print it for a readable report; it never raises for an unavailable
    backend (only for invalid arguments)."""
    _check_backend(backend)
    call = describe_call(q, k, v, block_indices, block_size, block_counts=block_counts,
                         scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         need_lse=return_lse)
    return decide(call, backend)
