#!/usr/bin/env bash
# The test command: sets up what it needs (scripts/setup_env.sh), then runs the test suite.
# GPU tests are marked `gpu` and skipped without a CUDA device. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=$(bash scripts/setup_env.sh | tail -n 1)
"$PY" -m nsa_ext.info --short || true
exec "$PY" -m pytest -q -p no:cacheprovider tests "$@"
