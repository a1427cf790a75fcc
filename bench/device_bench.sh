#!/usr/bin/env bash
# One device call, end to end, inside a wall-clock limit: install the fla-core wheel (when
# .whl/ holds it), build the package with its CUDA extension, run the selection bench, then the
# threshold optimizer (--dry-run: the decision is applied on the developer's checkout with
#   python bench/threshold_optimizer.py --apply-json <OUT>/thresholds_<arch>.json).
# Everything lands in $OUT (default bench/results/device): build.log, bench_selection.*,
# threshold_optimizer.txt, thresholds_<arch>.json.
#
#   LIMIT=470 OPT_S=100 bash bench/device_bench.sh [extra bench arguments]
# OPT_S=0 skips the optimizer; MARGIN_S (default 60) is kept for the bench's last row and files.
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-470}          # seconds for this whole script
OPT_S=${OPT_S:-100}          # seconds kept for the threshold optimizer
OUT=${OUT:-bench/results/device}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
start=$SECONDS
left() { echo $((LIMIT - (SECONDS - start))); }
export PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv
  if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/fla ]; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && echo "fla-core wheel installed into /tmp/site"
  fi
} > "$OUT/build.log" 2>&1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}

echo "== build ($(left) s left)"
MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  timeout $(( $(left) - OPT_S - 120 )) $PYTHON -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1
echo "build exit $? after $((SECONDS - start)) s"
tail -n 3 "$OUT/build.log"
$PYTHON -m nsa_ext.info >> "$OUT/build.log" 2>&1
grep -A3 '"cuda_extension"' "$OUT/build.log" | head -n 4

budget=$(( $(left) - OPT_S - ${MARGIN_S:-60} ))
echo "== bench (budget $budget s, $(left) s left)"
timeout $(( $(left) - OPT_S )) $PYTHON bench/bench_selection.py --out "$OUT" --no-progress --budget-s "$budget" "$@"
echo "bench exit $? after $((SECONDS - start)) s"

if [ "$OPT_S" -le 0 ]; then exit 0; fi
echo "== threshold optimizer ($(left) s left)"
timeout $(( $(left) - 5 )) $PYTHON bench/threshold_optimizer.py --dry-run --budget-s $(( $(left) - 45 )) \
  --json-out "$OUT/thresholds_sm90.json" 2>/dev/null | tee "$OUT/threshold_optimizer.txt"
echo "optimizer exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
