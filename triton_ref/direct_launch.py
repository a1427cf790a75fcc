"""Launch a compiled Triton kernel again without Triton's per-call launcher (eager plans).

`kernel[grid](...)` binds and specialises every argument, hashes the specialisation, looks the
compiled kernel up, and only then calls `CompiledKernel.run`. On the H200 bench host that costs
~60-70 us per launch: the eager split-KV decode's two launches were 157 of its 168 us
(notes/eager.md), against ~5 us for a launch of the CUDA extension. An eager plan
(nsa_ext/eager_plan.py) launches the same kernel with the same metadata call after call; only the
tensors' addresses change. `DirectLaunch.first` launches once through Triton's own path (which
compiles or finds the kernel), keeps the CompiledKernel and the whole argument list in the
kernel's order, and later launches call `CompiledKernel.run` with the new tensors in their slots:
the call Triton's launcher itself ends with. Triton 3.4 to 3.8 end their launcher with the same
call (every parameter, constexprs included, in signature order; the launch hooks from
`triton.knobs`), read in each release's runtime/jit.py; other versions take the normal launch
(`SUPPORTED`), since a changed signature could misplace arguments rather than fail.

Safe because nothing the kernel was specialised on can differ: the plan's key fixes shapes,
strides, dtypes, devices and scalars, and the tensors in the slots must be 16-byte aligned as the
first launch's were (Triton specialises pointers on it); `__call__` returns False otherwise and
the caller launches the normal way. Autotuned kernels are not served (their config is chosen per
launch); `heuristics` wrappers are evaluated once, as their values depend on the fixed metadata.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction

try:
    from triton import knobs as _knobs
except ImportError:                     # a Triton without knobs has another launch signature
    _knobs = None

_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# The Triton releases whose launcher was read to end in the call DirectLaunch repeats.
SUPPORTED = (3, 4) <= _version(triton.__version__) <= (3, 8)


class DirectLaunch:
    """One kernel launch, repeatable with new tensors in `slots` (see the module docstring)."""

    def __init__(self, compiled, grid, values: list, slots: Sequence[int], device: int):
        self._compiled = compiled
        self._grid = tuple(grid) + (1,) * (3 - len(grid))
        self._slots = tuple(slots)
        # The slots are filled per launch: the template keeps none of the first launch's tensors
        # alive (a plan lives as long as its metadata is cached; a decode step's K/V cache is
        # one of those tensors).
        self._values = [None if i in self._slots else value for i, value in enumerate(values)]
        self._device = device

    @classmethod
    def first(cls, kernel, grid, slots: Sequence[str], **kwargs) -> tuple:
        """Launch `kernel[grid](**kwargs)` the normal way; returns (that launch's return value,
        a DirectLaunch for the tensors named by `slots`, or None where this kernel cannot be
        relaunched directly: autotuned, an unknown Triton, a misaligned tensor)."""
        heuristics = []
        fn = kernel
        while isinstance(fn, Heuristics):
            heuristics.append(fn.values)
            fn = fn.fn
        if not SUPPORTED or isinstance(fn, Autotuner) or not isinstance(fn, JITFunction) or \
                _knobs is None or not all(_aligned(kwargs[name]) for name in slots):
            return kernel[grid](**kwargs), None
        args = {name: value for name, value in kwargs.items() if name not in _OPTIONS}
        options = {name: value for name, value in kwargs.items() if name in _OPTIONS}
        for values in heuristics:                           # outermost first, as Heuristics.run
            for name, rule in values.items():
                args[name] = rule(args)
        try:
            values = [args[name] if name in args else param.default
                      for name, param in zip(fn.arg_names, fn.params)]
        except AttributeError:
            return fn[grid](**args, **options), None
        compiled = fn[grid](**args, **options)
        if hasattr(compiled, "result"):                     # an asynchronous compile's future
            compiled = compiled.result()
        if compiled is None or not all(hasattr(compiled, attr) for attr in
                                       ("run", "function", "packed_metadata", "launch_metadata")):
            return compiled, None
        positions = [fn.arg_names.index(name) for name in slots]
        device = triton.runtime.driver.active.get_current_device()
        return compiled, cls(compiled, grid, values, positions, device)

    def __call__(self, *tensors: torch.Tensor) -> bool:
        """Launch with `tensors` in the slots, on the current stream; False (nothing launched)
        where a tensor is not 16-byte aligned or the current device is another."""
        driver = triton.runtime.driver.active
        device = driver.get_current_device()
        if device != self._device or not all(_aligned(t) for t in tensors):
            return False
        values = list(self._values)
        for slot, tensor in zip(self._slots, tensors):
            values[slot] = tensor
        compiled, grid = self._compiled, self._grid
        stream = driver.get_current_stream(device)
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function,
                     compiled.packed_metadata, compiled.launch_metadata(grid, stream, *values),
                     _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook, *values)
        return True


def _aligned(tensor: Optional[torch.Tensor]) -> bool:
    return tensor is None or (isinstance(tensor, torch.Tensor) and tensor.data_ptr() % 16 == 0)


__all__ = ["DirectLaunch"]
