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
    assert any("NSA_SEL_TRITON_MIN_L" in r for r in d.reasons["triton"])
    d = decide(call, settings=settings(sel_triton_min_L=64, sel_cuda_min_L=10**6), facts=H100)
    assert not any("NSA_SEL_TRITON_MIN_L" in r for r in d.reasons["triton"])


def test_triton_flag_turns_it_off():
    d = decide(a_call(), settings=load_settings({"NSA_USE_TRITON_SEL": "0"}), facts=H100)
    assert any("NSA_USE_TRITON_SEL" in r for r in d.reasons["triton"])
    assert d.chosen != "triton"


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
