"""The CUDA extension backend: nsa_ext._C's tensor-core kernel (fp16/bf16) and its fp32 path.

The kernel reads each row's selected set in canonical form (nsa_ext.selection.canonical_blocks:
sorted, de-duplicated, -1 padded, causally trimmed) and each query's absolute position and key
offset (row_geometry); this module computes both, then calls
`torch.ops.nsa_ext_cuda.selection_fwd`. It has no backward: the dispatcher's autograd recomputes
gradients through packed SDPA.

Decode (TQ = 1, or a few, small B) has too few rows to fill the GPU: below SPLIT_BELOW_WAVES waves
of thread blocks over the SMs the op is asked to cut each row's entries into `num_splits` slices
(split-KV) and merge them; the count follows from shapes and the SM count only, so a decode step
stays capturable in a CUDA graph.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional

import torch

from .. import _ext
from ..call import SelectionCall
from ..device import device_facts
from ..policy import kernel_path_reasons
from ..selection import canonical_blocks, row_geometry

NAME = "cuda"

# ADR-2025-08-M4-02: the kernel paths stay off on SM 8.9 (RTX 4090) unless forced.
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
    elif facts.sm is None:
        reasons.append("compute capability unknown: the kernel needs SM 8.0 or newer")
    else:
        policy = kernel_path_reasons(facts, settings, "CUDA extension")
        reasons.extend(policy)
        archs = info.get("archs", [])
        if tuple(facts.sm) >= (8, 0) and not _arch_served(facts.sm, archs):
            reasons.append(f"built for archs {';'.join(archs)}, none runs on SM "
                           f"{facts.sm[0]}.{facts.sm[1]} ({facts.name}); rebuild with "
                           f"NSA_EXT_CUDA_ARCHS={facts.sm[0]}.{facts.sm[1]}")
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


def auto_preferences(call: SelectionCall, settings, facts) -> List[str]:
    """Why `auto` prefers another backend for a call the kernel can compute (a named
    backend="cuda" runs it anyway): the length threshold only steers auto."""
    min_len = settings.min_len("cuda", facts.arch)
    if call.selected_len < min_len:
        return [f"selected length {call.selected_len} tokens per row is below the CUDA threshold "
                f"{min_len} (NSA_SEL_CUDA_MIN_L / runtime.sel_cuda_min_L): packed SDPA measured "
                f"faster there"]
    return []


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.data_ptr() % 16 == 0 else t.clone()


# Below this many waves of thread blocks over the SMs the kernel splits each row's entries
# (the same bound as nsa_ext/backends/triton.py's).
SPLIT_BELOW_WAVES = 4


def _choose_num_splits_here(work_items: int, num_entries: int, sm_count: int) -> int:
    """triton_ref.selection_split.choose_num_splits without Triton: at most one wave of thread
    blocks, at most one slice per entry, no empty slice."""
    if num_entries <= 1 or sm_count <= 0:
        return 1
    wanted = sm_count // max(work_items, 1)
    splits = max(1, min(wanted, num_entries))
    return -(-num_entries // -(-num_entries // splits))


@functools.lru_cache(maxsize=None)
def _split_chooser() -> Callable[[int, int, int], int]:
    try:
        from triton_ref.selection_split import choose_num_splits
    except ImportError:
        return _choose_num_splits_here
    return choose_num_splits


def row_tiles(call: SelectionCall) -> int:
    """Thread blocks per (query token, KV head) without splitting: the tensor-core kernel takes
    up to 32 query heads in one block and 64 per block past that (32 when Dv > 128); the fp32
    kernel one block per row."""
    G = call.group_size
    if call.dtype == torch.float32 or G <= 32:
        return 1
    return -(-G // (64 if call.head_dim_v <= 128 else 32))


def num_splits(call: SelectionCall, sm_count: int) -> int:
    """Slices per row for the op: 1 unless the grid is under SPLIT_BELOW_WAVES waves."""
    work_items = call.batch * call.seqlen_q * call.num_heads_kv * row_tiles(call)
    if sm_count <= 0 or work_items >= SPLIT_BELOW_WAVES * sm_count:
        return 1
    return _split_chooser()(work_items, call.num_selected, sm_count)


def forward(call: SelectionCall, force_splits: Optional[int] = None):
    """(o [B, TQ, HQ, Dv] in q's dtype, lse [B, TQ, HQ] float32). `force_splits` replaces the
    split-KV choice (tests and scripts/sanitize_cuda.py drive every slicing through it)."""
    geometry = row_geometry(call)
    blocks, num_blocks = canonical_blocks(call, geometry)
    # The kernel copies rows 16 bytes at a time: contiguous and 16-byte aligned.
    q, k, v = (_aligned(t.contiguous()) for t in (call.q, call.k, call.v))
    pos = geometry.pos.contiguous()
    k_offset = geometry.k_offset.contiguous()
    splits = force_splits or num_splits(call, device_facts(call.device).sm_count)
    return torch.ops.nsa_ext_cuda.selection_fwd(q, k, v, blocks.contiguous(),
                                                num_blocks.contiguous(), pos, k_offset,
                                                call.block_size, call.scale, splits)
