"""The CUDA backend's Hopper tile kernel (csrc/hopper/: wgmma + TMA, SM 9.0).

CPU: which calls it serves and the reasons it names for the others; that forcing `kv` makes the
CUDA backend unable (Triton's schedule) and forcing `tile` where the kernel cannot run names why;
the operator's fake implementation. GPU (marked `gpu`, SM 9.0 with a build that has the kernel):
the parity matrix with the tile schedule forced (G = 1, 3, 16, 24, 64, Dk=192/Dv=128, d = 64 and
256, block sizes 64/128, varlen ragged and chunked, TQ = 1, TQ < TK, messy indices, block_counts,
empty rows) in bf16 and fp16, tiles whose rows chose the same / disjoint blocks, a block chosen
by every row, bitwise run-to-run equality, and that the kernel really ran (a spy on the seam);
the parity cases also with the persistent grid capped (NSA_SEL_TILE_MAX_CTAS), so that each CTA
runs many tiles. At d128 with 64-key blocks the small cases run the pair-step kernel (two union
chunks a step) and `G16_many_tiles` the 64-key kernel (the launcher picks by grid rounds).
"""
from __future__ import annotations

import pytest
import torch

import nsa_ext
from common import assert_close_to_reference, make_case
from nsa_ext import _ext
from nsa_ext.backends import cuda as cuda_backend
from nsa_ext.call import describe_call
from nsa_ext.config import Settings, load_settings
from nsa_ext.device import DeviceFacts
from nsa_ext.reference import reference_forward
from nsa_ext.schedules.tiles import tile_unions
from nsa_ext.selection import canonical_blocks, row_geometry

H200 = DeviceFacts("cuda", (9, 0), "NVIDIA H200", 132)
A100 = DeviceFacts("cuda", (8, 0), "NVIDIA A100", 108)
needs_ext = pytest.mark.skipif(not _ext.available(),
                               reason=f"nsa_ext._C not usable: {_ext.unavailable_reason()}")
HOPPER = (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
          and _ext.build_info().get("hopper_tile", False))
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs an SM 9.0 GPU and a build with "
                                                     "the Hopper kernel")


def meta_call(G=16, dtype=torch.bfloat16, block_size=64, D=128, T=256):
    q = torch.empty(1, T, 2 * G, D, dtype=dtype, device="meta")
    k = torch.empty(1, T, 2, D, dtype=dtype, device="meta")
    idx = torch.zeros(1, T, 2, 4, dtype=torch.int32, device="meta")
    return describe_call(q, k, k, idx, block_size)


@pytest.mark.parametrize("kwargs,facts,needle", [
    (dict(), A100, "SM 9.0 only"),
    (dict(G=80), H200, "G=80 > 64"),
    (dict(block_size=32), H200, "64-key chunks"),
    (dict(dtype=torch.float32), H200, "float16 and bfloat16"),
])
def test_tile_reasons_name_what_the_kernel_cannot_serve(kwargs, facts, needle):
    reasons = cuda_backend.tile_reasons(meta_call(**kwargs), facts)
    assert any(needle in r for r in reasons), reasons


@needs_ext
def test_a_servable_call_has_no_tile_reason_on_a_hopper_build():
    if not _ext.build_info().get("hopper_tile"):
        pytest.skip("this build has no Hopper kernel")
    assert cuda_backend.tile_reasons(meta_call(G=3), H200) == []


@needs_ext
def test_forced_kv_leaves_the_cuda_backend_and_auto_takes_another(monkeypatch):
    monkeypatch.setenv("NSA_SEL_SCHEDULE", "kv")
    from nsa_ext.config import load_settings

    reasons = cuda_backend.reasons_unsupported(meta_call(), load_settings(), H200)
    assert any("kv is the Triton backend's" in r for r in reasons), reasons


@needs_ext
def test_forced_tile_names_why_the_kernel_cannot_serve(monkeypatch):
    monkeypatch.setenv("NSA_SEL_SCHEDULE", "tile")
    from nsa_ext.config import load_settings

    reasons = cuda_backend.reasons_unsupported(meta_call(G=80), load_settings(), H200)
    assert any("tile" in r and "G=80" in r for r in reasons), reasons


def test_small_g_steers_auto_to_triton_where_kv_is_measured():
    settings = Settings(thresholds={"sm90": {"sel_kv_max_g": 2}})
    facts = DeviceFacts("cuda", (9, 0), "NVIDIA H200", 132)
    assert any("kv" in p for p in cuda_backend.auto_preferences(meta_call(G=1), settings, facts))
    assert cuda_backend.auto_preferences(meta_call(G=16), settings, facts) == []


