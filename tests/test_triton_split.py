"""The split-KV (flash-decoding) Triton kernel against the fp32 reference.

CPU lane: Triton's interpreter, fp16 and fp32. GPU lane (marked): bf16, fp16, fp32, larger.
Each case runs with one slice (no merge) and with several, including one entry per slice."""
import pytest
import torch

from common import assert_close_to_reference, import_triton_for_the_interpreter, make_case
from nsa_ext.call import describe_call
from nsa_ext.reference import reference_forward
from nsa_ext.selection import row_geometry

CUDA = torch.cuda.is_available()
INTERPRETER = import_triton_for_the_interpreter()

CASES = {
    "decode_G16": dict(B=2, TQ=1, TK=300, HQ=16, H=1, Dk=64, S=6, block_size=32),
    "decode_G3_dk96_dv64": dict(B=3, TQ=1, TK=200, HQ=6, H=2, Dk=96, Dv=64, S=5, block_size=16),
    "decode_G1_bs64": dict(B=1, TQ=1, TK=500, HQ=2, H=2, Dk=32, S=7, block_size=64),
    "few_queries_counts": dict(B=1, TQ=4, TK=130, HQ=8, H=2, Dk=32, S=6, block_size=16,
                               block_counts="tensor"),
    "counts_int": dict(B=2, TQ=2, TK=90, HQ=4, H=1, Dk=32, S=5, block_size=16, block_counts=2),
    "varlen_decode": dict(seqlens=[1, 1, 1], seqlens_k=[70, 1, 33], HQ=4, H=2, Dk=32, S=4,
                          block_size=16),
    "G80_two_tiles": dict(B=1, TQ=1, TK=64, HQ=80, H=1, Dk=32, S=3, block_size=16),
    "bs128": dict(B=1, TQ=2, TK=400, HQ=2, H=1, Dk=32, S=3, block_size=128),
}


def run_split(case, num_splits, interpret):
    from triton_ref.selection_split import (selection_merge_kernel, selection_split_fwd,
                                            selection_split_kernel)

    kernels = None
    if interpret:
        from triton_ref.selection_fwd import _interpreted

        kernels = (_interpreted(selection_split_kernel), _interpreted(selection_merge_kernel))
    call = describe_call(*case.args(), **case.kwargs())
    geometry = row_geometry(call) if call.is_varlen else None
    o, lse = selection_split_fwd(
        call.q, call.k, call.v, call.block_indices, scale=call.scale, block_size=call.block_size,
        block_counts=call.block_counts, count_limit=call.block_count_limit,
        pos=geometry.pos if geometry else None, k_offset=geometry.k_offset if geometry else None,
        num_splits=num_splits, kernels=kernels)
    ref_call = describe_call(case.q.float(), case.k.float(), case.v.float(), case.block_indices,
                             case.block_size, **case.kwargs())
    o_ref, lse_ref = reference_forward(ref_call)
    assert_close_to_reference(o, o_ref, case.q.dtype, lse, lse_ref)


