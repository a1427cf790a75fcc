"""The Triton backend (triton_ref/selection_fwd.py) against the fp32 reference, both variants.

Two lanes over one matrix:
- CPU, through Triton's interpreter, fp16 and fp32 (the interpreter's bf16 tl.dot is wrong),
  small sizes. Triton picks the interpreter when `triton.language` is imported, so this module
  imports Triton with TRITON_INTERPRET=1 (when no GPU is present and nothing imported Triton
  before) and restores the variable at once; each CPU test turns it on again for itself only,
  so other test modules see the environment they expect.
- GPU (marked `gpu`): the same matrix in bf16, fp16 and fp32, plus large and 64-bit-offset cases,
  CUDA-graph capture and the absence of host synchronisation. Small calls would take the
  split-KV kernel (tests/test_triton_split.py tests it); the matrix here pins the main kernels.
Plus the backward kernel's gradients against autograd through the reference, the reasons the
backend gives, and the `sel.triton.reads` log record against counts made here from SPEC.md.
"""
import functools
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
from nsa_ext.device import CPU, DeviceFacts
from nsa_ext.reference import reference_forward

CUDA = torch.cuda.is_available()
INTERPRETER = import_triton_for_the_interpreter()

H100 = DeviceFacts("cuda", (9, 0), "NVIDIA H100 80GB HBM3", 132)
RTX4090 = DeviceFacts("cuda", (8, 9), "NVIDIA GeForce RTX 4090", 128)
T4 = DeviceFacts("cuda", (7, 5), "Tesla T4", 40)

# name -> make_case arguments (plus "empty_rows": fraction of rows set to all -1, "strided":
# q/k/v as views into wider tensors). Small: the CPU lane interprets every program in Python.
MATRIX = {
    "G1": dict(B=2, TQ=24, HQ=2, H=2, Dk=64, S=4, block_size=16),
    "G3": dict(B=1, TQ=36, HQ=3, H=1, Dk=64, S=5, block_size=16),
    "G16_dk192_dv128": dict(B=1, TQ=12, HQ=16, H=1, Dk=192, Dv=128, S=3, block_size=16),
    "G64": dict(B=1, TQ=3, TK=70, HQ=64, H=1, Dk=64, S=4, block_size=16),
    "G80_two_tiles": dict(B=1, TQ=2, TK=50, HQ=80, H=1, Dk=32, S=3, block_size=16),
    "d59": dict(B=1, TQ=30, HQ=2, H=1, Dk=59, Dv=37, S=4, block_size=16),
    "d96_G6": dict(B=1, TQ=12, HQ=12, H=2, Dk=96, S=3, block_size=16),
    "bs4": dict(B=1, TQ=20, HQ=2, H=1, Dk=32, S=6, block_size=4),
    "bs64": dict(B=1, TQ=70, TK=150, HQ=2, H=1, Dk=32, S=3, block_size=64),
    "bs128": dict(B=1, TQ=40, TK=260, HQ=2, H=1, Dk=32, S=3, block_size=128),
    "decode": dict(B=3, TQ=1, TK=333, HQ=8, H=2, Dk=64, S=6, block_size=32),
    "chunked_prefill": dict(B=2, TQ=9, TK=100, HQ=4, H=1, Dk=64, S=5, block_size=16),
    "counts_int": dict(B=1, TQ=32, HQ=4, H=2, Dk=64, S=6, block_size=16, block_counts=3),
    "counts_zero": dict(B=1, TQ=16, HQ=2, H=1, Dk=64, S=4, block_size=16, block_counts=0),
    "counts_tensor": dict(B=2, TQ=24, HQ=4, H=2, Dk=64, S=5, block_size=16, block_counts="tensor"),
    "varlen": dict(seqlens=[21, 1, 32, 13], HQ=4, H=2, Dk=64, S=4, block_size=16),
    "varlen_chunked": dict(seqlens=[5, 1, 20], seqlens_k=[70, 16, 20], HQ=6, H=2, Dk=64, S=5,
                           block_size=16),
    "varlen_batchless": dict(seqlens=[30, 17], HQ=2, H=1, Dk=64, S=3, block_size=16,
                             batchless=True),
    "scale_int32": dict(B=1, TQ=30, HQ=4, H=1, Dk=64, S=4, block_size=16, scale=0.05,
                        index_dtype=torch.int32),
    "empty_rows": dict(B=1, TQ=24, HQ=4, H=2, Dk=64, S=4, block_size=16, empty_rows=0.5),
    "strided": dict(B=2, TQ=20, HQ=4, H=2, Dk=64, S=4, block_size=16, strided=True),
}

