"""torch.compile(fullgraph=True; eager, aot_eager and inductor, static and dynamic shapes),
torch.export and torch.library.opcheck on the operator (CPU: packed SDPA)."""
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


def _two_lengths():
    first = make_case(B=2, TQ=48, HQ=4, H=2, Dk=32, S=4, block_size=16, seed=3)
    second = make_case(B=2, TQ=80, HQ=4, H=2, Dk=32, S=4, block_size=16, seed=4)
    return [(c.q, c.k, c.v, c.block_indices) for c in (first, second)]


def test_torch_export_with_a_dynamic_sequence_length():
    """torch.export traces the operator through its fake implementation, with the sequence
    length symbolic: the exported program gives eager's output at another length too."""
    torch.manual_seed(0)
    model = Block(32)
    first, second = _two_lengths()
    T = torch.export.Dim("T", min=2, max=4096)
    exported = torch.export.export(model, first, dynamic_shapes=({1: T},) * 4)
    for args in (first, second):
        torch.testing.assert_close(exported.module()(*args), model(*args), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_with_dynamic_shapes_and_the_default_backend(backend):
    """fullgraph compile with symbolic shapes (aot_eager) and with inductor, PyTorch's default
    backend: outputs and parameter gradients match eager at two sequence lengths."""
    torch.manual_seed(0)
    model = Block(32)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    for args in _two_lengths():
        out = compiled(*args)
        grads = torch.autograd.grad(out.sum(), list(model.parameters()))
        out_eager = model(*args)
        grads_eager = torch.autograd.grad(out_eager.sum(), list(model.parameters()))
        torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, grads_eager):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
