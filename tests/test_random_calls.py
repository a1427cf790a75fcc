"""Seeded random calls over what SPEC.md allows, every backend against the reference: o, lse and
the gradients of q, k, v.

Each seed draws one call: dense (TQ <= TK, B up to 3), varlen or batchless varlen; block_size 1
to 64; G = 1 to 8, powers of two or not; Dk != Dv; S = 0 to 8 with messy entries (repeats,
-1, other negatives, out of range); block_counts None, an int or a tensor; int32 or int64
indices; a given scale; and, for half the seeds, q/k/v/block_indices/block_counts as strided
views (a [B, H, T, D] tensor transposed, a slice of a wider last dim, a strided last dim).
CPU lane: packed SDPA, and Triton in its interpreter (fp16/fp32; its bf16 tl.dot is wrong).
GPU lane (marked): every backend that can serve the call, bf16 too; and calls drawn around the
shapes the compiled kernels are built for (head dims 64-256, blocks of 32-128, G up to 64, rows
long enough for tiles) with each forward schedule forced (NSA_SEL_SCHEDULE), so the tile and kv
schedules and the Hopper tile kernel meet messy calls too, not only what auto picks for small
ones; and decode-shaped calls (one to three query tokens a sequence against caches of up to 4k
keys, batches up to 48: split-KV with its merge, in a cluster on SM 9.0) through every backend.
`NSA_TEST_SWEEP_SEEDS=N` widens those two sweeps (default 16 seeds) and `NSA_TEST_GPU_SEEDS=N` the
general GPU lane (default 24) for a longer run on a GPU.
"""
import os
import random

import pytest
import torch

import nsa_ext
from nsa_ext.call import describe_call
from nsa_ext.reference import reference_forward
from common import (assert_close_to_reference, import_triton_for_the_interpreter, make_case,
                    progress)

CUDA = torch.cuda.is_available()
INTERPRETER = import_triton_for_the_interpreter()
CPU_SEEDS = range(16)
GPU_SEEDS = range(int(os.environ.get("NSA_TEST_GPU_SEEDS", "24")))
SWEEP_SEEDS = range(int(os.environ.get("NSA_TEST_SWEEP_SEEDS", "16")))


def _strided(t, how):
    """The same values as a view with other strides."""
    if how == "transpose" and t.dim() == 4:           # stored [B, H, T, D], seen [B, T, H, D]
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "pad":                                  # a slice of a wider last dim
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1] + 3)
        wide[..., 1:1 + t.shape[-1]] = t
        return wide[..., 1:1 + t.shape[-1]]
    if how == "lastdim":                              # a strided last dim
        wide = t.new_zeros(*t.shape, 2)
        wide[..., 0] = t
        return wide[..., 0]
    return t


def random_case(seed, dtype, device, kernel_shapes=False, decode=False):
    """One seeded call (module docstring). `kernel_shapes`: drawn around the compiled kernels'
    instances (head dims 64 / 128 / 192-128 / 256, blocks of 64 or 128 with some 32, G up to 64,
    up to 16 blocks per row, longer sequences) instead of the small general draw. `decode`: the
    same instances, one to three query tokens a sequence (the last ones of each sequence's keys)
    against up to 4k keys, up to 48 sequences: few rows, so the kernels split each row's blocks."""
    rnd = random.Random(seed)
    kw = (_decode_kwargs(rnd) if decode else _general_kwargs(rnd, kernel_shapes))
    kw.update(dtype=dtype, device=device, seed=seed)
    case = make_case(**kw)
    if rnd.random() < 0.5:
        views = ["transpose", "pad", "lastdim", "none"]
        case.q, case.k, case.v = (_strided(t, rnd.choice(views)) for t in (case.q, case.k, case.v))
        case.block_indices = _strided(case.block_indices, rnd.choice(["transpose", "pad", "none"]))
        if isinstance(case.block_counts, torch.Tensor):
            case.block_counts = _strided(case.block_counts, "pad")
    return case


def _selection_kwargs(rnd, H, G, Dk, Dv, S, block_size):
    """make_case's arguments every draw shares: the heads, dims and selection, and the indices'
    dtype, block_counts and scale drawn for them."""
    return dict(HQ=H * G, H=H, Dk=Dk, Dv=Dv, S=S, block_size=block_size,
                index_dtype=rnd.choice([torch.int32, torch.int64]),
                block_counts=rnd.choice([None, None, "tensor", rnd.randint(0, S + 1)]),
                scale=rnd.choice([None, 0.3]))


