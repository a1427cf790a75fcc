#!/usr/bin/env bash
# One device call that checks the package on a GPU machine: build (with the CUDA extension),
# the GPU-marked tests, and compute-sanitizer over the messy-call scripts. Logs land in $OUT
# (default bench/results/verify). STEPS picks the parts (default build,tests,sanitize; also
# `eager`: bench/eager_bench.py --stages, `fla`: examples/fla_nsa.py (fla's whole NSA layer with and
# without nsa_ext's selection, T = 8k and 32k), and `tile`: the tile schedules' bench rows beside fla,
# the floors, notes/hopper.md; `profile`: Nsight Compute on one CUDA tile-kernel call; `compare`: another
# source tree, COMPARE_TREE (e.g. `git worktree add .trees/x branch`, carried to the device), built and
# run in the same call -- its Hopper tests and its tile rows beside this tree's triton-tile -- then this
# tree rebuilt: an A/B of a kernel variant with the same anchors);
# PYTEST_N (default 12) xdist workers; PYTEST_LIMIT (default none) seconds per pytest run, after
# which pytest and its xdist workers are killed (a `timeout` alone kills pytest and leaves the
# workers on the GPU, where they made the next device call's tests run out of memory);
# SAN_LIMIT (default 150) seconds per sanitizer run. `tests` runs both halves of the GPU suite;
# `tests_small` and `tests_big` run one each, `tests_rest` what a stopped `tests_small` did not
# reach (the whole suite and the sanitizer do not fit one 600 s device call); `focus` the tests
# FOCUS names, alone, with Triton's autotuning lines (a test that runs for minutes: where).
#   STEPS=build,tests bash scripts/device_verify.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/verify}
STEPS=${STEPS:-build,tests,sanitize}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)     # absolute: the compare step runs in another tree
export PYTHONUNBUFFERED=1
has() { case ",$STEPS," in *",$1,"*) return 0;; esac; return 1; }
status=0
fail() { echo "!! $1 failed (exit $2)"; [ "$status" -ne 0 ] || status=$2; }
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/fla ]; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if has build; then
  t0=$SECONDS
  MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    $PYTHON -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || fail build $?
  echo "build: $((SECONDS - t0)) s"; tail -n 2 "$OUT/build.log"
  $PYTHON -m nsa_ext.info > "$OUT/info.json" 2>&1; grep -A2 '"cuda_extension"' "$OUT/info.json" | head -3
