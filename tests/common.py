"""Inputs and the SPEC.md accuracy check, shared by the test modules."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

# SPEC.md, "Accuracy": (mean, max) of |o - o_ref| / max(1, |o_ref|).
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 5e-3),
    torch.bfloat16: (1e-3, 2e-2),
    torch.float64: (1e-12, 1e-10),
}
LSE_ATOL = 1e-3


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    block_indices: torch.Tensor
    block_size: int
    block_counts: object = None
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    scale: Optional[float] = None

    def kwargs(self):
        return dict(block_counts=self.block_counts, scale=self.scale,
                    cu_seqlens_q=self.cu_seqlens_q, cu_seqlens_k=self.cu_seqlens_k)

    def args(self):
        return (self.q, self.k, self.v, self.block_indices, self.block_size)


def messy_indices(generator, shape, num_blocks: int, S: int, device="cpu"):
    """[*, S] block numbers mixing valid blocks, repeats, -1 padding, other negatives and
    out-of-range entries (SPEC.md's set semantics must ignore the last three and count repeats once)."""
    idx = torch.randint(0, max(num_blocks, 1), (*shape, S), generator=generator)
    r = torch.rand((*shape, S), generator=generator)
    idx = torch.where(r < 0.15, torch.full_like(idx, -1), idx)
    idx = torch.where((r >= 0.15) & (r < 0.2), torch.full_like(idx, -7), idx)
    idx = torch.where((r >= 0.2) & (r < 0.25), idx + num_blocks, idx)            # out of range
    dup = torch.rand((*shape, S), generator=generator) < 0.2
    shifted = torch.roll(idx, 1, dims=-1)
    idx = torch.where(dup, shifted, idx)                                           # repeats
    return idx.to(device)


def make_case(*, B=1, TQ=64, TK=None, HQ=4, H=1, Dk=32, Dv=None, S=4, block_size=16,
              dtype=torch.float32, device="cpu", seed=0, index_dtype=torch.int64,
              block_counts=None, seqlens=None, seqlens_k=None, scale=None, batchless=False):
    """A random call. With `seqlens` (list of query lengths per sequence) it is varlen, keys of
    `seqlens_k` (defaults to the same lengths)."""
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or Dk
    TK = TK or TQ
    cu_q = cu_k = None
    if seqlens is not None:
        seqlens_k = seqlens_k or seqlens
        TQ, TK, B = sum(seqlens), sum(seqlens_k), 1
        cu_q = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
        cu_k = torch.tensor([0, *torch.tensor(seqlens_k).cumsum(0).tolist()], dtype=torch.int32)
        max_k = max(seqlens_k)
    else:
        max_k = TK
    num_blocks = math.ceil(max_k / block_size)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    q, k, v = rand(B, TQ, HQ, Dk), rand(B, TK, H, Dk), rand(B, TK, H, Dv)
    bi = messy_indices(g, (B, TQ, H), num_blocks, S).to(index_dtype).to(device)
    if isinstance(block_counts, str) and block_counts == "tensor":
        block_counts = torch.randint(0, S + 2, (B, TQ, H), generator=g).to(device)
    if cu_q is not None:
        cu_q, cu_k = cu_q.to(device), cu_k.to(device)
        if seqlens_k == seqlens:
            cu_k = None if torch.equal(cu_q, cu_k) else cu_k
    if batchless:
        q, k, v, bi = q[0], k[0], v[0], bi[0]
        if isinstance(block_counts, torch.Tensor):
            block_counts = block_counts[0]
    return Case(q, k, v, bi, block_size, block_counts, cu_q, cu_k, scale)


def spec_errors(o: torch.Tensor, o_ref: torch.Tensor):
    """(mean, max) of SPEC.md's per-element error."""
    o, o_ref = o.double(), o_ref.double()
    err = (o - o_ref).abs() / o_ref.abs().clamp(min=1.0)
    return err.mean().item(), err.max().item()


def assert_close_to_reference(o, o_ref, dtype, lse=None, lse_ref=None):
    assert o.shape == o_ref.shape, (o.shape, o_ref.shape)
    assert o.dtype == dtype, o.dtype
    assert not torch.isnan(o).any(), "NaN in o"
    mean_tol, max_tol = TOLERANCES[dtype]
    mean_err, max_err = spec_errors(o, o_ref)
    assert mean_err <= mean_tol and max_err <= max_tol, \
        f"o error mean {mean_err:.3g} (tol {mean_tol}), max {max_err:.3g} (tol {max_tol})"
    if lse_ref is not None:
        assert lse.shape == lse_ref.shape and lse.dtype == torch.float32
        assert not torch.isnan(lse).any(), "NaN in lse"
        ref_inf = torch.isneginf(lse_ref)
        assert torch.equal(torch.isneginf(lse), ref_inf), "lse is -inf where the reference's is not"
        finite = ~ref_inf
        if finite.any():
            diff = (lse[finite].double() - lse_ref[finite].double()).abs().max().item()
            assert diff <= LSE_ATOL, f"lse error {diff:.3g} > {LSE_ATOL}"


# The running GPU test's watchdog file (tests/conftest.py's _gpu_test_watch sets it): progress()
# appends a timed line there, so that a test its run's limit stops, or the watchdog ends, shows
# which of its steps it had finished (the decode draws of tests/test_random_calls.py ran for
# minutes and no dump said where: twenty-fifth session).
PROGRESS = {"file": None, "start": 0.0}


def progress(step: str) -> None:
    """One line in the running GPU test's watchdog file: seconds since the test began, `step`."""
    if PROGRESS["file"] is not None:
        PROGRESS["file"].write(f"  +{time.perf_counter() - PROGRESS['start']:.1f} s {step}\n")
        PROGRESS["file"].flush()


def import_triton_for_the_interpreter() -> bool:
    """On a machine without CUDA, import Triton in interpreter mode (it decides when
    `triton.language` is first imported) and restore TRITON_INTERPRET at once, so only the tests
    that ask for the interpreter get it. True when Triton kernels can run on the CPU here."""
    import torch as _torch

    if _torch.cuda.is_available():
        return False
    if "triton" not in sys.modules:
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import triton.language  # noqa: F401
        except ImportError:
            return False
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(tl.zeros, InterpretedFunction)


def assert_no_sync_and_graph_replay(call, forward, first):
    """`forward(call)` (warmed up: `first` is its earlier (o, lse)) enqueues with no host
    synchronisation and gives `first` again, then replays from a CUDA graph with new q values
    and matches the fp32 reference."""
    from nsa_ext.reference import reference_forward

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o, lse = forward(call)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(o, first[0]) and torch.equal(lse, first[1])
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o_graph, lse_graph = forward(call)
    call.q.copy_(torch.randn_like(call.q))
    graph.replay()
    torch.cuda.synchronize()
    o_ref, lse_ref = reference_forward(call)
    assert_close_to_reference(o_graph, o_ref, call.dtype, lse_graph, lse_ref)
