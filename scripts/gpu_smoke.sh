#!/usr/bin/env bash
# GPU smoke lane: the one command a GPU machine runs (locally, on the device tool, or from
# .github/workflows/triton-gpu-smoke.yml):
#   1. build and install the package with its CUDA extension, for this GPU's architecture;
#   2. the GPU-marked tests (pytest -m gpu);
#   3. a small bench (bench/bench_selection.py --quick), tables and files under $NSA_SMOKE_OUT.
# Every step runs even when an earlier one fails; the exit status is the first failure's.
#
# Knobs: PYTHON (default python3), NSA_SMOKE_OUT (default bench/results/smoke),
# TORCH_CUDA_ARCH_LIST (default: this GPU's, e.g. 9.0), MAX_JOBS, NSA_SMOKE_SKIP_BUILD=1,
# NSA_SMOKE_PYTEST_ARGS (extra pytest arguments).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${NSA_SMOKE_OUT:-bench/results/smoke}
mkdir -p "$OUT"
status=0
step() { echo; echo "== $1 ($(date -u +%H:%M:%S) UTC)"; }
fail() { echo "!! $1 failed (exit $2)"; [ "$status" -ne 0 ] || status=$2; }

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || fail "nvidia-smi" $?
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PYTHON -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') \
    || { fail "torch sees no CUDA GPU" 1; exit "$status"; }
  export TORCH_CUDA_ARCH_LIST
fi
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-(default)}"

if [ "${NSA_SMOKE_SKIP_BUILD:-0}" != "1" ]; then
  step "build: pip install --no-build-isolation -e ."
  $PYTHON -m pip install --no-build-isolation -e . 2>&1 | tee "$OUT/build.log" | tail -n 20
  rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || fail "build" "$rc"
fi

step "what is built"
$PYTHON -m nsa_ext.info | tee "$OUT/backend_info.json" || fail "nsa_ext.info" $?

step "GPU tests: pytest -m gpu"
# shellcheck disable=SC2086
$PYTHON -m pytest -m gpu -q -rs ${NSA_SMOKE_PYTEST_ARGS:-} tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 40
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || fail "GPU tests" "$rc"

step "bench: bench/bench_selection.py --quick"
$PYTHON bench/bench_selection.py --quick --out "$OUT" --no-progress || fail "bench" $?

step "done: exit $status; files in $OUT"
exit "$status"