@pytest.mark.skipif(not INTERPRETER, reason="needs Triton's CPU interpreter (no GPU here)")
@pytest.mark.parametrize("num_splits", [1, 2, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", CASES)
def test_split_kernel_interpreted(name, dtype, num_splits, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")     # Triton reads it at launch, too
    run_split(make_case(dtype=dtype, seed=sum(map(ord, name)), **CASES[name]), num_splits, True)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", CASES)
def test_split_kernel_gpu(name, dtype, num_splits):
    run_split(make_case(dtype=dtype, device="cuda", seed=sum(map(ord, name)), **CASES[name]),
              num_splits, False)


DIRECT_CASES = {name: CASES[name] for name in ("decode_G16", "decode_G3_dk96_dv64",
                                                "decode_G1_bs64", "counts_int", "G80_two_tiles")}


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", DIRECT_CASES)
def test_gpu_split_launch_relaunches_directly_and_equals_the_normal_launch(name, dtype,
                                                                          num_splits):
    """SplitLaunch (eager plans): after its first call the kernels go through
    triton_ref/direct_launch.py; every call's o and lse are bitwise those of
    selection_split_fwd on the same tensors, for new tensors at new addresses each call."""
    from triton_ref.selection_split import SplitLaunch, selection_split_fwd

    shape = DIRECT_CASES[name]
    c = make_case(dtype=dtype, device="cuda", **shape)
    call = describe_call(*c.args(), **c.kwargs())
    scalars = dict(scale=call.scale, block_size=call.block_size,
                   count_limit=call.block_count_limit, num_splits=num_splits)
    launch = SplitLaunch(**scalars)
    for seed in range(3):
        c = make_case(dtype=dtype, device="cuda", seed=seed, **shape)
        o, lse = launch(c.q, c.k, c.v, c.block_indices)
        o_ref, lse_ref = selection_split_fwd(c.q, c.k, c.v, c.block_indices, **scalars)
        assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)
    assert launch.direct_launches == 2        # calls 2 and 3 went direct


@pytest.mark.gpu
def test_gpu_split_launch_declines_a_misaligned_tensor_and_stays_right():
    """A q view 2 elements into its storage is not 16-byte aligned, which Triton specialised the
    kernel on: SplitLaunch launches the normal way for it (no direct launch) with the same
    result."""
    from triton_ref.selection_split import SplitLaunch, selection_split_fwd

    shape = dict(B=1, TQ=1, TK=512, HQ=16, H=2, Dk=64, S=5, block_size=32)
    c = make_case(dtype=torch.float16, device="cuda", seed=3, **shape)
    scalars = dict(scale=0.125, block_size=32, count_limit=5, num_splits=2)
    launch = SplitLaunch(**scalars)
    launch(c.q, c.k, c.v, c.block_indices)
    storage = torch.empty(c.q.numel() + 2, dtype=c.q.dtype, device="cuda")
    q = storage[2:].view_as(c.q)
    q.copy_(c.q)
    assert q.data_ptr() % 16
    o, lse = launch(q, c.k, c.v, c.block_indices)
    o_ref, lse_ref = selection_split_fwd(c.q, c.k, c.v, c.block_indices, **scalars)
    assert launch.direct_launches == 0
    assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)
    launch(c.q, c.k, c.v, c.block_indices)
    assert launch.direct_launches == 1


@pytest.mark.skipif(not INTERPRETER, reason="needs Triton importable")
def test_direct_launch_only_on_the_triton_versions_read(monkeypatch):
    """DirectLaunch repeats the call Triton 3.4-3.8's launcher ends with; on any other version
    (or an autotuned kernel) `first` launches the normal way and offers no direct launch. Its
    argument template holds no tensor of the launch it was made from."""
    from triton_ref import direct_launch

    assert direct_launch._version("3.8.0") == (3, 8)
    assert direct_launch._version("3.10.0+git12ab") == (3, 10)
    assert direct_launch._version("3.4") == (3, 4)
    launched = []

    class Kernel:          # stands for kernel[grid](**kwargs)
        def __getitem__(self, grid):
            return lambda **kwargs: launched.append((grid, kwargs)) or "compiled"

    kept = direct_launch.DirectLaunch("compiled", (4,), [torch.ones(2), 7, torch.ones(3)],
                                      [0, 2], 0)
    assert kept._values == [None, 7, None]       # no tensor of the first launch kept alive
    monkeypatch.setattr(direct_launch, "SUPPORTED", False)
    result, again = direct_launch.DirectLaunch.first(Kernel(), (4,), ("x",), x=None, n=3)
    assert (result, again) == ("compiled", None) and launched == [((4,), dict(x=None, n=3))]


def test_num_splits_heuristic():
    from triton_ref.selection_split import choose_num_splits

    assert choose_num_splits(4, 16, 132) == 16          # B=1, H=4: one entry per slice
    assert choose_num_splits(512, 16, 132) == 1         # B=128: enough rows already
    assert choose_num_splits(128, 16, 132) == 1         # B=32: 128 rows nearly fill 132 SMs
    assert choose_num_splits(32, 16, 132) == 4          # B=8: four slices, 128 programs
    assert choose_num_splits(4, 1, 132) == 1
    for work in range(1, 300, 7):
        n = choose_num_splits(work, 16, 132)
        eps = -(-16 // n)
        assert (n - 1) * eps < 16                       # no slice is empty