@needs_ext
def test_tile_fake_implementation_gives_the_output_shapes():
    B, T, H, G, Dk, Dv = 2, 70, 2, 3, 64, 32
    m = dict(device="meta")
    q = torch.empty(B, T, H * G, Dk, dtype=torch.bfloat16, **m)
    k = torch.empty(B, T, H, Dk, dtype=torch.bfloat16, **m)
    v = torch.empty(B, T, H, Dv, dtype=torch.bfloat16, **m)
    blocks = torch.empty(B, T, H, 4, dtype=torch.int32, **m)
    nb = torch.empty(B, T, H, dtype=torch.int32, **m)
    pos = torch.empty(B, T, dtype=torch.int64, **m)
    NT = -(-T // 21)
    starts = torch.empty(B, NT, H, 84, dtype=torch.int64, **m)
    counts = torch.empty(B, NT, H, dtype=torch.int32, **m)
    o, lse = torch.ops.nsa_ext_cuda.selection_fwd_tile(q, k, v, blocks, nb, pos, pos, starts,
                                                       counts, 21, 64, 0.125)
    assert o.shape == (B, T, H * G, Dv) and lse.shape == (B, T, H * G)
    assert lse.dtype == torch.float32


# --- GPU ------------------------------------------------------------------------------------

CASES = {
    "G1": dict(B=2, TQ=150, HQ=4, H=4, Dk=64, S=5, block_size=64),
    "G3": dict(B=1, TQ=200, HQ=6, H=2, Dk=128, S=6, block_size=64),
    "G16": dict(B=1, TQ=130, HQ=16, H=1, Dk=128, S=4, block_size=64),
    # d128 with 64-key blocks runs the pair-step kernel on grids of few tiles (the cases above
    # and below) and the 64-key kernel on grids of many (1024 tiles here; the reference is dense,
    # O(TQ x HQ x TK) per sequence, so the tiles come from B and H rather than a long sequence).
    "G16_many_tiles": dict(B=2, TQ=512, HQ=64, H=4, Dk=128, S=6, block_size=64),
    # The pair kernel keeps a tile's canonical rows in shared memory up to 240 entries: 64 tokens
    # x 8 here read them from global memory instead.
    "G1_d128_rows_in_global": dict(B=1, TQ=300, HQ=2, H=2, Dk=128, S=8, block_size=64),
    "G24": dict(B=1, TQ=90, HQ=48, H=2, Dk=64, S=4, block_size=64),
    "G64": dict(B=1, TQ=100, HQ=64, H=1, Dk=128, S=4, block_size=64),
    "dk192_dv128": dict(B=1, TQ=150, HQ=8, H=2, Dk=192, Dv=128, S=4, block_size=64),
    "d256": dict(B=1, TQ=160, HQ=16, H=1, Dk=256, S=3, block_size=64),
    "bs128": dict(B=1, TQ=400, HQ=4, H=1, Dk=64, S=3, block_size=128),
    # Four 64-key chunks per block: the kernel's chunk index is a shift and a mask.
    "bs256": dict(B=1, TQ=700, HQ=8, H=1, Dk=128, S=3, block_size=256),
    "chunked_prefill": dict(B=2, TQ=37, TK=700, HQ=4, H=2, Dk=128, S=3, block_size=64),
    "TQ1": dict(B=3, TQ=1, TK=1000, HQ=16, H=2, Dk=128, S=8, block_size=64),
    "counts_tensor": dict(B=2, TQ=64, HQ=4, H=2, Dk=64, S=6, block_size=64,
                          block_counts="tensor"),
    "varlen_ragged": dict(seqlens=[37, 1, 130, 13, 64], HQ=8, H=2, Dk=128, S=5, block_size=64),
    "varlen_chunked": dict(seqlens=[5, 1, 20], seqlens_k=[170, 16, 200], HQ=6, H=2, Dk=64, S=5,
                           block_size=64),
}


@pytest.fixture
def tile_spy(monkeypatch):
    """Forces the tile schedule and counts the Hopper kernel's launches."""
    monkeypatch.setenv("NSA_SEL_SCHEDULE", "tile")
    calls = []
    real = cuda_backend.tile_forward

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(cuda_backend, "tile_forward", spy)
    return calls


# The kernel's grid caps: 0 = as many persistent CTAs as fit (each small test call then runs one
# tile per CTA); 2 = every CTA strides over many tiles (the copies issued across tile boundaries).
GRID_CAPS = [0, 2]


def cap_grid(monkeypatch, max_ctas):
    monkeypatch.setenv("NSA_SEL_TILE_MAX_CTAS", str(max_ctas))


def run_tile(case, calls):
    call = describe_call(*case.args(), **case.kwargs(), need_lse=True)
    before = len(calls)
    o, lse = cuda_backend.forward(call, force_splits=1)
    torch.cuda.synchronize()
    assert len(calls) == before + 1, "the Hopper tile kernel did not run"
    assert calls[-1][-1] == load_settings().sel_tile_max_ctas, "the grid cap did not reach the op"
    ref_call = describe_call(case.q.float(), case.k.float(), case.v.float(), case.block_indices,
                             case.block_size, **case.kwargs(), need_lse=True)
    o_ref, lse_ref = reference_forward(ref_call)
    return o, lse, o_ref, lse_ref


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("max_ctas", GRID_CAPS)
def test_tile_kernel_matches_reference(tile_spy, monkeypatch, name, dtype, max_ctas):
    cap_grid(monkeypatch, max_ctas)
    case = make_case(dtype=dtype, device="cuda", seed=sum(map(ord, name)), **CASES[name])
    rows = case.block_indices.shape[1]
    if rows > 1:
        case.block_indices[:, : max(1, rows // 7)] = -1       # rows with nothing selected
    o, lse, o_ref, lse_ref = run_tile(case, tile_spy)
    assert_close_to_reference(o, o_ref.to(dtype), dtype, lse, lse_ref)
    assert torch.isfinite(lse_ref).any()


def _pattern_case(pattern, dtype=torch.bfloat16, G=4, T=512, H=2, D=128, S=6):
    case = make_case(B=1, TQ=T, HQ=H * G, H=H, Dk=D, S=S, block_size=64, dtype=dtype,
                     device="cuda", seed=3)
    t = torch.arange(T, device="cuda")
    nblk = t // 64                                        # each query's own (last visible) block
    idx = case.block_indices
    if pattern == "shared":      # every row of a tile chose the same blocks: 0 and its own
        idx[..., 0] = 0
        idx[..., 1] = (nblk // 2 * 2)[None, :, None]
        idx[..., 2:] = -1
    elif pattern == "disjoint":  # neighbouring rows chose different blocks
        idx[..., 0] = (t % (nblk + 1))[None, :, None]
        idx[..., 1:] = -1
    elif pattern == "popular":   # block 0 chosen by every row, beside messy entries
        idx[..., -1] = 0
    return case


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("pattern", ["shared", "disjoint", "popular"])
@pytest.mark.parametrize("max_ctas", GRID_CAPS)
def test_tile_kernel_on_overlap_patterns(tile_spy, monkeypatch, pattern, max_ctas):
    cap_grid(monkeypatch, max_ctas)
    case = _pattern_case(pattern)
    o, lse, o_ref, lse_ref = run_tile(case, tile_spy)
    assert_close_to_reference(o, o_ref.to(o.dtype), o.dtype, lse, lse_ref)


LONG_CASES = {   # long unions (many more chunks than copy stages), every head-dim instance
    "G1_d64_long": dict(B=1, TQ=2048, HQ=2, H=2, Dk=64, S=16, block_size=64),
    "G16_d128": dict(B=1, TQ=1024, HQ=32, H=2, Dk=128, S=16, block_size=64),
    "dk192_dv128": dict(B=1, TQ=900, HQ=8, H=2, Dk=192, Dv=128, S=12, block_size=64),
    "d256": dict(B=1, TQ=700, HQ=4, H=1, Dk=256, S=8, block_size=64),
    "bs128": CASES["bs128"],
    "varlen_chunked": CASES["varlen_chunked"],
}


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("name", LONG_CASES)
@pytest.mark.parametrize("max_ctas", [0, 3])
def test_tile_kernel_on_long_walks(tile_spy, monkeypatch, name, max_ctas):
    """Unions of many blocks: the two-stage copy ring wraps many times and every row's cursor
    walks its whole canonical row, in every head-dim instance (with 3 CTAs: across many tiles)."""
    cap_grid(monkeypatch, max_ctas)
    case = make_case(dtype=torch.bfloat16, device="cuda", seed=sum(map(ord, name)),
                     **LONG_CASES[name])
    o, lse, o_ref, lse_ref = run_tile(case, tile_spy)
    assert_close_to_reference(o, o_ref.to(o.dtype), o.dtype, lse, lse_ref)


@pytest.mark.gpu
@needs_hopper
def test_tile_kernel_is_bitwise_deterministic(tile_spy, monkeypatch):
    """Bitwise the same across calls and across grid sizes (a tile's result does not depend on
    which CTA ran it or what that CTA ran before)."""
    case = _pattern_case("popular", G=16, T=1024)
    call = describe_call(*case.args(), **case.kwargs(), need_lse=True)
    runs = []
    for max_ctas in (0, 0, 1, 5):
        cap_grid(monkeypatch, max_ctas)
        runs.append(cuda_backend.forward(call, force_splits=1))
    assert len(tile_spy) == 4
    for o, lse in runs[1:]:
        assert torch.equal(o, runs[0][0]) and torch.equal(lse, runs[0][1])


@pytest.mark.gpu
@needs_hopper
def test_tile_op_rejects_a_negative_grid_cap():
    case = make_case(B=1, TQ=64, HQ=4, H=1, Dk=64, S=3, block_size=64, dtype=torch.bfloat16,
                     device="cuda")
    call = describe_call(*case.args(), **case.kwargs(), need_lse=True)
    geometry = row_geometry(call)
    blocks, nb = canonical_blocks(call, geometry)
    union = tile_unions(call, geometry, blocks, 16)
    with pytest.raises(RuntimeError, match="max_ctas must be >= 0"):
        torch.ops.nsa_ext_cuda.selection_fwd_tile(
            case.q, case.k, case.v, blocks, nb, geometry.pos, geometry.k_offset, union.starts,
            union.counts, 16, 64, 0.125, -1)


@pytest.mark.gpu
@needs_hopper
def test_public_api_with_the_cuda_backend_and_tile_forced(tile_spy):
    case = make_case(B=2, TQ=300, HQ=16, H=2, Dk=128, S=5, block_size=64, dtype=torch.bfloat16,
                     device="cuda", seed=11)
    o = nsa_ext.selection_attention(*case.args(), **case.kwargs(), backend="cuda")
    o_ref = nsa_ext.selection_attention(*case.args(), **case.kwargs(), backend="reference")
    assert tile_spy, "the Hopper tile kernel did not run"
    assert_close_to_reference(o, o_ref.to(o.dtype), o.dtype)


@pytest.mark.gpu
@needs_hopper
def test_forced_tile_on_fp32_raises_naming_why(monkeypatch):
    monkeypatch.setenv("NSA_SEL_SCHEDULE", "tile")
    case = make_case(B=1, TQ=64, HQ=4, H=1, Dk=64, S=3, block_size=64, dtype=torch.float32,
                     device="cuda")
    with pytest.raises(ValueError, match="tile.*float16 and bfloat16"):
        nsa_ext.selection_attention(*case.args(), **case.kwargs(), backend="cuda")


@pytest.mark.parametrize("schedule,T,min_rows,expected", [
    ("auto", 256, 65536, False),      # 512 rows: below the measured crossover, no chooser
    ("auto", 256, None, True),        # no measured crossover: the chooser decides
    ("auto", 256, 256, True),
    ("tile", 256, 65536, True),       # forced
    ("row", 256, None, False),
    ("kv", 256, None, False),
])
def test_tile_may_run_decides_from_metadata(monkeypatch, schedule, T, min_rows, expected):
    monkeypatch.setattr(cuda_backend._ext, "build_info", lambda: {"hopper_tile": True})
    thresholds = {} if min_rows is None else {"sm90": {"sel_tile_min_rows": min_rows}}
    settings = Settings(sel_schedule=schedule, thresholds=thresholds)
    assert cuda_backend.tile_may_run(meta_call(T=T), settings, H200) is expected


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("measured", [1, 0])
def test_auto_runs_tile_calls_on_the_measured_tile_backend(tile_spy, monkeypatch, tmp_path,
                                                           measured):
    """Under auto Triton is chosen; where its chooser picks tile, the CUDA tile kernel runs the
    call when runtime.thresholds.sm90.sel_cuda_first_tile = 1 (Triton's own tile kernel at 0),
    with the same result."""
    import yaml

    from nsa_ext.config import config_path

    data = yaml.safe_load(config_path().read_text())
    data["runtime"]["thresholds"]["sm90"].update(sel_cuda_first_tile=measured, sel_cuda_first=0,
                                                 sel_tile_min_rows=1024)
    path = tmp_path / "nsa.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("NSA_CONFIG", str(path))
    T, S = 4096, 8
    case = make_case(B=1, TQ=T, HQ=8, H=2, Dk=128, S=S, block_size=64, dtype=torch.bfloat16,
                     device="cuda", seed=5)
    own = torch.arange(T, device="cuda") // 64        # each query's last visible block
    sliding = own[:, None] - torch.arange(S, device="cuda")      # neighbours share their blocks
    case.block_indices.copy_(sliding.clamp(min=-1)[None, :, None, :].expand_as(case.block_indices))
    decision = nsa_ext.explain(*case.args(), **case.kwargs())
    assert decision.chosen == "triton"
    assert (decision.tile_backend == "cuda") == bool(measured), str(decision)
    assert any("schedule: tile" in line for line in decision.details["triton"]), str(decision)
    o, lse = nsa_ext.selection_attention(*case.args(), **case.kwargs(), return_lse=True)
    assert len(tile_spy) == measured, "the tile call did not run where the key says"
    ref_call = describe_call(case.q.float(), case.k.float(), case.v.float(), case.block_indices,
                             case.block_size, **case.kwargs(), need_lse=True)
    o_ref, lse_ref = reference_forward(ref_call)
    assert_close_to_reference(o, o_ref.to(o.dtype), o.dtype, lse, lse_ref)
