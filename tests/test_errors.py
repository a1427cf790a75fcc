"""Every error of SPEC.md (and the issue's extra ones) raises before any kernel runs and names
the argument."""
import pytest
import torch

import nsa_ext
from common import make_case


def base(**over):
    c = make_case(B=2, TQ=32, HQ=4, H=2, Dk=16, S=3, block_size=16, seed=1)
    args = dict(q=c.q, k=c.k, v=c.v, block_indices=c.block_indices, block_size=16)
    args.update(over)
    return args


def call(args, **kw):
    args = dict(args)
    return nsa_ext.selection_attention(args.pop("q"), args.pop("k"), args.pop("v"),
                                       args.pop("block_indices"), args.pop("block_size"), **kw)


A = base()
CU = torch.tensor([0, 10, 32], dtype=torch.int32)
VAR = dict(q=A["q"][:1], k=A["k"][:1], v=A["v"][:1], block_indices=A["block_indices"][:1])

ERRORS = {
    "q_not_tensor": (dict(q=[1.0]), {}, TypeError, "q"),
    "q_dtype": (dict(q=A["q"].double()), {}, TypeError, "q"),
    "q_int": (dict(q=A["q"].to(torch.int32)), {}, TypeError, "q"),
    "k_dtype": (dict(k=A["k"].half()), {}, TypeError, "k"),
    "v_dtype": (dict(v=A["v"].bfloat16()), {}, TypeError, "v"),
    "indices_float": (dict(block_indices=A["block_indices"].float()), {}, TypeError, "block_indices"),
    "q_3d": (dict(q=A["q"][0]), {}, ValueError, "q"),
    "batch_mismatch": (dict(k=A["k"][:1], v=A["v"][:1]), {}, ValueError, "batch"),
    "dk_mismatch": (dict(k=A["k"][..., :8]), {}, ValueError, "k"),
    "v_len_mismatch": (dict(v=A["v"][:, :20]), {}, ValueError, "v"),
    "hq_not_multiple": (dict(q=A["q"][:, :, :3]), {}, ValueError, "HQ % H"),
    "indices_shape": (dict(block_indices=A["block_indices"][:, :, :1]), {}, ValueError, "block_indices"),
    "tq_gt_tk": (dict(k=A["k"][:, :20], v=A["v"][:, :20]), {}, ValueError, "TQ"),
    "block_size_3": (dict(block_size=3), {}, ValueError, "block_size"),
    "block_size_0": (dict(block_size=0), {}, ValueError, "block_size"),
    "block_size_float": (dict(block_size=16.0), {}, ValueError, "block_size"),
    "empty_q": (dict(q=A["q"][:, :0], block_indices=A["block_indices"][:, :0]), {}, ValueError, "empty"),
    "counts_shape": ({}, dict(block_counts=torch.ones(2, 32, dtype=torch.int64)), ValueError, "block_counts"),
    "counts_float": ({}, dict(block_counts=torch.ones(2, 32, 2)), TypeError, "block_counts"),
    "counts_negative": ({}, dict(block_counts=-1), ValueError, "block_counts"),
    "scale_str": ({}, dict(scale="0.1"), ValueError, "scale"),
    "scale_nan": ({}, dict(scale=float("nan")), ValueError, "scale"),
    "backend_name": ({}, dict(backend="flash"), ValueError, "backend"),
    "cu_batch_2": ({}, dict(cu_seqlens_q=CU), ValueError, "B == 1"),
    "cu_float": (VAR, dict(cu_seqlens_q=CU.float()), TypeError, "cu_seqlens_q"),
    "cu_decreasing": (VAR, dict(cu_seqlens_q=torch.tensor([0, 20, 10, 32])), ValueError, "cu_seqlens_q"),
    "cu_wrong_total": (VAR, dict(cu_seqlens_q=torch.tensor([0, 10, 30])), ValueError, "cu_seqlens_q"),
    "cu_not_zero_start": (VAR, dict(cu_seqlens_q=torch.tensor([2, 10, 32])), ValueError, "cu_seqlens_q"),
    "cu_k_count": (VAR, dict(cu_seqlens_q=CU, cu_seqlens_k=torch.tensor([0, 32])), ValueError, "cu_seqlens_k"),
    "cu_k_shorter": (VAR, dict(cu_seqlens_q=CU, cu_seqlens_k=torch.tensor([0, 5, 32])), ValueError, "sequence 0"),
    "cu_k_only": (VAR, dict(cu_seqlens_k=CU), ValueError, "cu_seqlens_q"),
    "cu_2d": (VAR, dict(cu_seqlens_q=CU[None]), ValueError, "cu_seqlens_q"),
}


@pytest.mark.parametrize("name", ERRORS)
def test_error(name):
    over, kwargs, exc, words = ERRORS[name]
    with pytest.raises(exc, match=words.replace("(", r"\(").replace("%", "%")) as info:
        call(base(**over), **kwargs)
    # dtype errors are TypeError and ValueError at once: SPEC.md allows either.
    if exc is TypeError and name != "q_not_tensor":
        assert isinstance(info.value, ValueError)


def test_device_mismatch_names_the_argument():
    args = base()
    meta_k = args["k"].to("meta")
    with pytest.raises(ValueError, match="k: expected a tensor on cpu"):
        nsa_ext.selection_attention(args["q"], meta_k, args["v"], args["block_indices"], 16)


def test_cu_seqlens_on_another_device():
    with pytest.raises(ValueError, match="cu_seqlens_q: expected a tensor on cpu"):
        call(base(**VAR), cu_seqlens_q=CU.to("meta"))


def test_cu_seqlens_values_are_checked_once_per_tensor_and_version(monkeypatch):
    from nsa_ext import call as call_module

    checked = []
    real = call_module._check_cu_values
    monkeypatch.setattr(call_module, "_check_cu_values",
                        lambda name, cu, total: (checked.append(name), real(name, cu, total)))
    args = base(**VAR)
    cu = torch.tensor([0, 10, 32], dtype=torch.int32)
    call(args, cu_seqlens_q=cu)
    assert checked == ["cu_seqlens_q", "cu_seqlens_k"]
    call(args, cu_seqlens_q=cu)                       # the same tensor, unchanged: no re-read
    assert len(checked) == 2
    cu[1] = 40                                        # an in-place write bumps its version
    with pytest.raises(ValueError, match="cu_seqlens_q: must be non-decreasing"):
        call(args, cu_seqlens_q=cu)
    cu[1] = 10
    shorter = dict(args, q=args["q"][:, :20], block_indices=args["block_indices"][:, :20])
    with pytest.raises(ValueError, match="cu_seqlens_q: last entry must equal the packed length 20"):
        call(shorter, cu_seqlens_q=cu)                # the same values against another total
    with pytest.raises(ValueError, match="cu_seqlens_q: must start at 0"):
        call(args, cu_seqlens_q=torch.tensor([2, 10, 32]))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_named_backend_that_cannot_serve_raises_with_reasons(backend):
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot serve this call: .+"):
        call(base(), backend=backend)
