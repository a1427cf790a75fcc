"""The eager fast path: a call that needs no gradient and runs under no tracing or mode skips the
custom op's dispatch (same validation, dispatch and kernels); everything else goes through the op."""
import pytest
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
    # The decode row once, the chunk row once per selection pattern.
    labels = [row["row"] for row in results["rows"]]
    assert out.is_file() and len(labels) == 4 and len(set(labels)) == 4
    assert [label.split()[-1] for label in labels[1:]] == ["random", "clustered", "model"]
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


def test_a_capture_reads_a_kept_geometry_and_pins_it(monkeypatch):
    """Inside a CUDA-graph capture (faked on the CPU: no tensor is made on that branch) a small
    dense call gets the geometry kept from an eager call, pinned for good; none where no eager
    call made one, past the row bound or past the pin limit."""
    from nsa_ext import selection
    from nsa_ext.selection import RowGeometry, _kept_geometry

    monkeypatch.setattr(selection, "_DENSE_GEOMETRY", {})
    monkeypatch.setattr(selection, "_PINNED_GEOMETRY", {})
    monkeypatch.setattr(selection, "_PIN_GEOMETRIES", 2)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    gpu = torch.device("cuda", 0)
    made = [RowGeometry(torch.zeros(1), torch.zeros(1), torch.zeros(1)) for _ in range(4)]
    for i, geometry in enumerate(made):
        selection._DENSE_GEOMETRY[(1, 1, 1000 + i, gpu)] = geometry
    selection._DENSE_GEOMETRY[(64, 128, 4096, gpu)] = made[0]
    assert _kept_geometry(1, 1, 999, gpu) is None                  # no eager call made one
    assert _kept_geometry(64, 128, 4096, gpu) is None               # B * TQ past _PIN_ROWS
    assert _kept_geometry(1, 1, 1000, gpu) is made[0]
    assert _kept_geometry(1, 1, 1001, gpu) is made[1]
    assert _kept_geometry(1, 1, 1002, gpu) is None                  # past the pin limit
    assert list(selection._PINNED_GEOMETRY) == [(1, 1, 1000, gpu), (1, 1, 1001, gpu)]
    selection._DENSE_GEOMETRY.clear()                               # the cache drops its entries
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _kept_geometry(1, 1, 1001, gpu) is made[1]               # a pinned one stays
    with RecordOps():
        assert _kept_geometry(1, 1, 1001, gpu) is None              # never under a mode


# Launch plans (nsa_ext/eager_plan.py): on the CPU no backend has a launcher, so the tests give
# packed SDPA one that records what it was made for and runs SDPA's own forward.
def planned_sdpa(monkeypatch, decline=False):
    from nsa_ext import eager_plan
    from nsa_ext.backends import sdpa_packed
    from nsa_ext.call import describe_call

    made, launched = [], []

    def eager_launch(call, settings, facts):
        made.append(call.dispatch_key())
        block_size, scale = call.block_size, call.scale

        def launch(q, k, v, block_indices):
            launched.append(q)
            if decline:
                return None
            return sdpa_packed.forward(describe_call(q, k, v, block_indices, block_size,
                                                     scale=scale, need_lse=True))
        return launch

    monkeypatch.setattr(sdpa_packed, "eager_launch", eager_launch, raising=False)
    eager_plan.clear()
    return made, launched


def full_path(c, **kw):
    counts = kw.get("block_counts")
    return ops.run_forward(c.q, c.k, c.v, c.block_indices, None, counts, None, None,
                           c.block_size, kw.get("scale"), "auto", True)


def test_a_repeated_call_launches_from_its_plan_with_the_same_result(monkeypatch):
    made, launched = planned_sdpa(monkeypatch)
    first, second = case(), make_case(B=1, TQ=24, HQ=4, H=2, Dk=16, S=3, block_size=8, seed=9)
    for c in (first, second):
        o, lse = nsa_ext.selection_attention(*c.args(), return_lse=True)
        o_full, lse_full = full_path(c)
        torch.testing.assert_close(o, o_full, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_full, rtol=0, atol=0)
    assert len(made) == 1 and len(launched) == 2 and launched[1] is second.q


