"""Quick bench of the Triton selection kernels against fla's parallel_nsa_fwd (and packed SDPA).

Prefill, bf16, D=128, 16 selected blocks of 64 per row, random causal selection: block 0, the
query's own block, and the rest distinct random earlier blocks (-1 where fewer exist). Times are
medians of triton.testing.do_bench; TFLOP/s = 4 * D * (attended query-key pairs summed over query
heads) / time (2 * (Dk + Dv) in place of 4 * D when they differ). "fwd" is the backend's forward (canonical_blocks + kernel), "kernel" the launch alone
on precomputed canonical rows; fla gets the raw rows (it needs no preprocessing for this input).

    python bench/triton_quick.py [--out results.json] [--quick] [--bwd] [--no-fwd]

Backward rows: TFLOP/s counts 2.5x the forward's flops (five products instead of two).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import traceback

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nsa_ext.call import describe_call  # noqa: E402
from nsa_ext.selection import canonical_blocks, row_geometry  # noqa: E402
from triton_ref import selection_fwd as kernels  # noqa: E402

D, BLOCK, S = 128, 64, 16


def causal_selection(T, H, device, seed=0):
    """[1, T, H, S] int64: block 0, the own block, S - 2 distinct random earlier blocks."""
    g = torch.Generator(device=device).manual_seed(seed)
    nb = triton.cdiv(T, BLOCK)
    own = torch.arange(T, device=device) // BLOCK                          # [T]
    rows = []
    for t0 in range(0, T, 8192):                                           # bounded memory
        own_c = own[t0:t0 + 8192]
        blk = torch.arange(nb, device=device)
        cand = (blk > 0)[None, None, :] & (blk[None, None, :] < own_c[:, None, None])
        score = torch.rand(own_c.numel(), H, nb, device=device, generator=g)
        score = torch.where(cand, score, -1.0)
        top = score.topk(S - 2, dim=-1)
        rest = torch.where(top.values >= 0, top.indices, -1)
        first = torch.zeros(own_c.numel(), H, 1, dtype=torch.int64, device=device)
        own_col = torch.where(own_c > 0, own_c, -1)[:, None, None].expand(-1, H, 1)
        rows.append(torch.cat([first, own_col, rest], dim=-1))
    return torch.cat(rows).unsqueeze(0)


def attended_pairs(call, blocks):
    pos = row_geometry(call).pos[:, :, None, None]
    start = blocks.to(torch.int64) * BLOCK
    visible = torch.where(blocks >= 0, (pos - start + 1).clamp(max=BLOCK), 0)
    return int(visible.sum().item()) * call.group_size


def make(T, HQ, H, device="cuda", seed=0, Dk=D, Dv=D):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, T, HQ, Dk, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, T, H, Dk, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, T, H, Dv, device=device, dtype=torch.bfloat16, generator=g)
    idx = causal_selection(T, H, device, seed)
    return describe_call(q, k, v, idx, BLOCK, need_lse=True)


def fla_fn(call):
    try:
        from fla.ops.nsa.parallel import parallel_nsa_fwd
    except Exception as err:
        return None, f"fla not importable: {err}"
    idx = call.block_indices.to(torch.long)

    def run():
        return parallel_nsa_fwd(call.q, call.k, call.v, idx, S, BLOCK, call.scale)
    return run, None


def sdpa_fn(call):
    try:
        from nsa_ext.backends import sdpa_packed
    except Exception as err:
        return None, f"packed SDPA not importable: {err}"
    return (lambda: sdpa_packed.forward(call)), None


def timed(fn):
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def bench_case(T, G, H=4, with_fla=True, with_sdpa=False, Dk=D, Dv=D):
    HQ = G * H
    call = make(T, HQ, H, Dk=Dk, Dv=Dv)
    geometry = row_geometry(call)
    blocks, num_blocks = canonical_blocks(call, geometry)
    pairs = attended_pairs(call, blocks)
    flops = 2 * (Dk + Dv) * pairs
    out = []

    def record(name, ms, note=""):
        out.append(dict(T=T, G=G, HQ=HQ, H=H, Dk=Dk, Dv=Dv, name=name, ms=ms,
                        tflops=(flops / (ms * 1e-3) / 1e12) if ms else None, note=note))

    ref = {}
    for group in (True, False):
        variant = "group" if group else "head"

        def kernel_only():
            return kernels.selection_fwd(call.q, call.k, call.v, blocks, num_blocks,
                                         scale=call.scale, block_size=BLOCK, group=group)

        def fwd():
            b, n = canonical_blocks(call, geometry)
            return kernels.selection_fwd(call.q, call.k, call.v, b, n, scale=call.scale,
                                         block_size=BLOCK, group=group)
        try:
            record(f"{variant} fwd", timed(fwd))
            record(f"{variant} kernel", timed(kernel_only))
            ker = kernels.selection_fwd_group_kernel if group else kernels.selection_fwd_head_kernel
            best = getattr(ker.fn, "best_config", None)
            out[-1]["note"] = f"best {best}"
            ref[variant] = kernel_only()[:2]
        except Exception as err:
            traceback.print_exc()
            record(f"{variant} fwd", None, f"failed: {type(err).__name__}: {str(err)[:200]}")
    if "group" in ref and "head" in ref:
        diff = (ref["group"][0].float() - ref["head"][0].float()).abs().max().item()
        out[-1]["note"] += f" | max|group-head| {diff:.3g}"
    if with_fla:
        run, why = fla_fn(call)
        if run is None:
            record("fla", None, why)
        else:
            try:
                ms = timed(run)
                o_fla = run()[0]
                diff = (o_fla.float() - ref["group"][0].float()).abs().max().item() if "group" in ref else float("nan")
                record("fla", ms, f"max|fla-group| {diff:.3g}")
            except Exception as err:
                record("fla", None, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    if with_sdpa:
        run, why = sdpa_fn(call)
        if run is None:
            record("sdpa_packed", None, why)
        else:
            try:
                record("sdpa_packed", timed(run))
            except Exception as err:
                record("sdpa_packed", None, f"failed: {type(err).__name__}: {str(err)[:160]}")
    del call
    torch.cuda.empty_cache()
    return out


def kernel_times(fn, reps=5):
    """Device time per launch of each kernel fn runs, from the profiler (ms, mean of reps)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        if event.device_type.name == "CUDA" or getattr(event, "device_time_total", 0):
            total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
            if total:
                times[event.key[:40]] = total / reps / 1e3
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:6])


