import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import import_triton_for_the_interpreter  # noqa: E402

# Before any test module imports Triton: on a CPU machine, Triton must come up able to interpret.
TRITON_INTERPRETER = import_triton_for_the_interpreter()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "big_memory: needs most of a GPU's memory (run apart "
                            "from other GPU tests)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def _release_cached_cuda_memory(request):
    """After a GPU test, the worker hands its cached-but-free CUDA memory back to the driver.
    Under xdist every worker's caching allocator otherwise keeps the peak of the largest test it
    ran, and sixteen such reserves beside one heavy test ran an H200 out of memory (seventeenth
    session, notes/hopper.md)."""
    yield
    if "gpu" in request.keywords and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
