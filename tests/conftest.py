import faulthandler
import os
import sys
import tempfile
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



# A GPU test that runs past NSA_TEST_HANG_S seconds (default 240; 0: off) is taken as hung: its
# id and every thread's Python stack are left in NSA_TEST_HANG_DIR (default <tmp>/nsa_ext_hangs,
# one file per hung test; files of tests that end are removed) and the process exits, so that the
# run reports the test (under xdist as a crashed worker, which is replaced) instead of stalling
# until the device call's limit kills it whole. A kernel that never finishes cannot be interrupted
# from Python: only the process's end stops it. (Twenty-fourth session: a decode-shaped random
# call held its xdist worker for minutes, and the suite ran into its limit with tests unreported.)
HANG_S = float(os.environ.get("NSA_TEST_HANG_S", "240"))
HANG_DIR = Path(os.environ.get("NSA_TEST_HANG_DIR", Path(tempfile.gettempdir()) / "nsa_ext_hangs"))


@pytest.fixture(autouse=True)
def _hang_watchdog(request):
    if HANG_S <= 0 or "gpu" not in request.keywords or not torch.cuda.is_available():
        yield
        return
    HANG_DIR.mkdir(parents=True, exist_ok=True)
    path = HANG_DIR / f"hang_{os.getpid()}_{os.urandom(4).hex()}.log"
    with open(path, "w") as log:
        log.write(f"{request.node.nodeid}: still running after {HANG_S:g} s\n")
        log.flush()
        faulthandler.dump_traceback_later(HANG_S, exit=True, file=log)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
    path.unlink(missing_ok=True)
