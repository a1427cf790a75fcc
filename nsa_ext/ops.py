"""The operators behind the API, as torch.library custom ops with fake implementations and a
registered autograd formula, so `selection_attention` traces under torch.compile(fullgraph=True)
with no graph break: the data-dependent parts (packed SDPA's bucketing, the kernels' launches)
live inside the ops.

`nsa_ext::selection_forward` runs the backend the dispatcher chose (its name is an argument);
`nsa_ext::selection_backward` runs that backend's `backward` when it has one, else packed SDPA's
recomputation. Tensors arrive in the call's normalized layout ([B, T, heads, dim]; varlen B == 1).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .call import SelectionCall
from .dispatch import backend_module


def _call(q, k, v, block_indices, block_counts, block_count_limit, cu_seqlens_q, cu_seqlens_k,
          block_size, scale, need_lse) -> SelectionCall:
    # Arguments were validated by describe_call before the op was entered.
    return SelectionCall(q=q, k=k, v=v, block_indices=block_indices, block_counts=block_counts,
                         block_count_limit=block_count_limit, block_size=block_size, scale=scale,
                         cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, batchless=False,
                         need_lse=need_lse)


@torch.library.custom_op("nsa_ext::selection_forward", mutates_args=())
def selection_forward(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor,
                      block_counts: Optional[Tensor], block_count_limit: int,
                      cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                      block_size: int, scale: float, backend: str,
                      need_lse: bool) -> Tuple[Tensor, Tensor]:
    call = _call(q, k, v, block_indices, block_counts, block_count_limit, cu_seqlens_q,
                 cu_seqlens_k, block_size, scale, need_lse)
    o, lse = backend_module(backend).forward(call)
    if not need_lse:
        lse = lse.new_empty(0)
    return o.contiguous(), lse.contiguous()


@selection_forward.register_fake
def _(q, k, v, block_indices, block_counts, block_count_limit, cu_seqlens_q, cu_seqlens_k,
      block_size, scale, backend, need_lse):
    B, TQ, HQ, _ = q.shape
    o = q.new_empty(B, TQ, HQ, v.shape[-1])
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = q.new_empty((B, TQ, HQ) if need_lse else (0,), dtype=lse_dtype)
    return o, lse


@torch.library.custom_op("nsa_ext::selection_backward", mutates_args=())
def selection_backward(grad_o: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor,
                       v: Tensor, block_indices: Tensor, block_counts: Optional[Tensor],
                       block_count_limit: int, cu_seqlens_q: Optional[Tensor],
                       cu_seqlens_k: Optional[Tensor], block_size: int, scale: float,
                       backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    call = _call(q, k, v, block_indices, block_counts, block_count_limit, cu_seqlens_q,
                 cu_seqlens_k, block_size, scale, grad_lse is not None)
    module = backend_module(backend)
    if not hasattr(module, "backward"):
        module = backend_module("sdpa")
    dq, dk, dv = module.backward(call, grad_o.contiguous(), grad_lse)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@selection_backward.register_fake
def _(grad_o, grad_lse, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)



def _setup_context(ctx, inputs, output):
    (q, k, v, block_indices, block_counts, block_count_limit, cu_seqlens_q, cu_seqlens_k,
     block_size, scale, backend, need_lse) = inputs
    ctx.save_for_backward(q, k, v, block_indices, block_counts, cu_seqlens_q, cu_seqlens_k)
    ctx.static = (block_count_limit, block_size, scale, backend, need_lse)


def _backward(ctx, grad_o, grad_lse):
    q, k, v, block_indices, block_counts, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    block_count_limit, block_size, scale, backend, need_lse = ctx.static
    if grad_o is None:
        grad_o = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    if not need_lse:
        grad_lse = None
    dq, dk, dv = selection_backward(grad_o, grad_lse, q, k, v, block_indices, block_counts,
                                    block_count_limit, cu_seqlens_q, cu_seqlens_k, block_size,
                                    scale, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


selection_forward.register_autograd(_backward, setup_context=_setup_context)
