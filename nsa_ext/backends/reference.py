"""The fp32 reference as a backend: `backend="reference"` only, never chosen by "auto"."""
from __future__ import annotations

from typing import List, Optional

import torch

from ..call import SelectionCall
from ..reference import reference_forward

NAME = "reference"


def reasons_unsupported(call: SelectionCall, settings, facts) -> List[str]:
    return []


def forward(call: SelectionCall):
    return reference_forward(call)


def backward(call: SelectionCall, grad_o: torch.Tensor, grad_lse: Optional[torch.Tensor]):
    inputs = [t.detach().requires_grad_() for t in (call.q, call.k, call.v)]
    with torch.enable_grad():
        o, lse = reference_forward(_replace_qkv(call, *inputs))
        outputs, grads = [o], [grad_o]
        if grad_lse is not None:
            outputs.append(lse)
            grads.append(torch.where(torch.isfinite(lse), grad_lse.to(lse.dtype), 0))
        return torch.autograd.grad(outputs, inputs, grads)


def _replace_qkv(call, q, k, v):
    from dataclasses import replace
    return replace(call, q=q, k=k, v=v)
