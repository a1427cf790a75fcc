"""Decode steps captured in a CUDA graph: no host synchronisation and no data-dependent
allocation on the kernel paths, so capture succeeds and replays give the right answer for new
inputs copied into the captured buffers (GPU only)."""
import pytest
import torch

import nsa_ext
from bench.common import capture_graph
from common import assert_close_to_reference, make_case

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
@pytest.mark.parametrize("B,TK", [(1, 4096), (4, 1000)])
def test_decode_step_in_cuda_graph(backend, B, TK):
    shape = dict(B=B, TQ=1, TK=TK, HQ=16, H=4, Dk=128, S=16, block_size=64,
                 dtype=torch.bfloat16, device="cuda")
    case = make_case(seed=1, **shape)
    if nsa_ext.explain(*case.args(), backend=backend).chosen is None:
        pytest.skip(f"{backend} cannot serve this case here")
    q, k, v, bi = (t.clone() for t in (case.q, case.k, case.v, case.block_indices))

    def step():
        return nsa_ext.selection_attention(q, k, v, bi, 64, backend=backend, return_lse=True)

    # warm-up (compile and tune outside the capture), then the capture: the bench's helper
    graph, (o_graph, lse_graph) = capture_graph(step, warmup=3)

    for seed in (2, 3):             # new inputs through the captured buffers
        fresh = make_case(seed=seed, **shape)
        for dst, src in zip((q, k, v, bi), fresh.args()[:4]):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        o_ref, lse_ref = nsa_ext.selection_attention(
            fresh.q.float(), fresh.k.float(), fresh.v.float(), fresh.block_indices, 64,
            backend="reference", return_lse=True)
        assert_close_to_reference(o_graph, o_ref, torch.bfloat16, lse_graph, lse_ref)


def test_captured_cuda_decode_reads_the_pinned_geometry(monkeypatch):
    """A capture after eager warm-up builds no geometry of its own (its arange, copy and fills
    were a quarter of a B = 1 replay): it reads the eager calls' kept geometry, which stays
    pinned after the cache drops its entries, so later replays read live memory."""
    from nsa_ext import selection

    shape = dict(B=2, TQ=1, TK=3000, HQ=16, H=4, Dk=128, S=16, block_size=64,
                 dtype=torch.bfloat16, device="cuda")
    case = make_case(seed=4, **shape)
    if nsa_ext.explain(*case.args(), backend="cuda").chosen is None:
        pytest.skip("the CUDA backend cannot serve this case here")
    q, k, v, bi = (t.clone() for t in (case.q, case.k, case.v, case.block_indices))
    monkeypatch.setattr(selection, "_PINNED_GEOMETRY", {})   # other captures' pins: not here

    def step():
        return nsa_ext.selection_attention(q, k, v, bi, 64, backend="cuda", return_lse=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    built = []
    real = selection._dense_geometry
    monkeypatch.setattr(selection, "_dense_geometry", lambda *a: built.append(a) or real(*a))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph, lse_graph = step()
    assert built == []
    assert (2, 1, 3000, q.device) in selection._PINNED_GEOMETRY
    selection._DENSE_GEOMETRY.clear()
    torch.cuda.empty_cache()
    junk = torch.full((1 << 20,), -7, dtype=torch.int64, device="cuda")   # reuse freed memory
    fresh = make_case(seed=5, **shape)
    for dst, src in zip((q, k, v, bi), fresh.args()[:4]):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    del junk
    o_ref, lse_ref = nsa_ext.selection_attention(
        fresh.q.float(), fresh.k.float(), fresh.v.float(), fresh.block_indices, 64,
        backend="reference", return_lse=True)
    assert_close_to_reference(o_graph, o_ref, torch.bfloat16, lse_graph, lse_ref)
