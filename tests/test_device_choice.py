"""The schedule chosen on the device: `nsa_ext_cuda::selection_fwd_auto` (backends/cuda.py
device_choice).

CPU: which calls the device chooses for (auto only; below the measured `sel_tile_min_rows`, or
above it where Triton's kv is no candidate; where the Hopper tile kernel serves the call; with the
crossover the host chooser would apply) and the
operator's fake implementation. GPU (marked `gpu`, SM 9.0 with a build that has the operator):
the operator runs exactly the kernel the call's counts pick, bitwise the same as that kernel's
own operator (row: selection_fwd; tile: selection_fwd_tile) over group sizes, head dims,
varlen, block_counts, empty rows and grid caps; the backend's auto path, its eager plan and the
Triton backend's hand-over take it; a captured CUDA graph re-chooses on replay when the indices
change; the operator's errors name the argument.
"""
from __future__ import annotations

import pytest
import torch

import nsa_ext
from common import assert_close_to_reference, make_case
from test_cuda_hopper import CASES as TILE_CASES
from nsa_ext import _ext, eager_plan
from nsa_ext.backends import cuda as cuda_backend
from nsa_ext.call import describe_call
from nsa_ext.config import Settings, load_settings
from nsa_ext.device import DeviceFacts, device_facts
from nsa_ext.reference import reference_forward
from nsa_ext.selection import canonical_blocks, row_geometry

H200 = DeviceFacts("cuda", (9, 0), "NVIDIA H200", 132)
A100 = DeviceFacts("cuda", (8, 0), "NVIDIA A100", 108)
SM90 = {"sel_tile_min_rows": 32768, "sel_tile_max_union_pct": 50, "sel_kv_max_g": 2,
        "sel_kv_tile_max_union_pct": 50, "sel_cuda_tile_max_union_pct": 80}
HOPPER = (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
          and _ext.has_fwd_auto() and _ext.build_info().get("hopper_tile", False))
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs an SM 9.0 GPU and a build with "
                                                     "selection_fwd_auto")


def meta_call(G=16, T=256, H=2, S=4, dtype=torch.bfloat16, block_size=64):
    q = torch.empty(1, T, H * G, 128, dtype=dtype, device="meta")
    k = torch.empty(1, T, H, 128, dtype=dtype, device="meta")
    idx = torch.zeros(1, T, H, S, dtype=torch.int32, device="meta")
    return describe_call(q, k, k, idx, block_size)


@pytest.fixture
def hopper_build(monkeypatch):
    """The extension as a Hopper build with the operator (CPU: the decision only)."""
    monkeypatch.setattr(_ext, "has_fwd_auto", lambda: True)
    monkeypatch.setattr(_ext, "build_info", lambda: {"hopper_tile": True})


@pytest.mark.parametrize("settings,call_kwargs,facts,expected", [
    (Settings(thresholds={"sm90": SM90}), {}, H200, 80),                 # the CUDA tile key
    (Settings(thresholds={"sm90": {k: v for k, v in SM90.items()
                                   if k != "sel_cuda_tile_max_union_pct"}}), {}, H200, 50),
    (Settings(thresholds={"sm90": SM90}), dict(T=16384), H200, 80),      # 32768 rows, G = 16
    (Settings(thresholds={"sm90": SM90}), dict(T=16384, G=2), H200, None),   # kv: the host
    (Settings(thresholds={"sm90": SM90}), dict(T=256, G=2), H200, 80),   # small: no kv there
    (Settings(thresholds={"sm90": SM90}, sel_schedule="row"), {}, H200, None),   # forced
    (Settings(thresholds={"sm90": SM90}, sel_schedule="tile"), {}, H200, None),
    (Settings(thresholds={}), {}, H200, None),                           # nothing measured
    (Settings(thresholds={"sm90": SM90}), {}, A100, None),               # no tile kernel
    (Settings(thresholds={"sm90": SM90}), dict(G=80), H200, None),
    (Settings(thresholds={"sm90": SM90}), dict(dtype=torch.float32), H200, None),
    (Settings(thresholds={"sm90": SM90}), dict(block_size=32), H200, None),
    (Settings(thresholds={"sm90": SM90}), dict(S=33), H200, None),       # past the canonical op
    (Settings(thresholds={"sm90": SM90}), dict(T=1), H200, None),        # decode: row, no choice
    (Settings(thresholds={"sm90": SM90}), dict(T=2), H200, 80),
])
def test_device_choice_decides_from_metadata(hopper_build, settings, call_kwargs, facts,
                                             expected):
    assert cuda_backend.device_choice(meta_call(**call_kwargs), settings, facts) == expected


