"""The Triton forward schedules (nsa_ext/schedules: row, tile, kv), each forced, against the fp32
reference; the cases that stress each one; the reads they log; the chooser and its reasons.

CPU lane: Triton's interpreter, fp16 and fp32 (its bf16 tl.dot is wrong), small shapes. GPU lane
(marked `gpu`): bf16 too, larger shapes, bitwise run-to-run equality of `kv`, no host sync.
"""
import logging
import math

import pytest
import torch

import nsa_ext
from common import (assert_close_to_reference, assert_no_sync_and_graph_replay,
                    import_triton_for_the_interpreter, make_case)
from nsa_ext.backends import triton as triton_backend
from nsa_ext.call import describe_call
from nsa_ext.config import Settings
from nsa_ext.device import DeviceFacts
from nsa_ext.reference import reference_forward
from nsa_ext.schedules import chooser
from test_parity import MATRIX as PARITY_MATRIX
from test_triton import MATRIX as TRITON_MATRIX, build_call, counted_reads

CUDA = torch.cuda.is_available()
INTERPRETER = import_triton_for_the_interpreter()
SCHEDULES = ["row", "tile", "kv"]
DEVICE = "cuda" if CUDA else "cpu"
H200 = DeviceFacts("cuda", (9, 0), "NVIDIA H200", 132)

# The parity matrix, plus the Triton matrix's cases it lacks (G = 64 and 80, empty rows, strided
# views, blocks of 4).
EXTRA = {name: TRITON_MATRIX[name] for name in ("G64", "G80_two_tiles", "bs4", "empty_rows",
                                                  "strided")}
# Rows wider than 32 blocks (a long cursor walk through the union per row).
EXTRA["wide_S40"] = dict(B=1, TQ=160, HQ=4, H=2, Dk=32, S=40, block_size=4)
CASES = {**PARITY_MATRIX, **EXTRA}


