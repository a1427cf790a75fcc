"""Facts about the device a call runs on, as plain data so the dispatcher can be tested with
any GPU's facts on a CPU machine."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class DeviceFacts:
    kind: str                              # "cpu", "cuda", ...
    sm: Optional[Tuple[int, int]] = None   # compute capability, CUDA only
    name: str = ""
    sm_count: int = 0

    @property
    def arch(self) -> Optional[str]:
        """"sm90" for SM 9.0; None off CUDA. Keys the measured thresholds in configs/base.yaml."""
        return f"sm{self.sm[0]}{self.sm[1]}" if self.sm else None

    def describe(self) -> str:
        if self.kind != "cuda":
            return self.kind
        return f"{self.name} (SM {self.sm[0]}.{self.sm[1]}, {self.sm_count} SMs)"


CPU = DeviceFacts("cpu", name="cpu")


@functools.lru_cache(maxsize=None)
def _cuda_facts(index: int) -> DeviceFacts:
    props = torch.cuda.get_device_properties(index)
    return DeviceFacts("cuda", (props.major, props.minor), props.name, props.multi_processor_count)


def device_facts(device: torch.device) -> DeviceFacts:
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_facts(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return CPU
    return DeviceFacts(device.type, name=device.type)


def on_device(device: torch.device):
    """A context that makes `device` the current CUDA device: Triton launches its kernels on the
    current device whatever device the tensors live on (the CUDA extension guards itself). A
    no-op off CUDA and when `device` is already current."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def elapsed_ms(fn, cuda: bool) -> float:
    """Milliseconds of one call of `fn`: CUDA events around it on the current stream (waiting
    for the end event only) when `cuda`, else perf_counter. The autotuner's one-run timing of a
    long launch (triton_ref/selection_fwd.py) and the CP bench (bench/cp_bench.py) share it."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    import time

    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3
