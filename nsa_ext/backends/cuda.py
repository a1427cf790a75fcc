"""The CUDA extension backend: nsa_ext._C's tensor-core kernel (fp16/bf16) and its fp32 path.

The kernel reads each row's selected set in canonical form (nsa_ext.selection.canonical_blocks:
sorted, de-duplicated, -1 padded, causally trimmed) and each query's absolute position and key
offset (row_geometry); this module computes both, then calls
`torch.ops.nsa_ext_cuda.selection_fwd`. It has no backward: the dispatcher's autograd recomputes
gradients through packed SDPA.
"""
from __future__ import annotations

from typing import List

import torch

from .. import _ext
from ..call import SelectionCall
from ..selection import canonical_blocks, row_geometry

NAME = "cuda"

# ADR-2025-08-M4-02: the kernel paths stay off on SM 8.9 (RTX 4090) unless forced.
_SM89 = (8, 9)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _arch_served(sm, archs) -> bool:
    """Does a build for `archs` (["8.0", "9.0+PTX", "9.0a"]) run on compute capability `sm`?
    Machine code runs on its own major version at an equal or higher minor; PTX is JIT-compiled
    for any newer GPU. An arch-specific build (9.0a) runs only on exactly that GPU."""
    for arch in archs:
        text = str(arch)
        ptx = text.endswith("+PTX")
        text = text.replace("+PTX", "")
        specific = text.endswith("a")
        major, minor = (int(x) for x in text.rstrip("a").split("."))
        if specific:
            if tuple(sm) == (major, minor):
                return True
        elif ptx and tuple(sm) >= (major, minor):
            return True
        elif sm[0] == major and sm[1] >= minor:
            return True
    return False


def reasons_unsupported(call: SelectionCall, settings, facts) -> List[str]:
    if not _ext.available():
        return [f"extension not available: {_ext.unavailable_reason()} "
                f"(see python -m nsa_ext.info)"]
    reasons = []
    info = _ext.build_info()
    if facts.kind != "cuda":
        reasons.append(f"device {facts.kind}: the CUDA backend needs a CUDA device")
    elif facts.sm is None or tuple(facts.sm) < (8, 0):
        reasons.append(f"compute capability {facts.sm}: the kernel needs SM 8.0 or newer "
                       f"(mma.sync bf16, cp.async)")
    else:
        archs = info.get("archs", [])
        if not _arch_served(facts.sm, archs):
            reasons.append(f"built for archs {';'.join(archs)}, none runs on SM "
                           f"{facts.sm[0]}.{facts.sm[1]} ({facts.name}); rebuild with "
                           f"NSA_EXT_CUDA_ARCHS={facts.sm[0]}.{facts.sm[1]}")
        if tuple(facts.sm) == _SM89 and not settings.triton_sel_force:
            reasons.append("SM 8.9 (RTX 4090): kernel paths are off by ADR-2025-08-M4-02; "
                           "set NSA_TRITON_SEL_FORCE=1 to use them")
    min_len = settings.min_len("cuda", facts.arch)
    if call.selected_len < min_len:
        reasons.append(f"selected length {call.selected_len} tokens per row is below "
                       f"NSA_SEL_CUDA_MIN_L={min_len} (packed SDPA is faster there)")
    if call.dtype in _HALF_DTYPES:
        pairs = [tuple(p) for p in info.get("head_dims", [])]
        if (call.head_dim_qk, call.head_dim_v) not in pairs:
            built = ", ".join(f"{dk}/{dv}" for dk, dv in pairs)
            reasons.append(f"head dims Dk={call.head_dim_qk}, Dv={call.head_dim_v}: no "
                           f"{str(call.dtype).replace('torch.', '')} kernel instance "
                           f"(built Dk/Dv: {built})")
        if call.head_dim_qk % 8 or call.head_dim_v % 8:
            reasons.append(f"head dims Dk={call.head_dim_qk}, Dv={call.head_dim_v}: must be "
                           f"multiples of 8 (16-byte loads)")
    elif call.dtype == torch.float32:
        limit = int(info.get("fp32_max_head_dim", 256))
        if call.head_dim_qk > limit or call.head_dim_v > limit:
            reasons.append(f"float32 head dims Dk={call.head_dim_qk}, Dv={call.head_dim_v}: "
                           f"the fp32 kernel takes at most {limit}")
    else:
        reasons.append(f"dtype {str(call.dtype).replace('torch.', '')}: the CUDA backend takes "
                       f"float16, bfloat16 and float32")
    min_block = int(info.get("min_block_size", 16))
    if call.block_size < min_block:
        reasons.append(f"block_size {call.block_size}: the kernel takes powers of two >= "
                       f"{min_block}")
    if call.batch * call.seqlen_q >= 2 ** 31 or call.num_heads_kv >= 65536:
        reasons.append(f"grid too large: B*TQ={call.batch * call.seqlen_q}, "
                       f"H={call.num_heads_kv}")
    return reasons


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.data_ptr() % 16 == 0 else t.clone()


def forward(call: SelectionCall):
    """(o [B, TQ, HQ, Dv] in q's dtype, lse [B, TQ, HQ] float32)."""
    geometry = row_geometry(call)
    blocks, num_blocks = canonical_blocks(call, geometry)
    # The kernel copies rows 16 bytes at a time: contiguous and 16-byte aligned.
    q, k, v = (_aligned(t.contiguous()) for t in (call.q, call.k, call.v))
    pos = geometry.pos.contiguous()
    k_offset = geometry.k_offset.contiguous()
    return torch.ops.nsa_ext_cuda.selection_fwd(q, k, v, blocks.contiguous(),
                                                num_blocks.contiguous(), pos, k_offset,
                                                call.block_size, call.scale)
