#!/usr/bin/env bash
# One device call for issue 14: install the fla-core wheel (when .whl/ holds it), build the package
# with its CUDA extension, then
#   1. bench/eager_bench.py --stages: eager and host us per call (decode B=1 TK=64k, chunk TQ=512
#      TK=32k; auto, triton, cuda, fla's parallel_nsa_fwd) and the host breakdown per stage;
#   2. the GPU tests of the named-backend and fla-layer work (test_dispatch, test_eager,
#      test_fla_nsa, test_decode_graph);
#   3. examples/fla_nsa.py: both whole NSA layers, forward and forward+backward, T = 8k and 32k.
# Everything lands in $OUT (default bench/results/eager): build.log, eager.txt, eager.json,
# tests.txt, fla_nsa.txt.
#
#   LIMIT=540 bash bench/eager_device.sh          # STEPS="eager tests fla" (default: all three)
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-540}
STEPS=${STEPS:-eager tests fla}
OUT=${OUT:-bench/results/eager}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
start=$SECONDS
left() { echo $((LIMIT - (SECONDS - start))); }
export PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv
  if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/fla ]; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && echo "fla-core wheel installed into /tmp/site"
  fi
  MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    timeout $(( $(left) / 2 )) $PYTHON -m pip install --no-build-isolation --no-deps -e .
  echo "build exit $?"
  $PYTHON -m nsa_ext.info
} > "$OUT/build.log" 2>&1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
grep -m1 "build exit" "$OUT/build.log"; grep -A3 '"cuda_extension"' "$OUT/build.log" | head -n 4

for step in $STEPS; do
  echo "== $step ($(left) s left)"
  case $step in
    eager) timeout $(( $(left) - 10 )) $PYTHON bench/eager_bench.py --stages --out "$OUT/eager.json" \
             2>&1 | tee "$OUT/eager.txt" ;;
    tests) timeout $(( $(left) - 10 )) $PYTHON -m pytest -q -p no:cacheprovider tests/test_dispatch.py \
             tests/test_eager.py tests/test_fla_nsa.py tests/test_decode_graph.py 2>&1 \
             | tee "$OUT/tests.txt" | tail -n 15 ;;
    fla) timeout $(( $(left) - 5 )) $PYTHON examples/fla_nsa.py 2>&1 | tee "$OUT/fla_nsa.txt" ;;
  esac
done
echo "done after $((SECONDS - start)) s"
