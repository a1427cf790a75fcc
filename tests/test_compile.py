"""torch.compile(fullgraph=True) and torch.library.opcheck on the operator (CPU: packed SDPA)."""
import pytest
import torch

import nsa_ext
from common import make_case
from nsa_ext import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class Block(torch.nn.Module):
    """A small module around the op, as a model would use it."""

    def __init__(self, dim):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, q, k, v, block_indices, cu_seqlens=None):
        o, lse = nsa_ext.selection_attention(self.proj(q), k, v, block_indices, 16,
                                             cu_seqlens_q=cu_seqlens, return_lse=True)
        return o.float().sum(-1) + torch.where(torch.isfinite(lse), lse, 0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("varlen", [False, True])
def test_compiled_module_matches_eager(device, backend, varlen):
    kw = dict(seqlens=[20, 1, 43]) if varlen else dict(B=2, TQ=48)
    case = make_case(HQ=4, H=2, Dk=32, S=4, block_size=16, device=device, seed=3, **kw)
    torch.manual_seed(0)
    model = Block(32).to(device)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    args = (case.q, case.k, case.v, case.block_indices, case.cu_seqlens_q)
    out_eager = model(*args)
    grads_eager = torch.autograd.grad(out_eager.sum(), list(model.parameters()))
    torch._dynamo.reset()
    out_compiled = compiled(*args)
    grads_compiled = torch.autograd.grad(out_compiled.sum(), list(model.parameters()))
    assert torch.allclose(out_eager, out_compiled, atol=1e-5)
    for a, b in zip(grads_eager, grads_compiled):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("return_lse", [False, True])
def test_opcheck(device, return_lse):
    case = make_case(B=1, TQ=24, HQ=4, H=2, Dk=16, S=3, block_size=8, device=device, seed=1)
    q, k, v = (t.requires_grad_() for t in (case.q, case.k, case.v))
    torch.library.opcheck(ops.selection_attention_op,
                          (q, k, v, case.block_indices, None, None, None, None, 8, None, "auto",
                           return_lse))


def test_fake_tensor_shapes_and_errors_at_trace_time():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 50, 6, 64, dtype=torch.bfloat16)
        k = torch.empty(1, 50, 2, 64, dtype=torch.bfloat16)
        v = torch.empty(1, 50, 2, 48, dtype=torch.bfloat16)
        bi = torch.empty(1, 50, 2, 5, dtype=torch.int32)
        o, lse = ops.selection_attention_op(q, k, v, bi, None, None, None, None, 64, None,
                                            "auto", True)
        assert o.shape == (1, 50, 6, 48) and o.dtype == torch.bfloat16
        assert lse.shape == (1, 50, 6) and lse.dtype == torch.float32
        with pytest.raises(ValueError, match="HQ % H"):
            ops.selection_attention_op(q[:, :, :5], k, v, bi, None, None, None, None, 64, None,
                                       "auto", False)
