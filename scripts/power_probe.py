"""Sustained time, board power and SM clock of one auto call, read together.

The model-32k call runs the H200 into its 700 W limit (notes/hopper.md, nineteenth session), so a
kernel variant's effect on the *sustained* time follows its energy per call as much as its
cycles. This script runs 3 s of calls, then N calls back to back between two CUDA events while a
thread reads NVML every 20 ms, and prints ms a call, mean watts, median SM MHz and mJ a call.
A launcher variable (e.g. NSA_EXT_TILE_DUO) set in the environment picks the kernel variant:

    NSA_EXT_TILE_DUO=1 python scripts/power_probe.py duo --T 32768 --pattern model
"""
import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("label")
    parser.add_argument("--T", type=int, default=32768)
    parser.add_argument("--G", type=int, default=16)
    parser.add_argument("--pattern", default="model")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("power_probe.py: needs a CUDA GPU")
    import pynvml

    import nsa_ext
    from bench.common import prefill_inputs

    q, k, v, bi = prefill_inputs(argparse.Namespace(T=args.T, G=args.G, pattern=args.pattern))
    call = lambda: nsa_ext.selection_attention(q, k, v, bi, 64, backend="auto")  # noqa: E731
    handle = torch.cuda._get_pynvml_handler(torch.device("cuda"))
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    t1 = time.time()
    while time.time() - t1 < 3.0:
        for _ in range(10):
            call()
        torch.cuda.synchronize()
    samples, stop = [], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
                            pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)))
            time.sleep(0.02)

    th = threading.Thread(target=sample)
    th.start()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.calls):
        call()
    end.record()
    end.synchronize()
    stop.set()
    th.join()
    ms = start.elapsed_time(end) / args.calls
    watts = statistics.mean(w for w, _ in samples[len(samples) // 4:])
    mhz = statistics.median(c for _, c in samples)
    print(f"{args.label:10s} T={args.T} {args.pattern}: {ms:.4f} ms/call  {watts:.0f} W  "
          f"SM {mhz:.0f} MHz  {watts * ms:.0f} mJ/call  ({len(samples)} samples)", flush=True)


if __name__ == "__main__":
    main()
