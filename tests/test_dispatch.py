"""The dispatcher's decisions, with device facts and settings given as data (runs on a CPU).

Includes the SM 8.9 lane: on an RTX 4090's facts the kernel paths stay off (ADR-2025-08-M4-02)
unless NSA_TRITON_SEL_FORCE=1.
"""
import logging
import math

import pytest
import torch

import nsa_ext
from common import make_case
from nsa_ext.call import describe_call
from nsa_ext.config import Settings, load_settings
from nsa_ext.device import CPU, DeviceFacts
from nsa_ext.dispatch import PRIORITY, decide
from nsa_ext.selection import canonical_blocks



def extension_available() -> bool:
    try:
        from nsa_ext import _ext
    except ImportError:
        return False
    return _ext.available()


H100 = DeviceFacts("cuda", (9, 0), "NVIDIA H100 80GB HBM3", 132)
A100 = DeviceFacts("cuda", (8, 0), "NVIDIA A100", 108)
RTX3090 = DeviceFacts("cuda", (8, 6), "NVIDIA GeForce RTX 3090", 82)
RTX4090 = DeviceFacts("cuda", (8, 9), "NVIDIA GeForce RTX 4090", 128)
T4 = DeviceFacts("cuda", (7, 5), "Tesla T4", 40)
KERNELS = ("cuda", "triton")


def a_call(dtype=torch.float16, S=4, block_size=16, Dk=64):
    case = make_case(B=1, TQ=32, HQ=8, H=2, Dk=Dk, S=S, block_size=block_size, dtype=dtype)
    return describe_call(*case.args())


def settings(**over):
    return Settings(**over)


def test_cpu_takes_packed_sdpa_and_says_why_not_the_kernels():
    d = decide(a_call(), settings=settings(), facts=CPU)
    assert d.chosen == "sdpa"
    assert any("CUDA" in r for r in d.reasons["triton"])
    assert d.reasons["cuda"], "the CUDA extension cannot serve a CPU device"


@pytest.mark.parametrize("facts", [H100, A100, RTX3090], ids=lambda f: f.arch)
def test_kernel_path_on_sm80_and_newer(facts):
    d = decide(a_call(), settings=settings(), facts=facts)
    assert not any("ADR-2025-08-M4-02" in r for rs in d.reasons.values() for r in rs)
    triton_ok = not d.reasons["triton"]
    cuda_ok = not d.reasons["cuda"]
    expected = "triton" if triton_ok else ("cuda" if cuda_ok else "sdpa")
    assert d.chosen == expected
    try:
        import triton  # noqa: F401
        assert triton_ok, d.reasons["triton"]
    except ImportError:
        assert not triton_ok


def test_sm89_policy_keeps_kernels_off_unless_forced():
    d = decide(a_call(), settings=settings(), facts=RTX4090)
    assert d.chosen == "sdpa"
    for name in KERNELS:
        if name == "cuda" and not extension_available():
            continue   # not built here: that is its reason
        assert any("ADR-2025-08-M4-02" in r and "NSA_TRITON_SEL_FORCE=1" in r
                   for r in d.reasons[name]), (name, d.reasons[name])
    assert any("ADR-2025-08-M4-02" in r for r in d.reasons["triton"])
    forced = decide(a_call(), settings=settings(triton_sel_force=True), facts=RTX4090)
    assert not any("ADR-2025-08-M4-02" in r for rs in forced.reasons.values() for r in rs)
    assert forced.chosen in ("cuda", "triton") or forced.reasons["triton"]


def test_sm89_force_flag_read_from_environment():
    forced = load_settings({"NSA_TRITON_SEL_FORCE": "1"})
    assert forced.triton_sel_force
    d = decide(a_call(), settings=forced, facts=RTX4090)
    assert not any("ADR-2025-08-M4-02" in r for r in d.reasons["triton"])


def test_old_gpus_fall_back():
    d = decide(a_call(), settings=settings(), facts=T4)
    assert d.chosen == "sdpa"
    assert any("8.0" in r for r in d.reasons["triton"])
    assert d.reasons["cuda"]


