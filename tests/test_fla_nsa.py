"""examples/fla_nsa.py: fla's whole NSA layer with nsa_ext's selection gives fla's `parallel_nsa`
output and gradients (G = 16, fla's smallest group). GPU only; skipped where fla-core is missing."""
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def rms_ratio(x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS of the difference over RMS of the reference (fla's own test measure)."""
    x, ref = x.float(), ref.float()
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp(min=1e-12)).item()


CASES = {
    "dense_B2_T2048_G16_D64": dict(B=2, T=2048, HQ=16, H=1, D=64, seqlens=None),
    "dense_B1_T3000_G16_D128": dict(B=1, T=3000, HQ=32, H=2, D=128, seqlens=None),
    "varlen_G16_D128": dict(B=1, T=None, HQ=16, H=1, D=128, seqlens=[700, 1300, 2100]),
}


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("name", CASES)
def test_matches_fla_parallel_nsa(name, backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("fla.ops.nsa.parallel", reason="fla-core is not installed")
    from fla.ops.nsa.parallel import parallel_nsa

    from fla_nsa import nsa

    case = CASES[name]
    torch.manual_seed(0)
    cu_seqlens = None
    T = case["T"]
    if case["seqlens"] is not None:
        T = sum(case["seqlens"])
        cu_seqlens = torch.tensor([0, *torch.tensor(case["seqlens"]).cumsum(0).tolist()],
                                  dtype=torch.int32, device="cuda")
    B, HQ, H, D = case["B"], case["HQ"], case["H"], case["D"]

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_()

    q, k, v = rnd(B, T, HQ, D), rnd(B, T, H, D), rnd(B, T, H, D)
    g_cmp = torch.rand(B, T, HQ, device="cuda", dtype=torch.bfloat16).requires_grad_()
    g_slc = torch.rand(B, T, HQ, device="cuda", dtype=torch.bfloat16).requires_grad_()
    do = torch.randn(B, T, HQ, D, device="cuda", dtype=torch.bfloat16)
    inputs = (q, k, v, g_cmp, g_slc)
    kwargs = dict(g_cmp=g_cmp, g_slc=g_slc, block_counts=16, block_size=64,
                  cu_seqlens=cu_seqlens)

    ref = parallel_nsa(q, k, v, **kwargs)
    ref_grads = torch.autograd.grad(ref, inputs, do)
    out = nsa(q, k, v, backend=backend, **kwargs)
    grads = torch.autograd.grad(out, inputs, do)

    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any()
    assert rms_ratio(out, ref) < 0.005, rms_ratio(out, ref)
    for what, g, g_ref in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc"), grads, ref_grads):
        assert not torch.isnan(g).any(), what
        assert rms_ratio(g, g_ref) < 0.01, (what, rms_ratio(g, g_ref))
