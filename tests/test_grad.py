"""Gradients of q, k, v through every backend match the reference's (autograd of fp32 math)."""
import pytest
import torch

import nsa_ext
from common import make_case
from nsa_ext.backends import sdpa_packed
from nsa_ext.call import SUPPORTED_DTYPES, describe_call
from nsa_ext.reference import reference_forward

GRAD_CASES = {
    "gqa": dict(B=2, TQ=40, HQ=6, H=2, Dk=32, Dv=16, S=4, block_size=8),
    "chunked": dict(B=1, TQ=9, TK=50, HQ=2, H=1, Dk=32, S=4, block_size=8, block_counts="tensor"),
    "varlen": dict(seqlens=[13, 1, 24], HQ=4, H=2, Dk=32, S=3, block_size=8),
}


def grads(case, backend, with_lse):
    q, k, v = (t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v))
    if backend == "reference":   # plain autograd through the reference's fp32 math
        call = describe_call(q, k, v, case.block_indices, case.block_size, **case.kwargs())
        o, lse = reference_forward(call)
    else:
        o, lse = nsa_ext.selection_attention(q, k, v, case.block_indices, case.block_size,
                                             **case.kwargs(), backend=backend, return_lse=True)
    g = torch.Generator().manual_seed(0)
    loss = (o * torch.randn(o.shape, generator=g).to(o)).sum()
    if with_lse:
        finite = torch.isfinite(lse)
        loss = loss + (lse[finite] * 0.3).sum()
    loss.backward()
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("name", GRAD_CASES)
@pytest.mark.parametrize("backend,device", [("sdpa", "cpu"),
                                            pytest.param("sdpa", "cuda", marks=pytest.mark.gpu),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu),
                                            pytest.param("cuda", "cuda", marks=pytest.mark.gpu)])
def test_gradients_match_reference(backend, device, name, with_lse):
    case = make_case(device=device, seed=7, **GRAD_CASES[name])
    if nsa_ext.explain(*case.args(), **case.kwargs(), backend=backend).chosen is None:
        pytest.skip(f"{backend} cannot serve this case")
    got = grads(case, backend, with_lse)
    want = grads(case, "reference", with_lse)
    for name_, a, b in zip("qkv", got, want):
        assert a is not None and torch.isfinite(a).all(), name_
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (name_, (a - b).abs().max())
    assert any(w.abs().max() > 0 for w in want)


def test_sdpa_gradcheck_fp64():
    """torch.autograd.gradcheck, in float64, of packed SDPA's forward with its written-out
    backward (the one every backend without a backward kernel uses), on a tiny case with empty
    rows. float64 is below the public API (which takes fp16/bf16/fp32), so the test wires the
    backend's forward and backward into an autograd.Function itself."""
    case = make_case(B=1, TQ=6, TK=9, HQ=2, H=1, Dk=4, Dv=3, S=3, block_size=2,
                     dtype=torch.float64, seed=2)
    fp64 = SUPPORTED_DTYPES + (torch.float64,)

    class Packed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            call = describe_call(q, k, v, case.block_indices, case.block_size, need_lse=True,
                                 allowed_dtypes=fp64)
            ctx.call = call
            o, lse = sdpa_packed.forward(call)
            return o, lse

        @staticmethod
        def backward(ctx, grad_o, grad_lse):
            return sdpa_packed.backward(ctx.call, grad_o, grad_lse)

    def fn(q, k, v):
        o, lse = Packed.apply(q, k, v)
        return o, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    q, k, v = (t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v))
    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-7)


def test_block_indices_get_no_gradient():
    case = make_case(B=1, TQ=16, HQ=2, H=1, Dk=8, S=2, block_size=4, seed=1)
    q = case.q.requires_grad_()
    nsa_ext.selection_attention(q, case.k, case.v, case.block_indices, 4).sum().backward()
    assert q.grad is not None and case.block_indices.grad is None


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "sdpa"])
def test_gradients_are_bitwise_deterministic(backend):
    """SPEC.md: the same inputs give bitwise the same dq, dk, dv on every run. Every query picks
    block 0, so hundreds of rows add into one block's dk/dv (where atomics would reorder)."""
    case = make_case(B=1, TQ=1024, HQ=32, H=2, Dk=64, S=6, block_size=64,
                     dtype=torch.bfloat16, device="cuda", seed=4)
    case.block_indices[..., 0] = 0
    if nsa_ext.explain(*case.args(), **case.kwargs(), backend=backend).chosen is None:
        pytest.skip(f"{backend} cannot serve this case")
    runs = [grads(case, backend, with_lse=True) for _ in range(3)]
    for name, first, *others in zip("qkv", *runs):
        for other in others:
            assert torch.equal(first, other), f"d{name} differs between runs"
