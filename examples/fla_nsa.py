"""fla's whole NSA layer with nsa_ext doing the selection step.

NSA (DeepSeek 2025) sums three branches per query head, each weighted by a gate:
  - compressed attention: keys and values mean-pooled per block of `block_size` tokens, attended
    to causally (fla: `mean_pooling`, `parallel_nsa_compression`);
  - selected attention: the `block_counts` blocks with the highest compressed-attention scores
    (fla: `parallel_nsa_topk`, which always keeps block 0 and the query's last two blocks),
    attended at full resolution: here `nsa_ext.selection_attention`, which takes fla's layouts
    ([B, T, heads, dim], block indices [B, T, H, S] with -1 padding, cu_seqlens) unchanged;
  - sliding-window attention over the last `window_size` tokens (fla: flash-attn).

`nsa(...)` takes the arguments of fla's `fla.ops.nsa.parallel_nsa` and returns the same output;
`tests/test_fla_nsa.py` compares output and gradients with fla's at G = 16, fla's smallest group.
Needs fla-core (`pip install fla-core`) and a CUDA GPU; the window branch needs flash-attn.

    python examples/fla_nsa.py        # times both layers, forward and forward+backward, T=8k, 32k
"""
from __future__ import annotations

import argparse
from typing import Optional, Tuple, Union

import torch
from fla.ops.nsa.compression import parallel_nsa_compression
from fla.ops.nsa.parallel import parallel_nsa_topk
from fla.ops.utils.pooling import mean_pooling

import nsa_ext

CuSeqlens = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None]


def _split_cu_seqlens(cu_seqlens: CuSeqlens):
    if cu_seqlens is None:
        return None, None
    if isinstance(cu_seqlens, tuple):
        return cu_seqlens
    return cu_seqlens, cu_seqlens


