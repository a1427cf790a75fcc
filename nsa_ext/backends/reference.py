"""The fp32 reference as a backend: `backend="reference"` only, never chosen by "auto".

It has no `backward`: an op's implementation runs below autograd, so gradients of a
`backend="reference"` call come from packed SDPA's recomputation (GRADIENTS_BY: plain PyTorch
math, on every device; not the first kernel backend, whose fp32 backward on a GPU would be a
kernel under test and, on first use, an autotuning of fp32 configs). Tests take the reference's
gradients by autograd through `nsa_ext.reference.reference_forward` directly."""
from __future__ import annotations

from typing import List

from ..call import SelectionCall
from ..reference import reference_forward

NAME = "reference"
GRADIENTS_BY = "sdpa"


def reasons_unsupported(call: SelectionCall, settings, facts) -> List[str]:
    return []


def forward(call: SelectionCall):
    return reference_forward(call)


