"""The validated description of one selection-attention call.

`describe_call` checks every argument once (SPEC.md, "Errors") and returns a frozen
`SelectionCall`. The dispatcher and every backend read that object; nobody re-derives shapes.

Inside the call the layout is always `[B, T, heads, dim]`: FlashAttention's batch-less varlen
layout (`[total, heads, dim]`) is given a batch dimension of 1 here and removed again by the API.
"""
from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
BACKEND_NAMES = ("auto", "cuda", "triton", "sdpa", "reference")


class NSAInputDtypeError(TypeError, ValueError):
    """A tensor of the wrong dtype. Both a TypeError and a ValueError, as SPEC.md allows either."""


@dataclass(frozen=True)
class SelectionCall:
    q: torch.Tensor                        # [B, TQ, HQ, Dk]
    k: torch.Tensor                        # [B, TK, H, Dk]
    v: torch.Tensor                        # [B, TK, H, Dv]
    block_indices: torch.Tensor            # [B, TQ, H, S], int32/int64
    block_counts: Optional[torch.Tensor]   # [B, TQ, H] integer, or None
    block_count_limit: int                 # an int block_counts clipped to [0, S]; S when absent
    block_size: int
    scale: float
    cu_seqlens_q: Optional[torch.Tensor]   # [N+1] int, on q's device
    cu_seqlens_k: Optional[torch.Tensor]   # [N+1] int, on q's device
    batchless: bool                        # the caller used FlashAttention's [total, ...] layout
    need_lse: bool

    # Shapes, derived once.
    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def seqlen_q(self) -> int:
        return self.q.shape[1]

    @property
    def seqlen_k(self) -> int:
        return self.k.shape[1]

    @property
    def num_heads_q(self) -> int:
        return self.q.shape[2]

    @property
    def num_heads_kv(self) -> int:
        return self.k.shape[2]

    @property
    def group_size(self) -> int:
        return self.q.shape[2] // self.k.shape[2]

    @property
    def head_dim_qk(self) -> int:
        return self.q.shape[3]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[3]

    @property
    def num_selected(self) -> int:
        """S: entries per selection row (before set semantics and block_counts)."""
        return self.block_indices.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.numel() - 1 if self.is_varlen else self.batch

    @property
    def selected_len(self) -> int:
        """Most key tokens one row can attend to: entries used per row x block_size."""
        return self.block_count_limit * self.block_size

    def dispatch_key(self) -> tuple:
        """Everything about the call except tensor values: shape, strides, dtype and device of
        every tensor, and the scalar arguments. The dispatcher caches its decision on it, so a
        backend's reasons and preferences may read nothing else of the call."""
        return (_metadata(self.q), _metadata(self.k), _metadata(self.v),
                _metadata(self.block_indices), _metadata(self.block_counts),
                _metadata(self.cu_seqlens_q), _metadata(self.cu_seqlens_k),
                self.block_count_limit, self.block_size, self.scale, self.batchless, self.need_lse)

    def summary(self) -> str:
        kind = f"varlen(N={self.num_seqs})" if self.is_varlen else f"B={self.batch}"
        return (f"{kind} TQ={self.seqlen_q} TK={self.seqlen_k} HQ={self.num_heads_q} "
                f"H={self.num_heads_kv} G={self.group_size} Dk={self.head_dim_qk} "
                f"Dv={self.head_dim_v} S={self.num_selected} block_size={self.block_size} "
                f"dtype={str(self.dtype).replace('torch.', '')} device={self.device}")


def _metadata(t: Optional[torch.Tensor]):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise NSAInputDtypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _is_tracing(t: torch.Tensor) -> bool:
    """True where the values of cu_seqlens cannot or must not be read: under torch.compile
    (fake tensors), and during CUDA-graph capture (reading them would synchronise). Their
    checks then run only in eager calls."""
    from torch._subclasses.fake_tensor import FakeTensor

    if torch.compiler.is_compiling() or isinstance(t, FakeTensor) or t.device.type == "meta":
        return True
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# The values of cu_seqlens (start at 0, non-decreasing, end at the packed length, TQ <= TK per
# sequence) can only be read through a host synchronisation, which would cost every eager call a
# GPU round trip. They are checked once per tensor: each checked (cu_seqlens_q, cu_seqlens_k)
# pair (the last 64) is remembered by weak reference with its version counters, which every
# in-place PyTorch op bumps, so the same tensors passed again unchanged (each layer of a model, each
# step of a loop) skip the check, and new or modified tensors are checked. What a caller loses:
# a write the version counter does not see (through `.data`, DLPack, or a raw kernel writing
# into the tensor's memory) is not checked, and wrong values then give wrong output or reads out
# of bounds instead of a ValueError. Inference tensors have no version counter: checked each call.
_CHECKED_CU: dict = {}


