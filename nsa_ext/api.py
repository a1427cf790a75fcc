"""The public call: validate -> dispatch -> run, all inside the `nsa_ext::selection_attention`
operator (nsa_ext/ops.py), so the call is one opaque node under torch.compile."""
from __future__ import annotations

import dataclasses
import numbers

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .call import BACKEND_NAMES, describe_call
from .config import load_settings
from .device import device_facts
from .dispatch import Decision, backend_module, decide
from . import eager_plan, ops


def _op_arguments(q, k, v, block_indices, block_size, block_counts, scale, cu_seqlens_q,
                  cu_seqlens_k, backend):
    """Split block_counts into the op's (tensor, int) pair. Arguments the op's schema cannot
    carry (a float block_size, a string scale, ...) get describe_call's error here."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {', '.join(BACKEND_NAMES)}, got {backend!r}")
    integral = (lambda x: isinstance(x, numbers.Integral) and not isinstance(x, bool))
    schema_ok = (integral(block_size)
                 and (block_counts is None or isinstance(block_counts, torch.Tensor) or integral(block_counts))
                 and (scale is None or (isinstance(scale, numbers.Real) and not isinstance(scale, bool)))
                 and all(isinstance(t, torch.Tensor) for t in (q, k, v, block_indices))
                 and all(c is None or isinstance(c, torch.Tensor) for c in (cu_seqlens_q, cu_seqlens_k)))
    if not schema_ok:
        describe_call(q, k, v, block_indices, block_size, block_counts=block_counts, scale=scale,
                      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        raise ValueError("selection_attention: an argument has a type the operator cannot take")
    if isinstance(block_counts, torch.Tensor):
        return block_counts, None, None if scale is None else float(scale)
    return None, None if block_counts is None else int(block_counts), None if scale is None else float(scale)


def _plain_eager(*args) -> bool:
    """True where the custom op would add nothing but its own dispatch (~10 us of host time a
    call): not traced by torch.compile, no dispatch or function mode active (FakeTensorMode,
    FlopCounterMode, ...), no functorch transform, and plain tensors (no subclass)."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or \
            torch._C._is_torch_function_mode_enabled() or \
            torch._C._are_functorch_transforms_active():
        return False
    return all(type(a) is torch.Tensor for a in args if isinstance(a, torch.Tensor))


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
    counts_tensor, counts_int, scale = _op_arguments(q, k, v, block_indices, block_size,
                                                     block_counts, scale, cu_seqlens_q,
                                                     cu_seqlens_k, backend)
    # With gradients wanted, lse is computed too (kernels write it anyway): the backward then
    # reuses the forward's o and lse instead of recomputing them.
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    arguments = (q, k, v, block_indices, counts_tensor, counts_int, cu_seqlens_q, cu_seqlens_k,
                 int(block_size), scale, backend, bool(return_lse) or wants_grad)
    if not wants_grad and _plain_eager(q, k, v, block_indices, counts_tensor, cu_seqlens_q,
                                       cu_seqlens_k):
        # The operator's own computation without the operator: same validation, dispatch and
        # kernels, minus its dispatch cost; gradients and tracing always go through the operator.
        # A call whose metadata was seen before launches from its plan (nsa_ext/eager_plan.py).
        planned = None
        if counts_tensor is None and cu_seqlens_q is None and cu_seqlens_k is None:
            planned = eager_plan.run(q, k, v, block_indices, counts_int, int(block_size), scale,
                                     backend, arguments[-1])
        if planned is not None:
            o, lse = planned
            return (o, lse) if return_lse else o
        o, lse = ops.run_forward(*arguments)
    else:
        o, lse = ops.selection_attention_op(*arguments)
    return (o, lse) if return_lse else o


def explain(q, k, v, block_indices, block_size=64, *, block_counts=None, scale=None,
            cu_seqlens_q=None, cu_seqlens_k=None, backend="auto", return_lse=False) -> Decision:
    """Which backend `selection_attention` would run with these arguments, and why each other
    backend would not. Print it for a readable report; it never raises for an unavailable
    backend (only for invalid arguments)."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {', '.join(BACKEND_NAMES)}, got {backend!r}")
    call = describe_call(q, k, v, block_indices, block_size, block_counts=block_counts,
                         scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         need_lse=return_lse)
    decision = decide(call, backend)
    describe = getattr(backend_module(decision.chosen), "explain_schedule", None) \
        if decision.chosen else None
    if describe is not None:          # the chosen backend's schedule and why (may sync)
        settings, facts = load_settings(), device_facts(call.device)
        lines = describe(call, settings, facts, tile_backend=decision.tile_backend)
        decision = dataclasses.replace(decision, details={decision.chosen: lines})
    return decision
