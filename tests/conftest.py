import faulthandler
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import import_triton_for_the_interpreter  # noqa: E402

# Before any test module imports Triton: on a CPU machine, Triton must come up able to interpret.
TRITON_INTERPRETER = import_triton_for_the_interpreter()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "big_memory: needs most of a GPU's memory (run apart "
                            "from other GPU tests)")


# The GPU suite outgrew one 600 s device call (twenty-fourth session), so a run can be taken in
# parts: NSA_TEST_TIMES=FILE appends "seconds<TAB>test id" for every GPU test that ends (kept
# by a run its limit killed), and NSA_TEST_SKIP_DONE=FILE deselects the tests listed in such a
# file: the next call runs what the last one did not reach (scripts/device_verify.sh, tests_rest).
# On a GPU, the tests run longest first, by the times in NSA_TEST_ORDER (default
# tests/gpu_test_times.txt, a NSA_TEST_TIMES list of an earlier run, where present; tests it does
# not list take its median): xdist's workers then end together instead of one worker starting a
# test of minutes near the end.
TIMES_FILE = os.environ.get("NSA_TEST_TIMES")
SKIP_DONE_FILE = os.environ.get("NSA_TEST_SKIP_DONE")
ORDER_FILE = Path(os.environ.get("NSA_TEST_ORDER", Path(__file__).parent / "gpu_test_times.txt"))


def _read_times(path):
    """{test id: seconds} of a NSA_TEST_TIMES list (the last entry of a test wins)."""
    times = {}
    with open(path) as f:
        for line in f:
            seconds, sep, nodeid = line.rstrip("\n").partition("\t")
            if sep:
                times[nodeid] = float(seconds)
    return times


def pytest_collection_modifyitems(config, items):
    if SKIP_DONE_FILE:
        done = _read_times(SKIP_DONE_FILE)
        config.hook.pytest_deselected(items=[i for i in items if i.nodeid in done])
        items[:] = [i for i in items if i.nodeid not in done]
    if torch.cuda.is_available():
        if ORDER_FILE.is_file():
            times = _read_times(ORDER_FILE)
            if times:
                median = sorted(times.values())[len(times) // 2]
                items.sort(key=lambda i: -times.get(i.nodeid, median))   # stable: ties keep order
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


# A GPU test that runs past NSA_TEST_HANG_S seconds (default 400; 0: off) is taken as hung: every
# thread's Python stack goes to its file in NSA_TEST_HANG_DIR (default <tmp>/nsa_ext_hangs) and
# the process exits, so that the run reports the test (under xdist as a crashed worker, which is
# replaced) instead of stalling until the device call's limit kills it whole; a kernel that
# never finishes cannot be interrupted from Python. Each GPU test's file names it and is removed
# when it ends: the files left after a run that was stopped are the tests it was running.
# (Twenty-fourth session: the last tests of the GPU suite, under 16 xdist workers that compile
# Triton kernels side by side, took minutes each, and three runs ended at their limit with them
# unreported; whether one of them hung could not be told.)
HANG_S = float(os.environ.get("NSA_TEST_HANG_S", "400"))
# Outside a GPU test SIGUSR1 does nothing (by default it would end the process): the pytest
# process that runs xdist's workers must outlive the signal until they have written their stacks.
if hasattr(signal, "SIGUSR1"):
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
HANG_DIR = Path(os.environ.get("NSA_TEST_HANG_DIR", Path(tempfile.gettempdir()) / "nsa_ext_hangs"))


@pytest.fixture(autouse=True)
def _gpu_test_watch(request):
    """A GPU test's hang watchdog (HANG_S) and its line in TIMES_FILE."""
    if "gpu" not in request.keywords or not torch.cuda.is_available():
        yield
        return
    start = time.perf_counter()
    path = None
    if HANG_S > 0:
        HANG_DIR.mkdir(parents=True, exist_ok=True)
        path = HANG_DIR / f"hang_{os.getpid()}_{os.urandom(4).hex()}.log"
        log = open(path, "w")
        log.write(f"{request.node.nodeid}: started {time.strftime('%H:%M:%S')} "
                  f"(limit {HANG_S:g} s)\n")
        log.flush()
        faulthandler.dump_traceback_later(HANG_S, exit=True, file=log)
        # SIGUSR1 (scripts/device_verify.sh sends it to the run just before its limit kills it):
        # the stacks of a test the limit stops, which HANG_S has not reached.
        if hasattr(signal, "SIGUSR1"):
            faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
        common.PROGRESS.update(file=log, start=start)
    yield
    if path is not None:
        common.PROGRESS.update(file=None)
        if hasattr(signal, "SIGUSR1"):
            faulthandler.unregister(signal.SIGUSR1)
        faulthandler.cancel_dump_traceback_later()
        log.close()
        path.unlink(missing_ok=True)
    if TIMES_FILE:
        with open(TIMES_FILE, "a") as f:
            f.write(f"{time.perf_counter() - start:.1f}\t{request.node.nodeid}\n")
