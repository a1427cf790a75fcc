"""The eager fast path: a call that needs no gradient and runs under no tracing or mode skips the
custom op's dispatch (same validation, dispatch and kernels); everything else goes through the op."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nsa_ext
from common import make_case
from nsa_ext import ops


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def count_op_calls(monkeypatch):
    calls = []
    real = ops.selection_attention_op

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(ops, "selection_attention_op", counting)
    return calls


def case():
    return make_case(B=1, TQ=24, HQ=4, H=2, Dk=16, S=3, block_size=8, seed=5)


def test_eager_call_without_grad_skips_the_op_and_matches_it(monkeypatch):
    c = case()
    calls = count_op_calls(monkeypatch)
    o, lse = nsa_ext.selection_attention(*c.args(), return_lse=True)
    assert calls == []
    o_op, lse_op = ops.selection_attention_op(c.q, c.k, c.v, c.block_indices, None, None, None,
                                              None, c.block_size, None, "auto", True)
    torch.testing.assert_close(o, o_op, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_op, rtol=0, atol=0)


def test_gradients_go_through_the_op(monkeypatch):
    c = case()
    calls = count_op_calls(monkeypatch)
    q = c.q.clone().requires_grad_()
    nsa_ext.selection_attention(q, c.k, c.v, c.block_indices, c.block_size).sum().backward()
    assert len(calls) == 1 and q.grad is not None
    with torch.no_grad():
        nsa_ext.selection_attention(q, c.k, c.v, c.block_indices, c.block_size)
    assert len(calls) == 1


def test_a_dispatch_mode_sees_the_op():
    c = case()
    with RecordOps() as mode:
        nsa_ext.selection_attention(*c.args())
    assert "nsa_ext.selection_attention.default" in mode.names


def test_eager_bench_runs_on_the_cpu(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import eager_bench

    out = tmp_path / "eager.json"
    results = eager_bench.main(["--device", "cpu", "--calls", "1", "--out", str(out)])
    assert out.is_file() and len(results["rows"]) == 2
    for row in results["rows"]:
        assert row["chosen"] == "sdpa" and row["eager_us"] >= row["host_us"] > 0
    real = ops.backend_module
    stubbed = eager_bench.main(["--device", "cpu", "--calls", "5", "--stages", "--stub-forward"])
    assert ops.backend_module is real
    served = [row for row in stubbed["rows"] if "stages_us" in row]
    assert served and all("describe_call (validation)" in row["stages_us"] for row in served)


def test_dense_row_geometry_is_kept_per_shape():
    from nsa_ext.call import describe_call
    from nsa_ext.selection import row_geometry

    c = make_case(B=2, TQ=5, TK=40, HQ=2, H=1, Dk=8, S=2, block_size=8)
    call = describe_call(*c.args())
    first = row_geometry(call)
    assert row_geometry(describe_call(*make_case(B=2, TQ=5, TK=40, HQ=2, H=1, Dk=8, S=2,
                                                 block_size=8, seed=3).args())) is first
    assert first.pos.tolist() == [list(range(35, 40))] * 2
    assert first.seqlen_k.eq(40).all() and first.k_offset.eq(0).all()
    other = row_geometry(describe_call(*make_case(B=2, TQ=6, TK=40, HQ=2, H=1, Dk=8, S=2,
                                                  block_size=8).args()))
    assert other is not first and other.pos.shape == (2, 6)
    with RecordOps():
        assert row_geometry(call) is not first           # not handed out under a mode
    with torch.inference_mode():
        fresh = describe_call(*make_case(B=3, TQ=5, TK=40, HQ=2, H=1, Dk=8, S=2,
                                         block_size=8).args())
        kept = row_geometry(fresh)
    assert not kept.pos.is_inference()                   # usable outside inference mode
