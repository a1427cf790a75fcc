"""Every backend against the fp32 reference, over the cases SPEC.md allows (one matrix).

On the CPU this runs packed SDPA; on a GPU (marked `gpu`) packed SDPA, Triton and the CUDA
extension, each where the dispatcher says it can serve the call.
"""
import pytest
import torch

import nsa_ext
from common import assert_close_to_reference, make_case

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# name -> make_case arguments. Small on purpose: CPU CI runs all of them for every dtype.
MATRIX = {
    "G1": dict(B=2, TQ=80, HQ=2, H=2, Dk=64, S=4, block_size=16),
    "G2_d128": dict(B=1, TQ=70, HQ=4, H=2, Dk=128, S=4, block_size=16),
    "G3": dict(B=1, TQ=64, HQ=3, H=1, Dk=64, S=5, block_size=16),
    "G8_dk192_dv128": dict(B=1, TQ=96, HQ=8, H=1, Dk=192, Dv=128, S=4, block_size=32),
    "G16_d256": dict(B=1, TQ=40, HQ=16, H=1, Dk=256, S=3, block_size=16),
    "bs64": dict(B=1, TQ=200, HQ=4, H=2, Dk=64, S=4, block_size=64),
    "bs128": dict(B=1, TQ=300, HQ=2, H=1, Dk=64, S=3, block_size=128),
    "d59": dict(B=1, TQ=50, HQ=2, H=1, Dk=59, Dv=37, S=4, block_size=16),
    "decode": dict(B=3, TQ=1, TK=333, HQ=8, H=2, Dk=64, S=6, block_size=32),
    "chunked_prefill": dict(B=2, TQ=17, TK=150, HQ=4, H=1, Dk=64, S=5, block_size=16),
    "counts_int": dict(B=1, TQ=64, HQ=4, H=2, Dk=64, S=6, block_size=16, block_counts=3),
    "counts_zero": dict(B=1, TQ=32, HQ=2, H=1, Dk=64, S=4, block_size=16, block_counts=0),
    "counts_tensor": dict(B=2, TQ=48, HQ=4, H=2, Dk=64, S=5, block_size=16, block_counts="tensor"),
    "no_entries": dict(B=1, TQ=40, HQ=4, H=2, Dk=64, S=0, block_size=16),   # [B, TQ, H, 0]
    "varlen": dict(seqlens=[37, 1, 64, 13], HQ=4, H=2, Dk=64, S=4, block_size=16),
    "varlen_chunked": dict(seqlens=[5, 1, 20], seqlens_k=[70, 16, 20], HQ=6, H=2, Dk=64, S=5,
                           block_size=16),
    "varlen_batchless": dict(seqlens=[30, 17], HQ=2, H=1, Dk=64, S=3, block_size=16, batchless=True),
    "scale_int32": dict(B=1, TQ=50, HQ=4, H=1, Dk=64, S=4, block_size=16, scale=0.05,
                        index_dtype=torch.int32),
}

BACKENDS = [
    pytest.param("sdpa", "cpu", id="sdpa-cpu"),
    pytest.param("sdpa", "cuda", id="sdpa-cuda", marks=pytest.mark.gpu),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.gpu),
]