def sliding_window(q, k, v, window_size: int, cu_seqlens: CuSeqlens) -> torch.Tensor:
    """Causal attention over each query's last `window_size` keys (flash-attn, as fla does)."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as err:
        raise RuntimeError("window_size > 0 needs flash-attn (pip install flash-attn)") from err
    cu_q, cu_k = _split_cu_seqlens(cu_seqlens)
    if cu_q is None:
        return flash_attn_func(q, k, v, causal=True, window_size=(window_size - 1, 0))
    return flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                  max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1], causal=True,
                                  window_size=(window_size - 1, 0)).unsqueeze(0)


def nsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        g_cmp: Optional[torch.Tensor] = None, g_slc: Optional[torch.Tensor] = None,
        g_swa: Optional[torch.Tensor] = None, block_indices: Optional[torch.Tensor] = None,
        block_counts: Union[torch.Tensor, int] = 16, block_size: int = 64, window_size: int = 0,
        scale: Optional[float] = None, cu_seqlens: CuSeqlens = None,
        backend: str = "auto") -> torch.Tensor:
    """fla's `parallel_nsa` with nsa_ext's selection attention.

    Args (fla's): q [B, TQ, HQ, K], k [B, TK, H, K], v [B, TK, H, V]; gates g_cmp, g_slc, g_swa
    [B, TQ, HQ] (None leaves a branch out; the selection's output is taken ungated when g_slc is
    None); block_indices [B, TQ, H, S] to skip the top-k (else computed from the compressed
    scores); block_counts (int or [B, TQ, H]); block_size; window_size; scale (default K**-0.5);
    cu_seqlens (one tensor, or (cu_seqlens_q, cu_seqlens_k)) for a packed batch with B == 1.
    `backend` picks nsa_ext's backend ("auto", "triton", "cuda", "sdpa").

    Returns o [B, TQ, HQ, V] in q's dtype.
    """
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    cu_q, cu_k = _split_cu_seqlens(cu_seqlens)
    o_cmp = None
    if g_cmp is not None:
        # Compressed branch: one mean-pooled key and value per block (differentiable).
        k_cmp, v_cmp = mean_pooling(k, block_size, cu_k), mean_pooling(v, block_size, cu_k)
        o_cmp, lse_cmp = parallel_nsa_compression(q=q, k=k_cmp, v=v_cmp, TK=k.shape[1],
                                                  block_size=block_size, scale=scale,
                                                  cu_seqlens=cu_seqlens)
        if block_indices is None:
            # The selection: indices only, no gradient flows through the top-k.
            with torch.no_grad():
                block_indices = parallel_nsa_topk(q=q, k=k_cmp, lse=lse_cmp, TK=k.shape[1],
                                                  block_counts=block_counts,
                                                  block_size=block_size, scale=scale,
                                                  cu_seqlens=cu_seqlens)
    if block_indices is None:
        raise ValueError("block_indices: needed when g_cmp is None (no compressed scores to "
                         "select from)")
    o = nsa_ext.selection_attention(q, k, v, block_indices, block_size,
                                    block_counts=block_counts, scale=scale, cu_seqlens_q=cu_q,
                                    cu_seqlens_k=cu_k if cu_k is not cu_q else None,
                                    backend=backend)
    if g_slc is not None:
        o = o * g_slc.unsqueeze(-1)
    if o_cmp is not None:
        o = torch.addcmul(o, o_cmp, g_cmp.unsqueeze(-1))
    if window_size > 0:
        o = torch.addcmul(o, sliding_window(q, k, v, window_size, cu_seqlens), g_swa.unsqueeze(-1))
    return o


# ----------------------------------------------------------------------------------------------
# Timing both layers

def make_layer_inputs(T: int, *, B=1, HQ=64, H=4, D=128, dtype=torch.bfloat16, device="cuda",
                      requires_grad=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    q, k, v = rnd(B, T, HQ, D), rnd(B, T, H, D), rnd(B, T, H, D)
    gates = [torch.rand(B, T, HQ, generator=g, device=device, dtype=dtype) for _ in range(2)]
    tensors = [q, k, v, *gates]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return tensors


def time_layers(lengths=(8192, 32768), window_size: int = 0, backend: str = "auto") -> list:
    from fla.ops.nsa.parallel import parallel_nsa
    from triton.testing import do_bench

    print(f"# {torch.cuda.get_device_name()} | bf16 B=1 HQ=64 H=4 D=128, 16 blocks of 64, "
          f"window {window_size} | whole NSA layer, median ms (triton.testing.do_bench)")
    print("| T | pass | fla parallel_nsa | fla + nsa_ext selection | ratio |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for T in lengths:
        q, k, v, g_cmp, g_slc = make_layer_inputs(T, requires_grad=True)
        g_swa = torch.rand_like(g_cmp) if window_size else None
        kwargs = dict(g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa, block_counts=16, block_size=64,
                      window_size=window_size)
        do = torch.randn_like(q)
        layers = {"fla": lambda: parallel_nsa(q, k, v, **kwargs),
                  "nsa_ext": lambda: nsa(q, k, v, backend=backend, **kwargs)}
        for name in ("forward", "forward+backward"):
            times = {}
            for which, layer in layers.items():
                if name == "forward":
                    def run(layer=layer):
                        with torch.no_grad():
                            return layer()
                else:
                    def run(layer=layer):
                        layer().backward(do)
                run()
                times[which] = do_bench(run, grad_to_none=[q, k, v, g_cmp, g_slc],
                                        return_mode="median")
            ratio = times["nsa_ext"] / times["fla"]
            print(f"| {T} | {name} | {times['fla']:.3f} | {times['nsa_ext']:.3f} | {ratio:.2f}x |")
            rows.append({"T": T, "pass": name, "fla_ms": times["fla"],
                         "nsa_ext_ms": times["nsa_ext"]})
        del q, k, v, g_cmp, g_slc, do
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Time fla's NSA layer and the same layer with "
                                                 "nsa_ext's selection attention")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--window", type=int, default=0, help="sliding window (needs flash-attn)")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    time_layers(args.lengths, args.window, args.backend)
