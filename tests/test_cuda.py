"""The CUDA extension backend (nsa_ext._C, nsa_ext/backends/cuda.py).

CPU: the loader's report, the operator's schema and fake implementation (opcheck on meta
tensors), the backend's reasons. GPU (marked `gpu`): parity with the fp32 reference over SPEC.md's
cases, the kernel's own edge cases (group sizes that need padding or several row tiles, block
sizes 16..256, Dk != Dv, 64-row groups, empty rows), opcheck on CUDA tensors, and the split-KV
decode path (num_splits forced through the operator) against the reference.
"""
from __future__ import annotations

import pytest
import torch

from common import assert_close_to_reference, make_case, spec_errors
from nsa_ext import _ext
from nsa_ext.backends import cuda as cuda_backend
from nsa_ext.call import describe_call
from nsa_ext.config import Settings
from nsa_ext.device import DeviceFacts
from nsa_ext.reference import reference_forward
from nsa_ext.selection import canonical_blocks, canonical_blocks_torch, row_geometry

needs_ext = pytest.mark.skipif(not _ext.available(),
                               reason=f"nsa_ext._C not usable: {_ext.unavailable_reason()}")
H100 = DeviceFacts("cuda", (9, 0), "NVIDIA H100", 132)


def _op_args(device, dtype=torch.bfloat16, B=1, TQ=4, TK=8, HQ=6, H=2, Dk=64, Dv=64, S=3):
    return (torch.randn(B, TQ, HQ, Dk, device=device, dtype=dtype),
            torch.randn(B, TK, H, Dk, device=device, dtype=dtype),
            torch.randn(B, TK, H, Dv, device=device, dtype=dtype),
            torch.zeros(B, TQ, H, S, device=device, dtype=torch.int32),
            torch.ones(B, TQ, H, device=device, dtype=torch.int32),
            torch.arange(TK - TQ, TK, device=device).expand(B, TQ).contiguous(),
            torch.zeros(B, TQ, device=device, dtype=torch.int64),
            16, 0.125)


# --- CPU ------------------------------------------------------------------------------------

def test_loader_reports_a_reason_or_build_info():
    if _ext.available():
        info = _ext.build_info()
        assert info["archs"] and info["torch_version"] and info["cuda_version"]
        assert (128, 128) in [tuple(p) for p in info["head_dims"]]
        assert _ext.unavailable_reason() is None
    else:
        assert isinstance(_ext.unavailable_reason(), str) and _ext.unavailable_reason()
        assert _ext.build_info() == {} or "archs" in _ext.build_info()


def test_backend_names_the_missing_extension(monkeypatch):
    monkeypatch.setattr(_ext, "available", lambda: False)
    monkeypatch.setattr(_ext, "unavailable_reason", lambda: "not built (test)")
    case = make_case(TQ=8, HQ=2, H=1, Dk=64, S=2)
    call = describe_call(*case.args())
    reasons = cuda_backend.reasons_unsupported(call, Settings(), H100)
    assert len(reasons) == 1 and "not built (test)" in reasons[0] and "nsa_ext.info" in reasons[0]


