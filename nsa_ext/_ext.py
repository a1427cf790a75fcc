"""The compiled extension `nsa_ext._C`, loaded once and never raising on import.

Like xformers' `_cpp_lib.py`: the first call to `available()` (or any function here) tries
`import nsa_ext._C`; a failure is kept as a reason instead of raised, and logged once as a
warning when a compiled module exists but cannot be loaded (a build for another torch, an
undefined symbol). The CUDA backend turns `unavailable_reason()` into its reason for not serving
a call. Loading the module registers the operators `torch.ops.nsa_ext_cuda.selection_fwd`,
`selection_fwd_rows` (canonical rows + forward in one call), `selection_fwd_tile` (SM 9.0) and
`canonical_blocks`, `tile_union` and `selection_fwd_auto` (SM 9.0: the row or tile schedule,
chosen on the device) (its `TORCH_LIBRARY` block runs at load); their fake (meta)
implementations are registered here.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger("nsa_ext")

OP_NAME = "nsa_ext_cuda::selection_fwd"
TILE_OP_NAME = "nsa_ext_cuda::selection_fwd_tile"      # SM 9.0 (csrc/hopper/)
ROWS_OP_NAME = "nsa_ext_cuda::selection_fwd_rows"      # canonical rows + selection_fwd in one
CANONICAL_OP_NAME = "nsa_ext_cuda::canonical_blocks"   # S <= CANONICAL_MAX_SELECTED
CANONICAL_MAX_SELECTED = 32
UNION_OP_NAME = "nsa_ext_cuda::tile_union"            # the tile schedule's unions, one launch
UNION_MAX_WIDTH = 4096                                 # tokens_per_tile * S it takes
AUTO_OP_NAME = "nsa_ext_cuda::selection_fwd_auto"      # row or tile, chosen on the device
_PACKAGE_DIR = Path(__file__).resolve().parent
_HOW_TO_BUILD = ("build it with CUDA_HOME=/path/to/cuda pip install --no-build-isolation -v . "
                 "(see the build knobs in setup.py)")


@dataclass(frozen=True)
class _LoadResult:
    module: Optional[object]
    reason: Optional[str]
    info: dict = field(default_factory=dict)


def _compiled_files() -> list:
    return sorted(p.name for p in _PACKAGE_DIR.glob("_C*.so")) + \
        sorted(p.name for p in _PACKAGE_DIR.glob("_C*.pyd"))


def _import_compiled():
    """Import nsa_ext._C: the pybind11 module, or (built without Python's headers) the plain
    Torch library through torch.ops.load_library. Raises what the import raised."""
    try:
        return importlib.import_module("nsa_ext._C")
    except ImportError as err:
        files = _compiled_files()
        if not files or "module export function" not in str(err):
            raise
        torch.ops.load_library(str(_PACKAGE_DIR / files[0]))
        return files[0]


def _failure(err: BaseException, files) -> str:
    text = f"{type(err).__name__}: {err}"
    if "undefined symbol" in text or "version" in text.lower():
        return (f"nsa_ext._C was built for another torch than the one running "
                f"({torch.__version__}): {text}; rebuild it: {_HOW_TO_BUILD}")
    return f"nsa_ext._C failed to load: {text}"


@functools.lru_cache(maxsize=None)
def _load() -> _LoadResult:
    if torch.version.cuda is None:
        return _LoadResult(None, f"this torch ({torch.__version__}) is built without CUDA")
    files = _compiled_files()
    if not files:
        why = f"the CUDA extension nsa_ext._C is not built (pure-Python install); {_HOW_TO_BUILD}"
        if torch.cuda.is_available():
            # pip hides what setup.py printed; on a GPU machine say it once here too.
            logger.warning("nsa_ext: %s. The Triton and packed-SDPA backends still work.", why)
        return _LoadResult(None, why)
    try:
        module = _import_compiled()
        info = json.loads(torch.ops.nsa_ext_cuda.build_info())
    except Exception as err:  # ImportError, OSError, or a static initialiser's exception
        why = _failure(err, files)
        logger.warning("nsa_ext: the CUDA extension exists (%s) but cannot be loaded: %s",
                       ", ".join(files), why)
        return _LoadResult(None, why)
    info["head_dims"] = [tuple(pair) for pair in info.get("head_dims", [])]
    info["torch_runtime"] = torch.__version__
    built = str(info.get("torch_version", ""))
    if built and built.split("+")[0].split(".")[:2] != torch.__version__.split("+")[0].split(".")[:2]:
        why = (f"nsa_ext._C was built against torch {built} but torch {torch.__version__} is "
               f"running; rebuild it: {_HOW_TO_BUILD}")
        logger.warning("nsa_ext: %s", why)
        return _LoadResult(None, why, info)
    _register_fake(info)
    return _LoadResult(module, None, info)


def available() -> bool:
    """True when nsa_ext._C is loaded and its operator registered."""
    return _load().module is not None


def unavailable_reason() -> Optional[str]:
    """Why the extension cannot be used, or None when it can."""
    return _load().reason


def build_info() -> dict:
    """What the extension was built with: `archs` (e.g. ["8.0", "9.0"]), `torch_version`,
    `cuda_version`, `head_dims`, `block_sizes`, ...; {} when it is not loaded."""
    return dict(_load().info)


def has_tile_union() -> bool:
    """Does the loaded extension have `tile_union` (builds before it do not)?"""
    result = _load()
    return result.module is not None and bool(result.info.get("tile_union"))


def has_fwd_auto() -> bool:
    """Does the loaded extension have `selection_fwd_auto` (builds before it do not)?"""
    result = _load()
    return result.module is not None and bool(result.info.get("fwd_auto"))


def direct_auto():
    """The pybind11 module's `selection_fwd_auto` (see direct_rows), or None."""
    module = _load().module
    return getattr(module, "selection_fwd_auto", None) if not isinstance(module, str) else None


def direct_rows():
    """The pybind11 module's `selection_fwd_rows` (the operator's C++ function without the
    dispatcher), or None where the module has none (built without Python's headers, or an
    older build). Only plain eager calls may use it: it serves no autograd, tracing or modes."""
    module = _load().module
    return getattr(module, "selection_fwd_rows", None) if not isinstance(module, str) else None


def compiled_archs() -> list:
    """["8.0", "9.0+PTX", ...] as the build was told; [] without the extension."""
    return list(build_info().get("archs", []))


def _register_fake(info: dict) -> None:
    # Shapes only; the same for every device. Used by torch.compile, opcheck and meta tensors.
    @torch.library.register_fake(OP_NAME)
    def _selection_fwd_fake(q, k, v, blocks, num_blocks, pos, k_offset, block_size, scale,
                            num_splits=1):
        # num_splits changes only the kernels' schedule (and a private workspace), not the outputs.
        B, TQ, HQ, _ = q.shape
        o = q.new_empty((B, TQ, HQ, v.shape[3]))
        lse = q.new_empty((B, TQ, HQ), dtype=torch.float32)
        return o, lse

    @torch.library.register_fake(TILE_OP_NAME)
    def _selection_fwd_tile_fake(q, k, v, blocks, num_blocks, pos, k_offset, union_starts,
                                 union_counts, tokens_per_tile, block_size, scale, max_ctas=0):
        B, TQ, HQ, _ = q.shape
        return (q.new_empty((B, TQ, HQ, v.shape[3])),
                q.new_empty((B, TQ, HQ), dtype=torch.float32))

    @torch.library.register_fake(ROWS_OP_NAME)
    def _selection_fwd_rows_fake(q, k, v, block_indices, block_counts, count_limit, pos, k_offset,
                                 block_size, scale, num_splits=1):
        B, TQ, HQ, _ = q.shape
        return (q.new_empty((B, TQ, HQ, v.shape[3])),
                q.new_empty((B, TQ, HQ), dtype=torch.float32))

    if info.get("tile_union"):      # builds before it lack the operator
        @torch.library.register_fake(UNION_OP_NAME)
        def _tile_union_fake(blocks, k_offset, block_size, tokens_per_tile, totals=None):
            B, TQ, H, S = blocks.shape
            NT = -(-TQ // tokens_per_tile)
            return (blocks.new_empty((B, NT, H, tokens_per_tile * S), dtype=torch.int64),
                    blocks.new_empty((B, NT, H), dtype=torch.int32))

    if info.get("fwd_auto"):
        @torch.library.register_fake(AUTO_OP_NAME)
        def _selection_fwd_auto_fake(q, k, v, block_indices, block_counts, count_limit, pos,
                                     k_offset, block_size, scale, tile_max_union_pct,
                                     max_ctas=0):
            B, TQ, HQ, _ = q.shape
            return (q.new_empty((B, TQ, HQ, v.shape[3])),
                    q.new_empty((B, TQ, HQ), dtype=torch.float32))

    @torch.library.register_fake(CANONICAL_OP_NAME)
    def _canonical_blocks_fake(block_indices, pos, block_counts, count_limit, block_size):
        blocks = block_indices.new_empty(block_indices.shape, dtype=torch.int32)
        return blocks, block_indices.new_empty(block_indices.shape[:3], dtype=torch.int32)