def test_length_threshold_sends_short_rows_to_sdpa():
    call = a_call(S=4, block_size=16)              # 64 selected tokens per row
    d = decide(call, settings=settings(sel_triton_min_L=65, sel_cuda_min_L=65), facts=H100)
    assert d.chosen == "sdpa"
    assert any("NSA_SEL_TRITON_MIN_L" in r for r in d.preferences["triton"])
    assert any("NSA_SEL_CUDA_MIN_L" in r for r in d.preferences["cuda"])
    assert not any("MIN_L" in r for rs in d.reasons.values() for r in rs)
    d = decide(call, settings=settings(sel_triton_min_L=64, sel_cuda_min_L=10**6), facts=H100)
    assert not any("NSA_SEL_TRITON_MIN_L" in r for r in d.preferences["triton"])


def test_triton_flag_turns_it_off_for_auto():
    d = decide(a_call(), settings=load_settings({"NSA_USE_TRITON_SEL": "0"}), facts=H100)
    assert any("NSA_USE_TRITON_SEL" in r for r in d.preferences["triton"])
    assert d.chosen != "triton"


# --- reasons (real incapacities) vs auto's preferences, one test per kind ------------------------

def triton_importable() -> bool:
    from nsa_ext.backends import triton as triton_backend

    return triton_backend._import_error() is None


PREFERENCES = {
    "triton_min_len": (dict(sel_triton_min_L=10**6), "triton", "NSA_SEL_TRITON_MIN_L"),
    "triton_switch": (dict(use_triton_sel=False), "triton", "NSA_USE_TRITON_SEL"),
    "triton_arch_threshold": (dict(thresholds={"sm90": {"sel_triton_min_L": 10**6}}), "triton",
                              "NSA_SEL_TRITON_MIN_L"),
    "cuda_min_len": (dict(sel_cuda_min_L=10**6), "cuda", "NSA_SEL_CUDA_MIN_L"),
    "cuda_arch_threshold": (dict(thresholds={"sm90": {"sel_cuda_min_L": 10**6}}), "cuda",
                            "NSA_SEL_CUDA_MIN_L"),
}


@pytest.mark.parametrize("kind", PREFERENCES)
def test_a_preference_steers_auto_but_never_refuses_a_named_backend(kind):
    over, name, needle = PREFERENCES[kind]
    call = a_call()
    auto = decide(call, settings=settings(**over), facts=H100)
    assert any(needle in p for p in auto.preferences[name]), auto.preferences
    assert not any(needle in r for r in auto.reasons[name]), auto.reasons
    assert auto.chosen != name
    named = decide(call, name, settings=settings(**over), facts=H100)
    assert not any(needle in r for r in named.reasons[name])
    assert any(needle in p for p in named.preferences[name])
    can_serve = triton_importable() if name == "triton" else extension_available()
    assert named.chosen == (name if can_serve else None), named
    assert "auto's preference, not a limit: " in str(named)


REASONS = {
    # (call, facts, settings, backend, words of the reason)
    "sm89_policy": (dict(), RTX4090, dict(), "triton", "ADR-2025-08-M4-02"),
    "old_gpu": (dict(), T4, dict(), "triton", "SM 8.0"),
    "cpu_device": (dict(), CPU, dict(), "triton", "CUDA GPU"),
    "dtype": (dict(dtype=torch.float64), H100, dict(), "triton", "float64"),
    "head_dim": (dict(Dk=320), H100, dict(), "triton", "Dk=320"),
}


@pytest.mark.parametrize("kind", REASONS)
def test_a_reason_refuses_the_named_backend(kind):
    call_over, facts, over, name, needle = REASONS[kind]
    dtype = call_over.pop("dtype", torch.float16)
    case = make_case(B=1, TQ=32, HQ=8, H=2, Dk=call_over.get("Dk", 64), S=4, block_size=16,
                     dtype=dtype)
    call = describe_call(*case.args(), allowed_dtypes=(torch.float16, torch.float64))
    named = decide(call, name, settings=settings(**over), facts=facts)
    assert named.chosen is None
    assert any(needle in r for r in named.reasons[name]), named.reasons
    assert not named.preferences[name]