def test_device_choice_needs_the_operator(monkeypatch):
    monkeypatch.setattr(_ext, "has_fwd_auto", lambda: False)
    monkeypatch.setattr(_ext, "build_info", lambda: {"hopper_tile": True})
    settings = Settings(thresholds={"sm90": SM90})
    assert cuda_backend.device_choice(meta_call(), settings, H200) is None


@pytest.mark.skipif(not _ext.has_fwd_auto(), reason="the extension has no selection_fwd_auto")
def test_auto_op_fake_gives_the_output_shapes():
    m = dict(device="meta")
    q = torch.empty(2, 70, 6, 64, dtype=torch.bfloat16, **m)
    k = torch.empty(2, 90, 2, 64, dtype=torch.bfloat16, **m)
    v = torch.empty(2, 90, 2, 32, dtype=torch.bfloat16, **m)
    idx = torch.empty(2, 70, 2, 4, dtype=torch.int32, **m)
    pos = torch.empty(2, 70, dtype=torch.int64, **m)
    args = (q, k, v, idx, None, 4, pos, pos, 64, 0.125, 80, 0)
    o, lse = torch.ops.nsa_ext_cuda.selection_fwd_auto(*args)
    assert o.shape == (2, 70, 6, 32) and lse.shape == (2, 70, 6) and lse.dtype == torch.float32
    torch.library.opcheck(torch.ops.nsa_ext_cuda.selection_fwd_auto.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# --- GPU ------------------------------------------------------------------------------------

# The tile kernel's parity cases (G = 1..64, head dims, block sizes 64-256, chunked, TQ = 1,
# block_counts, varlen): every shape the tile side of the operator serves. Where a tile's rows
# fit one warp's 2, 4 or 8 passes (G >= 4 at S <= 16, G >= 8 at S <= 32) the operator computes the
# canonical rows and the unions in one kernel (csrc/selection_union.cu, canonical_union_kernel);
# the cases below give that kernel what the parity cases give it only at small S and large G:
# each pass count at half-warp (S <= 16) and whole-warp (S <= 32) rows, varlen key offsets, a
# block_counts tensor, int32 indices, chunked positions, 128-token blocks.
CASES = {
    **TILE_CASES,
    "prologue_G16_S16_varlen_counts": dict(seqlens=[70, 1, 150, 33], HQ=32, H=2, Dk=64, S=16,
                                           block_size=64, block_counts="tensor"),
    "prologue_G32_S24_chunked_int32": dict(B=2, TQ=40, TK=1500, HQ=32, H=1, Dk=64, S=24,
                                           block_size=64, index_dtype=torch.int32),
    "prologue_G16_S16_bs128": dict(B=1, TQ=300, HQ=16, H=1, Dk=128, S=16, block_size=128),
    "prologue_G8_S16_4_passes": dict(B=2, TQ=100, TK=1300, HQ=16, H=2, Dk=64, S=16,
                                     block_size=64, block_counts="tensor"),
    "prologue_G4_S16_8_passes": dict(seqlens=[90, 7, 140], HQ=8, H=2, Dk=64, S=16, block_size=64),
    "prologue_G16_S24_4_passes": dict(B=1, TQ=120, TK=2000, HQ=16, H=1, Dk=128, S=24,
                                      block_size=64, index_dtype=torch.int32),
    "prologue_G8_S32_8_passes": dict(B=1, TQ=200, TK=2500, HQ=8, H=1, Dk=64, S=32, block_size=64),
}


def shared_blocks(case):
    """Every row chooses block 0 and its own block: neighbours share all they chose."""
    idx = case.block_indices
    own = row_geometry(describe_call(*case.args(), **case.kwargs())).pos // case.block_size
    idx[..., 0] = 0
    idx[..., 1] = own[:, :, None]
    idx[..., 2:] = -1
    return case


def disjoint_blocks(case):
    """Neighbouring rows choose disjoint windows of S blocks (modulo their visible blocks): with
    many visible blocks a tile's union is about all its selections."""
    idx = case.block_indices
    S = idx.shape[-1]
    own = row_geometry(describe_call(*case.args(), **case.kwargs())).pos // case.block_size
    t = torch.arange(idx.shape[1], device=idx.device)
    window = (t[None, :, None] * S + torch.arange(S, device=idx.device)) % (own[:, :, None] + 1)
    idx.copy_(window[:, :, None, :].expand_as(idx))
    return case


def op_inputs(case):
    call = describe_call(*case.args(), **case.kwargs(), need_lse=True)
    geometry = row_geometry(call)
    counts = call.block_counts
    return call, geometry, (call.block_indices.contiguous(), counts, call.block_count_limit,
                            geometry.pos.contiguous(), geometry.k_offset.contiguous(),
                            call.block_size, call.scale)


def kernels_outputs(call, geometry, max_ctas):
    """(row, tile) outputs of the two kernels' own operators, and the call's union ratio in %."""
    from nsa_ext.schedules.tiles import tile_unions

    blocks, num_blocks = canonical_blocks(call, geometry)
    QT = 64 // call.group_size
    union = tile_unions(call, geometry, blocks, QT)
    pos, k_offset = geometry.pos.contiguous(), geometry.k_offset.contiguous()
    q, k, v = call.q.contiguous(), call.k.contiguous(), call.v.contiguous()
    row = torch.ops.nsa_ext_cuda.selection_fwd(q, k, v, blocks, num_blocks, pos, k_offset,
                                               call.block_size, call.scale, 1)
    tile = torch.ops.nsa_ext_cuda.selection_fwd_tile(q, k, v, blocks, num_blocks, pos, k_offset,
                                                     union.starts, union.counts, QT,
                                                     call.block_size, call.scale, max_ctas)
    selections, unions = int(num_blocks.sum()), int(union.counts.sum())
    return row, tile, selections, unions


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("indices", ["messy", "shared"])
@pytest.mark.parametrize("max_ctas", [0, 2])
def test_auto_op_runs_the_kernel_the_counts_pick(name, dtype, indices, max_ctas):
    case = make_case(dtype=dtype, device="cuda", seed=sum(map(ord, name)), **CASES[name])
    if indices == "shared":
        shared_blocks(case)
    rows = case.block_indices.shape[1]
    if rows > 1:
        case.block_indices[:, : max(1, rows // 7)] = -1       # rows with nothing selected
    call, geometry, args = op_inputs(case)
    row, tile, selections, unions = kernels_outputs(call, geometry, max_ctas)
    q, k, v = call.q.contiguous(), call.k.contiguous(), call.v.contiguous()
    for pct in (0, 50, 80, 100):
        o, lse = torch.ops.nsa_ext_cuda.selection_fwd_auto(q, k, v, *args, pct, max_ctas)
        picks_tile = unions * 100 <= pct * selections if selections else pct >= 100
        want = tile if picks_tile else row
        assert torch.equal(o, want[0]) and torch.equal(lse, want[1]), \
            f"pct={pct}: not the {'tile' if picks_tile else 'row'} kernel's output"
    ref_call = describe_call(case.q.float(), case.k.float(), case.v.float(), case.block_indices,
                             case.block_size, **case.kwargs(), need_lse=True)
    o_ref, lse_ref = reference_forward(ref_call)
    assert_close_to_reference(o, o_ref.to(dtype), dtype, lse, lse_ref)


@pytest.mark.gpu
@needs_hopper
def test_auto_op_takes_both_sides_of_the_crossover():
    """The shared pattern's union is far below 80 % of its selections and the messy one's far
    above at G = 16: the same shapes run tile for one and row for the other."""
    picked = {}
    for indices in ("shared", "disjoint"):
        case = make_case(B=1, TQ=512, TK=4096, HQ=16, H=1, Dk=128, S=8, block_size=64,
                         dtype=torch.bfloat16, device="cuda", seed=4)
        (shared_blocks if indices == "shared" else disjoint_blocks)(case)
        call, geometry, args = op_inputs(case)
        row, tile, selections, unions = kernels_outputs(call, geometry, 0)
        o, _ = torch.ops.nsa_ext_cuda.selection_fwd_auto(call.q, call.k, call.v, *args, 80, 0)
        picked[indices] = ("tile" if torch.equal(o, tile[0]) else
                           "row" if torch.equal(o, row[0]) else "neither")
        assert (picked[indices] == "tile") == (unions * 100 <= 80 * selections), \
            (indices, unions, selections)
    assert picked == {"shared": "tile", "disjoint": "row"}, picked


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("TQ", [256, 16384])    # below and above sel_tile_min_rows (32768 rows)
def test_cuda_backend_auto_takes_the_device_choice(monkeypatch, TQ):
    monkeypatch.setenv("NSA_SEL_SCHEDULE", "auto")
    case = shared_blocks(make_case(B=1, TQ=TQ, HQ=32, H=2, Dk=128, S=4, block_size=64,
                                   dtype=torch.bfloat16, device="cuda", seed=2))
    call = describe_call(*case.args(), **case.kwargs(), need_lse=True)
    settings, facts = load_settings(), device_facts(call.device)
    # The configured crossover (configs/base.yaml), whatever the last bench made of it.
    pct = settings.thresholds[facts.arch]["sel_cuda_tile_max_union_pct"]
    assert 0 < pct <= 100
    assert cuda_backend.device_choice(call, settings, facts) == pct
    seen = []
    real = cuda_backend.device_choice
    monkeypatch.setattr(cuda_backend, "device_choice",
                        lambda *a: seen.append(real(*a)) or seen[-1])
    o, lse = cuda_backend.forward(call)
    assert seen == [pct]
    _, geometry, args = op_inputs(case)
    want = torch.ops.nsa_ext_cuda.selection_fwd_auto(call.q, call.k, call.v, *args, pct, 0)
    assert torch.equal(o, want[0]) and torch.equal(lse, want[1])
    lines = nsa_ext.explain(*case.args(), **case.kwargs(), backend="cuda").details["cuda"]
    assert lines[0].startswith("schedule: tile (chosen on the device"), lines


@pytest.mark.gpu
@needs_hopper
def test_eager_plan_launches_the_auto_op(monkeypatch):
    monkeypatch.setenv("NSA_SEL_SCHEDULE", "auto")
    eager_plan.clear()
    case = shared_blocks(make_case(B=1, TQ=512, HQ=16, H=2, Dk=128, S=4, block_size=64,
                                   dtype=torch.bfloat16, device="cuda", seed=3))
    call = describe_call(*case.args(), **case.kwargs())
    launch = cuda_backend.eager_launch(call, load_settings(), device_facts(call.device))
    assert launch is not None and launch.__name__ == "launch_auto"
    o_plan, lse_plan = launch(case.q, case.k, case.v, case.block_indices)
    o, lse = cuda_backend.forward(describe_call(*case.args(), **case.kwargs(), need_lse=True))
    assert torch.equal(o_plan, o) and torch.equal(lse_plan, lse)
    first = nsa_ext.selection_attention(*case.args(), **case.kwargs(), backend="cuda")
    again = nsa_ext.selection_attention(*case.args(), **case.kwargs(), backend="cuda")
    assert torch.equal(first, o) and torch.equal(again, o)


@pytest.mark.gpu
@needs_hopper
def test_captured_graph_chooses_again_on_replay(monkeypatch):
    """No host decision is baked into the graph: new indices with another union ratio replay
    into the other kernel, and the result is that kernel's (equal to an eager call's)."""
    monkeypatch.setenv("NSA_SEL_SCHEDULE", "auto")
    case = shared_blocks(make_case(B=1, TQ=512, TK=4096, HQ=16, H=2, Dk=128, S=8,
                                   block_size=64, dtype=torch.bfloat16, device="cuda", seed=6))
    disjoint = disjoint_blocks(make_case(B=1, TQ=512, TK=4096, HQ=16, H=2, Dk=128, S=8,
                                         block_size=64, dtype=torch.bfloat16, device="cuda",
                                         seed=6)).block_indices
    call = describe_call(*case.args(), **case.kwargs(), need_lse=True)
    cuda_backend.forward(call)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o_graph, lse_graph = cuda_backend.forward(call)
    torch.cuda.current_stream().wait_stream(stream)
    picked = []
    for indices in (case.block_indices.clone(), disjoint):
        case.block_indices.copy_(indices)
        graph.replay()
        torch.cuda.synchronize()
        o, lse = cuda_backend.forward(call)
        assert torch.equal(o_graph, o) and torch.equal(lse_graph, lse)
        _, geometry, _ = op_inputs(case)
        row, tile, _, _ = kernels_outputs(call, geometry, 0)
        picked.append("tile" if torch.equal(o, tile[0]) else
                      "row" if torch.equal(o, row[0]) else "neither")
        ref_call = describe_call(case.q.float(), case.k.float(), case.v.float(),
                                 case.block_indices, case.block_size, need_lse=True)
        o_ref, lse_ref = reference_forward(ref_call)
        assert_close_to_reference(o_graph, o_ref.to(o.dtype), o.dtype, lse_graph, lse_ref)
    assert picked == ["tile", "row"], picked


@pytest.mark.gpu
@needs_hopper
def test_triton_hands_small_calls_to_the_device_choice(monkeypatch, tmp_path):
    """Under auto with Triton first and sel_cuda_first_tile = 1, a call below sel_tile_min_rows
    runs the CUDA extension's device-chosen schedule (bitwise the named cuda backend's)."""
    import yaml

    from nsa_ext.config import config_path

    data = yaml.safe_load(config_path().read_text())
    data["runtime"]["thresholds"]["sm90"].update(sel_cuda_first_tile=1, sel_cuda_first=0,
                                                 sel_cuda_first_eager_rows=0)
    path = tmp_path / "nsa.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("NSA_CONFIG", str(path))
    case = shared_blocks(make_case(B=1, TQ=1024, HQ=16, H=2, Dk=128, S=4, block_size=64,
                                   dtype=torch.bfloat16, device="cuda", seed=8))
    decision = nsa_ext.explain(*case.args(), **case.kwargs())
    assert decision.chosen == "triton" and decision.tile_backend == "cuda", str(decision)
    assert decision.details["triton"][0].startswith("handed to the CUDA extension"), str(decision)
    o = nsa_ext.selection_attention(*case.args(), **case.kwargs())
    o_cuda = nsa_ext.selection_attention(*case.args(), **case.kwargs(), backend="cuda")
    assert torch.equal(o, o_cuda)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("change,needle", [
    (dict(pct=101), "tile_max_union_pct must be in 0..100"),
    (dict(pct=-1), "tile_max_union_pct must be in 0..100"),
    (dict(max_ctas=-1), "max_ctas must be >= 0"),
    (dict(HQ=80), "at most 64 query heads"),
    (dict(block_size=32), "block_size must be a multiple of 64"),
    (dict(dtype=torch.float32), "q must be float16 or bfloat16"),
])
def test_auto_op_errors_name_the_argument(change, needle):
    pct, max_ctas = change.pop("pct", 80), change.pop("max_ctas", 0)
    kwargs = dict(B=1, TQ=64, HQ=4, H=1, Dk=64, S=3, block_size=64, dtype=torch.bfloat16,
                  device="cuda")
    kwargs.update(change)
    case = make_case(**kwargs)
    call, _, args = op_inputs(case)
    with pytest.raises(RuntimeError, match=needle):
        torch.ops.nsa_ext_cuda.selection_fwd_auto(call.q, call.k, call.v, *args, pct, max_ctas)