def _cu_values_known_good(cu_q: torch.Tensor, cu_k: torch.Tensor, totals) -> bool:
    entry = _CHECKED_CU.get((id(cu_q), id(cu_k)))
    if entry is None or entry[0]() is not cu_q or entry[1]() is not cu_k:
        return False
    if cu_q.is_inference() or cu_k.is_inference():
        return False
    return entry[2] == (cu_q._version, cu_k._version, totals)


def _remember_cu_values(cu_q: torch.Tensor, cu_k: torch.Tensor, totals) -> None:
    """`totals`: (TQ, TK), which the last entries were checked against."""
    if cu_q.is_inference() or cu_k.is_inference():
        return
    if len(_CHECKED_CU) >= 64:
        _CHECKED_CU.clear()
    _CHECKED_CU[(id(cu_q), id(cu_k))] = (weakref.ref(cu_q), weakref.ref(cu_k),
                                         (cu_q._version, cu_k._version, totals))


def _check_cu_seqlens(name: str, cu: torch.Tensor, device: torch.device) -> None:
    _check_tensor(name, cu)
    if cu.dtype not in INDEX_DTYPES:
        raise NSAInputDtypeError(f"{name}: expected int32 or int64, got {_dtype_name(cu.dtype)}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name}: expected shape [N+1] with N >= 1, got {_shape(cu)}")
    if cu.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (q's device), got {cu.device}")


def _check_cu_values(name: str, cu: torch.Tensor, total: int) -> None:
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {values[0]}")
    steps = [b - a for a, b in zip(values[:-1], values[1:])]
    if any(s < 0 for s in steps):
        raise ValueError(f"{name}: must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}: last entry must equal the packed length {total}, got {values[-1]}")


def describe_call(q, k, v, block_indices, block_size=64, *, block_counts=None, scale=None,
                  cu_seqlens_q=None, cu_seqlens_k=None, need_lse=False,
                  allowed_dtypes=SUPPORTED_DTYPES) -> SelectionCall:
    """Check every argument against SPEC.md and return the call's frozen description.

    Raises ValueError (shapes, devices, values) or NSAInputDtypeError (a TypeError and a
    ValueError: dtypes) before anything runs. `allowed_dtypes` is widened to float64 only by
    tests (gradcheck) that call below the public API.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("block_indices", block_indices)):
        _check_tensor(name, t)

    # dtypes
    if q.dtype not in allowed_dtypes:
        allowed = ", ".join(_dtype_name(d) for d in allowed_dtypes)
        raise NSAInputDtypeError(f"q: expected dtype in ({allowed}), got {_dtype_name(q.dtype)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise NSAInputDtypeError(
                f"{name}: expected the dtype of q ({_dtype_name(q.dtype)}), got {_dtype_name(t.dtype)}")
    if block_indices.dtype not in INDEX_DTYPES:
        raise NSAInputDtypeError(
            f"block_indices: expected an integer tensor (int32 or int64), got {_dtype_name(block_indices.dtype)}")

    # devices
    for name, t in (("k", k), ("v", v), ("block_indices", block_indices)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} (q's device), got {t.device}")

    # block_size
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise ValueError(f"block_size: expected a positive power of two (int), got {block_size!r}")
    block_size = int(block_size)
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size: expected a positive power of two, got {block_size}")

    # layout: dense [B, T, ...], varlen [1, total, ...] or batch-less [total, ...]
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if cu_seqlens_q is None and cu_seqlens_k is not None:
        raise ValueError("cu_seqlens_q: required when cu_seqlens_k is given, got None")
    batchless = False
    if varlen and q.dim() == 3:
        batchless = True
        for name, t in (("q", q), ("k", k), ("v", v), ("block_indices", block_indices)):
            if t.dim() != 3:
                raise ValueError(f"{name}: the batch-less varlen layout needs a 3-d tensor "
                                 f"[total, heads, dim], got {_shape(t)}")
        q, k, v, block_indices = (t.unsqueeze(0) for t in (q, k, v, block_indices))
        if isinstance(block_counts, torch.Tensor) and block_counts.dim() == 2:
            block_counts = block_counts.unsqueeze(0)
    for name, t, what in (("q", q, "[B, TQ, HQ, Dk]"), ("k", k, "[B, TK, H, Dk]"),
                          ("v", v, "[B, TK, H, Dv]"), ("block_indices", block_indices, "[B, TQ, H, S]")):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-d tensor {what}, got {_shape(t)}")
    B, TQ, HQ, Dk = q.shape
    _, TK, H, _ = k.shape
    for name, size in (("batch B", B), ("TQ", TQ), ("TK", TK), ("HQ", HQ), ("H", H), ("Dk", Dk),
                       ("Dv", v.shape[3])):
        if size == 0:
            raise ValueError(f"empty input: {name} is 0 (q {_shape(q)}, k {_shape(k)}, v {_shape(v)})")
    if k.shape[0] != B or v.shape[0] != B or block_indices.shape[0] != B:
        raise ValueError(f"batch size mismatch: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}, "
                         f"block_indices {_shape(block_indices)}")
    if k.shape[3] != Dk:
        raise ValueError(f"k: expected head dim Dk={Dk} (q's last dim), got {_shape(k)}")
    if v.shape[1] != TK or v.shape[2] != H:
        raise ValueError(f"v: expected shape [{B}, {TK}, {H}, Dv] (k's first three dims), got {_shape(v)}")
    if HQ % H != 0:
        raise ValueError(f"q/k: HQ % H must be 0 (each KV head serves HQ // H query heads), "
                         f"got HQ={HQ}, H={H}")
    if tuple(block_indices.shape[:3]) != (B, TQ, H):
        raise ValueError(f"block_indices: expected shape [{B}, {TQ}, {H}, S], got {_shape(block_indices)}")
    S = block_indices.shape[3]
    if S == 0:
        # No entries: every row's set is empty. One -1 column says the same (negative entries are
        # ignored), so no backend meets a zero-width index tensor.
        block_indices = block_indices.new_full((B, TQ, H, 1), -1)
        S = 1

    if varlen:
        if B != 1:
            raise ValueError(f"cu_seqlens_q: the varlen layout needs B == 1 (or no batch dim), "
                             f"got q {_shape(q)}")
        if cu_seqlens_k is None:
            cu_seqlens_k = cu_seqlens_q
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
        if cu_seqlens_k.numel() != cu_seqlens_q.numel():
            raise ValueError(f"cu_seqlens_k: expected {cu_seqlens_q.numel()} entries like cu_seqlens_q, "
                             f"got {cu_seqlens_k.numel()}")
        if not (_is_tracing(cu_seqlens_q) or _is_tracing(cu_seqlens_k)
                or _cu_values_known_good(cu_seqlens_q, cu_seqlens_k, (TQ, TK))):
            _check_cu_values("cu_seqlens_q", cu_seqlens_q, TQ)
            _check_cu_values("cu_seqlens_k", cu_seqlens_k, TK)
            if cu_seqlens_k is not cu_seqlens_q:
                lq = torch.diff(cu_seqlens_q).tolist()
                lk = torch.diff(cu_seqlens_k).tolist()
                bad = [i for i, (a, b) in enumerate(zip(lq, lk)) if a > b]
                if bad:
                    i = bad[0]
                    raise ValueError(f"cu_seqlens_q/cu_seqlens_k: sequence {i} has {lq[i]} queries "
                                     f"but only {lk[i]} keys (queries are the last TQ positions, "
                                     f"so TQ <= TK)")
            _remember_cu_values(cu_seqlens_q, cu_seqlens_k, (TQ, TK))
    elif TQ > TK:
        raise ValueError(f"q/k: TQ must be <= TK (queries are the last TQ key positions), "
                         f"got TQ={TQ}, TK={TK}")

    # block_counts
    counts_tensor = None
    count_limit = S
    if block_counts is not None:
        if isinstance(block_counts, torch.Tensor):
            if block_counts.dtype.is_floating_point or block_counts.dtype.is_complex or \
                    block_counts.dtype == torch.bool:
                raise NSAInputDtypeError(f"block_counts: expected an integer tensor, got "
                                         f"{_dtype_name(block_counts.dtype)}")
            if block_counts.device != q.device:
                raise ValueError(f"block_counts: expected a tensor on {q.device} (q's device), "
                                 f"got {block_counts.device}")
            if block_counts.dim() == 0:
                counts_tensor = block_counts.expand(B, TQ, H)
            elif tuple(block_counts.shape) != (B, TQ, H):
                want = f"[{TQ}, {H}]" if batchless else f"[{B}, {TQ}, {H}]"
                raise ValueError(f"block_counts: expected an int or a tensor of shape {want}, "
                                 f"got {_shape(block_counts)}")
            else:
                counts_tensor = block_counts
        elif isinstance(block_counts, numbers.Integral) and not isinstance(block_counts, bool):
            if block_counts < 0:
                raise ValueError(f"block_counts: expected an int >= 0, got {block_counts}")
            count_limit = min(int(block_counts), S)
        else:
            raise ValueError(f"block_counts: expected None, an int or an integer tensor, "
                             f"got {type(block_counts).__name__}")

    # scale
    if scale is None:
        scale = Dk ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    scale = float(scale)

    # Every kernel reads a row's head dim with unit stride (SPEC.md: last dim contiguous); a view
    # whose last dim is strided is copied here, once, instead of being read wrongly.
    q, k, v = (t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in (q, k, v))
    return SelectionCall(q=q, k=k, v=v, block_indices=block_indices, block_counts=counts_tensor,
                         block_count_limit=count_limit, block_size=block_size, scale=scale,
                         cu_seqlens_q=cu_seqlens_q if varlen else None,
                         cu_seqlens_k=cu_seqlens_k if varlen else None,
                         batchless=batchless, need_lse=bool(need_lse))
