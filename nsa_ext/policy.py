"""Device policy shared by the kernel paths (Triton and the CUDA extension), stated once.

- SM 8.0 or newer: both kernels rely on bf16 tensor-core mma and asynchronous copies.
- SM 8.9 (RTX 4090): ADR-2025-08-M4-02 measured packed SDPA faster than the kernel paths there,
  so they stay off unless NSA_TRITON_SEL_FORCE=1 (runtime.triton_sel_force) asks for them.
"""
from __future__ import annotations

from typing import List

ADR_SM89 = "ADR-2025-08-M4-02"


def kernel_path_reasons(facts, settings, path: str) -> List[str]:
    """Why the kernel `path` ("Triton kernel", "CUDA extension") may not run on this GPU."""
    if facts.kind != "cuda" or facts.sm is None:
        return []            # not a CUDA device: each backend says so in its own terms
    reasons = []
    if tuple(facts.sm) < (8, 0):
        reasons.append(f"GPU {facts.describe()}: the {path} needs SM 8.0 or newer "
                       f"(bf16 tensor-core mma, cp.async)")
    if tuple(facts.sm) == (8, 9) and not settings.triton_sel_force:
        reasons.append(f"GPU is SM 8.9: {ADR_SM89} keeps the kernel paths off there (packed SDPA "
                       f"measured faster); set NSA_TRITON_SEL_FORCE=1 (runtime.triton_sel_force) "
                       f"to use the {path}")
    return reasons
