"""The bench's CPU mode, its inputs and work counts, and the threshold optimizer's config writer.

No timing assertions: these check that the bench runs and writes its files on a CPU, that its
selection patterns mean what the bench says, that the gather floor reads what it should, and
that writing thresholds keeps every comment and key of configs/base.yaml.
"""
from __future__ import annotations

import csv
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench import threshold_optimizer as topt  # noqa: E402

SMALL = common.Shape(B=2, TQ=130, TK=200, HQ=4, H=2, Dk=24, Dv=16, S=4, block_size=16)


@pytest.mark.parametrize("pattern", common.PATTERNS)
def test_patterns_are_causal_distinct_sets(pattern):
    block_indices = common.make_block_indices(SMALL, pattern, seed=3)
    assert block_indices.shape == (2, 130, 2, 4) and block_indices.dtype == torch.int32
    pos = torch.arange(SMALL.TQ) + SMALL.TK - SMALL.TQ
    own = (pos // SMALL.block_size).tolist()
    for b in range(2):
        for t in range(SMALL.TQ):
            for h in range(2):
                row = [x for x in block_indices[b, t, h].tolist() if x >= 0]
                assert len(row) == len(set(row))
                assert all(0 <= x <= own[t] for x in row)
                assert 0 in row and own[t] in row
                assert len(row) == min(SMALL.S, own[t] + 1)


def test_clustered_tiles_share_blocks():
    shape = common.Shape(B=1, TQ=1024, TK=1024, HQ=2, H=1, Dk=16, Dv=16, S=8, block_size=64)
    random_union = common.tile_unions(common.make_block_indices(shape, "random", seed=1))
    clustered_union = common.tile_unions(common.make_block_indices(shape, "clustered", seed=1))
    # A clustered tile draws from S - 2 + CLUSTER_SPARE earlier blocks plus block 0 and its own.
    assert (clustered_union >= 0).sum(-1).max() <= shape.S + common.CLUSTER_SPARE
    assert (clustered_union >= 0).sum() < (random_union >= 0).sum()


def test_model_pattern_overlaps_like_a_trained_model():
    """Adjacent rows share ~90% of their blocks (published dumps: 87-94%); tiles' unions are far
    smaller than a random selection's; block 0 and both local blocks are always chosen."""
    shape = common.Shape(B=1, TQ=4096, TK=4096, HQ=2, H=2, Dk=16, Dv=16, S=16, block_size=64)
    model = common.make_block_indices(shape, "model", seed=2)
    random = common.make_block_indices(shape, "random", seed=2)
    assert 0.85 <= common.adjacent_jaccard(model) <= 0.97
    assert common.adjacent_jaccard(random) < 0.5
    assert (common.tile_unions(model) >= 0).sum() < 0.7 * (common.tile_unions(random) >= 0).sum()
    own = torch.arange(shape.TQ) // shape.block_size
    local = (model == (own - 1).clamp(min=0)[None, :, None, None].to(model.dtype)).any(-1)
    assert local[:, shape.block_size:].all()


def test_tile_unions_and_work_match_brute_force():
    block_indices = common.make_block_indices(SMALL, "random", seed=5)
    unions = common.tile_unions(block_indices)
    for b in range(2):
        for tile in range(unions.shape[1]):
            for h in range(2):
                rows = block_indices[b, tile * common.TILE:(tile + 1) * common.TILE, h]
                expected = sorted({x for x in rows.flatten().tolist() if x >= 0})
                assert [x for x in unions[b, tile, h].tolist() if x >= 0] == expected
    work = common.measure_work(SMALL, block_indices, unions, elem=2)
    pos = (torch.arange(SMALL.TQ) + SMALL.TK - SMALL.TQ).tolist()
    bs = SMALL.block_size
    pairs = sum(sum(1 for j in range(n * bs, n * bs + bs) if j <= pos[t])
                for b in range(2) for t in range(SMALL.TQ) for h in range(2)
                for n in block_indices[b, t, h].tolist() if n >= 0)
    assert work.pairs == pairs * SMALL.G
    assert work.row_bytes == int((block_indices >= 0).sum()) * bs * (SMALL.Dk + SMALL.Dv) * 2
    assert work.tile_bytes == int((unions >= 0).sum()) * bs * (SMALL.Dk + SMALL.Dv) * 2
    assert work.dense_pairs == sum(p + 1 for p in pos) * SMALL.HQ * SMALL.B


def test_gather_floor_reads_the_listed_blocks(monkeypatch):
    from common import import_triton_for_the_interpreter

    if not import_triton_for_the_interpreter():
        pytest.skip("Triton's CPU interpreter is not available in this process (a GPU machine)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(common, "_floor_kernel", None)   # define the kernel under the interpreter
    shape = common.Shape(B=1, TQ=8, TK=40, HQ=2, H=2, Dk=12, Dv=8, S=3, block_size=16)
    block_indices = common.make_block_indices(shape, "random", seed=2)
    q, k, v = common.make_qkv(shape, torch.float32, "cpu")
    out = common.gather_floor_fn(k, v, block_indices, shape.block_size)().reshape(block_indices.shape)
    expected = torch.zeros(block_indices.shape)
    for t in range(shape.TQ):
        for h in range(shape.H):
            for s, n in enumerate(block_indices[0, t, h].tolist()):
                if n >= 0:
                    lo, hi = n * 16, min(n * 16 + 16, shape.TK)
                    expected[0, t, h, s] = k[0, lo:hi, h].sum() + v[0, lo:hi, h].sum()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)


def test_bench_cpu_quick_writes_its_files(tmp_path):
    nsa_ext = pytest.importorskip("nsa_ext")
    if not hasattr(nsa_ext, "selection_attention"):
        pytest.skip("nsa_ext.selection_attention not there yet")
    from bench import bench_selection

    rc = bench_selection.main(["--quick", "--device", "cpu", "--cases", "prefill,decode",
                               "--patterns", "random", "--out", str(tmp_path), "--no-progress",
                               "--budget-s", "60"])
    assert rc == 0
    data = json.loads((tmp_path / "bench_selection.json").read_text())
    assert data["environment"]["device"] == "cpu" and data["settings"]["complete"]
    env = data["environment"]           # the host-launch anchor, at the run's start and end
    assert 0 < env["host_launch_us_start"] < 1e4 and 0 < env["host_launch_us_end"] < 1e4
    rows = {(r["case"], r["backend"]): r for r in data["rows"]}
    for case in ("prefill T=512", "decode B=4 TK=2048"):
        for backend in ("nsa:sdpa", "nsa:reference", "dense:cpu"):
            assert rows[(case, backend)]["status"] == "ok", rows[(case, backend)]
            assert rows[(case, backend)]["ms"] > 0
        assert rows[(case, "fla")]["status"] == "n/a"
        assert rows[(case, "dense:cudnn")]["status"] == "n/a"
    decode = rows[("decode B=4 TK=2048", "nsa:sdpa")]          # eager and host time per call
    assert 0 < decode["host_us"] <= decode["eager_us"] and "eager" in decode["note"]
    assert rows[("prefill T=512", "nsa:sdpa")]["eager_us"] is None
    text = (tmp_path / "bench_selection.txt").read_text()
    assert "CPU run" in text and "NOT a GPU performance number" in text
    assert "SM clock" not in text and all(r["sm_mhz"] is None for r in data["rows"])   # GPU only
    with (tmp_path / "bench_selection.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(data["rows"])


def test_rounds_report_the_median_round_and_never_hide_a_failure():
    from bench.bench_selection import Row, median_round

    def row(ms, status="ok"):
        return Row("c", "prefill", "random", "nsa:sdpa", "fwd", status=status, ms=ms, note="x",
                   wall_s=1.0)

    picked = median_round([row(3.0), row(1.0), row(2.0)])
    assert picked.ms == 2.0 and picked.note.startswith("median of 3 rounds (3/1/2 ms)")
    assert picked.wall_s == 3.0
    assert median_round([row(4.0), row(1.0)]).ms == 1.0          # even count: the lower middle
    failed = median_round([row(1.0), row(None, status="error"), row(2.0)])
    assert failed.status == "error"
    single = row(5.0)
    assert median_round([single]) is single and single.note == "x"


def test_bench_cpu_rounds_run_every_row_in_turns(tmp_path):
    nsa_ext = pytest.importorskip("nsa_ext")
    if not hasattr(nsa_ext, "selection_attention"):
        pytest.skip("nsa_ext.selection_attention not there yet")
    from bench import bench_selection

    rc = bench_selection.main(["--quick", "--device", "cpu", "--cases", "decode", "--patterns",
                               "random", "--backends", "nsa:sdpa,nsa:reference", "--rounds", "2",
                               "--out", str(tmp_path), "--no-progress", "--budget-s", "60"])
    assert rc == 0
    data = json.loads((tmp_path / "bench_selection.json").read_text())
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["backend"] for r in rows} == {"nsa:sdpa", "nsa:reference"}
    for r in rows:
        rounds = re.search(r"median of 2 rounds \(([0-9.e+-]+)/([0-9.e+-]+) ms\)", r["note"])
        assert rounds, r["note"]
        assert f"{r['ms']:.4g}" in rounds.groups()
    assert "median of 2 rounds taken in turns" in (tmp_path / "bench_selection.txt").read_text()


def test_auto_choice_names_the_backend_of_the_tile_schedule(monkeypatch):
    """auto's line in the bench names the backend that runs the tile schedule when it is not the
    chosen one (Triton hands its tile calls to the CUDA extension on the H200)."""
    import nsa_ext
    from bench import bench_selection
    from nsa_ext.dispatch import Decision

    shape = common.Shape(B=1, TQ=8, TK=64, HQ=2, H=1, Dk=16, Dv=16, S=2, block_size=16)
    q, k, v = common.make_qkv(shape, torch.float32, "cpu")
    block_indices = common.make_block_indices(shape, "random", device="cpu")
    ctx = types.SimpleNamespace(sets=[types.SimpleNamespace(q=q, k=k, v=v,
                                                            block_indices=block_indices)],
                                shape=shape)
    monkeypatch.setattr(bench_selection, "triton_schedule", lambda ctx: "tile")
    for tile_backend, want in (("cuda", "triton, its tile schedule on cuda; "),
                               ("triton", "triton; "), (None, "triton; ")):
        monkeypatch.setattr(nsa_ext, "explain", lambda *a, tb=tile_backend, **kw: Decision(
            chosen="triton", requested="auto", tile_backend=tb))
        assert bench_selection.auto_choice(ctx, {}).startswith(want)


# ----------------------------------------------------------------------------------------------
# The threshold optimizer's decision and config writer

def _points(times):
    """times: {(G, L): (sdpa, triton, cuda)}"""
    return [{"G": G, "L": L, "sdpa": s, "triton": t, "cuda": c} for (G, L), (s, t, c) in times.items()]


def test_decide_takes_the_crossing_and_the_max_over_groups():
    points = _points({
        (1, 64): (1.0, 2.0, None), (1, 128): (1.0, 0.9, None), (1, 256): (1.0, 1.1, None),
        (1, 512): (1.0, 0.5, None),
        (4, 64): (1.0, 0.9, None), (4, 128): (1.0, 0.8, None), (4, 256): (1.0, 0.7, None),
        (4, 512): (1.0, 0.5, None),
    })
    decision = topt.decide(points, [64, 128, 256, 512])
    assert decision["triton"]["per_group"] == {1: 512, 4: 64}   # a win at 128 then a loss: noise
    assert decision["triton"]["threshold"] == 512
    assert decision["cuda"]["threshold"] is None                # never measured: keep the config


def test_decide_never_winning_goes_past_the_sweep():
    points = _points({(4, 64): (1.0, 2.0, 3.0), (4, 128): (1.0, 2.0, 0.5)})
    decision = topt.decide(points, [64, 128])
    assert decision["triton"]["threshold"] == 256 and decision["triton"]["warning"]
    assert decision["cuda"]["threshold"] == 128


def test_write_thresholds_keeps_comments_and_keys(tmp_path, monkeypatch):
    yaml = pytest.importorskip("yaml")
    original = (REPO / "configs" / "base.yaml").read_text()
    written = topt.write_thresholds(original, "sm90", {"sel_triton_min_L": 256, "sel_cuda_min_L": 128},
                                    "measured here")
    old_lines = [l for l in original.splitlines() if l.strip().startswith("#")]
    assert all(l in written.splitlines() for l in old_lines)
    before, after = yaml.safe_load(original), yaml.safe_load(written)
    # Written keys replace their values; the arch's other keys (the schedule crossovers) stay.
    kept = dict(before["runtime"]["thresholds"].get("sm90") or {})
    assert after["runtime"]["thresholds"]["sm90"] == {**kept, "sel_triton_min_L": 256,
                                                      "sel_cuda_min_L": 128}
    for key, value in before["runtime"].items():
        if key != "thresholds":
            assert after["runtime"][key] == value
    # A second arch, then the first again with one key: merged, nothing else moves.
    twice = topt.write_thresholds(written, "sm89", {"sel_triton_min_L": 4096})
    thrice = topt.write_thresholds(twice, "sm90", {"sel_cuda_min_L": 64}, "again")
    th = yaml.safe_load(thrice)["runtime"]["thresholds"]
    assert th == {"sm90": {**kept, "sel_triton_min_L": 256, "sel_cuda_min_L": 64},
                  "sm89": {"sel_triton_min_L": 4096}}
    assert topt.write_thresholds(thrice, "sm90", {"sel_cuda_min_L": 64}, "again") == thrice
    # The package's one config reader sees the values.
    from nsa_ext.config import load_settings

    path = tmp_path / "base.yaml"
    path.write_text(thrice)
    settings = load_settings({"NSA_CONFIG": str(path)})
    assert settings.min_len("triton", "sm90") == 256 and settings.min_len("cuda", "sm90") == 64
    assert settings.min_len("triton", "sm89") == 4096


def test_write_thresholds_from_flow_style_and_without_the_key():
    yaml = pytest.importorskip("yaml")
    text = "# top\nruntime:\n  a: 1  # keep\n  thresholds: {sm80: {sel_cuda_min_L: 9}}  # why\nother: 2\n"
    out = topt.write_thresholds(text, "sm90", {"sel_triton_min_L": 128})
    data = yaml.safe_load(out)
    assert data["runtime"]["thresholds"] == {"sm80": {"sel_cuda_min_L": 9}, "sm90": {"sel_triton_min_L": 128}}
    assert data["other"] == 2 and "# keep" in out and "# why" in out and out.startswith("# top\n")
    bare = topt.write_thresholds("runtime:\n  a: 1\nother: 2\n", "sm90", {"sel_cuda_min_L": 64})
    assert yaml.safe_load(bare) == {"runtime": {"a": 1, "thresholds": {"sm90": {"sel_cuda_min_L": 64}}},
                                    "other": 2}
    with pytest.raises(ValueError):
        topt.write_thresholds(text, "hopper", {"sel_cuda_min_L": 1})


def test_apply_dry_run_leaves_the_file(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text((REPO / "configs" / "base.yaml").read_text())
    before = path.read_text()
    decision = {"triton": {"threshold": 512, "per_group": {}}, "cuda": {"threshold": None, "per_group": {}}}
    message = topt.apply(path, "sm90", decision, "test", dry_run=True)
    assert "would set" in message and path.read_text() == before
    topt.apply(path, "sm90", decision, "test", dry_run=False)
    assert "sel_triton_min_L: 512" in path.read_text() and "sel_cuda_min_L" in path.read_text()


def test_the_sampler_for_huge_selections_draws_distinct_visible_blocks(monkeypatch):
    """Past EXACT_SAMPLER_MAX_KEYS the random pattern samples by draws with replacement: every
    row still holds distinct blocks in [1, limit), as many as exist up to `count`."""
    from bench import common

    monkeypatch.setattr(common, "EXACT_SAMPLER_MAX_KEYS", 0)
    g = torch.Generator().manual_seed(3)
    limit = torch.cat([torch.arange(40), torch.randint(40, 3000, (3000,))])
    out = common._distinct_below(limit, 14, 3000, g)
    for row, lim in zip(out.tolist(), limit.tolist()):
        valid = [b for b in row if b >= 0]
        assert len(valid) == len(set(valid)) == min(14, max(lim - 1, 0))
        assert all(1 <= b < lim for b in valid)
    counts = torch.bincount(common._distinct_below(torch.full((20000,), 61), 14, 3000, g).flatten(),
                            minlength=61)[1:].float() / 20000
    assert counts.min() > 0.2 and counts.max() < 0.27          # 14 of 60: 0.233 each


@pytest.mark.parametrize("splits", [2, 3])
def test_key_split_passes_merge_to_the_whole_call(splits):
    """bench/cp_local_shapes.py's key-split experiment computes the same attention: passes over
    disjoint block ranges (rows with no block in a pass included: lse -inf there), merged through
    their lse, equal the one call over every selected block (fp32, TQ < TK, -1 padding)."""
    import nsa_ext
    from bench import cp_local_shapes as cls

    q, k, v = common.make_qkv(SMALL, torch.float32, "cpu", seed=4)
    bi = common.make_block_indices(SMALL, "random", seed=4)
    num_blocks = -(-SMALL.TK // SMALL.block_size)
    parts = cls.key_split_indices(bi, num_blocks, splits)
    assert sum(int((part >= 0).sum()) for part in parts) == int((bi >= 0).sum())
    o, lse = cls.key_split_call(q, k, v, parts, SMALL.block_size)
    o_ref, lse_ref = nsa_ext.selection_attention(q, k, v, bi, SMALL.block_size, return_lse=True)
    empty_somewhere = any(bool(torch.isinf(nsa_ext.selection_attention(
        q, k, v, part, SMALL.block_size, return_lse=True)[1]).any()) for part in parts)
    assert empty_somewhere          # the -inf weights are exercised
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


def test_gpu_state_note_says_the_parts_known():
    capped = {"sm_mhz": 1740, "power_w": 691.2, "limit_w": 700, "power_cap": True, "thermal": False}
    assert common.gpu_state_note(capped) == "SM 1740 MHz, 691/700 W, power cap"
    assert common.gpu_state_note({"sm_mhz": 1980}) == "SM 1980 MHz"
    assert common.gpu_state_note({"power_w": 300.0, "limit_w": 700, "power_cap": False,
                                  "thermal": True}) == "300/700 W, thermal"
    assert common.gpu_state_note(None) == "" and common.gpu_state_note({}) == ""
    assert common.gpu_state_after("cpu") is None


@pytest.mark.parametrize("reasons, cap, thermal", [(0x0, False, False), (0x4, True, False),
                                                   (0x80, True, False), (0x40, False, True),
                                                   (0x1, False, False)])
def test_power_state_reads_nvml_reason_bits(monkeypatch, reasons, cap, thermal):
    fake = types.SimpleNamespace(
        NVML_CLOCK_SM=1,
        nvmlDeviceGetClockInfo=lambda h, kind: {1: 1740}[kind],
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: reasons,
        nvmlDeviceGetPowerUsage=lambda h: 691_234,            # mW
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "_get_pynvml_handler", lambda device: "handle", raising=False)
    state = common.power_state("cuda:0")
    assert state == {"sm_mhz": 1740, "power_w": 691.2, "limit_w": 700, "power_cap": cap,
                     "thermal": thermal}
    monkeypatch.setitem(sys.modules, "pynvml", None)            # not installed: no state
    assert common.power_state("cuda:0") is None


def test_summary_counts_the_rows_under_the_power_cap():
    from bench.bench_selection import Row, summary_text

    def row(backend, ms, mhz=None, cap=None):
        return Row("prefill T=32k", "prefill", "model", backend, "fwd", ms=ms, sm_mhz=mhz, power_cap=cap)

    text = summary_text([row("nsa:auto", 2.9, 1740, True), row("fla", 10.4, 1980, False),
                         row("nsa:cuda", 2.8, 1755, True)], [("prefill T=32k", "model")])
    assert "SM clock right after the rows: 1740-1980 MHz (median 1755); under the power cap after 2 of 3" in text
    assert "SM clock" not in summary_text([row("nsa:auto", 2.9)], [("prefill T=32k", "model")])
