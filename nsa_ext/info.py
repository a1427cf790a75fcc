"""What this installation has: versions, the compiled extension, Triton, the settings.

`python -m nsa_ext.info` prints it."""
from __future__ import annotations

import json
from dataclasses import asdict

import torch

from .config import load_settings
from .device import device_facts


def _triton_status() -> dict:
    try:
        import triton
    except Exception as err:  # ImportError, or a broken install
        return {"importable": False, "reason": f"{type(err).__name__}: {err}"}
    return {"importable": True, "version": triton.__version__}


def _extension_status() -> dict:
    try:
        from . import _ext
    except ImportError as err:
        return {"built": False, "reason": f"nsa_ext._ext missing: {err}"}
    if _ext.available():
        # eager_direct_entry: the pybind11 entry the eager plans call (built with Python's
        # headers and libtorch_python; without it they take the operator).
        return {"built": True, **_ext.build_info(),
                "eager_direct_entry": _ext.direct_rows() is not None}
    return {"built": False, "reason": _ext.unavailable_reason()}


def backend_info() -> dict:
    from . import __version__

    info = {
        "nsa_ext": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": _triton_status(),
        "cuda_extension": _extension_status(),
        "settings": {k: v for k, v in asdict(load_settings()).items()},
    }
    if torch.cuda.is_available():
        info["device"] = device_facts(torch.device("cuda")).describe()
    return info


def short_line(info: dict) -> str:
    ext = info["cuda_extension"]
    ext_text = "built" if ext.get("built") else f"not built ({ext.get('reason')})"
    tri = info["triton"]
    tri_text = tri.get("version") if tri.get("importable") else "not importable"
    return (f"nsa_ext {info['nsa_ext']} | torch {info['torch']} (CUDA {info['torch_cuda']}) | "
            f"triton {tri_text} | CUDA extension {ext_text} | device {info.get('device', 'cpu')}")


if __name__ == "__main__":
    import sys

    info = backend_info()
    print(short_line(info) if "--short" in sys.argv else json.dumps(info, indent=2, default=str))