fi
# pytest "$@", within PYTEST_LIMIT seconds if set: in a process group of its own (setsid), which
# is killed whole at the limit and after pytest returns, so that no xdist worker outlives it.
limited_pytest() {
  if [ -z "${PYTEST_LIMIT:-}" ]; then
    $PYTHON -m pytest "$@"
    return
  fi
  setsid $PYTHON -m pytest "$@" &
  local pid=$! rc=0
  # At the limit: SIGUSR1 first (tests/conftest.py: each running GPU test writes its stacks into
  # its file in NSA_TEST_HANG_DIR), then the kill.
  ( trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    sleep "$PYTEST_LIMIT" & nap=$!
    wait "$nap" && { kill -USR1 -- "-$pid" 2>/dev/null; sleep 3; kill -9 -- "-$pid" 2>/dev/null; } ) &
  local watchdog=$!
  wait "$pid" || rc=$?
  kill "$watchdog" 2>/dev/null
  kill -9 -- "-$pid" 2>/dev/null
  return $rc
}
# tests/conftest.py keeps a file here for each GPU test while it runs (its id; the steps it
# logged; its Python stacks if it passes NSA_TEST_HANG_S, when its process ends, or when a run's
# limit stops it): gathered into $OUT/hangs.log after each
# pytest run -- hung tests, and those a run's limit stopped.
export NSA_TEST_HANG_DIR=${NSA_TEST_HANG_DIR:-/tmp/nsa_ext_hangs}
rm -rf "$NSA_TEST_HANG_DIR"
report_hangs() {
  ls "$NSA_TEST_HANG_DIR"/*.log >/dev/null 2>&1 || return 0
  for f in "$NSA_TEST_HANG_DIR"/*.log; do
    if grep -q "^Timeout (" "$f"; then echo "!! hung: $(head -n 1 "$f")"
    else echo "!! stopped by the limit: $(head -n 1 "$f")"; fi
    grep "^  +" "$f" | tail -n 4     # its last steps (tests/common.py's progress)
    cat "$f" >> "$OUT/hangs.log"; rm -f "$f"
  done
}
# Each GPU test that ends is listed in $OUT/test_times.txt (seconds, id). `tests_rest` runs the
# GPU tests (not big-memory) that are not listed in TESTS_DONE (default .test_times_done.txt in
# the tree: the last call's test_times.txt, copied there and carried): a suite that its limit
# stopped is finished by the next call.
export NSA_TEST_TIMES="$OUT/test_times.txt"
run_small=0
if has tests || has tests_small; then run_small=1; fi
if has tests_rest; then
  export NSA_TEST_SKIP_DONE=${TESTS_DONE:-.test_times_done.txt}
  if [ -f "$NSA_TEST_SKIP_DONE" ]; then
    run_small=1
    echo "tests_rest: $(wc -l < "$NSA_TEST_SKIP_DONE") tests already run ($NSA_TEST_SKIP_DONE)"
  else
    fail "tests_rest (no list $NSA_TEST_SKIP_DONE: copy the last call's test_times.txt there and carry it)" 2
  fi
fi
if [ "$run_small" = 1 ]; then
  t0=$SECONDS
  # Tests that fill most of the GPU's memory run alone after the others (16 workers beside a
  # 64 GiB test ran out of memory).
  # worksteal (pytest-xdist >= 3.2): an idle worker takes queued tests from a busy one. Under the
  # default load scheduling two runs stopped at their 470 / 480 s limits with 54 tests unreported,
  # queued behind tests that take minutes; with worksteal, 2 (twenty-fourth session).
  dist=$($PYTHON -c "import xdist; v = tuple(int(x) for x in xdist.__version__.split('.')[:2]); print('worksteal' if v >= (3, 2) else 'load')" 2>/dev/null || echo load)
  limited_pytest -m "gpu and not big_memory" -q -rfs -p no:cacheprovider -n "${PYTEST_N:-12}" \
    --dist "$dist" --durations=25 ${PYTEST_ARGS:-} tests > "$OUT/pytest_gpu.log" 2>&1 || fail tests $?
  echo "tests: $((SECONDS - t0)) s"; tail -n 15 "$OUT/pytest_gpu.log"; report_hangs
fi
if has tests || has tests_big; then
  t0=$SECONDS
  limited_pytest -m "gpu and big_memory" -q -rfs -p no:cacheprovider ${PYTEST_ARGS:-} tests \
    > "$OUT/pytest_gpu_big.log" 2>&1 || fail "big-memory tests" $?
  echo "big-memory tests: $((SECONDS - t0)) s"; tail -n 8 "$OUT/pytest_gpu_big.log"; report_hangs
fi
unset NSA_TEST_SKIP_DONE
if has focus; then   # FOCUS (test ids, space-separated) alone: no xdist, their output and Triton's
  t0=$SECONDS        # autotuning lines shown (-s), their steps and stacks in hangs.log if stopped
  if [ -z "${FOCUS:-}" ]; then
    fail "focus (set FOCUS to the test ids)" 2
  else
    ( export TRITON_PRINT_AUTOTUNING=1
      limited_pytest -s -q -rfs -p no:cacheprovider --durations=10 $FOCUS > "$OUT/pytest_focus.log" 2>&1 ) \
      || fail focus $?
    echo "focus: $((SECONDS - t0)) s"; grep -E "passed|failed|error" "$OUT/pytest_focus.log" | tail -n 3
    report_hangs
  fi
fi
if has sanitize; then
  for run in "memcheck sanitize_backward.py" "racecheck sanitize_backward.py --small" \
             "memcheck sanitize_schedules.py" "racecheck sanitize_schedules.py --small" \
             "memcheck sanitize_cuda.py" "racecheck sanitize_cuda.py --small"; do
    set -- $run; tool=$1; shift
    log="$OUT/sanitize_${tool}_${1%.py}.log"
    t0=$SECONDS
    timeout "${SAN_LIMIT:-150}" compute-sanitizer --tool "$tool" --target-processes all \
      $PYTHON "scripts/$@" > "$log" 2>&1 || fail "$tool $*" $?
    echo "$tool $*: $((SECONDS - t0)) s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|all ok|FAILED' "$log" | tr '\n' ' ')"
  done
fi
if has eager; then
  $PYTHON bench/eager_bench.py --stages --out "$OUT/eager.json" > "$OUT/eager.txt" 2>&1 \
    || fail eager $?
  head -n 14 "$OUT/eager.txt"
fi
if has fla; then     # fla's whole NSA layer beside the same layer with nsa_ext's selection
  $PYTHON examples/fla_nsa.py > "$OUT/fla_nsa.txt" 2>&1 || fail fla $?
  tail -n 12 "$OUT/fla_nsa.txt"
fi
if has profile; then  # Nsight Compute on one CUDA tile-kernel call (notes/hopper.md): stall reasons per SASS line
  ncu --nvtx --nvtx-include "profiled/" --set full --import-source yes -f -o "$OUT/tile_cuda" \
    $PYTHON scripts/profile_tile.py --backend cuda > "$OUT/profile.log" 2>&1 || fail profile $?
  ncu -i "$OUT/tile_cuda.ncu-rep" --page details > "$OUT/tile_cuda_details.txt" 2>&1
  ncu -i "$OUT/tile_cuda.ncu-rep" --page source --print-source sass --csv > "$OUT/tile_cuda_sass.csv" 2>&1
  grep -E "median|Warp Cycles Per Issued|Issue Slots Busy|Achieved Occupancy|Stall" "$OUT/profile.log" \
    "$OUT/tile_cuda_details.txt" | head -n 30
fi
if has tile; then
  $PYTHON bench/bench_selection.py --cases prefill,groups --patterns model,clustered,random \
    --backends fla,floor/row,floor/tile,nsa:auto,nsa:triton,nsa:triton-row,nsa:triton-tile,nsa:cuda,nsa:cuda-row,nsa:cuda-tile \
    --no-progress --out "$OUT/tile" > "$OUT/tile.log" 2>&1 || fail tile $?
  tail -n 40 "$OUT/tile.log"
fi
if has compare; then
  tree=$(cd "${COMPARE_TREE:?compare: set COMPARE_TREE to another source tree}" && pwd)
  build() {   # build (editable install) the tree in $1, log to $2
    (cd "$1" && MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
      $PYTHON -m pip install --no-build-isolation --no-deps -e . > "$2" 2>&1)
  }
  t0=$SECONDS
  build "$tree" "$OUT/compare_build.log" || fail "compare build" $?
  echo "compare: $tree built in $((SECONDS - t0)) s"
  (cd "$tree" && PYTHONPATH=/tmp/site:$tree $PYTHON -m pytest -m gpu -q -p no:cacheprovider \
    -n "${PYTEST_N:-12}" tests/test_cuda_hopper.py > "$OUT/compare_pytest.log" 2>&1) \
    || fail "compare tests" $?
  tail -n 3 "$OUT/compare_pytest.log"
  (cd "$tree" && PYTHONPATH=/tmp/site:$tree $PYTHON bench/bench_selection.py --cases prefill,groups \
    --patterns model,clustered,random --backends nsa:triton-tile,nsa:cuda-tile --no-progress \
    --out "$OUT/compare_tile" > "$OUT/compare_tile.log" 2>&1) || fail "compare tile" $?
  tail -n 30 "$OUT/compare_tile.log"
  build "$PWD" "$OUT/rebuild.log" || fail "rebuild of this tree" $?
fi
echo "device_verify: exit $status"
exit "$status"