def bench_backward(T, G, H=4, with_sdpa=False):
    """Backward: ours (the backend's, recomputing o and lse; given them; and its stages: the
    inverse index, the dQ kernel, the dK/dV kernels) vs fla's parallel_nsa_bwd (given its
    forward's o and lse) and packed SDPA's recomputing backward."""
    from nsa_ext.backends import triton as triton_backend
    from nsa_ext.inverse_index import build_inverse_index, work_items
    from triton_ref import selection_bwd as bwd

    HQ = G * H
    call = make(T, HQ, H)
    geometry = row_geometry(call)
    blocks, num_blocks = canonical_blocks(call, geometry)
    flops = 2.5 * 4 * D * attended_pairs(call, blocks)     # 5 products of the forward's 2
    g = torch.Generator(device="cuda").manual_seed(1)
    grad_o = torch.randn(call.q.shape, device="cuda", dtype=call.dtype, generator=g)
    out = []

    def record(name, ms, note=""):
        out.append(dict(T=T, G=G, HQ=HQ, H=H, Dk=D, Dv=D, name=name, ms=ms,
                        tflops=(flops / (ms * 1e-3) / 1e12) if ms else None, note=note))
    ours = None
    try:
        record("bwd ours", timed(lambda: triton_backend.backward(call, grad_o, None)),
               "incl. forward recompute + canonical_blocks + index")
        o, lse, _ = kernels.selection_fwd(call.q, call.k, call.v, blocks, num_blocks,
                                          scale=call.scale, block_size=BLOCK)
        record("bwd ours kept", timed(lambda: triton_backend.backward(call, grad_o, None, o=o,
                                                                     lse=lse)),
               "given the forward's o, lse (+ canonical_blocks + index)")
        sm = torch.cuda.get_device_properties(0).multi_processor_count

        def index():
            ix = build_inverse_index(call, geometry, blocks, num_blocks)
            return ix, work_items(ix, bwd.dkdv_tokens_per_item(G, ix.capacity, sm))
        ix, items = index()
        record("bwd index", timed(index), f"{ix.capacity} entries, {items.max_items} items max, "
               f"{items.per_item} tokens/item")

        def kernel_only():
            return bwd.selection_bwd(call.q, call.k, call.v, o, lse, grad_o, None, blocks,
                                     num_blocks, ix, items, scale=call.scale, block_size=BLOCK)
        record("bwd ours kernels", timed(kernel_only),
               f"dq {getattr(bwd.selection_bwd_dq_kernel.fn, 'best_config', None)} "
               f"dkdv {getattr(bwd.selection_bwd_dkdv_kernel.fn, 'best_config', None)}")
        record("bwd ours serial", timed(lambda: bwd.selection_bwd(
            call.q, call.k, call.v, o, lse, grad_o, None, blocks, num_blocks, ix, items,
            scale=call.scale, block_size=BLOCK, overlap=False)), "dQ and dK/dV on one stream")
        out[-1]["note"] += " | " + kernel_times(kernel_only)
        ours = kernel_only()
        runs = [kernel_only() for _ in range(2)]
        same = all(torch.equal(a, b) for r in runs for a, b in zip(ours, r))
        out[-1]["note"] += f" | bitwise equal over 3 runs: {same}"
    except Exception as err:
        traceback.print_exc()
        record("bwd ours", None, f"failed: {type(err).__name__}: {str(err)[:200]}")
    try:
        from fla.ops.nsa.parallel import parallel_nsa_bwd, parallel_nsa_fwd

        idx = call.block_indices.to(torch.long)
        o_f, lse_f = parallel_nsa_fwd(call.q, call.k, call.v, idx, S, BLOCK, call.scale)

        def fla_bwd():
            return parallel_nsa_bwd(call.q, call.k, call.v, o_f, lse_f, grad_o, idx, S, BLOCK,
                                    call.scale)
        ms = timed(fla_bwd)
        note = ""
        if ours is not None:
            theirs = fla_bwd()
            note = "max|ours-fla| dq,dk,dv " + " ".join(
                f"{(a.float() - b.float()).abs().max().item():.3g}" for a, b in zip(ours, theirs))
        record("bwd fla", ms, note + " (excl. forward)")
    except Exception as err:
        record("bwd fla", None, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    if with_sdpa:
        try:
            from nsa_ext.backends import sdpa_packed
            record("bwd sdpa_packed", timed(lambda: sdpa_packed.backward(call, grad_o, None)))
        except Exception as err:
            record("bwd sdpa_packed", None, f"failed: {type(err).__name__}: {str(err)[:160]}")
    del call
    torch.cuda.empty_cache()
    return out


def versions():
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version())
    try:
        import fla
        info["fla"] = getattr(fla, "__version__", "?")
    except Exception:
        info["fla"] = "absent"
    return info