@needs_ext
def test_fake_implementation_passes_opcheck_on_meta():
    args = _op_args("meta")
    o, lse = torch.ops.nsa_ext_cuda.selection_fwd(*args)
    assert o.shape == (1, 4, 6, 64) and o.dtype == torch.bfloat16
    assert lse.shape == (1, 4, 6) and lse.dtype == torch.float32
    torch.library.opcheck(torch.ops.nsa_ext_cuda.selection_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@needs_ext
def test_fake_implementation_takes_num_splits():
    args = (*_op_args("meta", Dk=192, Dv=128), 4)
    o, lse = torch.ops.nsa_ext_cuda.selection_fwd(*args)
    assert o.shape == (1, 4, 6, 128) and lse.shape == (1, 4, 6)
    torch.library.opcheck(torch.ops.nsa_ext_cuda.selection_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# One wave of thread blocks, one per SM: 132 on 132 SMs.
@pytest.mark.parametrize("shape,dtype,sm_count,expected", [
    (dict(B=1, TQ=1, TK=4096, HQ=16, H=4, S=16), torch.bfloat16, 132, 16),   # 4 rows: all 16
    (dict(B=32, TQ=1, TK=512, HQ=16, H=4, S=16), torch.bfloat16, 132, 1),    # 128 rows: a wave
    (dict(B=8, TQ=1, TK=512, HQ=16, H=4, S=16), torch.bfloat16, 132, 4),     # 32 rows: 4 slices
    (dict(B=16, TQ=1, TK=512, HQ=16, H=4, S=16), torch.bfloat16, 132, 2),    # 64 rows: 2 slices
    (dict(B=128, TQ=1, TK=512, HQ=16, H=4, S=16), torch.bfloat16, 132, 1),   # 512 rows
    (dict(B=1, TQ=1, TK=4096, HQ=16, H=4, S=16), torch.bfloat16, 0, 1),      # SM count unknown
    (dict(B=4, TQ=64, TK=512, HQ=16, H=4, S=16), torch.bfloat16, 132, 1),    # 1024 rows: enough
    (dict(B=2, TQ=1, TK=512, HQ=16, H=4, S=1), torch.bfloat16, 132, 1),      # one entry a row
    (dict(B=33, TQ=1, TK=512, HQ=128, H=1, S=16), torch.bfloat16, 132, 2),   # 2 row tiles a row
    (dict(B=33, TQ=1, TK=512, HQ=128, H=1, S=16), torch.float32, 132, 4),    # fp32: one block
])
def test_num_splits_follows_shapes_and_sm_count(shape, dtype, sm_count, expected):
    case = make_case(Dk=64, block_size=64, dtype=dtype, **shape)
    call = describe_call(*case.args())
    assert cuda_backend.num_splits(call, sm_count) == expected


def test_explain_names_the_split_count_of_a_decode():
    case = make_case(B=1, TQ=1, TK=4096, HQ=16, H=4, Dk=64, S=16, block_size=64,
                     dtype=torch.bfloat16)
    call = describe_call(*case.args())
    lines = cuda_backend.explain_schedule(call, Settings(), H100)
    assert lines == ["schedule: row (too few rows to fill the GPU: split-KV, "
                     f"{cuda_backend.num_splits(call, H100.sm_count)} slices a row)"]
    assert cuda_backend.num_splits(call, H100.sm_count) == 16


def test_num_splits_without_triton_matches_triton_ref():
    choose = pytest.importorskip("triton_ref.selection_split").choose_num_splits
    for work in (1, 3, 4, 64, 127, 500):
        for entries in (0, 1, 2, 5, 16, 33):
            for sm_count in (0, 78, 132):
                assert cuda_backend._choose_num_splits_here(work, entries, sm_count) == \
                    choose(work, entries, sm_count)


@needs_ext
def test_fake_implementation_keeps_dv():
    o, lse = torch.ops.nsa_ext_cuda.selection_fwd(*_op_args("meta", Dk=192, Dv=128))
    assert o.shape == (1, 4, 6, 128)


@needs_ext
@pytest.mark.parametrize("facts,needle", [
    (DeviceFacts("cpu", name="cpu"), "needs a CUDA device"),
    (DeviceFacts("cuda", (7, 5), "T4", 40), "SM 8.0 or newer"),
    (DeviceFacts("cuda", (8, 9), "RTX 4090", 128), "ADR-2025-08-M4-02"),
])
def test_reasons_for_devices(facts, needle):
    case = make_case(TQ=8, HQ=2, H=1, Dk=64, S=2, dtype=torch.bfloat16)
    reasons = cuda_backend.reasons_unsupported(describe_call(*case.args()), Settings(), facts)
    assert any(needle in r for r in reasons), reasons


@needs_ext
def test_sm89_policy_can_be_forced():
    case = make_case(TQ=8, HQ=2, H=1, Dk=64, S=2, dtype=torch.bfloat16)
    call = describe_call(*case.args())
    facts = DeviceFacts("cuda", (8, 9), "RTX 4090", 128)
    reasons = cuda_backend.reasons_unsupported(call, Settings(triton_sel_force=True), facts)
    assert not any("ADR-2025-08-M4-02" in r for r in reasons)


@needs_ext
@pytest.mark.parametrize("kwargs,needle", [
    (dict(Dk=96, dtype=torch.bfloat16), "no bfloat16 kernel instance"),
    (dict(Dk=59, Dv=37, dtype=torch.float16), "multiples of 8"),
    (dict(Dk=320, dtype=torch.float32), "at most 256"),
    (dict(block_size=8, Dk=64, dtype=torch.bfloat16), "powers of two >= 16"),
])
def test_reasons_for_calls(kwargs, needle):
    case = make_case(TQ=8, HQ=2, H=1, S=2, **kwargs)
    reasons = cuda_backend.reasons_unsupported(describe_call(*case.args()), Settings(), H100)
    assert any(needle in r for r in reasons), reasons


@needs_ext
def test_min_len_threshold_is_auto_preference_not_a_reason():
    case = make_case(TQ=8, HQ=2, H=1, Dk=64, S=2, block_size=16, dtype=torch.bfloat16)
    call = describe_call(*case.args())
    assert not cuda_backend.reasons_unsupported(call, Settings(sel_cuda_min_L=64), H100)
    preferences = cuda_backend.auto_preferences(call, Settings(sel_cuda_min_L=64), H100)
    assert any("NSA_SEL_CUDA_MIN_L" in r for r in preferences), preferences
    assert not cuda_backend.auto_preferences(call, Settings(sel_cuda_min_L=32), H100)


def test_arch_matching():
    served = cuda_backend._arch_served
    assert served((9, 0), ["8.0", "9.0"]) and served((8, 6), ["8.0"])
    assert not served((9, 0), ["8.0", "8.6"]) and served((9, 0), ["8.6+PTX"])
    assert not served((8, 0), ["8.6"]) and not served((10, 0), ["9.0a"])


# --- GPU ------------------------------------------------------------------------------------

DTYPES = [torch.bfloat16, torch.float16, torch.float32]

CASES = {
    "G1": dict(B=2, TQ=70, HQ=3, H=3, Dk=64, S=5, block_size=16),
    "G3": dict(B=1, TQ=90, HQ=6, H=2, Dk=128, S=6, block_size=32),
    "G16": dict(B=1, TQ=130, HQ=16, H=1, Dk=128, S=4, block_size=64),
    "G64": dict(B=1, TQ=100, HQ=64, H=1, Dk=128, S=4, block_size=32),
    "G24_two_warp_rows": dict(B=1, TQ=50, HQ=48, H=2, Dk=64, S=4, block_size=16),
    "G80_two_row_tiles": dict(B=1, TQ=40, HQ=80, H=1, Dk=64, S=3, block_size=16),
    "dk192_dv128": dict(B=1, TQ=150, HQ=8, H=2, Dk=192, Dv=128, S=4, block_size=64),
    "d256": dict(B=1, TQ=80, HQ=16, H=1, Dk=256, S=3, block_size=16),
    "bs128": dict(B=1, TQ=400, HQ=4, H=1, Dk=64, S=3, block_size=128),
    "bs256_chunked_prefill": dict(B=2, TQ=37, TK=700, HQ=4, H=2, Dk=128, S=3, block_size=256),
    "decode_TQ1": dict(B=3, TQ=1, TK=1000, HQ=16, H=2, Dk=128, S=8, block_size=64),
    "counts_tensor": dict(B=2, TQ=64, HQ=4, H=2, Dk=64, S=6, block_size=16, block_counts="tensor"),
    "counts_int": dict(B=1, TQ=64, HQ=4, H=2, Dk=128, S=6, block_size=32, block_counts=2),
    "varlen_ragged": dict(seqlens=[37, 1, 130, 13, 64], HQ=8, H=2, Dk=128, S=5, block_size=32),
    "varlen_chunked": dict(seqlens=[5, 1, 20], seqlens_k=[170, 16, 20], HQ=6, H=2, Dk=64, S=5,
                           block_size=16),
}


def _run(case):
    call = describe_call(*case.args(), **case.kwargs(), need_lse=True)
    reasons = cuda_backend.reasons_unsupported(call, Settings(), DeviceFacts(
        "cuda", torch.cuda.get_device_capability(), torch.cuda.get_device_name(), 0))
    assert not reasons, reasons
    o, lse = cuda_backend.forward(call)
    torch.cuda.synchronize()
    ref_call = describe_call(case.q.float(), case.k.float(), case.v.float(), case.block_indices,
                             case.block_size, **case.kwargs(), need_lse=True)
    o_ref, lse_ref = reference_forward(ref_call)
    return call, o, lse, o_ref, lse_ref


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", CASES)
def test_cuda_matches_reference(name, dtype):
    case = make_case(dtype=dtype, device="cuda", seed=sum(map(ord, name)), **CASES[name])
    call, o, lse, o_ref, lse_ref = _run(case)
    assert o.shape == (call.batch, call.seqlen_q, call.num_heads_q, call.head_dim_v)
    assert_close_to_reference(o, o_ref.to(dtype), dtype, lse, lse_ref)
    assert torch.isfinite(lse_ref).any()


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_empty_rows_give_zero_and_minus_inf(dtype):
    case = make_case(B=1, TQ=48, HQ=16, H=2, Dk=128, S=4, block_size=16, dtype=dtype,
                     device="cuda", seed=3)
    case.block_indices[:, ::3] = -1                  # nothing selected
    case.block_indices[:, 1::3, 0] = 10_000          # only out-of-range on KV head 0
    case.block_indices[:, 1::3, 0, 1:] = -5
    call, o, lse, o_ref, lse_ref = _run(case)
    assert_close_to_reference(o, o_ref.to(dtype), dtype, lse, lse_ref)
    assert (o[:, ::3] == 0).all() and torch.isneginf(lse[:, ::3]).all()
    assert (o[:, 1::3, :8] == 0).all() and torch.isneginf(lse[:, 1::3, :8]).all()


@pytest.mark.gpu
@needs_ext
def test_repeats_and_order_do_not_matter_and_runs_are_identical():
    case = make_case(B=1, TQ=128, HQ=16, H=2, Dk=128, S=6, block_size=16, dtype=torch.bfloat16,
                     device="cuda", seed=11)
    bi = case.block_indices.clamp(min=0)
    twice = torch.cat([bi.flip(-1), bi], dim=-1)
    o1, lse1 = cuda_backend.forward(describe_call(case.q, case.k, case.v, bi, 16, need_lse=True))
    o2, lse2 = cuda_backend.forward(describe_call(case.q, case.k, case.v, twice, 16, need_lse=True))
    o3, lse3 = cuda_backend.forward(describe_call(case.q, case.k, case.v, bi, 16, need_lse=True))
    # Same set, so the same function; not bit-identical, since this small call is split-KV and
    # S (6 vs 12) changes how the entries are sliced and so the order of the merge's sums.
    assert (o1.float() - o2.float()).abs().max().item() <= 1e-2
    assert (lse1 - lse2).nan_to_num(0.0).abs().max().item() <= 1e-4
    assert torch.equal(o1, o3) and torch.equal(lse1, lse3)   # a race would show run to run


@pytest.mark.gpu
@needs_ext
def test_misaligned_inputs_are_served():
    case = make_case(B=1, TQ=64, HQ=8, H=1, Dk=64, S=4, block_size=16, dtype=torch.float16,
                     device="cuda", seed=8)
    flat = torch.empty(case.k.numel() + 4, device="cuda", dtype=torch.float16)
    k = flat[4:].view_as(case.k)            # contiguous, 8 bytes past an aligned address
    k.copy_(case.k)
    assert k.data_ptr() % 16 != 0
    call = describe_call(case.q, k, case.v, case.block_indices, 16, need_lse=True)
    o, lse = cuda_backend.forward(call)
    o_ref, lse_ref = reference_forward(describe_call(
        case.q.float(), case.k.float(), case.v.float(), case.block_indices, 16, need_lse=True))
    assert_close_to_reference(o, o_ref.half(), torch.float16, lse, lse_ref)


@pytest.mark.gpu
@needs_ext
def test_every_output_is_written():
    """Poisoned outputs: the op allocates with empty(); fill the allocator's memory with NaN
    first so that an unwritten element would show."""
    case = make_case(B=1, TQ=96, HQ=12, H=4, Dk=64, S=3, block_size=16, dtype=torch.float16,
                     device="cuda", seed=2)
    junk = torch.full((1 << 22,), float("nan"), device="cuda")
    del junk
    call, o, lse, o_ref, lse_ref = _run(case)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()


def _blocks_int64(args):
    args[3] = args[3].to(torch.int64)


def _k_not_contiguous(args):
    args[1] = args[1].transpose(1, 2).contiguous().transpose(1, 2)


def _q_on_cpu(args):
    args[0] = args[0].cpu()


def _block_size_24(args):
    args[7] = 24


def _num_splits_0(args):
    args.append(0)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("spoil,message", [
    (_blocks_int64, "blocks must be int32"),
    (_k_not_contiguous, "k must be contiguous"),
    (_q_on_cpu, "q must be a CUDA tensor"),
    (_block_size_24, "block_size must be a power of two"),
    (_num_splits_0, "num_splits must be >= 1"),
], ids=["blocks_int64", "k_not_contiguous", "q_on_cpu", "block_size_24", "num_splits_0"])
def test_operator_checks_its_inputs(spoil, message):
    args = list(_op_args("cuda"))
    spoil(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.nsa_ext_cuda.selection_fwd(*args)


@pytest.mark.gpu
@needs_ext
def test_opcheck_on_cuda():
    torch.library.opcheck(torch.ops.nsa_ext_cuda.selection_fwd.default, _op_args("cuda"),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# --- GPU: split-KV decode -------------------------------------------------------------------

# Decode shapes (TQ = 1 or 2, small B) for the forced split counts below; make_case's indices
# carry repeats, -1, other negatives and out-of-range entries. 16 slices exceed most rows'
# entries, so empty slices are part of every case.
DECODE_CASES = {
    "G1_B4_TQ1": dict(B=4, TQ=1, TK=900, HQ=2, H=2, Dk=192, Dv=128, S=8, block_size=64),
    "G3_B2_TQ2": dict(B=2, TQ=2, TK=700, HQ=6, H=2, Dk=192, Dv=128, S=12, block_size=32),
    "G16_B1_TQ1": dict(B=1, TQ=1, TK=4096, HQ=16, H=1, Dk=192, Dv=128, S=16, block_size=64),
    "G16_B3_TQ2_d128": dict(B=3, TQ=2, TK=1500, HQ=32, H=2, Dk=128, S=20, block_size=16),
    "G64_B3_TQ1": dict(B=3, TQ=1, TK=1000, HQ=64, H=1, Dk=192, Dv=128, S=8, block_size=16),
    "G64_B2_TQ2": dict(B=2, TQ=2, TK=333, HQ=128, H=2, Dk=192, Dv=128, S=6, block_size=32),
    "counts_tensor": dict(B=2, TQ=1, TK=800, HQ=16, H=1, Dk=192, Dv=128, S=10, block_size=32,
                          block_counts="tensor"),
    "varlen_decode": dict(seqlens=[1, 1, 1, 1], seqlens_k=[300, 17, 1000, 64], HQ=6, H=2,
                          Dk=192, Dv=128, S=6, block_size=16),
    "varlen_decode_G16": dict(seqlens=[2, 1, 1], seqlens_k=[129, 1, 700], HQ=16, H=1, Dk=64,
                              S=9, block_size=32),
}
SPLITS = [1, 2, 16]


def _run_split(case, num_splits):
    """The backend with a forced num_splits, and the reference."""
    call = describe_call(*case.args(), **case.kwargs(), need_lse=True)
    o, lse = cuda_backend.forward(call, force_splits=num_splits)
    torch.cuda.synchronize()
    ref_call = describe_call(case.q.float(), case.k.float(), case.v.float(), case.block_indices,
                             case.block_size, **case.kwargs(), need_lse=True)
    o_ref, lse_ref = reference_forward(ref_call)
    return o, lse, o_ref, lse_ref


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("num_splits", SPLITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", DECODE_CASES)
def test_split_decode_matches_reference(name, dtype, num_splits):
    case = make_case(dtype=dtype, device="cuda", seed=sum(map(ord, name)), **DECODE_CASES[name])
    o, lse, o_ref, lse_ref = _run_split(case, num_splits)
    assert_close_to_reference(o, o_ref.to(dtype), dtype, lse, lse_ref)
    assert torch.isfinite(lse_ref).any()


# The merge kernel's other paths: more slices than a warp has lanes (its general loop; S > 32
# also takes the PyTorch canonical rows), and each width of a lane's columns (Dv 64 / 128 / 256).
@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape,num_splits", [
    (dict(B=2, TQ=1, TK=5000, HQ=4, H=1, Dk=64, S=48, block_size=64), 48),
    (dict(B=1, TQ=2, TK=3000, HQ=16, H=2, Dk=128, S=40, block_size=32), 40),
    (dict(B=2, TQ=1, TK=2000, HQ=8, H=1, Dk=256, S=12, block_size=64), 12),
], ids=["48_slices_dv64", "40_slices_dv128", "12_slices_dv256"])
def test_split_merge_many_slices_and_wide_heads(shape, num_splits, dtype):
    case = make_case(dtype=dtype, device="cuda", seed=num_splits, **shape)
    o, lse, o_ref, lse_ref = _run_split(case, num_splits)
    assert_close_to_reference(o, o_ref.to(dtype), dtype, lse, lse_ref)
    assert torch.isfinite(lse_ref).any()


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("num_splits", [2, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("G", [1, 16, 64])
def test_split_empty_rows_give_zero_and_minus_inf(G, dtype, num_splits):
    case = make_case(B=4, TQ=1, TK=600, HQ=2 * G, H=2, Dk=192, Dv=128, S=8, block_size=32,
                     dtype=dtype, device="cuda", seed=G)
    case.block_indices[0] = -1                          # nothing selected
    case.block_indices[1, :, 0] = 10_000                # only out-of-range on KV head 0
    case.block_indices[1, :, 0, 1:] = -5
    case.block_indices[2] = 3                           # one block, repeated: one entry a row
    junk = torch.full((1 << 22,), float("nan"), device="cuda")   # poison the allocator
    del junk
    o, lse, o_ref, lse_ref = _run_split(case, num_splits)
    assert_close_to_reference(o, o_ref.to(dtype), dtype, lse, lse_ref)
    assert (o[0] == 0).all() and torch.isneginf(lse[0]).all()
    assert (o[1, :, :G] == 0).all() and torch.isneginf(lse[1, :, :G]).all()
    assert torch.isfinite(lse[2]).all()


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("G", [3, 64])
def test_split_runs_are_identical_and_close_to_unsplit(G):
    case = make_case(B=2, TQ=1, TK=2000, HQ=2 * G, H=2, Dk=192, Dv=128, S=16, block_size=32,
                     dtype=torch.bfloat16, device="cuda", seed=5)
    o1, lse1, _, _ = _run_split(case, 1)
    o8, lse8, _, _ = _run_split(case, 8)
    o8b, lse8b, _, _ = _run_split(case, 8)
    assert torch.equal(o8, o8b) and torch.equal(lse8, lse8b)
    mean_err, max_err = spec_errors(o8, o1)     # P rounds to bf16 against other maxima
    assert mean_err <= 2e-3 and max_err <= 2e-2, (mean_err, max_err)
    assert (lse1 - lse8).nan_to_num(0.0).abs().max().item() <= 1e-4


def _merge_kernel_ran(fn):
    """Whether a call of fn launched the split-KV merge kernel (torch.profiler's kernel names)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return any("selection_merge_kernel" in e.key for e in prof.key_averages())


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape,num_splits", [
    (dict(HQ=16, H=1, Dk=128, Dv=128, S=16, block_size=64), 4),
    (dict(HQ=3, H=1, Dk=192, Dv=128, S=12, block_size=32), 12),
    (dict(HQ=8, H=1, Dk=64, Dv=64, S=16, block_size=16), 16),
    (dict(HQ=16, H=1, Dk=256, Dv=256, S=12, block_size=64), 12),
    (dict(HQ=16, H=1, Dk=128, Dv=128, S=16, block_size=64), 2),
], ids=["G16_s4", "G3_dk192_s12", "G8_d64_s16", "G16_d256_s12", "G16_s2"])
def test_split_merge_in_clusters_equals_the_merge_kernel(shape, num_splits, dtype):
    """On SM 9.0 the slices of a one-wave decode are one thread-block cluster each and merge in
    the forward (no merge kernel); a batch too large for one wave takes the workspace and the
    merge kernel. The same row in both gives bitwise the same o and lse: the cluster merge is the
    merge kernel's formula in its order, on the same partials."""
    if torch.cuda.get_device_capability() < (9, 0) or \
            not any(str(a).startswith("9") for a in _ext.build_info().get("archs", [])):
        pytest.skip("thread-block clusters need SM 9.0 and a build with SM 9.0 code")
    big_B = 400   # items = big_B * H * num_splits > the SMs x three two-buffer blocks
    case = make_case(B=1, TQ=1, TK=1500, dtype=dtype, device="cuda", seed=num_splits, **shape)
    case.block_indices[..., 1] = case.block_indices[..., 0]          # a repeat in every row
    one = describe_call(*case.args(), **case.kwargs(), need_lse=True)
    many = describe_call(*(t.expand(big_B, *t.shape[1:]).contiguous() for t in
                           (case.q, case.k, case.v, case.block_indices)), case.block_size,
                         need_lse=True)
    assert not _merge_kernel_ran(lambda: cuda_backend.forward(one, force_splits=num_splits))
    assert _merge_kernel_ran(lambda: cuda_backend.forward(many, force_splits=num_splits))
    o1, lse1 = cuda_backend.forward(one, force_splits=num_splits)
    o2, lse2 = cuda_backend.forward(many, force_splits=num_splits)
    assert torch.equal(o1[0], o2[big_B // 2]) and torch.equal(lse1[0], lse2[big_B // 2])
    ref_call = describe_call(case.q.float(), case.k.float(), case.v.float(), case.block_indices,
                             case.block_size, need_lse=True)
    o_ref, lse_ref = reference_forward(ref_call)
    assert_close_to_reference(o1, o_ref.to(dtype), dtype, lse1, lse_ref)


@pytest.mark.gpu
@needs_ext
def test_backend_splits_decode_and_matches_reference():
    """The backend's own choice (no forced count) on a decode step that it splits."""
    case = make_case(B=1, TQ=1, TK=4096, HQ=16, H=4, Dk=192, Dv=128, S=16, block_size=64,
                     dtype=torch.bfloat16, device="cuda", seed=9)
    call, o, lse, o_ref, lse_ref = _run(case)
    assert cuda_backend.num_splits(call, torch.cuda.get_device_properties(0).multi_processor_count) > 1
    assert_close_to_reference(o, o_ref.to(torch.bfloat16), torch.bfloat16, lse, lse_ref)


@pytest.mark.gpu
@needs_ext
def test_opcheck_on_cuda_with_splits():
    torch.library.opcheck(torch.ops.nsa_ext_cuda.selection_fwd.default, (*_op_args("cuda"), 3),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# --- GPU: the one-launch canonical rows ------------------------------------------------------

CANONICAL_CASES = {
    "S16_int64": dict(B=2, TQ=70, HQ=4, H=2, S=16, block_size=16),
    "S32_int32": dict(B=1, TQ=300, HQ=2, H=1, S=32, block_size=16, index_dtype=torch.int32),
    "S1": dict(B=3, TQ=40, HQ=2, H=2, S=1, block_size=16),
    "S7_counts_tensor": dict(B=2, TQ=64, HQ=4, H=2, S=7, block_size=16, block_counts="tensor"),
    "S9_counts_int": dict(B=1, TQ=64, HQ=4, H=2, S=9, block_size=32, block_counts=4),
    "varlen": dict(seqlens=[37, 1, 130, 13], seqlens_k=[50, 16, 130, 400], HQ=4, H=2, S=12,
                   block_size=16),
    # Half a warp per row up to S = 16: an odd row count leaves the last warp's second half
    # without a row.
    "S16_odd_rows": dict(B=1, TQ=37, HQ=1, H=1, S=16, block_size=32),
    "S17_whole_warp": dict(B=1, TQ=90, HQ=2, H=1, S=17, block_size=16),
}


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("name", CANONICAL_CASES)
def test_canonical_op_matches_python(name):
    """canonical_blocks on a CUDA call (the one-launch nsa_ext_cuda::canonical_blocks) equals
    canonical_blocks_torch exactly, on rows with repeats, -1, other negatives, out-of-range and
    causally hidden entries."""
    case = make_case(dtype=torch.bfloat16, device="cuda", seed=len(name), Dk=64, **CANONICAL_CASES[name])
    call = describe_call(*case.args(), **case.kwargs())
    geometry = row_geometry(call)
    expected = canonical_blocks_torch(call, geometry)
    got = canonical_blocks(call, geometry)
    torch.cuda.synchronize()
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.int32
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[0], expected[0])
    assert (expected[1] > 0).any() and (expected[1] < call.num_selected).any()   # not trivial


@pytest.mark.gpu
@needs_ext
def test_canonical_op_drops_indices_past_int32():
    """Entries of 2^31 and more are past every visible block (the rows are int32): dropped, not
    wrapped, on both the half-warp (S = 16) and whole-warp (S = 20) paths."""
    for S in (16, 20):
        case = make_case(B=1, TQ=40, HQ=2, H=1, Dk=64, S=S, block_size=16, dtype=torch.bfloat16,
                         device="cuda", seed=S)
        case.block_indices[..., 0] = 2 ** 31 + 1       # int32 2^31 + 1 would read as -2^31 + 1
        case.block_indices[..., 1] = 2 ** 32           # ... and 2^32 as 0
        call = describe_call(*case.args(), **case.kwargs())
        geometry = row_geometry(call)
        expected = canonical_blocks_torch(call, geometry)
        got = canonical_blocks(call, geometry)
        assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("S", [5, 16, 24])
def test_canonical_op_with_a_block_size_not_a_power_of_two(S):
    """The operator takes any positive block_size (the API only powers of two): past the
    shift, the kernel divides. Checked against the set semantics written out here."""
    g = torch.Generator().manual_seed(S)
    B, TQ, H, bs = 2, 45, 3, 48
    idx = torch.randint(-2, 40, (B, TQ, H, S), generator=g)
    pos = (torch.arange(TQ) * 37 % 1500).expand(B, TQ).contiguous()
    blocks, nb = torch.ops.nsa_ext_cuda.canonical_blocks(idx.cuda(), pos.cuda(), None, S - 1, bs)
    for b in range(B):
        for t in range(TQ):
            for h in range(H):
                want = sorted({int(i) for i in idx[b, t, h, :S - 1] if 0 <= i <= pos[b, t] // bs})
                row = blocks[b, t, h].tolist()
                assert nb[b, t, h].item() == len(want)
                assert row == want + [-1] * (S - len(want))


@pytest.mark.gpu
@needs_ext
def test_canonical_opcheck_on_cuda():
    case = make_case(B=1, TQ=20, HQ=2, H=1, Dk=64, S=5, block_size=16, dtype=torch.bfloat16,
                     device="cuda", seed=1)
    call = describe_call(*case.args())
    pos = row_geometry(call).pos.contiguous()
    torch.library.opcheck(torch.ops.nsa_ext_cuda.canonical_blocks.default,
                          (case.block_indices.contiguous(), pos, None, 5, 16),
                          test_utils=("test_schema", "test_faketensor"))


@needs_ext
def test_rows_operator_fake_gives_the_output_shapes():
    m = dict(device="meta")
    q = torch.empty(2, 5, 6, 64, dtype=torch.bfloat16, **m)
    k = torch.empty(2, 9, 2, 64, dtype=torch.bfloat16, **m)
    v = torch.empty(2, 9, 2, 32, dtype=torch.bfloat16, **m)
    idx = torch.empty(2, 5, 2, 3, dtype=torch.int64, **m)
    pos = torch.empty(2, 5, dtype=torch.int64, **m)
    o, lse = torch.ops.nsa_ext_cuda.selection_fwd_rows(q, k, v, idx, None, 3, pos, pos, 16, 0.1, 2)
    assert o.shape == (2, 5, 6, 32) and lse.shape == (2, 5, 6) and lse.dtype == torch.float32


def _rows_operator_equals_the_two_step_path(case, splits):
    """Asserts selection_fwd_rows(case) == canonical_blocks then selection_fwd, bitwise;
    returns the call and the canonical rows' counts."""
    call = describe_call(*case.args(), **case.kwargs(), need_lse=True)
    geometry = row_geometry(call)
    blocks, num_blocks = canonical_blocks(call, geometry)
    q, k, v = (t.contiguous() for t in (call.q, call.k, call.v))
    pos, k_offset = geometry.pos.contiguous(), geometry.k_offset.contiguous()
    o2, lse2 = torch.ops.nsa_ext_cuda.selection_fwd(q, k, v, blocks, num_blocks, pos, k_offset,
                                                    call.block_size, call.scale, splits)
    counts = call.block_counts
    o1, lse1 = torch.ops.nsa_ext_cuda.selection_fwd_rows(
        q, k, v, call.block_indices.contiguous(), None if counts is None else counts.contiguous(),
        call.block_count_limit, pos, k_offset, call.block_size, call.scale, splits)
    assert torch.equal(o1, o2) and torch.equal(lse1, lse2)
    return call, num_blocks


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("name", list(CANONICAL_CASES) + ["rows_past_in_kernel"])
def test_rows_operator_canonicalising_in_the_kernel_equals_the_canonical_rows(name, splits, dtype):
    """With fp16/bf16 selection_fwd_rows launches no canonical-rows kernel: each thread block of
    the forward canonicalises its own row. Its outputs equal selection_fwd on the canonical rows
    bitwise, on rows with repeats, -1, other negatives, out-of-range and hidden entries, int32 and
    int64 indices, a block_counts tensor and int, S = 1 and 32, varlen (fp32 keeps the
    canonical-rows kernel and is checked the same way, as are calls of more rows than the
    in-kernel limit, 8192)."""
    shape = CANONICAL_CASES.get(name, dict(B=1, TQ=4200, HQ=2, H=2, S=16, block_size=16))
    case = make_case(dtype=dtype, device="cuda", seed=len(name), Dk=64, **shape)
    call, num_blocks = _rows_operator_equals_the_two_step_path(case, splits)
    # Not trivial: canonicalisation dropped entries of some rows and kept some of others.
    assert (num_blocks > 0).any() and (num_blocks < call.num_selected).any()


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("name,splits", [("G3", 1), ("counts_tensor", 1), ("varlen_ragged", 1),
                                         ("decode_TQ1", 3), ("counts_int", 2)])
def test_rows_operator_equals_the_two_step_path(name, splits):
    """selection_fwd_rows (canonical rows + forward in one operator) is the same kernels as
    canonical_blocks then selection_fwd: bitwise the same outputs."""
    case = make_case(dtype=torch.bfloat16, device="cuda", seed=5, **CASES[name])
    _rows_operator_equals_the_two_step_path(case, splits)
