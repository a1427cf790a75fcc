"""Where auto's prefill spends the GPU's idle time: back-to-back calls under torch.profiler, and
one steady-state call's timeline of host runtime calls and GPU kernels, in us from the call's
start (the bench's shape and pattern: bf16, HQ = 4G, H = 4, D = 128, 16 of 64).

    python scripts/profile_auto_host.py --T 8192 --backend auto
    NSA_SEL_SCHEDULE=tile python scripts/profile_auto_host.py --T 8192 --backend cuda

Prints the median call time (triton.testing.do_bench), the GPU's busy fraction over the profiled
calls, and the timeline of the last profiled call; notes/hopper.md says what it is for (the
statistic's host synchronisation).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import nsa_ext  # noqa: E402
from bench.common import add_prefill_arguments, prefill_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    add_prefill_arguments(parser, T=8192)
    parser.add_argument("--calls", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_auto_host.py: needs a CUDA GPU")
    import triton.testing
    from torch.profiler import ProfilerActivity, profile, record_function

    q, k, v, block_indices = prefill_inputs(args)

    def call():
        return nsa_ext.selection_attention(q, k, v, block_indices, 64, backend=args.backend)

    ms = triton.testing.do_bench(call, warmup=50, rep=200)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.calls):
            with record_function(f"call{i}"):
                call()
        torch.cuda.synchronize()
    events = prof.events()
    # The callN ranges show on the GPU timeline too (user annotations): not kernels.
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                      and e.time_range.elapsed_us() > 0 and not e.name.startswith("call")),
                     key=lambda e: e.time_range.start)
    marks = {e.name: e for e in events if e.name.startswith("call")
             and e.device_type != torch.autograd.DeviceType.CUDA}
    first, last = marks["call1"], marks[f"call{args.calls - 1}"]
    span = [e for e in kernels if e.time_range.start >= first.time_range.start]
    busy = sum(e.time_range.elapsed_us() for e in span)
    total = span[-1].time_range.end - span[0].time_range.start if span else 0
    print(f"T={args.T} G={args.G} {args.pattern} backend={args.backend}: {ms:.3f} ms per call "
          f"(do_bench); GPU busy {busy / max(total, 1):.1%} over calls 1..{args.calls - 1}")
    t0 = last.time_range.start
    host = [e for e in events if e.device_type != torch.autograd.DeviceType.CUDA
            and last.time_range.start <= e.time_range.start <= last.time_range.end
            and (e.name.startswith(("cuda", "cu")) or e.name.startswith("aten::")
                 or "nsa" in e.name)]
    print(f"timeline of call{args.calls - 1} (us from its start; host: runtime calls and ops):")
    rows = [(e.time_range.start - t0, e.time_range.end - t0, "host", e.name) for e in host]
    rows += [(e.time_range.start - t0, e.time_range.end - t0, "gpu ", e.name) for e in kernels
             if e.time_range.end >= t0 - 2000 and e.time_range.start <= last.time_range.end + 5000]
    for start, end, where, name in sorted(rows):
        print(f"  {start:9.1f} {end:9.1f} {where} {name[:90]}")


if __name__ == "__main__":
    main()