def _general_kwargs(rnd, kernel_shapes):
    if kernel_shapes:
        S = rnd.choice([1, 4, 8, 16])
        H, G = rnd.choice([1, 2]), rnd.choice([1, 2, 3, 5, 8, 16, 24, 64])
        Dk, Dv = rnd.choice([(64, 64), (128, 128), (128, 128), (192, 128), (256, 256), (32, 48)])
        block_size = rnd.choice([32, 64, 64, 128])
        max_q, max_extra, max_varlen = 300, 500, 120   # dense TQ, extra keys, varlen TQ
    else:
        S = rnd.choice([0, 1, 2, 3, 5, 8])
        H, G = rnd.choice([1, 2, 3]), rnd.choice([1, 2, 3, 4, 5, 8])
        Dk = rnd.choice([8, 16, 24, 32, 64])
        Dv = rnd.choice([Dk, 16, 48])
        block_size = rnd.choice([1, 2, 4, 8, 16, 32, 64])
        max_q, max_extra, max_varlen = 70, 90, 40
    kw = _selection_kwargs(rnd, H, G, Dk, Dv, S, block_size)
    layout = rnd.choice(["dense", "dense", "varlen", "batchless"])
    if layout == "dense":
        TQ = rnd.randint(1, max_q)
        kw.update(B=rnd.randint(1, 3), TQ=TQ,
                  TK=TQ + rnd.choice([0, 0, rnd.randint(1, max_extra)]))
    else:
        seqlens = [rnd.randint(1, max_varlen) for _ in range(rnd.randint(1, 3))]
        kw.update(seqlens=seqlens, seqlens_k=[n + rnd.choice([0, rnd.randint(0, max_extra)])
                                             for n in seqlens],
                  batchless=layout == "batchless")
    return kw


def _decode_kwargs(rnd):
    S = rnd.choice([1, 4, 8, 16, 16])
    H, G = rnd.choice([1, 2, 4]), rnd.choice([1, 2, 3, 5, 8, 16, 16, 24, 64])
    Dk, Dv = rnd.choice([(64, 64), (128, 128), (128, 128), (192, 128), (256, 256)])
    kw = _selection_kwargs(rnd, H, G, Dk, Dv, S, rnd.choice([32, 64, 64, 128]))
    TQ = rnd.choice([1, 1, 1, 2, 3])
    if rnd.random() < 0.5:
        kw.update(B=rnd.choice([1, 2, 5, 16, 48]), TQ=TQ, TK=rnd.randint(TQ, 4096))
    else:   # varlen: the sequences' caches differ in length
        n = rnd.choice([1, 3, 17])
        kw.update(seqlens=[TQ] * n, seqlens_k=[rnd.randint(TQ, 4096) for _ in range(n)],
                  batchless=rnd.random() < 0.5)
    return kw


def _grads(case, backend, grad_o):
    q, k, v = (t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v))
    o, lse = nsa_ext.selection_attention(q, k, v, case.block_indices, case.block_size,
                                         **case.kwargs(), backend=backend, return_lse=True)
    return o, lse, torch.autograd.grad(o, (q, k, v), grad_o.to(q.dtype))


def _grad_errors(got, want):
    return [((g.double() - w.double()).abs() / w.double().abs().clamp(min=1)).max().item()
            for g, w in zip(got, want)]