def test_other_metadata_scalars_or_settings_make_another_plan(monkeypatch):
    made, launched = planned_sdpa(monkeypatch)
    c = case()
    nsa_ext.selection_attention(*c.args())
    nsa_ext.selection_attention(*c.args())
    assert len(made) == 1
    nsa_ext.selection_attention(*c.args(), scale=0.5)
    nsa_ext.selection_attention(*c.args(), block_counts=2)
    nsa_ext.selection_attention(*c.args(), return_lse=True)
    longer = make_case(B=1, TQ=32, HQ=4, H=2, Dk=16, S=3, block_size=8, seed=5)
    nsa_ext.selection_attention(*longer.args())
    nsa_ext.selection_attention(c.q.double().float(), c.k, c.v, c.block_indices.int(), 8)
    assert len(made) == 6
    monkeypatch.setenv("NSA_SDPA_GATHER_BUDGET_MB", "256")          # new settings object
    o = nsa_ext.selection_attention(*c.args())
    assert len(made) == 7
    torch.testing.assert_close(o, full_path(c)[0], rtol=0, atol=0)


def test_calls_the_plans_do_not_take(monkeypatch):
    made, launched = planned_sdpa(monkeypatch)
    c = case()
    counts = torch.full((1, 24, 2), 2, dtype=torch.int64)
    nsa_ext.selection_attention(*c.args(), block_counts=counts)      # a block_counts tensor
    q = c.q.clone().requires_grad_()
    nsa_ext.selection_attention(q, c.k, c.v, c.block_indices, c.block_size)   # gradients
    var = make_case(seqlens=[10, 14], HQ=4, H=2, Dk=16, S=3, block_size=8)
    nsa_ext.selection_attention(*var.args(), **var.kwargs())          # cu_seqlens
    monkeypatch.setenv("NSA_DEBUG_LOG", "1")                          # per-call logs
    nsa_ext.selection_attention(*c.args())
    assert made == [] and launched == []


def test_a_declining_launcher_falls_back_to_the_full_path(monkeypatch):
    made, launched = planned_sdpa(monkeypatch, decline=True)
    c = case()
    o = nsa_ext.selection_attention(*c.args())
    o2 = nsa_ext.selection_attention(*c.args())
    assert len(made) == 1 and len(launched) == 2
    torch.testing.assert_close(o, full_path(c)[0], rtol=0, atol=0)
    torch.testing.assert_close(o2, o, rtol=0, atol=0)


