#!/usr/bin/env bash
# The main job: the side-by-side bench (on a GPU the full table; on a CPU a small honest run).
# Sets up what it needs first (scripts/setup_env.sh). Extra arguments go to bench_selection.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=$(bash scripts/setup_env.sh | tail -n 1)
exec "$PY" bench/bench_selection.py "$@"
