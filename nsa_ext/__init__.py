"""nsa_ext: the selection branch of Native Sparse Attention for PyTorch.

    o = nsa_ext.selection_attention(q, k, v, block_indices, block_size=64)
    print(nsa_ext.explain(q, k, v, block_indices))   # which backend, and why
    nsa_ext.backend_info()                            # what is built and importable here
"""
__version__ = "0.1.0"

from .api import explain, selection_attention  # noqa: E402


def backend_info() -> dict:
    """Versions, whether the CUDA extension is built (and for which archs), Triton, settings."""
    from .info import backend_info as _backend_info  # lazy: `python -m nsa_ext.info` runs it

    return _backend_info()


__all__ = ["selection_attention", "explain", "backend_info", "__version__"]