def test_grid_limit_is_a_reason():
    # Expanded (zero-stride) tensors: the shapes of a huge call without its memory.
    q = torch.zeros(1, 1, 1, 16, dtype=torch.float16).expand(1, 2 ** 27, 32, 16)
    k = torch.zeros(1, 1, 1, 16, dtype=torch.float16).expand(1, 2 ** 27, 1, 16)
    block_indices = torch.zeros(1, 1, 1, 1, dtype=torch.int32).expand(1, 2 ** 27, 1, 1)
    named = decide(describe_call(q, k, k, block_indices, 16), "triton", settings=settings(),
                   facts=H100)
    assert named.chosen is None
    assert any("grid limit" in r for r in named.reasons["triton"]), named.reasons


def test_packed_sdpa_reason_off_cpu_and_cuda():
    named = decide(a_call(), "sdpa", settings=settings(), facts=DeviceFacts("xpu", name="xpu"))
    assert named.chosen is None and any("xpu" in r for r in named.reasons["sdpa"])
    assert not named.preferences["sdpa"]


def test_sm89_force_lifts_the_policy_reason_for_a_named_backend():
    named = decide(a_call(), "triton", settings=settings(triton_sel_force=True), facts=RTX4090)
    assert not any("ADR-2025-08-M4-02" in r for r in named.reasons["triton"])
    assert named.chosen == ("triton" if triton_importable() else None)


def test_auto_takes_an_able_backend_when_every_able_one_has_a_preference(monkeypatch):
    from nsa_ext.backends import sdpa_packed

    monkeypatch.setattr(sdpa_packed, "auto_preferences", lambda *a: ["a test's preference"],
                        raising=False)
    d = decide(a_call(), settings=settings(), facts=CPU)
    assert d.chosen == "sdpa" and d.preferences["sdpa"] == ["a test's preference"]


def test_explain_shows_preferences_apart_from_reasons(monkeypatch):
    monkeypatch.setenv("NSA_SEL_TRITON_MIN_L", "1000000")
    case = make_case(B=1, TQ=16, HQ=2, H=1, Dk=16, S=2, block_size=8)
    text = str(nsa_ext.explain(*case.args()))
    assert "  triton: auto's preference, not a limit: selected length 16" in text
    reason_lines = [line for line in text.splitlines() if line.startswith("  triton: ")
                    and "preference" not in line]
    assert reason_lines and not any("MIN_L" in line for line in reason_lines)


def test_named_backend_reports_only_itself_and_never_falls_back():
    d = decide(a_call(), "triton", settings=settings(), facts=CPU)
    assert d.chosen is None and list(d.reasons) == ["triton"]
    d = decide(a_call(), "reference", settings=settings(), facts=CPU)
    assert d.chosen == "reference"


def test_auto_never_picks_the_reference():
    assert "reference" not in PRIORITY


def test_explain_prints_every_backend_and_the_choice():
    case = make_case(B=1, TQ=16, HQ=2, H=1, Dk=16, S=2, block_size=8)
    text = str(nsa_ext.explain(*case.args()))
    assert "chosen: sdpa" in text
    for name in PRIORITY:
        assert f"  {name}: " in text


