"""What does a launch cost whose every program reads a device flag and returns at once?

The question behind a schedule decision taken on the device (notes/hopper.md, eighth session):
auto's prefill reads the union statistic with one host sync, then launches the chosen kernel.
Deciding on the device instead means launching every candidate kernel, each program returning
at once unless its schedule was chosen, so the kernel not chosen still costs its whole grid.
This times such grids (the row kernel's at T = 8k / 32k / 128k with H = 4, and the tile kernel's)
against the host sync they would replace. A lower bound: the real kernels reserve shared memory
and registers, so fewer of their programs are resident at once than of this empty one.

    python scripts/early_exit_probe.py
"""
import torch
import triton
import triton.language as tl


@triton.jit
def flagged_kernel(flag, out, RUN: tl.constexpr):
    # Every program reads the decision; the not-chosen kernel's programs stop here.
    if tl.load(flag) != RUN:
        return
    tl.store(out + tl.program_id(0), 1)


def main():
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.zeros(1 << 20, dtype=torch.int32, device="cuda")
    print(f"device: {torch.cuda.get_device_name()}")
    print("grid | warps | us per launch (every program returns at once)")
    for grid in (8192, 32768, 131072, 524288):
        for warps in (4, 8):
            run = lambda: flagged_kernel[(grid,)](flag, out, RUN=1, num_warps=warps)  # noqa: E731
            ms = triton.testing.do_bench(run, warmup=50, rep=200)
            print(f"{grid} | {warps} | {ms * 1e3:.1f}")
    # The host sync it would replace: a 16-byte device-to-host read after a small kernel.
    totals = torch.zeros(2, dtype=torch.int64, device="cuda")

    def synced():
        totals.add_(1)
        totals.tolist()
    ms = triton.testing.do_bench(synced, warmup=50, rep=200)
    print(f"small kernel + 16-byte read to the host (sync): {ms * 1e3:.1f} us")


if __name__ == "__main__":
    main()
