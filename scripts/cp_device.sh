#!/usr/bin/env bash
# Context parallelism on one host with 2 GPUs (the 2xH200 device machine), one command:
#   1. tests/test_distributed.py (gloo on the CPU, then NCCL on 2 GPUs);
#   2. bench/cp_bench.py: weak scaling, 2 GPUs on 2T vs 1 GPU on T, T = 128k and 256k,
#      forward and forward+backward, with all-gather / kernel / reduce-scatter times;
#   3. the longest sequence that trains, on 2 GPUs and on 1, with peak memory per rank: one
#      launch per length (a rank out of memory would leave the other waiting in a collective),
#      doubling until a launch fails.
# NVLink multicast stays off, as that machine sets it, in every process started here.
# Every step runs even when an earlier one fails; the exit status is the first failure's.
#
# Knobs: PYTHON (default python3), NSA_CP_OUT (default bench/results/cp), NSA_CP_STEPS (which of
# "tests scaling length" to run, default all three: one call each where a command's time is
# capped), NSA_CP_LENGTHS (tokens per GPU tried for the length limit, default
# "524288 1048576 2097152 4194304"), NSA_CP_LAUNCH_TIMEOUT (seconds per length launch, default
# 600). Cap the time with NSA_CP_LAUNCH_TIMEOUT, not with a `timeout` around this script: bash
# does not pass the signal on to a running launch, whose ranks then keep their GPU memory (seen:
# two ranks holding 129 GiB each after the script was killed).
# Each length launch's whole output, with rank 0's progress lines, is kept in
# $NSA_CP_OUT/length_*.log.
# The package is installed pure-Python (NSA_EXT_SKIP_CUDA_BUILD=1) when it is not importable:
# backend="auto" takes the Triton kernels on SM 9.0, so the extension's build is not needed here.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${NSA_CP_OUT:-bench/results/cp}
LENGTHS=${NSA_CP_LENGTHS:-524288 1048576 2097152 4194304}
LAUNCH_TIMEOUT=${NSA_CP_LAUNCH_TIMEOUT:-600}
STEPS=" ${NSA_CP_STEPS:-tests scaling length} "
wants() { [[ "$STEPS" == *" $1 "* ]]; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"
status=0
step() { echo; echo "== $1 ($(date -u +%H:%M:%S) UTC)"; }
fail() { echo "!! $1 failed (exit $2)"; [ "$status" -ne 0 ] || status=$2; }
RUN="$PYTHON -m torch.distributed.run --standalone"

step "GPUs"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || fail "nvidia-smi" $?
if ! $PYTHON -c "import nsa_ext" 2>/dev/null; then
  NSA_EXT_SKIP_CUDA_BUILD=1 $PYTHON -m pip install -q --no-build-isolation -e . || fail "install" $?
fi

if wants tests; then
  step "tests/test_distributed.py"
  $PYTHON -m pytest -q -p no:cacheprovider tests/test_distributed.py 2>&1 | tee "$OUT/tests.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || fail "tests" 1
fi

if wants scaling; then
  step "weak scaling"
  $RUN --nproc_per_node=2 bench/cp_bench.py --T 131072 262144 --out "$OUT/weak_scaling.json" \
    2>&1 | tee "$OUT/weak_scaling.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || fail "weak scaling" 1
fi
wants length || exit "$status"

step "longest training sequence, 2 GPUs (tokens per GPU; the sequence has twice as many)"
for T in $LENGTHS; do
  timeout "$LAUNCH_TIMEOUT" $RUN --nproc_per_node=2 bench/cp_bench.py --T "$T" --modes train --no-baseline \
    --no-parts --iters 2 --warmup 1 --out "$OUT/length_2gpu_$T.json" 2>&1 \
    | tee "$OUT/length_2gpu_$T.log" | grep -E '^[#|]|Error|^\[cp_bench' \
    || { echo "2 GPUs: $T tokens per GPU did not train"; break; }
  [ -f "$OUT/length_2gpu_$T.json" ] || { echo "2 GPUs: $T tokens per GPU did not train"; break; }
done

step "longest training sequence, 1 GPU"
for T in $LENGTHS; do
  timeout "$LAUNCH_TIMEOUT" $RUN --nproc_per_node=1 bench/cp_bench.py --T "$T" --modes train --only-baseline \
    --iters 2 --warmup 1 --out "$OUT/length_1gpu_$T.json" 2>&1 \
    | tee "$OUT/length_1gpu_$T.log" | grep -E '^[#|]|Error|^\[cp_bench' \
    || { echo "1 GPU: $T tokens did not train"; break; }
  [ -f "$OUT/length_1gpu_$T.json" ] || { echo "1 GPU: $T tokens did not train"; break; }
done
exit "$status"