def test_debug_log_records_the_choice_and_the_gather(monkeypatch, caplog):
    monkeypatch.setenv("NSA_DEBUG_LOG", "1")
    case = make_case(B=1, TQ=48, HQ=4, H=2, Dk=16, S=4, block_size=8, seed=3)
    with caplog.at_level(logging.INFO, logger="nsa_ext"):
        nsa_ext.selection_attention(*case.args())
    events = {r.nsa_event: r.nsa_fields for r in caplog.records if hasattr(r, "nsa_event")}
    assert events["sel.dispatch"]["backend"] == "sdpa"
    assert "triton" in events["sel.dispatch"]["reasons"]
    # Independent count: each (query, KV head) gathers its distinct visible blocks, whole.
    expected = 0
    bi = case.block_indices
    for t in range(48):
        for h in range(2):
            valid = {i for i in bi[0, t, h].tolist() if 0 <= i <= t // 8}
            expected += len(valid) * 8
    assert events["sel.sdpa.buckets"]["kv_tokens_gathered"] == expected
    assert sum(events["sel.sdpa.buckets"]["buckets"].values()) <= 48 * 2


def test_no_records_without_the_debug_flag(monkeypatch, caplog):
    monkeypatch.delenv("NSA_DEBUG_LOG", raising=False)
    monkeypatch.delenv("NSA_DEBUG_TRITON", raising=False)
    case = make_case(B=1, TQ=16, HQ=2, H=1, Dk=16, S=2, block_size=8)
    with caplog.at_level(logging.DEBUG, logger="nsa_ext"):
        nsa_ext.selection_attention(*case.args())
    assert not [r for r in caplog.records if hasattr(r, "nsa_event")]


def test_canonical_blocks_are_the_set_of_the_spec():
    case = make_case(B=2, TQ=40, HQ=2, H=2, Dk=8, S=6, block_size=4, seed=11, block_counts="tensor")
    call = describe_call(*case.args(), block_counts=case.block_counts)
    blocks, num = canonical_blocks(call)
    nb = math.ceil(40 / 4)
    for b in range(2):
        for t in range(40):
            for h in range(2):
                limit = int(case.block_counts[b, t, h])
                entries = case.block_indices[b, t, h, :limit].tolist()
                want = sorted({i for i in entries if 0 <= i < nb and i <= t // 4})
                row = blocks[b, t, h].tolist()
                assert row[:len(want)] == want and all(x == -1 for x in row[len(want):])
                assert num[b, t, h] == len(want)


# --- the cached decision sees every change of metadata and of the environment ------------------

def test_choose_caches_and_sees_env_and_metadata_changes(monkeypatch):
    from nsa_ext.dispatch import choose

    monkeypatch.delenv("NSA_SEL_TRITON_MIN_L", raising=False)
    monkeypatch.delenv("NSA_USE_TRITON_SEL", raising=False)
    call = a_call()
    first = choose(call, facts=H100)
    assert choose(a_call(), facts=H100) is first          # same metadata: the cached decision
    monkeypatch.setenv("NSA_SEL_TRITON_MIN_L", str(10**6))
    short = choose(call, facts=H100)
    assert short is not first and short.chosen != "triton"
    assert any("NSA_SEL_TRITON_MIN_L" in p for p in short.preferences["triton"])
    monkeypatch.delenv("NSA_SEL_TRITON_MIN_L")
    assert choose(call, facts=H100).chosen == first.chosen
    wide = a_call(Dk=320)                                  # another head dim: decided anew
    decision = choose(wide, facts=H100)
    assert decision is not first and any("Dk=320" in r for r in decision.reasons["triton"])
    assert choose(call, facts=RTX4090).chosen == "sdpa"    # other device facts: decided anew


def test_choose_keys_on_strides_too():
    from nsa_ext.call import describe_call as describe
    from nsa_ext.dispatch import choose

    case = make_case(B=1, TQ=32, HQ=8, H=2, Dk=64, S=4, block_size=16, dtype=torch.float16)
    q_strided = case.q.transpose(1, 2).contiguous().transpose(1, 2)   # same shape, other strides
    a = choose(describe(*case.args()), facts=H100)
    b = choose(describe(q_strided, *case.args()[1:]), facts=H100)
    assert a.call_summary == b.call_summary and a is not b


# --- a named backend serves a call below auto's thresholds ---------------------------------------

def _no_key_case(device):
    return make_case(B=1, TQ=8, HQ=4, H=2, Dk=16, S=4, block_size=16, dtype=torch.float16,
                     device=device)


def _check_no_key_output(o, lse):
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()


def test_block_counts_zero_runs_on_named_triton_in_the_interpreter(monkeypatch):
    from common import import_triton_for_the_interpreter

    if torch.cuda.is_available() or not import_triton_for_the_interpreter():
        pytest.skip("needs Triton's CPU interpreter (machines without a GPU)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("NSA_SEL_TRITON_MIN_L", "64")    # auto's threshold, above 0
    case = _no_key_case("cpu")
    kwargs = dict(block_counts=0, return_lse=True)
    assert nsa_ext.explain(*case.args(), **kwargs).chosen == "sdpa"
    assert nsa_ext.explain(*case.args(), backend="triton", **kwargs).chosen == "triton"
    _check_no_key_output(*nsa_ext.selection_attention(*case.args(), backend="triton", **kwargs))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_block_counts_zero_runs_on_named_kernels_on_the_gpu(backend, monkeypatch):
    monkeypatch.setenv("NSA_SEL_TRITON_MIN_L", "64")
    monkeypatch.setenv("NSA_SEL_CUDA_MIN_L", "64")
    case = _no_key_case("cuda")
    decision = nsa_ext.explain(*case.args(), block_counts=0, backend=backend)
    if decision.chosen is None:
        pytest.skip(f"{backend} cannot serve here: {decision.reasons[backend]}")
    _check_no_key_output(*nsa_ext.selection_attention(*case.args(), block_counts=0,
                                                      backend=backend, return_lse=True))


def test_measured_backend_order_puts_cuda_first_only_where_configured():
    from nsa_ext.dispatch import PRIORITY, priority

    facts = DeviceFacts("cuda", (9, 0), "NVIDIA H200", 132)
    assert priority(Settings(thresholds={"sm90": {"sel_cuda_first": 1}}), facts)[:2] == ("cuda", "triton")
    assert priority(Settings(thresholds={"sm90": {"sel_cuda_first": 0}}), facts) == PRIORITY
    assert priority(Settings(thresholds={"sm80": {"sel_cuda_first": 1}}), facts) == PRIORITY


def test_eager_calls_of_few_rows_put_cuda_first_but_not_inside_a_capture(monkeypatch):
    from nsa_ext import dispatch

    facts = DeviceFacts("cuda", (9, 0), "NVIDIA H200", 132)
    measured = Settings(thresholds={"sm90": {"sel_cuda_first_eager_rows": 64}})
    small = a_call()                                     # B * TQ * H rows of a_call
    rows = small.batch * small.seqlen_q * small.num_heads_kv
    assert rows <= 64
    assert dispatch.priority(measured, facts, small)[:2] == ("cuda", "triton")
    assert dispatch.priority(measured, facts) == PRIORITY          # no call: the plain order
    few = Settings(thresholds={"sm90": {"sel_cuda_first_eager_rows": rows - 1}})
    assert dispatch.priority(few, facts, small) == PRIORITY        # past the measured rows
    other_arch = Settings(thresholds={"sm80": {"sel_cuda_first_eager_rows": 64}})
    assert dispatch.priority(other_arch, facts, small) == PRIORITY
    monkeypatch.setattr(dispatch, "capturing", lambda device: True)
    assert dispatch.priority(measured, facts, small) == PRIORITY   # inside a CUDA-graph capture


def test_explain_says_why_auto_tries_the_backends_in_its_order(monkeypatch):
    from nsa_ext import dispatch

    facts = DeviceFacts("cuda", (9, 0), "NVIDIA H200", 132)
    call = a_call()
    measured = Settings(thresholds={"sm90": {"sel_cuda_first_eager_rows": 4096}})
    eager = decide(call, "auto", measured, facts)
    assert eager.order.startswith("cuda, triton, sdpa (CUDA extension first: an eager call")
    assert "order: cuda, triton, sdpa" in str(eager)
    monkeypatch.setattr(dispatch, "capturing", lambda device: True)
    captured = decide(call, "auto", measured, facts)
    assert captured.order.startswith("triton, cuda, sdpa (the default order inside a CUDA-graph")
    assert decide(call, "auto", settings(), facts).order == "triton, cuda, sdpa (the default order)"
    assert decide(call, "sdpa", measured, facts).order == ""


def test_the_decision_cache_sees_a_capture(monkeypatch):
    from nsa_ext import dispatch

    call = a_call()
    facts = DeviceFacts("cuda", (9, 0), "NVIDIA H200", 132)
    measured = Settings(thresholds={"sm90": {"sel_cuda_first_eager_rows": 4096}})
    seen = []
    real = dispatch.decide
    monkeypatch.setattr(dispatch, "decide", lambda *a, **kw: seen.append(a) or real(*a, **kw))
    for flag in (False, True, False, True):
        monkeypatch.setattr(dispatch, "capturing", lambda device, flag=flag: flag)
        try:
            dispatch.choose(call, "auto", measured, facts)
        except dispatch.BackendUnavailableError:
            pass
    assert len(seen) == 2          # one decision per capture state, then the cache


def load_optimizer():
    """bench/threshold_optimizer.py as a module (bench/ is not a package on the path)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "threshold_optimizer.py"
    spec = importlib.util.spec_from_file_location("threshold_optimizer", path)
    optimizer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(optimizer)
    return optimizer


def test_optimizer_derives_the_backend_order_from_bench_rows():
    optimizer = load_optimizer()

    def rows(cuda, triton):
        out = []
        for i, (c, t) in enumerate(zip(cuda, triton)):
            out += [dict(case=f"c{i}", pattern="random", mode="fwd", status="ok", backend="nsa:cuda", ms=c),
                    dict(case=f"c{i}", pattern="random", mode="fwd", status="ok", backend="nsa:triton", ms=t)]
        return {"rows": out}

    assert optimizer.backend_order(rows([1.0, 1.0, 2.0], [2.0, 2.0, 1.0]))["value"] == 1
    assert optimizer.backend_order(rows([1.0, 3.0, 3.0], [2.0, 2.0, 2.0]))["value"] == 0
    assert optimizer.backend_order({"rows": []})["value"] is None
    # The tile schedule's order from the forced-tile rows; the forced-row rows, where present,
    # decide the plain order (the tile rows do not sway it).
    def renamed(bench, cuda, triton):
        names = {"nsa:cuda": cuda, "nsa:triton": triton}
        return [dict(row, backend=names[row["backend"]]) for row in bench["rows"]]

    tile = renamed(rows([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]), "nsa:cuda-tile", "nsa:triton-tile")
    row = renamed(rows([2.1, 2.1, 2.1], [2.0, 2.0, 2.0]), "nsa:cuda-row", "nsa:triton-row")
    auto = rows([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])["rows"]
    assert optimizer.tile_order({"rows": tile + auto})["value"] == 1
    assert optimizer.tile_order({"rows": auto})["value"] is None
    assert optimizer.backend_order({"rows": tile + row + auto})["value"] == 0
    assert optimizer.backend_order({"rows": tile + auto})["value"] == 1

    def eager_bench(points):       # (TQ, cuda, triton, eager?) per case: B = 1, H = 4
        cases, out = [], []
        for i, (TQ, c, t, eager) in enumerate(points):
            cases.append(dict(case=f"c{i}", pattern="random", shape=dict(B=1, TQ=TQ, H=4)))
            for backend, spent in (("nsa:cuda", c), ("nsa:triton", t)):
                row = dict(case=f"c{i}", pattern="random", mode="fwd", status="ok",
                           backend=backend, ms=1.0)
                if eager:
                    row["eager_us"] = spent
                else:
                    row["ms"] = spent / 1e3
                out.append(row)
        return {"cases": cases, "rows": out}

    decode, chunk, prefill = (1, 40.0, 160.0, True), (512, 164.0, 287.0, True), \
        (8192, 2020.0, 1886.0, False)
    assert optimizer.eager_order(eager_bench([decode, chunk, prefill]))["value"] == 2048
    assert optimizer.eager_order(eager_bench([decode, (512, 300.0, 287.0, True), prefill]))["value"] == 4
    assert optimizer.eager_order(eager_bench([(1, 200.0, 160.0, True), chunk]))["value"] == 0
    assert optimizer.eager_order(eager_bench([decode, chunk, (8192, 1.0, 2.0, False)]))["value"] == 32768
    assert optimizer.eager_order({"rows": [], "cases": []})["value"] is None
    no_eager_rows = eager_bench([(8192, 2020.0, 1886.0, False), (16384, 1.0, 2.0, False)])
    assert optimizer.eager_order(no_eager_rows)["value"] is None       # keep the config's value


def test_optimizer_cuda_tile_union_limit():
    """sel_cuda_tile_max_union_pct from a run's forced cuda-tile rows against Triton's row
    schedule, by the cases' union ratios (the H200's random rows of the tenth session)."""
    optimizer = load_optimizer()

    def bench(points, G=16, forced_row=True):      # (ratio, cuda-tile ms, row ms) per case
        cases, rows = [], []
        for i, (ratio, tile, row) in enumerate(points):
            note = f"triton; nsa:triton's schedule: row (union/selections {ratio})"
            cases.append(dict(case=f"c{i}", pattern="random", auto=note,
                              shape=dict(B=1, TQ=8192, H=4, HQ=4 * G)))
            for backend, ms in (("nsa:cuda-tile", tile),
                                ("nsa:triton-row" if forced_row else "nsa:triton", row)):
                rows.append(dict(case=f"c{i}", pattern="random", mode="fwd", status="ok",
                                 backend=backend, ms=ms))
        return {"cases": cases, "rows": rows}

    h200 = [(0.605, 1.54, 2.04), (0.711, 3.64, 4.09), (0.786, 8.33, 8.22), (0.834, 17.8, 16.7)]
    assert optimizer.cuda_tile_union_limit(bench(h200))["value"] == 74
    assert optimizer.cuda_tile_union_limit(bench(h200, forced_row=False))["value"] == 74
    # No loss measured: halfway from the last win (71.1 %) to 100 %.
    assert optimizer.cuda_tile_union_limit(bench(h200[:2]))["value"] == 85
    assert optimizer.cuda_tile_union_limit(bench([(0.3, 2.0, 1.0)]))["value"] == 15
    assert optimizer.cuda_tile_union_limit(bench(h200, G=2))["value"] is None    # kv's side
    numeric = bench(h200)
    for i, case in enumerate(numeric["cases"]):  # bench_selection.py's own field wins
        case["union_ratio"], case["auto"] = 0.1 * (i + 1), "triton; nsa:triton's schedule: row"
    assert optimizer.cuda_tile_union_limit(numeric)["value"] == 25
    # Triton's own schedule was tile there: its time is no row time.
    tiled = bench(h200, forced_row=False)
    for case in tiled["cases"]:
        case["auto"] = case["auto"].replace("schedule: row", "schedule: tile")
    assert optimizer.cuda_tile_union_limit(tiled)["value"] is None


def test_the_tile_schedule_gets_its_measured_backend(monkeypatch):
    """sel_cuda_first_tile: under auto, where Triton is chosen, its tile calls go to the CUDA
    extension's tile kernel when that kernel can serve the call; never for a named backend,
    never without the key, and not when the CUDA tile kernel names a reason."""
    from nsa_ext import dispatch

    cuda = dispatch.backend_module("cuda")
    facts = DeviceFacts("cuda", (9, 0), "NVIDIA H200", 132)
    call = a_call()
    measured = Settings(thresholds={"sm90": {"sel_cuda_first_tile": 1}})
    monkeypatch.setattr(cuda, "reasons_unsupported", lambda *a: [])
    monkeypatch.setattr(cuda, "tile_reasons", lambda *a: [])
    monkeypatch.setattr(dispatch.backend_module("triton"), "reasons_unsupported", lambda *a: [])
    decision = decide(call, "auto", measured, facts)
    assert decision.chosen == "triton" and decision.tile_backend == "cuda"
    assert "tile schedule: where the chooser picks tile, the CUDA extension" in str(decision)
    assert decide(call, "triton", measured, facts).tile_backend is None
    assert decide(call, "auto", Settings(), facts).tile_backend is None
    assert decide(call, "auto", Settings(thresholds={"sm90": {"sel_cuda_first_tile": 0}}),
                  facts).tile_backend is None
    first = Settings(thresholds={"sm90": {"sel_cuda_first_tile": 1, "sel_cuda_first": 1}})
    assert decide(call, "auto", first, facts).chosen == "cuda"
    assert decide(call, "auto", first, facts).tile_backend is None   # CUDA runs its own tile
    monkeypatch.setattr(cuda, "tile_reasons", lambda *a: ["the tile kernel runs on SM 9.0 only"])
    refused = decide(call, "auto", measured, facts)
    assert refused.tile_backend is None and "SM 9.0 only" in refused.tile_why


def test_triton_hands_a_tile_call_to_the_runner_it_is_given(monkeypatch):
    """The Triton backend runs `tile_runner(prepared)` exactly where its chooser picked tile,
    with the chooser's canonical rows, and its own kernels elsewhere."""
    from common import import_triton_for_the_interpreter

    if torch.cuda.is_available() or not import_triton_for_the_interpreter():
        pytest.skip("needs Triton's CPU interpreter (machines without a GPU)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from nsa_ext.backends import triton as triton_backend
    from nsa_ext.reference import reference_forward
    from nsa_ext.schedules import schedule_module

    case = make_case(B=1, TQ=48, HQ=4, H=2, Dk=32, S=3, block_size=16, dtype=torch.float16)
    call = describe_call(*case.args(), need_lse=True)
    seen = []

    def runner(prep):
        seen.append(prep)
        o, lse, _ = schedule_module("tile").forward(prep)
        return o, lse
    monkeypatch.setenv("NSA_SEL_SCHEDULE", "tile")
    o, lse = triton_backend.forward(call, tile_runner=runner)
    assert len(seen) == 1
    blocks, num_blocks = canonical_blocks(call)
    assert torch.equal(seen[0].blocks, blocks) and torch.equal(seen[0].num_blocks, num_blocks)
    o_ref, lse_ref = reference_forward(call)
    torch.testing.assert_close(o.float(), o_ref.float(), atol=2e-3, rtol=2e-3)
    monkeypatch.setenv("NSA_SEL_SCHEDULE", "row")
    triton_backend.forward(call, tile_runner=runner)
    assert len(seen) == 1                                  # row: Triton's own kernel


def test_reference_gradients_come_from_packed_sdpa(monkeypatch):
    """A backend="reference" call is differentiated by packed SDPA's plain PyTorch math, also
    where a kernel backend could serve the backward (here Triton in its CPU interpreter, with
    auto's length threshold off): never by a kernel under test. Its gradients match autograd
    through the reference's own fp32 math."""
    from common import import_triton_for_the_interpreter
    from nsa_ext.dispatch import backward_backend
    from nsa_ext.reference import reference_forward

    if not torch.cuda.is_available():
        if not import_triton_for_the_interpreter():
            pytest.skip("needs Triton's CPU interpreter or a GPU")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("NSA_SEL_TRITON_MIN_L", "0")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = make_case(B=2, TQ=24, HQ=4, H=2, Dk=32, S=3, block_size=8, dtype=torch.float32,
                     device=device, seed=3)
    call = describe_call(*case.args(), **case.kwargs())
    assert backward_backend(call, "triton") == "triton"    # a kernel backward could serve it
    assert backward_backend(call, "reference") == "sdpa"

    grad_o = torch.randn(case.q.shape[:-1] + (case.v.shape[-1],), device=device)
    leaves = [t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v)]
    o = nsa_ext.selection_attention(*leaves, case.block_indices, case.block_size,
                                    **case.kwargs(), backend="reference")
    got = torch.autograd.grad(o, leaves, grad_o)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v)]
    o_ref, _ = reference_forward(describe_call(*ref_leaves, case.block_indices, case.block_size,
                                               **case.kwargs()))
    want = torch.autograd.grad(o_ref, ref_leaves, grad_o)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