@pytest.fixture
def device_lane(monkeypatch):
    """The interpreter on a CPU machine; on a GPU, the main kernels (never split-KV)."""
    if CUDA:
        from triton_ref import selection_fwd as kernels

        monkeypatch.setattr(kernels, "LARGE_PROGRAMS", 1 << 62)
        monkeypatch.setattr(triton_backend, "SPLIT_BELOW_WAVES", 0)
        return "cuda"
    if not INTERPRETER:
        pytest.skip("Triton cannot interpret kernels in this process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


def run_schedule(call, schedule, monkeypatch):
    monkeypatch.setenv("NSA_SEL_SCHEDULE", schedule)
    return triton_backend.forward(call)


def check(call, schedule, monkeypatch):
    o, lse = run_schedule(call, schedule, monkeypatch)
    o_ref, lse_ref = reference_forward(call)
    assert_close_to_reference(o, o_ref, call.dtype, lse, lse_ref)
    return o, lse


def spec_call(spec, dtype, device, seed=0):
    return build_call(spec, dtype, device, seed=seed)


# --- the matrix, each schedule forced ----------------------------------------------------------

@pytest.mark.parametrize("schedule", ["tile", "kv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", CASES)
def test_schedule_matches_reference(device_lane, monkeypatch, name, dtype, schedule):
    check(spec_call(CASES[name], dtype, device_lane, seed=sum(map(ord, name))), schedule,
          monkeypatch)


@pytest.mark.parametrize("schedule", SCHEDULES + ["auto"])
def test_public_api_with_each_schedule(device_lane, monkeypatch, schedule):
    """Through nsa_ext.selection_attention (backend="triton"), both varlen layouts."""
    monkeypatch.setenv("NSA_SEL_SCHEDULE", schedule)
    for spec in (PARITY_MATRIX["varlen_batchless"], PARITY_MATRIX["varlen_chunked"],
                 PARITY_MATRIX["counts_tensor"]):
        case = make_case(**spec, device=device_lane, seed=11)
        o, lse = nsa_ext.selection_attention(*case.args(), **case.kwargs(), backend="triton",
                                             return_lse=True)
        o_ref, lse_ref = nsa_ext.selection_attention(*case.args(), **case.kwargs(),
                                                     backend="reference", return_lse=True)
        assert_close_to_reference(o, o_ref, case.q.dtype, lse, lse_ref)


# --- stress cases ----------------------------------------------------------------------------

def _call(q_len, k_len, HQ, H, D, block_indices, block_size, dtype, device, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, q_len, HQ, D, generator=g).to(dtype).to(device)
    k = torch.randn(1, k_len, H, D, generator=g).to(dtype).to(device)
    v = torch.randn(1, k_len, H, D, generator=g).to(dtype).to(device)
    return describe_call(q, k, v, block_indices.to(device), block_size, need_lse=True, **kw)


def disjoint_tile(device, dtype=torch.float32):
    """G = 4 (16 tokens per tile): each of a tile's 16 queries chose 3 blocks no other chose."""
    TQ, TK, bs, S = 16, 1024, 16, 3
    t = torch.arange(TQ)
    blocks = (t[:, None] * S + torch.arange(S)[None, :])            # 48 distinct blocks < 63
    return _call(TQ, TK, 4, 1, 32, blocks[None, :, None, :], bs, dtype, device)


def shared_tile(device, dtype=torch.float32):
    """G = 4: all 16 queries of the tile chose the same 3 blocks (and one chose none)."""
    TQ, TK, bs = 16, 1024, 16
    blocks = torch.tensor([2, 40, 63]).expand(1, TQ, 1, 3).clone()
    blocks[0, 5] = -1
    return _call(TQ, TK, 4, 1, 32, blocks, bs, dtype, device)


def popular_block(device, dtype=torch.float32):
    """G = 1, 300 queries: block 0 chosen by all (cut into 5 work items of 64), block 1 by
    none, the rest random; KV head 1 chose only block 0."""
    TQ, bs, S = 300, 16, 3
    g = torch.Generator().manual_seed(2)
    own = torch.arange(TQ) // bs
    rest = (torch.rand(TQ, 2, generator=g) * own[:, None]).long()
    rest = torch.where(rest == 1, 0, rest)
    head0 = torch.cat([torch.zeros(TQ, 1, dtype=torch.long), rest], dim=-1)
    head1 = torch.tensor([0, -1, -1]).expand(TQ, 3)
    blocks = torch.stack([head0, head1], dim=1)[None]               # [1, TQ, 2, 3]
    return _call(TQ, TQ, 2, 2, 32, blocks, bs, dtype, device)


def varlen_tiles(device, dtype=torch.float32):
    """G = 4: sequences of 5, 3, 9, 1 and 14 queries, so 16-token tiles straddle boundaries."""
    case = make_case(seqlens=[5, 3, 9, 1, 14], seqlens_k=[40, 3, 30, 17, 14], HQ=8, H=2, Dk=32,
                     S=4, block_size=8, dtype=dtype, device=device, seed=4)
    return describe_call(*case.args(), **case.kwargs(), need_lse=True)


def decode(device, dtype=torch.float32):
    case = make_case(B=3, TQ=1, TK=333, HQ=8, H=2, Dk=64, S=6, block_size=32, dtype=dtype,
                     device=device, seed=6)
    return describe_call(*case.args(), **case.kwargs(), need_lse=True)


STRESS = {"disjoint_tile": disjoint_tile, "shared_tile": shared_tile,
          "popular_block": popular_block, "varlen_tiles": varlen_tiles, "decode_TQ1": decode}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", STRESS)
def test_stress(device_lane, monkeypatch, name, schedule):
    o, lse = check(STRESS[name](device_lane), schedule, monkeypatch)
    if name == "shared_tile":
        assert (o[0, 5] == 0).all() and torch.isneginf(lse[0, 5]).all()


def test_tile_statistic_spans_its_range(device_lane):
    from nsa_ext.schedules.tiles import overlap_ratio, sampled_overlap, tile_unions
    from nsa_ext.selection import canonical_blocks, row_geometry

    for make, union_size, selected in ((disjoint_tile, 48, 48), (shared_tile, 3, 45)):
        call = make(device_lane)
        geometry = row_geometry(call)
        blocks, num_blocks = canonical_blocks(call, geometry)
        union = tile_unions(call, geometry, blocks, 16)
        assert union.counts.flatten().tolist() == [union_size]
        starts = union.starts[0, 0, 0, :union_size].tolist()
        assert starts == sorted(set(starts)) and all(s % 16 == 0 for s in starts)
        assert overlap_ratio(union, num_blocks).item() == pytest.approx(union_size / selected)
        assert sampled_overlap(call, geometry, blocks, num_blocks, 16).tolist() == \
            [selected, union_size, selected]


@pytest.mark.parametrize("QT, S, seqlens, stride", [
    (4, 16, None, 1), (16, 3, None, 3), (1, 5, None, 1), (64, 2, None, 2),
    (5, 4, [9, 1, 23], 1), (8, 7, [17, 30], 2)])
@pytest.mark.parametrize("tiles_per_program", [0, 1, 4])
def test_one_launch_tile_unions_match_pytorch(QT, S, seqlens, stride, tiles_per_program,
                                              monkeypatch):
    """triton_ref.tile_union (the interpreter here, the compiled kernel on a GPU) gives the
    unions, their counts and the sampled statistic's counts that the PyTorch chain gives: dense
    with TQ < TK, varlen (k offsets per sequence), TQ not a multiple of QT, every stride-th tile;
    with the default number of tiles per program (0) and with one and four (programs past the
    last tile masked)."""
    from nsa_ext.schedules.tiles import tile_unions_torch
    from nsa_ext.selection import canonical_blocks_torch, row_geometry
    from triton_ref.tile_union import tile_union

    if not CUDA:
        if not INTERPRETER:
            pytest.skip("needs a CUDA GPU or Triton's interpreter")
        monkeypatch.setenv("TRITON_INTERPRET", "1")     # Triton's own helpers (tl.sort) too
    device = "cuda" if CUDA else "cpu"
    kw = dict(seqlens=seqlens, seqlens_k=[n + 7 for n in seqlens]) if seqlens else \
        dict(B=2, TQ=37, TK=70)
    case = make_case(HQ=2, H=2, S=S, block_size=4, seed=QT * 7 + S, device=device, **kw)
    call = describe_call(*case.args(), **case.kwargs())
    geometry = row_geometry(call)
    blocks, num_blocks = canonical_blocks_torch(call, geometry)
    want = tile_unions_torch(call, geometry, blocks, QT)
    totals = torch.zeros(2, dtype=torch.int64, device=device)
    starts, counts, selections = tile_union(blocks, geometry.k_offset, call.block_size, QT,
                                            interpret=not CUDA, totals=totals,
                                            tiles_per_program=tiles_per_program)
    assert torch.equal(counts, want.counts) and torch.equal(starts, want.starts)
    assert totals.tolist() == [int(num_blocks.sum()), int(want.counts.sum())]
    assert counts.sum() > 0 and bool((counts < selections).any()) == (QT > 1)
    # (a tile of several rows has blocks two rows chose, merged; one row has no repeats)
    _, sampled, sampled_selections = tile_union(blocks, geometry.k_offset, call.block_size, QT,
                                                stride=stride, store=False, interpret=not CUDA,
                                                tiles_per_program=tiles_per_program)
    assert torch.equal(sampled, want.counts[:, ::stride])
    NT = want.counts.shape[1]
    padded = torch.cat([num_blocks, num_blocks.new_zeros(num_blocks.shape[0], NT * QT -
                                                         num_blocks.shape[1], num_blocks.shape[2])], 1)
    per_tile = padded.reshape(padded.shape[0], NT, QT, -1).sum(2)
    assert torch.equal(sampled_selections, per_tile[:, ::stride].to(torch.int32))


@pytest.mark.parametrize("pattern", ["random", "model"])
def test_sampled_statistic_tracks_the_full_one(pattern):
    """Every k-th tile's overlap (what auto reads) against every tile's (what tile streams)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import common
    from nsa_ext.schedules.tiles import overlap_ratio, sampled_overlap, tile_unions
    from nsa_ext.selection import canonical_blocks_torch, row_geometry

    shape = common.Shape(1, 8192, 8192, 8, 2, 16, 16, 16, 64)
    q, k, v = common.make_qkv(shape, torch.float32, "cpu")
    call = describe_call(q, k, v, common.make_block_indices(shape, pattern, seed=3), 64)
    geometry = row_geometry(call)
    blocks, num_blocks = canonical_blocks_torch(call, geometry)
    full = overlap_ratio(tile_unions(call, geometry, blocks, 16), num_blocks).item()
    total, union, selected = sampled_overlap(call, geometry, blocks, num_blocks, 16,
                                             sample_tiles=64).tolist()
    assert total == num_blocks.sum().item() and selected < total / 4
    assert union / selected == pytest.approx(full, rel=0.15)


def test_popular_block_is_cut_into_items(device_lane):
    from nsa_ext.schedules import Prepared, kv
    from nsa_ext.selection import canonical_blocks, row_geometry

    call = popular_block(device_lane)
    geometry = row_geometry(call)
    blocks, num_blocks = canonical_blocks(call, geometry)
    index, items = kv._parts(Prepared(call, Settings(), geometry, blocks, num_blocks, True))
    assert index.offsets[1].item() - index.offsets[0].item() == 300       # block 0, head 0
    assert index.offsets[2].item() == index.offsets[1].item()             # block 1: nobody
    assert (items.bucket == 0).sum().item() == math.ceil(300 / items.per_item) > 1
    # Each listed token's canonical entry (where its partial is written) is its own.
    used = int(num_blocks.sum())
    entries = index.entries[:used].long()
    S, H = blocks.shape[-1], blocks.shape[2]
    assert torch.equal(entries // S // H, index.tokens[:used].long())
    assert (blocks.reshape(-1)[entries] >= 0).all()


def test_kv_is_deterministic(device_lane, monkeypatch):
    call = spec_call(PARITY_MATRIX["varlen"], torch.float32, device_lane, seed=3)
    first = run_schedule(call, "kv", monkeypatch)
    again = run_schedule(call, "kv", monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# --- the reads each schedule logs ---------------------------------------------------------------

def _rows(call):
    """(b, t, p, kv0, TK of the sequence, sequence) per query token, from SPEC.md."""
    if call.is_varlen:
        cu_q, cu_k = call.cu_seqlens_q.tolist(), call.cu_seqlens_k.tolist()
        return [(0, t, t - cu_q[i] + (cu_k[i + 1] - cu_k[i]) - (cu_q[i + 1] - cu_q[i]), cu_k[i],
                 cu_k[i + 1] - cu_k[i], i)
                for i in range(len(cu_q) - 1) for t in range(cu_q[i], cu_q[i + 1])]
    return [(b, t, call.seqlen_k - call.seqlen_q + t, 0, call.seqlen_k, b)
            for b in range(call.batch) for t in range(call.seqlen_q)]


def _sets(call):
    """{(b, t, h): set of chosen blocks with a visible key}, SPEC.md's set semantics."""
    bs = call.block_size
    indices = call.block_indices.tolist()
    counts = call.block_counts.tolist() if call.block_counts is not None else None
    sets = {}
    for b, t, p, _, _, _ in _rows(call):
        for h in range(call.num_heads_kv):
            limit = counts[b][t][h] if counts is not None else call.block_count_limit
            sets[(b, t, h)] = {i for i in indices[b][t][h][:max(limit, 0)] if 0 <= i <= p // bs}
    return sets


def expected_reads(call, schedule):
    bs, G = call.block_size, call.group_size
    rows = {(b, t): (p, kv0, tk, seq) for b, t, p, kv0, tk, seq in _rows(call)}
    sets = _sets(call)
    total = 0
    if schedule == "tile":
        from triton_ref.selection_tile import tile_shape

        QT, GT = tile_shape(G)
        for b in range(call.batch):
            for t0 in range(0, call.seqlen_q, QT):
                toks = [t for t in range(t0, min(t0 + QT, call.seqlen_q))]
                lim = max(rows[(b, t)][1] + rows[(b, t)][0] for t in toks)
                for h in range(call.num_heads_kv):
                    starts = {rows[(b, t)][1] + n * bs for t in toks for n in sets[(b, t, h)]}
                    total += sum(max(0, min(bs, lim - s + 1)) for s in starts)
        return total * math.ceil(G / GT)
    from triton_ref.selection_kv import item_shape

    per_item, GT = item_shape(G)
    buckets = {}
    for (b, t, h), chosen in sets.items():
        for n in chosen:
            buckets.setdefault((b, h, rows[(b, t)][3], n), []).append(t)
    for (b, h, seq, n), toks in buckets.items():
        toks.sort()
        for i in range(0, len(toks), per_item):
            p, kv0, tk, _ = rows[(b, toks[min(i + per_item, len(toks)) - 1])]
            total += max(0, min(bs, p - n * bs + 1, tk - n * bs))
    return total * math.ceil(G / GT)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", ["G3", "G80_two_tiles", "counts_tensor", "varlen_chunked", "bs4"])
def test_reads_log(device_lane, monkeypatch, caplog, name, schedule):
    monkeypatch.setenv("NSA_DEBUG_LOG", "1")
    call = build_call(TRITON_MATRIX[name], torch.float32, device_lane)
    with caplog.at_level(logging.INFO, logger="nsa_ext"):
        run_schedule(call, schedule, monkeypatch)
    events = {r.nsa_event: r.nsa_fields for r in caplog.records
              if getattr(r, "nsa_event", "").startswith("sel.triton.")}
    launch, reads = events["sel.triton.launch"], events["sel.triton.reads"]
    assert launch["schedule"] == reads["schedule"] == schedule
    visible, selected = counted_reads(TRITON_MATRIX[name], call)
    assert reads["sdpa_tokens"] == selected
    if schedule == "row":
        assert reads["kv_tokens_read"] == visible * math.ceil(call.group_size / 64)
    else:
        assert launch["variant"] == schedule
        assert reads["kv_tokens_read"] == expected_reads(call, schedule)


def test_shared_tile_reads_each_block_once(device_lane, monkeypatch, caplog):
    monkeypatch.setenv("NSA_DEBUG_LOG", "1")
    call = shared_tile(device_lane)
    found = {}
    for schedule in SCHEDULES:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="nsa_ext"):
            run_schedule(call, schedule, monkeypatch)
        found[schedule] = next(r.nsa_fields["kv_tokens_read"] for r in caplog.records
                               if getattr(r, "nsa_event", "") == "sel.triton.reads")
    assert found["tile"] == 3 * 16                          # 3 blocks of 16 keys, once
    assert found["kv"] == 3 * 16                            # one item per block
    assert found["row"] >= 10 * found["tile"]               # once per query that chose them


# --- the chooser --------------------------------------------------------------------------------

def meta_call(T, G, H=4, D=128, S=16, dtype=torch.bfloat16):
    q = torch.empty(1, T, G * H, D, dtype=dtype, device="meta")
    k = torch.empty(1, T, H, D, dtype=dtype, device="meta")
    bi = torch.empty(1, T, H, S, dtype=torch.int32, device="meta")
    return describe_call(q, k, k, bi, 64)


@pytest.mark.parametrize("G,overlap,expected", [(16, "random", "row"), (16, "model", "tile"),
                                                (1, "random", "kv"), (4, "random", "kv"),
                                                (8, "model", "tile"), (1, "model", "tile")])
def test_cost_model_ranks_the_schedules(G, overlap, expected):
    """H200-sized calls (T = 32k, H = 4, D = 128, 16 blocks of 64): the model's ranking."""
    from triton_ref.selection_tile import tile_shape

    call = meta_call(32768, G)
    selections = 32768 * 4 * 16.0
    QT, _ = tile_shape(G)
    tiles = selections / 16 / QT
    unions = tiles * (min(QT * 16, 256) if overlap == "random" else 16 + QT / 4)
    rates = dict(chooser.DEFAULT_RATES)
    times = chooser.predicted_ms(call, selections, unions, rates)
    assert chooser.pick(times, chooser.SCHEDULES, rates["sel_row_margin_pct"]) == expected, times


def test_forced_schedule_that_cannot_serve_raises(monkeypatch, device_lane):
    from nsa_ext.schedules import kv

    monkeypatch.setattr(kv, "KV_SCRATCH_LIMIT", 0)
    call = spec_call(PARITY_MATRIX["G1"], torch.float32, device_lane)
    with pytest.raises(chooser.ScheduleUnavailableError, match="kv.*NSA_SEL_SCHEDULE.*scratch"):
        run_schedule(call, "kv", monkeypatch)
    monkeypatch.setenv("NSA_SEL_SCHEDULE", "auto")
    o, lse = triton_backend.forward(call)                 # auto takes another schedule
    assert_close_to_reference(o, reference_forward(call)[0], call.dtype)


def test_explain_names_the_schedule_and_why(device_lane, monkeypatch):
    case = make_case(B=1, TQ=128, HQ=4, H=1, Dk=32, S=4, block_size=16, device=device_lane)
    text = str(nsa_ext.explain(*case.args(), backend="triton"))
    assert "triton: schedule: " in text and "predicted" in text and "union/selections" in text
    monkeypatch.setenv("NSA_SEL_SCHEDULE", "tile")
    text = str(nsa_ext.explain(*case.args(), backend="triton"))
    assert "schedule: tile (forced by NSA_SEL_SCHEDULE=tile)" in text
    assert "kv: not requested" in text


MEASURED = {"sel_tile_min_rows": 65536, "sel_tile_max_union_pct": 50, "sel_kv_max_g": 2,
            "sel_kv_tile_max_union_pct": 10}


# The H200 bench's cases (T = 32k): the sampled union / selections each pattern gave, and the
# fastest forced schedule there.
@pytest.mark.parametrize("G,ratio,expected", [(16, 0.787, "row"), (16, 0.276, "tile"),
                                              (16, 0.310, "tile"), (1, 0.234, "kv"),
                                              (1, 0.029, "tile"), (4, 0.535, "row"),
                                              (4, 0.079, "tile"), (8, 0.671, "row"),
                                              (8, 0.145, "tile"), (2, None, "kv"),
                                              (16, None, "row")])
def test_measured_crossovers_pick(G, ratio, expected):
    """The H200 bench's crossovers (configs/base.yaml, sm90): tile at low union, kv at G <= 2."""
    call = meta_call(32768, G)
    assert chooser.pick_measured(call, ratio, chooser.SCHEDULES, MEASURED) == expected
    assert chooser.pick_measured(call, ratio, ("row",), MEASURED) == "row"


@pytest.mark.parametrize("G,ratio,expected", [(16, 0.605, "tile"), (16, 0.711, "tile"),
                                              (16, 0.786, "row"), (16, 0.834, "row"),
                                              (1, 0.3, "kv"), (1, 0.029, "tile")])
def test_cuda_tile_crossover(G, ratio, expected):
    """Where the tile schedule runs on the CUDA Hopper kernel, its own union limit
    (sel_cuda_tile_max_union_pct; the H200's random rows: 61-71 % won, 79-83 % did not); G <= 2
    keeps kv's limit, and Triton's tile keeps sel_tile_max_union_pct."""
    measured = {**MEASURED, chooser.CUDA_TILE_UNION_KEY: 74}
    call = meta_call(32768, G)
    assert chooser.pick_measured(call, ratio, chooser.SCHEDULES, measured, cuda_tile=True) == expected
    triton_tile = chooser.pick_measured(call, ratio, chooser.SCHEDULES, measured)
    assert triton_tile == chooser.pick_measured(call, ratio, chooser.SCHEDULES, MEASURED)
    if G == 16:
        assert triton_tile == "row"
    # Without the key the CUDA tile kernel is held to the common limit.
    assert chooser.pick_measured(call, ratio, chooser.SCHEDULES, MEASURED, cuda_tile=True) == \
        triton_tile


def test_measured_crossovers_skip_the_statistic_for_small_calls():
    """Below sel_tile_min_rows no statistic is read (no host sync) and tile is not taken."""
    call = meta_call(4096, 16)
    settings = Settings(thresholds={"sm90": MEASURED})
    choice = chooser.choose_schedule(call, settings, H200, prep=object())
    assert choice.chosen == "row" and not choice.stats
    assert any("sel_tile_min_rows" in r for r in choice.reasons["tile"])
    assert "measured crossovers" in choice.why
    assert chooser.choose_schedule(meta_call(4096, 1), settings, H200, prep=None).chosen == "kv"


def test_chooser_without_statistics_skips_tile():
    call = meta_call(4096, 16)
    choice = chooser.choose_schedule(call, Settings(), H200, prep=None)
    assert choice.chosen in ("row", "kv") and not choice.stats
    assert any("no overlap statistic" in r for r in choice.reasons["tile"])
    split = chooser.choose_schedule(call, Settings(), H200, prep=None, split=True)
    assert split.chosen == "row" and "split-KV" in split.why


# --- GPU ------------------------------------------------------------------------------------------

GPU_CASES = {
    "large_G16_d128": dict(B=1, TQ=2048, HQ=16, H=1, Dk=128, S=16, block_size=64),
    "large_G1": dict(B=1, TQ=2048, HQ=2, H=2, Dk=128, S=16, block_size=64),
    "large_G64_dk192_dv128": dict(B=1, TQ=512, HQ=64, H=1, Dk=192, Dv=128, S=8, block_size=64),
    "large_G8_d256": dict(B=2, TQ=512, HQ=16, H=2, Dk=256, S=8, block_size=32),
    "large_G5_bs128": dict(B=1, TQ=1500, HQ=10, H=2, Dk=80, S=6, block_size=128),
    "large_varlen": dict(seqlens=[1000, 1, 640, 333], HQ=16, H=2, Dk=128, S=12, block_size=64),
}


# The row schedule's GPU matrix is test_triton.py's. Here: every case in bf16, the large ones in
# every dtype (each dtype, head dim and tile shape is a compile: kept to ~80 launches).
GPU_RUNS = ([pytest.param(name, torch.bfloat16, id=f"{name}-bf16") for name in CASES]
            + [pytest.param(name, dtype, id=f"{name}-{tag}") for name in GPU_CASES
               for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"),
                                  (torch.float32, "fp32"))])


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["tile", "kv"])
@pytest.mark.parametrize("name,dtype", GPU_RUNS)
def test_gpu_schedule_matches_reference(device_lane, monkeypatch, name, dtype, schedule):
    spec = CASES.get(name) or GPU_CASES[name]
    check(spec_call(spec, dtype, "cuda", seed=5), schedule, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("name", STRESS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gpu_stress_bf16(device_lane, monkeypatch, name, schedule):
    check(STRESS[name]("cuda", torch.bfloat16), schedule, monkeypatch)


UNION_CASES = [   # (QT, S, seqlens, TQ): every width instance of the extension's kernel
    (4, 16, None, 37), (16, 3, None, 37), (1, 5, None, 37), (64, 2, None, 37),
    (5, 4, [9, 1, 23], None), (8, 7, [17, 30], None), (16, 16, None, 300), (64, 8, None, 300),
    (64, 16, [200, 1, 130], None), (64, 32, None, 300), (64, 64, None, 300), (3, 33, None, 50)]


@pytest.mark.gpu
@pytest.mark.parametrize("QT, S, seqlens, TQ", UNION_CASES)
def test_gpu_extension_tile_unions_match_pytorch(QT, S, seqlens, TQ):
    """The extension's tile_union operator (csrc/selection_union.cu) gives the PyTorch chain's
    unions, counts and totals: teams of one warp (widths to 256, eight tiles a CTA, the last CTA
    partly empty) and of 2-16 warps (to 4096), dense with TQ < TK and not a multiple of QT,
    varlen; and tile_unions takes it where the extension has it."""
    from nsa_ext import _ext
    from nsa_ext.schedules.tiles import tile_unions, tile_unions_torch
    from nsa_ext.selection import canonical_blocks_torch, row_geometry

    if not (CUDA and _ext.has_tile_union()):
        pytest.skip("needs a CUDA GPU and the extension's tile_union")
    kw = dict(seqlens=seqlens, seqlens_k=[n + 7 for n in seqlens]) if seqlens else \
        dict(B=2, TQ=TQ, TK=TQ + 33)
    case = make_case(HQ=2, H=2, S=S, block_size=4, seed=QT * 7 + S, device="cuda", **kw)
    call = describe_call(*case.args(), **case.kwargs())
    geometry = row_geometry(call)
    blocks, num_blocks = canonical_blocks_torch(call, geometry)
    want = tile_unions_torch(call, geometry, blocks, QT)
    totals = torch.zeros(2, dtype=torch.int64, device="cuda")
    starts, counts = torch.ops.nsa_ext_cuda.tile_union(blocks, geometry.k_offset, call.block_size,
                                                       QT, totals)
    assert torch.equal(counts, want.counts) and torch.equal(starts, want.starts)
    assert totals.tolist() == [int(num_blocks.sum()), int(want.counts.sum())]
    assert counts.sum() > 0 and bool((counts.sum() < num_blocks.sum())) == (QT > 1)
    starts2, counts2 = torch.ops.nsa_ext_cuda.tile_union(blocks, geometry.k_offset,
                                                         call.block_size, QT, None)
    assert torch.equal(starts2, starts) and torch.equal(counts2, counts)
    union = tile_unions(call, geometry, blocks, QT)
    assert torch.equal(union.starts, starts) and union.totals.tolist() == totals.tolist()


@pytest.mark.gpu
def test_gpu_extension_tile_union_checks_and_opcheck():
    from nsa_ext import _ext

    if not (CUDA and _ext.has_tile_union()):
        pytest.skip("needs a CUDA GPU and the extension's tile_union")
    blocks = torch.randint(-1, 5, (1, 70, 2, 8), dtype=torch.int32, device="cuda")
    k_offset = torch.zeros(1, 70, dtype=torch.int64, device="cuda")
    totals = torch.zeros(2, dtype=torch.int64, device="cuda")
    torch.library.opcheck(torch.ops.nsa_ext_cuda.tile_union.default,
                          (blocks, k_offset, 64, 16, totals),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="tokens_per_tile \\* S must be in 1..4096"):
        torch.ops.nsa_ext_cuda.tile_union(blocks, k_offset, 64, 513, None)
    with pytest.raises(RuntimeError, match="totals must be an int64 tensor of 2"):
        torch.ops.nsa_ext_cuda.tile_union(blocks, k_offset, 64, 16, totals[:1])
    with pytest.raises(RuntimeError, match="k_offset must be int64"):
        torch.ops.nsa_ext_cuda.tile_union(blocks, k_offset.int(), 64, 16, None)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["messy", "model"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_chooser_reads_the_whole_union_and_the_tile_path_reuses_it(monkeypatch, backend,
                                                                      pattern):
    """On CUDA the chooser's overlap statistic is the whole union's (launched before its sync,
    kept on the call's Prepared; its launch sums the two counts) and exact; the tile path then
    runs on that same union. The forward's choice without details (detail=False) is the same."""
    import sys
    from pathlib import Path

    from nsa_ext.backends import cuda as cuda_backend
    from nsa_ext.config import load_settings
    from nsa_ext.device import device_facts
    from nsa_ext.schedules.tiles import overlap_ratio, union_before_sync
    from triton_ref.selection_tile import tile_shape

    # Enough rows that the measured crossovers read the statistic (sel_tile_min_rows).
    case = make_case(B=1, TQ=16384, HQ=16, H=4, Dk=64, S=16, block_size=64, seed=2,
                     dtype=torch.bfloat16, device="cuda")
    if pattern == "model":       # neighbours share most blocks: the tile side of the crossover
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from bench import common

        shape = common.Shape(B=1, TQ=16384, TK=16384, HQ=16, H=4, Dk=64, Dv=64, S=16,
                             block_size=64)
        case.block_indices = common.make_block_indices(shape, "model", device="cuda")
    call = describe_call(*case.args(), **case.kwargs())
    settings, facts = load_settings(), device_facts(call.device)
    if backend == "cuda" and (nsa_ext.explain(*case.args(), **case.kwargs(), backend="cuda").chosen
                              is None or cuda_backend.tile_reasons(call, facts)):
        pytest.skip("the CUDA backend's tile kernel cannot serve here")
    QT, _ = tile_shape(call.group_size)
    prep = triton_backend._prepare(call, settings, None, False)
    assert union_before_sync(prep.blocks, QT)
    if backend == "triton":
        choice = chooser.choose_schedule(call, settings, facts, prep)
    else:
        prep = cuda_backend.prepared(call, settings, prep.geometry, prep.blocks, prep.num_blocks)
        choice = cuda_backend.choose_schedule(call, settings, facts, prep)
    union = prep.cache.get(f"union{QT}")
    assert union is not None, "the chooser did not compute the union"
    assert choice.stats["union/selections"] == pytest.approx(
        overlap_ratio(union, prep.num_blocks).item(), rel=1e-6)
    assert prep.union(QT) is union                        # the tile path's input, not recomputed
    assert union.totals.tolist() == [int(prep.num_blocks.sum()), int(union.counts.sum())]
    if backend == "triton":
        quick = chooser.choose_schedule(call, settings, facts, prep, detail=False)
    else:
        quick = cuda_backend.choose_schedule(call, settings, facts, prep, detail=False)
    assert quick.chosen == choice.chosen
    if chooser.MEASURED_KEYS[0] in settings.thresholds.get(facts.arch or "", {}):
        assert not quick.reasons and not quick.stats      # nothing formatted on the hot path


@pytest.mark.parametrize("extension, triton, TQ, expected", [
    (True, True, 64, "extension"),        # 256 tiles: a small call, the launch's host cost decides
    (True, True, 8192, "triton"),         # 32768 tiles: past EXTENSION_UNION_MAX_TILES
    (True, False, 8192, "extension"),     # no Triton
    (False, True, 64, "triton"),          # a build without the operator
    (False, False, 64, "torch")])
def test_union_launcher_choice(monkeypatch, extension, triton, TQ, expected):
    from nsa_ext.schedules import tiles

    monkeypatch.setattr(tiles, "_extension_launch", lambda blocks, QT: extension)
    monkeypatch.setattr(tiles, "_triton_launch", lambda blocks, QT: triton)
    assert tiles.EXTENSION_UNION_MAX_TILES == 4096
    blocks = torch.zeros(1, TQ * 4, 4, 16, dtype=torch.int32)      # QT = 4: TQ tiles x 4 heads
    assert tiles.union_launcher(blocks, 4) == expected


def test_the_whole_union_is_read_only_on_cuda_and_within_its_budget(monkeypatch):
    from nsa_ext.schedules import tiles

    blocks = torch.zeros(1, 64, 4, 16, dtype=torch.int32)
    assert not tiles.union_before_sync(blocks, 4)                  # CPU: the sample
    monkeypatch.setattr(tiles, "_one_launch", lambda blocks, QT: True)
    assert tiles.union_before_sync(blocks, 4)
    monkeypatch.setattr(tiles, "UNION_BEFORE_SYNC_BYTES", blocks.numel() * 8 - 1)
    assert not tiles.union_before_sync(blocks, 4)                  # too large: the sample


@pytest.mark.gpu
@pytest.mark.big_memory    # K and V of 4 GiB each: out of memory beside other xdist workers
@pytest.mark.parametrize("schedule", ["tile", "kv"])
def test_gpu_64bit_offsets(device_lane, monkeypatch, schedule):
    """K and V of more than 2^31 elements: blocks near the end are addressed correctly."""
    TK, D, block_size = (1 << 25) + 100, 64, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 2, 2, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, TK, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, TK, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    assert k.numel() > 2 ** 31
    last = (TK - 1) // block_size
    block_indices = torch.tensor([[[[0, last, last - 1, last // 2, -1]],
                                   [[last, 3, last - 2, -1, -1]]]], device="cuda")
    check(describe_call(q, k, v, block_indices, block_size, need_lse=True), schedule, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_kv_bitwise_run_to_run(device_lane, monkeypatch, dtype):
    call = spec_call(GPU_CASES["large_varlen"], dtype, "cuda", seed=1)
    first = run_schedule(call, "kv", monkeypatch)
    for _ in range(3):
        again = run_schedule(call, "kv", monkeypatch)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["tile", "kv"])
def test_gpu_forced_schedules_do_not_sync_and_capture(device_lane, monkeypatch, schedule):
    monkeypatch.delenv("NSA_DEBUG_LOG", raising=False)
    monkeypatch.delenv("NSA_DEBUG_TRITON", raising=False)
    call = spec_call(GPU_CASES["large_G1"], torch.bfloat16, "cuda")
    first = run_schedule(call, schedule, monkeypatch)
    assert_no_sync_and_graph_replay(call, triton_backend.forward, first)


@pytest.mark.gpu
def test_gpu_auto_captures_without_the_statistic(device_lane, monkeypatch):
    call = spec_call(GPU_CASES["large_G16_d128"], torch.bfloat16, "cuda")
    for schedule in SCHEDULES:       # compile every schedule outside the capture
        run_schedule(call, schedule, monkeypatch)
    monkeypatch.setenv("NSA_SEL_SCHEDULE", "auto")
    triton_backend.forward(call)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o_graph, lse_graph = triton_backend.forward(call)
    graph.replay()
    torch.cuda.synchronize()
    o_ref, lse_ref = reference_forward(call)
    assert_close_to_reference(o_graph, o_ref, call.dtype, lse_graph, lse_ref)