def run_against_reference(backend, device, dtype, case):
    decision = nsa_ext.explain(*case.args(), **case.kwargs(), backend=backend)
    if decision.chosen is None:
        pytest.skip(f"{backend} cannot serve this case: {decision.reasons[backend]}")
    o, lse = nsa_ext.selection_attention(*case.args(), **case.kwargs(), backend=backend,
                                         return_lse=True)
    ref_args = (case.q.float(), case.k.float(), case.v.float(), case.block_indices, case.block_size)
    o_ref, lse_ref = nsa_ext.selection_attention(*ref_args, **case.kwargs(), backend="reference",
                                                 return_lse=True)
    assert_close_to_reference(o, o_ref, dtype, lse, lse_ref)
    return o, lse_ref


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", MATRIX)
def test_backend_matches_reference(name, dtype, backend, device):
    case = make_case(dtype=dtype, device=device, seed=sum(map(ord, name)), **MATRIX[name])
    o, lse_ref = run_against_reference(backend, device, dtype, case)
    if name in ("counts_zero", "no_entries"):
        assert torch.isneginf(lse_ref).all() and (o == 0).all()
    else:
        assert torch.isfinite(lse_ref).any()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fully_empty_rows_are_zero_without_nan(backend, device):
    case = make_case(B=1, TQ=40, HQ=4, H=2, Dk=64, S=3, block_size=16, device=device, seed=5)
    case.block_indices[:, ::3] = -1          # every third query selects nothing
    case.block_indices[:, 1::3, 0] = 10_000  # others only out-of-range blocks on head 0
    case.block_indices[:, 1::3, 0, 1:] = -5
    o, lse = run_against_reference(backend, device, torch.float32, case)
    assert (o[:, ::3] == 0).all()
    assert (o[:, 1::3, :2] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_order_and_repeats_do_not_matter(backend, device):
    case = make_case(B=1, TQ=64, HQ=4, H=1, Dk=64, S=4, block_size=16, device=device, seed=9)
    bi = case.block_indices.clamp(min=0)
    repeated = torch.cat([bi.flip(-1), bi], dim=-1)                # same set, each block twice
    o1 = nsa_ext.selection_attention(case.q, case.k, case.v, bi, 16, backend=backend)
    o2 = nsa_ext.selection_attention(case.q, case.k, case.v, repeated, 16, backend=backend)
    assert torch.allclose(o1, o2, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_a_strided_last_dim_is_read_right_with_gradients(backend, device):
    """q, k, v whose last dim has stride 2 (views of wider tensors): the kernels read a head dim
    with unit stride, so the call copies such a view; output and dq, dk, dv match the reference
    of the same values laid out densely."""
    case = make_case(B=1, TQ=48, HQ=4, H=2, Dk=32, S=4, block_size=16, device=device, seed=21)
    strided = []
    for t in (case.q, case.k, case.v):
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], device=device, dtype=t.dtype)
        view = wide[..., ::2]
        view.copy_(t)
        assert view.stride(-1) == 2
        strided.append(view.requires_grad_())
    dense = [t.clone().requires_grad_() for t in (case.q, case.k, case.v)]
    if nsa_ext.explain(*strided, case.block_indices, 16, backend=backend).chosen is None:
        pytest.skip(f"{backend} cannot serve this case here")
    o = nsa_ext.selection_attention(*strided, case.block_indices, 16, backend=backend)
    o_ref = nsa_ext.selection_attention(*dense, case.block_indices, 16, backend="reference")
    assert_close_to_reference(o, o_ref.detach(), torch.float32)
    grad_o = torch.randn_like(o_ref)
    grads = torch.autograd.grad(o, strided, grad_o)
    grads_ref = torch.autograd.grad(o_ref, dense, grad_o)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4, msg=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda", "sdpa"])
def test_tensors_on_a_cuda_device_that_is_not_the_current_one(backend):
    """Tensors on cuda:1 while cuda:0 is current: every backend computes on the tensors' device
    (Triton launches on the current device unless told, nsa_ext.device.on_device), forward and
    gradients, decode (split-KV) and prefill."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    for TQ, TK in ((1, 300), (96, 96)):
        case = make_case(B=2, TQ=TQ, TK=TK, HQ=8, H=2, Dk=64, S=4, block_size=16,
                         dtype=torch.bfloat16, device="cuda:1", seed=TQ)
        if nsa_ext.explain(*case.args(), backend=backend).chosen is None:
            pytest.skip(f"{backend} cannot serve this case here")
        q, k, v = (t.clone().requires_grad_() for t in (case.q, case.k, case.v))
        with torch.cuda.device(0):
            o = nsa_ext.selection_attention(q, k, v, case.block_indices, 16, backend=backend)
            grads = torch.autograd.grad(o.float().sum(), (q, k, v))
        assert o.device == torch.device("cuda:1")
        ref_inputs = [t.detach().float().requires_grad_() for t in (case.q, case.k, case.v)]
        o_ref = nsa_ext.selection_attention(*ref_inputs, case.block_indices, 16,
                                            backend="reference")
        grads_ref = torch.autograd.grad(o_ref.sum(), ref_inputs)
        assert_close_to_reference(o, o_ref.detach(), torch.bfloat16)
        for g, g_ref in zip(grads, grads_ref):
            assert g.device == torch.device("cuda:1")
            torch.testing.assert_close(g.float(), g_ref, rtol=5e-2, atol=5e-2)


def test_sdpa_chunks_when_the_gather_budget_is_small(monkeypatch):
    """A budget of 1 MiB forces many chunks per bucket: the result must not change."""
    case = make_case(B=1, TQ=256, HQ=8, H=2, Dk=64, S=8, block_size=16, seed=4)
    o_big = nsa_ext.selection_attention(*case.args(), backend="sdpa")
    monkeypatch.setenv("NSA_SDPA_GATHER_BUDGET_MB", "0")   # 0 -> one row per chunk
    o_small = nsa_ext.selection_attention(*case.args(), backend="sdpa")
    assert torch.equal(o_big, o_small)