def test_invalid_calls_raise_as_before_whatever_plans_exist(monkeypatch):
    planned_sdpa(monkeypatch)
    c = case()
    nsa_ext.selection_attention(*c.args())
    with pytest.raises(ValueError, match="block_indices"):
        nsa_ext.selection_attention(c.q, c.k, c.v, c.block_indices.float(), c.block_size)
    with pytest.raises(ValueError, match="k:"):
        nsa_ext.selection_attention(c.q, c.k.half(), c.v, c.block_indices, c.block_size)
    with pytest.raises(ValueError, match="block_size"):
        nsa_ext.selection_attention(c.q, c.k, c.v, c.block_indices, 6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("TQ,TK", [(1, 8192), (64, 4096)], ids=["decode", "chunk"])
def test_gpu_planned_calls_match_the_full_path_bitwise(backend, TQ, TK):
    from nsa_ext import eager_plan

    shape = dict(B=1, TQ=TQ, TK=TK, HQ=64, H=4, Dk=128, S=16, block_size=64,
                 dtype=torch.bfloat16, device="cuda")
    first = make_case(seed=1, **shape)
    if nsa_ext.explain(*first.args(), backend=backend).chosen is None:
        pytest.skip(f"{backend} cannot serve this case here")
    eager_plan.clear()
    for seed in (1, 2, 3):
        c = make_case(seed=seed, **shape)
        o, lse = nsa_ext.selection_attention(*c.args(), backend=backend, return_lse=True)
        o_full, lse_full = ops.run_forward(c.q, c.k, c.v, c.block_indices, None, None, None,
                                           None, 64, None, backend, True)
        assert torch.equal(o, o_full) and torch.equal(lse, lse_full)
    launches = [entry[1] for entry in eager_plan._PLANS.values()]
    chosen = nsa_ext.explain(*first.args(), backend=backend).chosen
    if TQ == 1 or chosen == "cuda":       # the split-KV step and the CUDA row path have launchers
        assert launches and all(launch is not None for launch in launches)
    if TQ == 1 and chosen == "triton":    # calls 2 and 3 skipped Triton's launcher
        assert [launch.split.direct_launches for launch in launches] == [2]


@pytest.mark.gpu
def test_gpu_eager_decode_takes_cuda_first_and_a_capture_takes_triton():
    from nsa_ext import dispatch
    from nsa_ext.call import describe_call
    from nsa_ext.device import device_facts

    c = make_case(B=1, TQ=1, TK=8192, HQ=64, H=4, Dk=128, S=16, block_size=64,
                  dtype=torch.bfloat16, device="cuda")
    from nsa_ext.config import load_settings
    settings = load_settings()
    facts = device_facts(c.q.device)
    rows = settings.thresholds.get(facts.arch or "", {}).get(dispatch.CUDA_FIRST_EAGER_ROWS_KEY)
    if rows is None or nsa_ext.explain(*c.args(), backend="cuda").chosen is None \
            or nsa_ext.explain(*c.args(), backend="triton").chosen is None:
        pytest.skip("no measured eager order here, or a kernel backend is missing")
    call = describe_call(*c.args())
    assert dispatch.choose(call, "auto").chosen == "cuda"
    nsa_ext.selection_attention(*c.args())              # warm-up: Triton stays uncompiled
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        in_capture = dispatch.choose(call, "auto").chosen
        o = nsa_ext.selection_attention(*c.args())
    graph.replay()
    torch.cuda.synchronize()
    assert in_capture == "triton"
    ref = nsa_ext.selection_attention(c.q.float(), c.k.float(), c.v.float(), c.block_indices, 64,
                                      backend="reference")
    torch.testing.assert_close(o.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_cuda_plans_launch_through_the_direct_entry_with_the_operators_result(monkeypatch):
    from nsa_ext import _ext, eager_plan
    from nsa_ext.backends import cuda
    from nsa_ext.call import describe_call
    from nsa_ext.selection import row_geometry

    direct = _ext.direct_rows()
    c = make_case(B=1, TQ=1, TK=8192, HQ=64, H=4, Dk=128, S=16, block_size=64,
                  dtype=torch.bfloat16, device="cuda")
    if direct is None or nsa_ext.explain(*c.args(), backend="cuda").chosen is None:
        pytest.skip("no extension with the direct entry here")
    seen = []

    def counting(*args):
        seen.append(len(args))
        return direct(*args)

    monkeypatch.setattr(_ext, "direct_rows", lambda: counting)
    eager_plan.clear()
    o, lse = nsa_ext.selection_attention(*c.args(), backend="cuda", return_lse=True)
    assert seen == [11]
    call = describe_call(*c.args())
    geometry = row_geometry(call)
    sms = torch.cuda.get_device_properties(c.q.device).multi_processor_count
    args = (c.q, c.k, c.v, c.block_indices, None, call.block_count_limit, geometry.pos,
            geometry.k_offset, 64, call.scale, cuda.num_splits(call, sms))
    o_op, lse_op = torch.ops.nsa_ext_cuda.selection_fwd_rows.default(*args)
    o_direct, lse_direct = direct(*args)
    assert torch.equal(o_op, o_direct) and torch.equal(lse_op, lse_direct)
    assert torch.equal(o, o_op) and torch.equal(lse, lse_op)
    # The same checks as the operator: a CPU tensor is refused by both, in the same words.
    bad = (args[0].cpu(),) + args[1:]
    with pytest.raises(RuntimeError) as by_op:
        torch.ops.nsa_ext_cuda.selection_fwd_rows.default(*bad)
    with pytest.raises(RuntimeError) as by_direct:
        direct(*bad)
    assert str(by_direct.value).splitlines()[0] == str(by_op.value).splitlines()[0]
    eager_plan.clear()
