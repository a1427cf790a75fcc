"""Can a Triton kernel be compiled for the first time inside a CUDA-graph capture?

The question behind a capture-aware backend order (eager small calls on the CUDA extension,
captured ones on Triton's split-KV kernels): eager warm-up calls would then never compile the
Triton kernels, so the first compile would happen inside `torch.cuda.graph`. Run in a fresh
process with an empty TRITON_CACHE_DIR; prints one line per probe and exits 1 on a failure.
"""
import os
import sys
import tempfile

os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-probe-"))
import torch  # noqa: E402

import nsa_ext  # noqa: E402


def inputs(TK, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 64, 128, generator=g).cuda().bfloat16()
    k = torch.randn(1, TK, 4, 128, generator=g).cuda().bfloat16()
    v = torch.randn(1, TK, 4, 128, generator=g).cuda().bfloat16()
    nb = TK // 64
    bi = torch.stack([torch.randperm(nb, generator=g)[:16] for _ in range(4)]).view(1, 1, 4, 16)
    return q, k, v, bi.cuda().int()


def probe(eager_backend, captured_backend, TK):
    q, k, v, bi = inputs(TK)
    for _ in range(3):
        nsa_ext.selection_attention(q, k, v, bi, 64, backend=eager_backend)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            o = nsa_ext.selection_attention(q, k, v, bi, 64, backend=captured_backend)
        graph.replay()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - the probe reports whatever the capture raised
        print(f"FAIL eager={eager_backend} captured={captured_backend} TK={TK}: "
              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return False
    ref = nsa_ext.selection_attention(q.float(), k.float(), v.float(), bi, 64, backend="reference")
    err = (o.float() - ref).abs().max().item()
    ok = err < 3e-2
    print(f"{'ok' if ok else 'WRONG'} eager={eager_backend} captured={captured_backend} "
          f"TK={TK}: max err {err:.2e}")
    return ok


if __name__ == "__main__":
    results = [probe("cuda", "triton", 8192), probe("cuda", "auto", 16384)]
    sys.exit(0 if all(results) else 1)