# Larger shapes, GPU only.
GPU_MATRIX = {
    "large_G16_d128": dict(B=1, TQ=2048, HQ=16, H=1, Dk=128, S=16, block_size=64),
    "large_G64_dk192_dv128": dict(B=1, TQ=1024, HQ=64, H=1, Dk=192, Dv=128, S=8, block_size=64),
    "large_G8_d256": dict(B=2, TQ=512, HQ=16, H=2, Dk=256, S=8, block_size=32),
    "large_G5_bs128": dict(B=1, TQ=1500, HQ=10, H=2, Dk=80, S=6, block_size=128),
    "large_varlen": dict(seqlens=[1000, 1, 640, 333], HQ=16, H=2, Dk=128, S=12, block_size=64),
}


def build_call(spec, dtype, device, seed=0):
    spec = dict(spec)
    empty_rows = spec.pop("empty_rows", 0.0)
    strided = spec.pop("strided", False)
    case = make_case(**spec, dtype=dtype, device=device, seed=seed)
    if empty_rows:
        g = torch.Generator().manual_seed(seed + 1)
        rows = torch.rand(case.block_indices.shape[:-1], generator=g) < empty_rows
        case.block_indices[rows.to(device)] = -1
    if strided:
        # Views with a head stride wider than the head dim and a token stride wider still.
        def widen(t):
            wide = torch.randn(*t.shape[:-1], t.shape[-1] + 8, dtype=t.dtype, device=device)
            wide[..., :t.shape[-1]] = t
            return wide[..., :t.shape[-1]]
        case.q, case.k, case.v = widen(case.q), widen(case.k), widen(case.v)
        assert not case.q.is_contiguous()
    return describe_call(*case.args(), **case.kwargs(), need_lse=True)


def run_variant(call, group, monkeypatch):
    # The row schedule's two variants (the other schedules: tests/test_schedules.py).
    monkeypatch.setenv("NSA_SEL_SCHEDULE", "row")
    monkeypatch.setenv("NSA_SEL_TRITON_GROUP", "1" if group else "0")
    return triton_backend.forward(call)


def check(call, group, monkeypatch):
    o, lse = run_variant(call, group, monkeypatch)
    o_ref, lse_ref = reference_forward(call)
    assert_close_to_reference(o, o_ref, call.dtype, lse, lse_ref)