def check_backend(case, backend, dtype):
    """o and lse within SPEC.md's accuracy of the fp32 reference; gradients close to the
    reference's autograd, relative above 1: fp32 within 1e-4; fp16/bf16 within 3e-2, or within 3x
    the error of packed SDPA's gradients of the same call in the same dtype plus 1.5x the error
    that the rounded O alone explains, whichever is larger (SPEC.md bounds o and lse, not
    gradients). The first term: a kernel that rounds P and dS to bf16 before its dK dot, as
    FlashAttention's do, sums many such roundings when G and the number of queries per block are
    large. The second: the kernels take delta = rowsum(dO * O) from the stored O, rounded to the
    dtype, as FlashAttention's do; where the softmax is peaked, dS = P (dP - delta) cancels and
    that rounding dominates dq and dk (scale 0.3 at d >= 128: ~3x packed SDPA's error, whose math
    keeps O in fp32; notes/backward.md). Its exact size is the gradient of sum(eps * lse) with eps
    = rowsum(dO * (O - rounded O)), from the reference's own autograd."""
    if nsa_ext.explain(*case.args(), **case.kwargs(), backend=backend).chosen is None:
        progress(f"{backend}: not served")
        return False
    progress(f"{backend}: explained")
    # The reference's own gradients: autograd through its fp32 math, not through the operator
    # (whose backward is another backend's: until the twenty-fifth session Triton's in fp32 on
    # a GPU -- a kernel under test as the yardstick, and an fp32 autotuning that made the
    # decode draws run for minutes).
    leaves = [t.detach().float().requires_grad_() for t in (case.q, case.k, case.v)]
    ref_call = describe_call(*leaves, case.block_indices, case.block_size, **case.kwargs())
    o_ref, lse_ref = reference_forward(ref_call)
    if ref_call.batchless:           # the caller's layout, as the API returns it
        o_ref, lse_ref = o_ref.squeeze(0), lse_ref.squeeze(0)
    grad_o = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(1)).to(o_ref.device)
    want = torch.autograd.grad(o_ref, leaves, grad_o, retain_graph=True)
    progress(f"{backend}: reference forward + backward")
    o, lse, got = _grads(case, backend, grad_o)
    progress(f"{backend}: its forward + backward")
    assert_close_to_reference(o, o_ref.to(dtype), dtype, lse, lse_ref)
    if dtype == torch.float32:
        tols = [1e-4] * 3
    else:
        sdpa_errors = _grad_errors(_grads(case, "sdpa", grad_o)[2], want)
        progress(f"{backend}: packed SDPA's gradients")
        # delta's error from the rounded O enters dq and dk as a gradient of lse would (dv: none)
        rounding = (grad_o * (o_ref.detach() - o_ref.detach().to(dtype).float())).sum(-1)
        rounding = torch.where(torch.isfinite(lse_ref), rounding, torch.zeros_like(rounding))
        delta_terms = torch.autograd.grad(lse_ref, leaves[:2], rounding)
        rounding_errors = [(d.abs() / w.abs().clamp(min=1)).max().item()
                           for d, w in zip(delta_terms, want)] + [0.0]
        tols = [max(3e-2, 3 * e + 1.5 * r) for e, r in zip(sdpa_errors, rounding_errors)]
    for name, g, err, tol in zip("qkv", got, _grad_errors(got, want), tols):
        assert torch.isfinite(g).all(), f"d{name} is not finite"
        assert err <= tol, f"d{name}: max error {err:.3g} > {tol:.3g}"
    progress(f"{backend}: checked")
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("seed", CPU_SEEDS)
def test_random_call_cpu(seed, dtype, monkeypatch):
    if CUDA:
        pytest.skip("the CPU lane (the GPU lane below covers a GPU machine)")
    case = random_case(seed, dtype, "cpu")
    served = []
    for backend in ("sdpa", "auto"):
        served += [backend] if check_backend(case, backend, dtype) else []
    if INTERPRETER:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        served += ["triton"] if check_backend(case, "triton", dtype) else []
    assert "sdpa" in served and "auto" in served


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("seed", GPU_SEEDS)
def test_random_call_gpu(seed, dtype):
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    case = random_case(seed, dtype, "cuda")
    served = [b for b in ("auto", "triton", "cuda", "sdpa") if check_backend(case, b, dtype)]
    assert "auto" in served


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["row", "tile", "kv"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("seed", SWEEP_SEEDS)
def test_random_kernel_shapes_each_schedule_gpu(seed, dtype, schedule, monkeypatch):
    """Kernel-shaped random calls with one forward schedule forced, through both kernel
    backends: Triton serves every schedule; CUDA serves row, and tile on SM 9.0 where its Hopper
    kernel takes the call (otherwise explain() says why and the call is skipped for it)."""
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    case = random_case(10_000 + seed, dtype, "cuda", kernel_shapes=True)
    monkeypatch.setenv("NSA_SEL_SCHEDULE", schedule)
    served = [b for b in ("triton", "cuda") if check_backend(case, b, dtype)]
    assert "triton" in served


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("seed", SWEEP_SEEDS)
def test_random_decode_calls_gpu(seed, dtype):
    """Decode-shaped random calls (random_case's `decode`) through every backend that serves them,
    against the reference: the row kernels' split-KV and its merges meet messy short calls."""
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    case = random_case(20_000 + seed, dtype, "cuda", decode=True)
    served = [b for b in ("auto", "triton", "cuda") if check_backend(case, b, dtype)]
    assert "auto" in served and "triton" in served
