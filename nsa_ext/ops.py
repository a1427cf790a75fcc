"""The operator behind the API, a torch.library custom op with a fake implementation and a
registered autograd formula, so `selection_attention` traces under torch.compile(fullgraph=True)
with no graph break: validation, dispatch and every data-dependent step (packed SDPA's bucketing,
the kernels' launches) run inside the op; under tracing the fake checks shapes and gives the
output's shape.

`nsa_ext::selection_attention` runs the backend the dispatcher chooses for the call;
`nsa_ext::selection_attention_backward` runs that backend's `backward` when it has one, else
packed SDPA's recomputation. Tensors are in the caller's layout (batch-less varlen included).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .call import SelectionCall, describe_call
from .config import load_settings
from .dispatch import backend_module, backward_backend, choose
from .logs import log_event


def plan(q, k, v, block_indices, block_counts, block_count, cu_seqlens_q, cu_seqlens_k,
         block_size, scale, backend, need_lse):
    """Validate and dispatch: (call, decision)."""
    counts = block_counts if block_counts is not None else block_count
    call = describe_call(q, k, v, block_indices, block_size, block_counts=counts, scale=scale,
                         cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, need_lse=need_lse)
    settings = load_settings()
    decision = choose(call, backend, settings)
    if settings.debug:
        log_event("sel.dispatch", backend=decision.chosen, requested=backend,
                  call=decision.call_summary, device=decision.device,
                  reasons={n: r for n, r in decision.reasons.items() if r},
                  preferences={n: r for n, r in decision.preferences.items() if r})
    return call, decision


def _to_caller_layout(call: SelectionCall, t: Tensor) -> Tensor:
    return (t.squeeze(0) if call.batchless else t).contiguous()


def run_forward(q, k, v, block_indices, block_counts, block_count, cu_seqlens_q, cu_seqlens_k,
                block_size, scale, backend, return_lse):
    """What the operator computes: validate, dispatch, run the chosen backend. The API calls it
    directly, without the operator, where the operator would only add its dispatch cost
    (eager calls that need no gradient, see api.selection_attention)."""
    call, decision = plan(q, k, v, block_indices, block_counts, block_count, cu_seqlens_q,
                          cu_seqlens_k, block_size, scale, backend, return_lse)
    module = backend_module(decision.chosen)
    if decision.tile_backend is None:
        o, lse = module.forward(call)
    else:               # the tile schedule's measured backend (dispatch.CUDA_TILE_KEY)
        tile_module = backend_module(decision.tile_backend)
        o, lse = module.forward(call, tile_runner=tile_module.run_tile,
                                device_runner=tile_module.forward_device_choice)
    lse = _to_caller_layout(call, lse) if return_lse else lse.new_empty(0)
    return _to_caller_layout(call, o), lse


@torch.library.custom_op("nsa_ext::selection_attention", mutates_args=())
def selection_attention_op(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor,
                           block_counts: Optional[Tensor], block_count: Optional[int],
                           cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                           block_size: int, scale: Optional[float], backend: str,
                           return_lse: bool) -> Tuple[Tensor, Tensor]:
    return run_forward(q, k, v, block_indices, block_counts, block_count, cu_seqlens_q,
                       cu_seqlens_k, block_size, scale, backend, return_lse)


@selection_attention_op.register_fake
def _(q, k, v, block_indices, block_counts, block_count, cu_seqlens_q, cu_seqlens_k,
      block_size, scale, backend, return_lse):
    counts = block_counts if block_counts is not None else block_count
    describe_call(q, k, v, block_indices, block_size, block_counts=counts, scale=scale,
                  cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    o = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = q.new_empty(q.shape[:-1] if return_lse else (0,), dtype=lse_dtype)
    return o, lse


@torch.library.custom_op("nsa_ext::selection_attention_backward", mutates_args=())
def selection_attention_backward_op(grad_o: Tensor, grad_lse: Optional[Tensor], o: Optional[Tensor],
                                    lse: Optional[Tensor], q: Tensor,
                                    k: Tensor, v: Tensor, block_indices: Tensor,
                                    block_counts: Optional[Tensor], block_count: Optional[int],
                                    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                                    block_size: int, scale: Optional[float],
                                    backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    call, decision = plan(q, k, v, block_indices, block_counts, block_count, cu_seqlens_q,
                          cu_seqlens_k, block_size, scale, backend, grad_lse is not None)
    module = backend_module(backward_backend(call, decision.chosen))
    if call.batchless:
        grad_o, grad_lse, o, lse = (None if t is None else t.unsqueeze(0)
                                    for t in (grad_o, grad_lse, o, lse))
    dq, dk, dv = module.backward(call, grad_o.contiguous(), grad_lse, o=o, lse=lse)
    return tuple(_to_caller_layout(call, g) for g in (dq, dk, dv))


@selection_attention_backward_op.register_fake
def _(grad_o, grad_lse, o, lse, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, block_indices, block_counts, block_count, cu_seqlens_q, cu_seqlens_k,
     block_size, scale, backend, return_lse) = inputs
    o, lse = output
    # The forward's o and lse spare a kernel backward its recomputation; lse exists only when
    # the API asked for it (it does whenever gradients are wanted).
    ctx.save_for_backward(q, k, v, block_indices, block_counts, cu_seqlens_q, cu_seqlens_k,
                          o if return_lse else None, lse if return_lse else None)
    ctx.static = (block_count, block_size, scale, backend, return_lse)
    # An unused output's gradient stays None instead of a tensor of zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_o, grad_lse):
    q, k, v, block_indices, block_counts, cu_seqlens_q, cu_seqlens_k, o, lse = ctx.saved_tensors
    block_count, block_size, scale, backend, return_lse = ctx.static
    if grad_o is None:
        grad_o = q.new_zeros(*q.shape[:-1], v.shape[-1])
    if not return_lse:      # the op's lse was an empty placeholder: it has no gradient
        grad_lse = None
    dq, dk, dv = selection_attention_backward_op(
        grad_o, grad_lse, o, lse, q, k, v, block_indices, block_counts, block_count,
        cu_seqlens_q, cu_seqlens_k, block_size, scale, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


selection_attention_op.register_autograd(_backward, setup_context=_setup_context)