@pytest.fixture
def interpreter(monkeypatch):
    if CUDA:
        pytest.skip("the interpreter lane runs on machines without a GPU")
    if not INTERPRETER:
        pytest.skip("Triton is missing, or was imported before this module without "
                    "TRITON_INTERPRET=1, so it cannot interpret kernels in this process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


VARIANTS = [pytest.param(True, id="group"), pytest.param(False, id="head")]


@pytest.mark.parametrize("group", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", MATRIX)
def test_interpreter_matches_reference(interpreter, monkeypatch, name, dtype, group):
    check(build_call(MATRIX[name], dtype, "cpu"), group, monkeypatch)


@pytest.fixture
def untuned(monkeypatch):
    """Every launch takes the main kernels (not split-KV) with the untuned config: autotuning
    each shape of the matrix would cost minutes of compilation and test nothing the tuned-path
    test below does not."""
    from triton_ref import selection_fwd as kernels

    monkeypatch.setattr(kernels, "LARGE_PROGRAMS", 1 << 62)
    monkeypatch.setattr(triton_backend, "SPLIT_BELOW_WAVES", 0)


@pytest.mark.gpu
@pytest.mark.parametrize("group", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("name", [*MATRIX, *GPU_MATRIX])
def test_gpu_matches_reference(untuned, monkeypatch, name, dtype, group):
    spec = MATRIX.get(name) or GPU_MATRIX[name]
    check(build_call(spec, dtype, "cuda"), group, monkeypatch)


@pytest.mark.gpu
def test_gpu_autotuned_launch_matches_reference(monkeypatch):
    from triton_ref import selection_fwd as kernels

    call = build_call(GPU_MATRIX["large_G16_d128"], torch.bfloat16, "cuda", seed=3)
    monkeypatch.setattr(kernels, "LARGE_PROGRAMS", 1)
    monkeypatch.setattr(triton_backend, "SPLIT_BELOW_WAVES", 0)
    check(call, True, monkeypatch)
    assert kernels.selection_fwd_group_kernel.fn.best_config is not None


@pytest.mark.big_memory
@pytest.mark.gpu
@pytest.mark.parametrize("group", VARIANTS)
def test_gpu_64bit_offsets(untuned, monkeypatch, group):
    """K and V of more than 2^31 elements: a block near the end is addressed correctly."""
    TK, D, block_size = (1 << 25) + 100, 64, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 1, 2, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, TK, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, TK, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    assert k.numel() > 2 ** 31
    last = (TK - 1) // block_size
    block_indices = torch.tensor([[[[0, last, last - 1, last // 2, -1]]]], device="cuda")
    call = describe_call(q, k, v, block_indices, block_size, need_lse=True)
    check(call, group, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["main", "auto"])
@pytest.mark.parametrize("group", VARIANTS)
def test_gpu_no_host_sync_and_graph_capture(monkeypatch, group, path):
    """The normal path neither synchronises nor allocates by data: a decode step replays in a
    graph ("main": the group/per-head kernels; "auto": what the backend picks, split-KV here)."""
    from triton_ref import selection_fwd as kernels

    monkeypatch.setattr(kernels, "LARGE_PROGRAMS", 1 << 62)
    if path == "main":
        monkeypatch.setattr(triton_backend, "SPLIT_BELOW_WAVES", 0)
    monkeypatch.delenv("NSA_DEBUG_LOG", raising=False)
    monkeypatch.delenv("NSA_DEBUG_TRITON", raising=False)
    call = build_call(MATRIX["decode"], torch.bfloat16, "cuda")
    first = run_variant(call, group, monkeypatch)      # compiles outside the checks
    assert_no_sync_and_graph_replay(call, triton_backend.forward, first)


# --- backward -------------------------------------------------------------------------------------

# (mean, max) of |g - g_ref| / max(1, |g_ref|) per gradient. fp32 as SPEC.md's forward; fp16/bf16
# looser than the forward's: dS is rounded to the input dtype before its two products.
GRAD_TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-2),
                   torch.bfloat16: (1e-2, 8e-2)}
GRAD_MATRIX = {
    "gqa_bs8": dict(B=2, TQ=24, HQ=6, H=2, Dk=32, Dv=16, S=4, block_size=8),
    "chunked_counts": dict(B=1, TQ=9, TK=50, HQ=2, H=1, Dk=32, S=4, block_size=8,
                           block_counts="tensor"),
    "varlen": dict(seqlens=[13, 1, 24], HQ=4, H=2, Dk=32, S=3, block_size=8),
    "G80_two_tiles": dict(B=1, TQ=2, TK=70, HQ=80, H=1, Dk=32, S=3, block_size=32),
    "d59_bs64": dict(B=1, TQ=40, TK=150, HQ=2, H=1, Dk=59, Dv=37, S=3, block_size=64),
    "empty_rows": dict(B=1, TQ=16, HQ=4, H=2, Dk=32, S=4, block_size=16, empty_rows=0.5),
    "bs128_key_chunks": dict(B=1, TQ=20, TK=300, HQ=4, H=2, Dk=32, S=3, block_size=128),
    "G1": dict(B=2, TQ=24, HQ=2, H=2, Dk=32, S=4, block_size=8),
    "G16_dk192_dv128": dict(B=1, TQ=12, HQ=16, H=1, Dk=192, Dv=128, S=3, block_size=16),
    "G64_chunked": dict(B=1, TQ=3, TK=70, HQ=64, H=1, Dk=32, S=4, block_size=16),
}
GPU_GRAD_MATRIX = {
    "large_G16_d128": dict(B=1, TQ=1024, HQ=16, H=1, Dk=128, S=8, block_size=64),
    "large_dk192_dv128": dict(B=1, TQ=300, HQ=8, H=2, Dk=192, Dv=128, S=6, block_size=32),
}


def gradients(call, with_lse, use_reference, seed=0):
    """(o, lse, dq, dk, dv) of loss = <o, R1> + <lse, R2> (finite lse only)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (call.q, call.k, call.v))
    call = describe_call(q, k, v, call.block_indices, call.block_size,
                         block_counts=call.block_counts if call.block_counts is not None
                         else call.block_count_limit, scale=call.scale,
                         cu_seqlens_q=call.cu_seqlens_q, cu_seqlens_k=call.cu_seqlens_k,
                         need_lse=True)
    g = torch.Generator().manual_seed(seed)
    grad_o = torch.randn(call.q.shape[:-1] + (call.head_dim_v,), generator=g).to(q)
    grad_lse = (torch.randn(call.q.shape[:-1], generator=g) * 0.3).to(q.device)
    if use_reference:
        o, lse = reference_forward(call)
        loss = (o.float() * grad_o.float()).sum()
        if with_lse:
            finite = torch.isfinite(lse)
            loss = loss + (lse[finite] * grad_lse[finite]).sum()
        loss.backward()
        return q.grad, k.grad, v.grad
    return triton_backend.backward(call, grad_o, grad_lse if with_lse else None)


def check_gradients(call, with_lse):
    got = gradients(call, with_lse, use_reference=False)
    want = gradients(call, with_lse, use_reference=True)
    mean_tol, max_tol = GRAD_TOLERANCES[call.dtype]
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == call.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name}: not finite"
        err = (a.double() - b.double()).abs() / b.double().abs().clamp(min=1.0)
        assert err.mean() <= mean_tol and err.max() <= max_tol, \
            f"{name}: error mean {err.mean():.3g} (tol {mean_tol}), max {err.max():.3g} (tol {max_tol})"
    assert any(w.abs().max() > 0 for w in want)


@pytest.mark.parametrize("with_lse", [False, True], ids=["o", "o+lse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", GRAD_MATRIX)
def test_interpreter_backward(interpreter, name, dtype, with_lse):
    check_gradients(build_call(GRAD_MATRIX[name], dtype, "cpu", seed=7), with_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("with_lse", [False, True], ids=["o", "o+lse"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("name", [*GRAD_MATRIX, *GPU_GRAD_MATRIX])
def test_gpu_backward(untuned, name, dtype, with_lse):
    spec = GRAD_MATRIX.get(name) or GPU_GRAD_MATRIX[name]
    check_gradients(build_call(spec, dtype, "cuda", seed=7), with_lse)


def test_backward_takes_the_forwards_outputs(request):
    """Given the forward's o and lse, the backward skips its recomputation: same gradients."""
    request.getfixturevalue("untuned" if CUDA else "interpreter")
    request.getfixturevalue("monkeypatch").setenv("NSA_SEL_SCHEDULE", "row")   # the backward's
    call = build_call(GRAD_MATRIX["varlen"], torch.float32, "cuda" if CUDA else "cpu", seed=3)
    grad_o = torch.randn(call.q.shape[:-1] + (call.head_dim_v,), device=call.device)
    recomputed = triton_backend.backward(call, grad_o, None)
    o, lse = triton_backend.forward(call)
    given = triton_backend.backward(call, grad_o, None, o=o, lse=lse)
    for name, a, b in zip(("dq", "dk", "dv"), recomputed, given):
        assert torch.equal(a, b), name      # the same forward kernel, no atomics: bitwise


@pytest.mark.parametrize("dq_path", ["partials", "kernel"])
@pytest.mark.parametrize("tokens_per_item", [1, 3])
@pytest.mark.parametrize("name", ["gqa_bs8", "varlen", "d59_bs64", "G80_two_tiles"])
def test_backward_with_buckets_cut_into_items(request, monkeypatch, name, tokens_per_item,
                                              dq_path):
    """Long query lists cut into several dK/dV work items (partials merged in item order) give
    the reference's gradients: the path the block every query chose takes at scale. dq either
    from the dK/dV kernel's per-block partials or from the dQ kernel, each forced."""
    request.getfixturevalue("untuned" if CUDA else "interpreter")
    import triton_ref.selection_bwd as bwd

    monkeypatch.setattr(bwd, "dkdv_tokens_per_item", lambda G, capacity, sm: tokens_per_item)
    monkeypatch.setattr(bwd, "DQ_PARTIALS_MAX_G", 1000 if dq_path == "partials" else 0)
    check_gradients(build_call(GRAD_MATRIX[name], torch.float32, "cuda" if CUDA else "cpu",
                               seed=5), with_lse=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
def test_gpu_backward_is_bitwise_deterministic(dtype):
    """Every query picks block 0 (plus random others): thousands of (query, head) pairs feed one
    block's dk/dv. Three runs on the same inputs give bitwise the same dq, dk, dv."""
    call = build_call(dict(B=1, TQ=1024, HQ=32, H=2, Dk=128, S=8, block_size=64), dtype, "cuda",
                      seed=11)
    call.block_indices[..., 0] = 0
    grad_o = torch.randn(call.q.shape[:-1] + (call.head_dim_v,), device="cuda").to(dtype)
    runs = [triton_backend.backward(call, grad_o, None) for _ in range(3)]
    for name, first, *others in zip(("dq", "dk", "dv"), *runs):
        assert first.abs().max() > 0, name
        for other in others:
            assert torch.equal(first, other), name


@pytest.fixture
def deterministic_algorithms():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def test_deterministic_mode_turns_autotuning_off(deterministic_algorithms):
    """Under torch.use_deterministic_algorithms(True) no launch picks its config by timing (a
    pick that may differ between processes, and configs sum in different orders)."""
    from triton_ref import selection_fwd as kernels

    assert not kernels.autotuned(1 << 30)
    assert not kernels.autotuned(1 << 30, 256)
    configs = kernels._prune(kernels.TUNING_CONFIGS, {"BLOCK": 64, "K": 128, "V": 128,
                                                      "LARGE": kernels.autotuned(1 << 30),
                                                      "q": torch.empty(1, dtype=torch.half),
                                                      "DOT_PRECISION": "tf32"})
    assert len(configs) == 1
    torch.use_deterministic_algorithms(False)
    assert kernels.autotuned(1 << 30) and not kernels.autotuned(10)
    assert kernels.autotuned(300, 256) and not kernels.autotuned(200, 256)


def test_fp32_launches_take_the_fixed_configs():
    """fp32 inputs never pick a config by timing, in any autotuned kernel (their tuning cost an
    fp32 training call 120 s of compiling on an H200), and their fixed configs are fp32's own:
    the forward at one stage, dQ with the forward's whole-block chunk up to 128-wide heads."""
    from triton_ref import selection_bwd, selection_kv, selection_tile
    from triton_ref import selection_fwd as kernels

    many = torch.empty(1, dtype=torch.int32).expand(1 << 22)     # a launch of 4M programs
    autotuned_kernels = [kernels.selection_fwd_group_kernel, kernels.selection_fwd_head_kernel,
                         selection_bwd.selection_bwd_dq_kernel,
                         selection_bwd.selection_bwd_dkdv_kernel,
                         selection_kv.selection_kv_kernel, selection_tile.selection_tile_kernel]
    for kernel in autotuned_kernels:
        for dtype, tuned in ((torch.float32, False), (torch.bfloat16, True), (torch.float16, True)):
            args = {"num_blocks": many, "item_bucket": many, "union_count": many, "G": 16,
                    "q": torch.empty(1, dtype=dtype)}
            assert kernel.values["LARGE"](args) is tuned, (kernel, dtype)

    def pruned(prune, configs, dtype, width):
        return prune(configs, {"BLOCK": 64, "K": width, "V": width, "LARGE": False,
                               "q": torch.empty(1, dtype=dtype),
                               "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"})

    (fwd32,), (fwd16,) = (pruned(kernels._prune, kernels.TUNING_CONFIGS, dt, 128)
                          for dt in (torch.float32, torch.bfloat16))
    assert (fwd32.kwargs["BS"], fwd32.num_stages) == (64, 1)
    assert (fwd16.kwargs["BS"], fwd16.num_stages) == (64, 2)
    chunks = {(dt, width): pruned(selection_bwd._prune_dq, selection_bwd.DQ_CONFIGS, dt,
                                  width)[0].kwargs["BS"]
              for dt in (torch.float32, torch.bfloat16) for width in (64, 128, 256)}
    assert chunks == {(torch.float32, 64): 64, (torch.float32, 128): 64,
                      (torch.float32, 256): 32, (torch.bfloat16, 64): 32,
                      (torch.bfloat16, 128): 32, (torch.bfloat16, 256): 32}


@pytest.mark.gpu
def test_gpu_deterministic_mode_takes_the_fixed_configs(monkeypatch):
    """A call large enough to autotune gives, under torch's deterministic mode, bitwise what the
    fixed default configs give: its bits do not depend on a timing-based pick (so two processes
    agree), forward and backward."""
    from triton_ref import selection_fwd as kernels

    monkeypatch.setenv("NSA_SEL_SCHEDULE", "row")
    call = build_call(dict(B=1, TQ=4096, HQ=32, H=2, Dk=128, S=8, block_size=64),
                      torch.bfloat16, "cuda", seed=12)
    grad_o = torch.randn(call.q.shape[:-1] + (call.head_dim_v,), device="cuda").to(call.dtype)

    def run():
        o, lse = triton_backend.forward(call)
        return (o, lse, *triton_backend.backward(call, grad_o, None, o=o, lse=lse))

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = run()
    finally:
        torch.use_deterministic_algorithms(previous)
    monkeypatch.setattr(kernels, "LARGE_PROGRAMS", 1 << 62)      # every launch untuned
    fixed = run()
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), deterministic, fixed):
        assert torch.equal(a, b), name


# --- the reads log -------------------------------------------------------------------------------

def counted_reads(spec, call):
    """(visible keys summed over (b, t, KV head) rows, selected blocks x block_size over the same
    rows), straight from SPEC.md: a Python loop over rows and sets."""
    bs = call.block_size
    indices = call.block_indices.tolist()
    counts = call.block_counts.tolist() if call.block_counts is not None else None
    if call.is_varlen:
        cu_q, cu_k = call.cu_seqlens_q.tolist(), call.cu_seqlens_k.tolist()
        seqs = [(cu_q[i], cu_q[i + 1], cu_k[i + 1] - cu_k[i]) for i in range(len(cu_q) - 1)]
        rows = [(0, t, t - q0 + (tk - (q1 - q0)), tk) for q0, q1, tk in seqs for t in range(q0, q1)]
    else:
        rows = [(b, t, call.seqlen_k - call.seqlen_q + t, call.seqlen_k)
                for b in range(call.batch) for t in range(call.seqlen_q)]
    visible = selected = 0
    for b, t, p, tk in rows:
        for h in range(call.num_heads_kv):
            limit = counts[b][t][h] if counts is not None else call.block_count_limit
            chosen = {i for i in indices[b][t][h][:max(limit, 0)] if 0 <= i < math.ceil(tk / bs)}
            chosen = {i for i in chosen if i * bs <= p}            # blocks with a visible key
            selected += len(chosen) * bs
            visible += sum(min(bs, p - i * bs + 1) for i in chosen)
    return visible, selected


def reads_records(caplog):
    return [r for r in caplog.records if getattr(r, "nsa_event", "").startswith("sel.triton.")]


@pytest.mark.parametrize("group", VARIANTS)
@pytest.mark.parametrize("name", ["G3", "G80_two_tiles", "counts_tensor", "varlen_chunked", "bs4"])
def test_reads_log(request, monkeypatch, caplog, name, group):
    device = "cuda" if CUDA else "cpu"
    request.getfixturevalue("untuned" if CUDA else "interpreter")
    monkeypatch.setenv("NSA_DEBUG_LOG", "1")
    call = build_call(MATRIX[name], torch.float32, device)
    with caplog.at_level(logging.INFO, logger="nsa_ext"):
        run_variant(call, group, monkeypatch)
    events = {r.nsa_event: r.nsa_fields for r in reads_records(caplog)}
    assert set(events) == {"sel.triton.launch", "sel.triton.reads"}
    launch, reads = events["sel.triton.launch"], events["sel.triton.reads"]
    assert launch["variant"] == ("group" if group else "head")
    assert launch["G"] == call.group_size
    visible, selected = counted_reads(MATRIX[name], call)
    G = call.group_size
    per_row = math.ceil(G / 64) if group else G
    assert reads["kv_tokens_read"] == visible * per_row
    assert reads["sdpa_tokens"] == selected
    if group and G <= 64:
        assert reads["kv_tokens_read"] <= reads["sdpa_tokens"]


def test_no_records_without_debug(request, monkeypatch, caplog):
    request.getfixturevalue("untuned" if CUDA else "interpreter")
    monkeypatch.delenv("NSA_DEBUG_LOG", raising=False)
    monkeypatch.delenv("NSA_DEBUG_TRITON", raising=False)
    call = build_call(MATRIX["G1"], torch.float32, "cuda" if CUDA else "cpu")
    with caplog.at_level(logging.DEBUG, logger="nsa_ext"):
        run_variant(call, True, monkeypatch)
    assert not reads_records(caplog)


# --- autotuning space ---------------------------------------------------------------------------

def test_autotune_space_per_launch():
    """Small launches take one default config; large ones try the chunk sizes a block allows."""
    from triton_ref import selection_bwd, selection_fwd

    q = torch.empty(1, dtype=torch.half)
    for prune, configs in ((selection_fwd._prune, selection_fwd.TUNING_CONFIGS),
                           (selection_bwd._prune_dq, selection_bwd.DQ_CONFIGS)):
        prune = functools.partial(prune, DOT_PRECISION="tf32")
        small = prune(configs, {"q": q}, BLOCK=64, K=128, V=128, LARGE=False)
        assert len(small) == 1
        assert prune(configs, {"q": q}, BLOCK=64, K=256, V=128, LARGE=False)[0].kwargs["BS"] == 32
        large = prune(configs, {"q": q}, BLOCK=64, K=128, V=128, LARGE=True)
        assert {c.kwargs["BS"] for c in large} == {32, 64} and len(large) > 2
        tiny = prune(configs, {"q": q}, BLOCK=8, K=64, V=64, LARGE=True)
        assert {c.kwargs["BS"] for c in tiny} == {16}
        assert prune(configs, {"q": q}, BLOCK=8, K=64, V=64, LARGE=False)[0].kwargs["BS"] == 16
    prune, configs = selection_bwd._prune_dkdv, selection_bwd.DKDV_CONFIGS
    half, full = dict(DOT_PRECISION="tf32"), dict(DOT_PRECISION="ieee")     # fp16/bf16, fp32
    assert len(prune(configs, {"q": q}, BK=128, BV=128, LARGE=False, **half)) == 1
    large = prune(configs, {"q": q}, BK=128, BV=128, LARGE=True, **half)
    assert {c.kwargs["BM"] for c in large} == {32, 64, 128}
    assert {c.kwargs["BM"] for c in prune(configs, {"q": q}, BK=256, BV=128, LARGE=True,
                                          **half)} == {32, 64}
    # fp32: 8 warps only (4-warp configs starve of registers), and beside a 128-wide head no
    # BM = 128 (more shared memory than a block gets); its default BM = 32 at 8 warps
    fp32_128 = prune(configs, {"q": q}, BK=128, BV=128, LARGE=True, **full)
    assert {c.kwargs["BM"] for c in fp32_128} == {32, 64}
    assert {c.num_warps for c in fp32_128} == {8}
    assert {c.kwargs["BM"] for c in prune(configs, {"q": q}, BK=64, BV=64, LARGE=True,
                                          **full)} == {32, 64, 128}
    (default,) = prune(configs, {"q": q}, BK=128, BV=128, LARGE=False, **full)
    assert (default.kwargs["BM"], default.num_warps) == (32, 8)
    (default,) = prune(configs, {"q": q}, BK=128, BV=128, LARGE=False, **half)
    assert (default.kwargs["BM"], default.num_warps) == (64, 4)


def test_tuning_times_a_long_launch_once(monkeypatch):
    """A config whose launch is long is timed by one run after one warm-up run, not by
    do_bench's ~7 runs (a 1M-token step spent minutes tuning); a short one goes to do_bench."""
    import inspect
    import time

    import triton
    from triton_ref import selection_bwd, selection_fwd, selection_kv, selection_tile

    runs = []
    long_call = lambda: (runs.append(1), time.sleep(0.03))             # 30 ms a launch
    monkeypatch.setattr(selection_fwd, "LONG_LAUNCH_MS", 20.0)
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, quantiles=None, **kw: pytest.fail("do_bench for a long launch"))
    timed = selection_fwd.tuning_bench(long_call, quantiles=(0.5, 0.2, 0.8))
    assert len(runs) == 2 and len(timed) == 3 and all(t >= 25 for t in timed)
    assert selection_fwd.tuning_bench(long_call) >= 25 and len(runs) == 4

    runs.clear()
    short_call = lambda: runs.append(1)
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, quantiles=None, **kw: [fn(), fn(), 1.5][2:] * 3)
    assert selection_fwd.tuning_bench(short_call, quantiles=(0.5, 0.2, 0.8)) == [1.5] * 3
    assert len(runs) == 4                   # warm-up, the timed run, then do_bench's own runs

    if "do_bench" in inspect.signature(triton.autotune).parameters:
        kernels = (selection_fwd.selection_fwd_group_kernel, selection_fwd.selection_fwd_head_kernel,
                   selection_bwd.selection_bwd_dq_kernel, selection_bwd.selection_bwd_dkdv_kernel,
                   selection_kv.selection_kv_kernel, selection_tile.selection_tile_kernel)
        for kernel in kernels:
            tuner = kernel
            while not isinstance(tuner, triton.runtime.Autotuner):
                tuner = tuner.fn
            assert tuner.do_bench is selection_fwd.tuning_bench


# --- reasons -------------------------------------------------------------------------------------

def small_call(dtype=torch.float16, Dk=64, Dv=None, **over):
    case = make_case(B=1, TQ=16, HQ=4, H=2, Dk=Dk, Dv=Dv, S=4, block_size=16, dtype=dtype, **over)
    return describe_call(*case.args(), **case.kwargs(),
                         allowed_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))


def test_serves_h100_with_default_settings():
    assert triton_backend.reasons_unsupported(small_call(), Settings(), H100) == []


def test_reasons_name_the_value_and_what_is_allowed():
    call = small_call()
    cpu = triton_backend.reasons_unsupported(call, Settings(), CPU)
    assert any("cpu" in r and "CUDA" in r and "TRITON_INTERPRET" in r for r in cpu)
    assert triton_backend.reasons_unsupported(call, Settings(triton_interpret=True), CPU) == []
    assert any("8.0" in r for r in triton_backend.reasons_unsupported(call, Settings(), T4))
    sm89 = triton_backend.reasons_unsupported(call, Settings(), RTX4090)
    assert any("ADR-2025-08-M4-02" in r and "NSA_TRITON_SEL_FORCE=1" in r for r in sm89)
    assert triton_backend.reasons_unsupported(call, Settings(triton_sel_force=True), RTX4090) == []
    # The switch and the length threshold are auto's preferences, not incapacities.
    for settings in (Settings(use_triton_sel=False), Settings(sel_triton_min_L=65)):
        assert triton_backend.reasons_unsupported(call, settings, H100) == []
    off = triton_backend.auto_preferences(call, Settings(use_triton_sel=False), H100)
    assert any("NSA_USE_TRITON_SEL" in r for r in off)
    short = triton_backend.auto_preferences(call, Settings(sel_triton_min_L=65), H100)
    assert any("64" in r and "65" in r and "NSA_SEL_TRITON_MIN_L" in r for r in short)
    assert triton_backend.auto_preferences(call, Settings(sel_triton_min_L=64), H100) == []
    fp64 = triton_backend.reasons_unsupported(small_call(torch.float64), Settings(), H100)
    assert any("float64" in r and "bfloat16" in r for r in fp64)
    wide = triton_backend.reasons_unsupported(small_call(Dk=64, Dv=320), Settings(), H100)
    assert any("Dv=320" in r and "256" in r for r in wide)


def test_measured_threshold_for_the_arch_applies():
    settings = Settings(thresholds={"sm90": {"sel_triton_min_L": 128}})
    assert any("128" in r for r in triton_backend.auto_preferences(small_call(), settings, H100))


@pytest.mark.gpu
def test_gpu_backward_at_8k_matches_reference(untuned):
    """Gradients at T = 8k (G = 4, bf16), against autograd through the fp32 reference."""
    call = build_call(dict(B=1, TQ=8192, HQ=8, H=2, Dk=64, S=16, block_size=64),
                      torch.bfloat16, "cuda", seed=8)
    check_gradients(call, with_lse=True)


@pytest.mark.big_memory
@pytest.mark.gpu
@pytest.mark.parametrize("G", [1, 16], ids=["dq-partials", "dq-kernel"])
def test_gpu_backward_64bit_offsets(untuned, G):
    """dK and dV of more than 2^31 elements (chunked prefill with gradients): blocks near the end
    get their gradients, the rest stays zero."""
    TK, D, block_size = (1 << 25) + 100, 64, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 2, G, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, TK, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, TK, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    assert k.numel() > 2 ** 31
    last = (TK - 1) // block_size
    block_indices = torch.tensor([[[[0, last, last - 1, -1]], [[last // 2, last, 3, last]]]],
                                 device="cuda")
    call = describe_call(q, k, v, block_indices, block_size, need_lse=True)
    grad_o = torch.randn(1, 2, G, D, device="cuda", dtype=torch.bfloat16, generator=g)
    dq, dk, dv = triton_backend.backward(call, grad_o, None)
    chosen = sorted({0, last, last - 1, last // 2, 3})
    keys = torch.cat([torch.arange(b * block_size, min((b + 1) * block_size, TK), device="cuda")
                      for b in chosen])
    small = describe_call(q, k[:, keys], v[:, keys], torch.tensor([[[[0, 4, 3, -1]], [[2, 4, 1, 4]]]],
                                                                  device="cuda"),
                          block_size, need_lse=True)
    # The same attention on the gathered blocks alone (block i of `small` is chosen[i]; the last
    # block of the big call is partial and stays last, so causality is unchanged).
    want_dq, want_dk, want_dv = (t.float() for t in gradients_of(small, grad_o))
    assert torch.allclose(dq.float(), want_dq, atol=2e-2, rtol=2e-2)
    assert torch.allclose(dk[:, keys].float(), want_dk, atol=2e-2, rtol=2e-2)
    assert torch.allclose(dv[:, keys].float(), want_dv, atol=2e-2, rtol=2e-2)
    # Nothing outside the chosen blocks, counted in slices: a whole-tensor count_nonzero asks for
    # 16 GiB of indices (out of memory beside other test workers on the H200).
    for grad in (dk, dv):
        nonzero = sum(int((part != 0).sum()) for part in grad.split(1 << 22, dim=1))
        assert nonzero == int((grad[:, keys] != 0).sum())


def gradients_of(call, grad_o):
    q, k, v = (t.detach().float().requires_grad_() for t in (call.q, call.k, call.v))
    ref = describe_call(q, k, v, call.block_indices, call.block_size, need_lse=True)
    o, _ = reference_forward(ref)
    (o * grad_o.float()).sum().backward()
    return q.grad, k.grad, v.grad


def test_sm90_compile_report_runs_without_a_gpu():
    """scripts/triton_sm90_report.py compiles the tile kernel for SM 9.0 on any machine with
    Triton's NVIDIA backend: its K/V loads become asynchronous copies (the software pipeline).
    In a process of its own: here Triton may be interpreting (TRITON_INTERPRET=1)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    script = Path(__file__).resolve().parents[1] / "scripts" / "triton_sm90_report.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script), "--kernels", "tile,dkdv", "--head-dims",
                          "64", "--configs", "1", "--dtype", "fp16"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    row = [line for line in run.stdout.splitlines() if line.startswith("| tile |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[2] == "4 x 2" and float(cells[3]) >= 0 and "registers" in cells[5]
    assert int(cells[6]) > 0
    # the backward's dK/dV kernel: one row per BM its tuning keeps at d 64 (all three)
    dkdv = [line for line in run.stdout.splitlines() if line.startswith("| dkdv BM=")]
    assert [line.split("|")[1].strip() for line in dkdv] == [
        "dkdv BM=32", "dkdv BM=64", "dkdv BM=128"]
    assert all("registers" in line for line in dkdv)


def test_interpreter_reads_a_strided_last_dim_right(interpreter):
    """The Triton kernels index a head dim with unit stride: a q / k / v view with a strided last
    dim must reach them as a dense copy (describe_call), not be read as if it were dense."""
    case = make_case(B=1, TQ=32, HQ=4, H=2, Dk=16, S=3, block_size=8, seed=2)
    strided = []
    for t in (case.q, case.k, case.v):
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1])
        wide[..., ::2] = t
        strided.append(wide[..., ::2])
    o = nsa_ext.selection_attention(*strided, case.block_indices, 8, backend="triton")
    o_ref = nsa_ext.selection_attention(case.q, case.k, case.v, case.block_indices, 8,
                                        backend="reference")
    assert_close_to_reference(o, o_ref, torch.float32)