def print_table(rows):
    print(f"{'T':>6} {'G':>3} {'HQ':>3} {'Dk/Dv':>7} {'kernel':<15} {'ms':>9} {'TFLOP/s':>8} "
          f"{'/fla':>6}  note")

    def key(r):
        return r["T"], r["G"], r["Dk"], r["Dv"], r["name"].startswith("bwd")
    fla = {key(r): r["ms"] for r in rows if r["name"] in ("fla", "bwd fla") and r["ms"]}
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
        base = fla.get(key(r))
        rel = f"{r['ms'] / base:.2f}" if (base and r["ms"]) else "-"
        dims = f"{r['Dk']}/{r['Dv']}"
        print(f"{r['T']:>6} {r['G']:>3} {r['HQ']:>3} {dims:>7} {r['name']:<15} {ms:>9} {tf:>8} "
              f"{rel:>6}  {r['note']}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="T = 8k only")
    parser.add_argument("--sweep-T", type=int, default=8192, help="T of the G sweep")
    parser.add_argument("--bwd", action="store_true", help="also the backward")
    parser.add_argument("--no-fwd", action="store_true", help="skip the forward tables")
    parser.add_argument("--paper", action="store_true",
                        help="also the NSA paper's head dims, Dk=192, Dv=128 (G=16)")
    args = parser.parse_args()
    info = versions()
    print(" | ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    rows = []
    for T in ([] if args.no_fwd else [8192] if args.quick else [8192, 32768, 65536]):
        rows += bench_case(T, 16)
        print_table(rows[-6:])
        sys.stdout.flush()
    for G in ([] if args.no_fwd else (1, 2, 4, 8, 3, 6)):
        rows += bench_case(args.sweep_T, G, with_sdpa=True)
        sys.stdout.flush()
    for T in ((8192, 32768) if args.paper else ()):
        rows += bench_case(T, 16, Dk=192, Dv=128)
        print_table(rows[-5:])
        sys.stdout.flush()
    if args.bwd:
        for T, G in ((8192, 16), (32768, 16), (32768, 4), (32768, 1)):
            rows += bench_backward(T, G, with_sdpa=False)
            print_table(rows[-6:])
            sys.stdout.flush()
    print()
    print(" | ".join(f"{k} {v}" for k, v in info.items()))
    print(f"bf16, {S} blocks of {BLOCK}, H=4, prefill (TQ = TK = T), median ms; "
          f"TFLOP/s = 2 (Dk + Dv) x attended pairs / time (x 2.5 for backward rows)")
    print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(info=info, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
