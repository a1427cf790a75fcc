#!/usr/bin/env bash
# Prepare a Python with torch and nsa_ext (its CUDA extension too where nvcc exists), then print
# that Python's path on the last line. Sourced by scripts/test.sh and scripts/bench.sh.
#
#   - A python3 that already has torch (a GPU image, a conda env): used as it is.
#   - Otherwise a virtual environment in .venv with torch ($TORCH_SPEC, default torch==2.14.1).
#   - The package is installed editable with `pip install --no-build-isolation -e .`, again only
#     when setup.py, CMakeLists.txt or csrc/ changed since the last install.
# Knobs: NSA_PYTHON (use this interpreter), TORCH_SPEC, NSA_EXT_SKIP_CUDA_BUILD=1 (pure Python),
# and setup.py's build variables (TORCH_CUDA_ARCH_LIST, MAX_JOBS, NVCC_THREADS).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

log() { echo "[setup] $*" >&2; }

if [ -n "${NSA_PYTHON:-}" ]; then
  PY=$NSA_PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
elif python3 -c "import torch" >/dev/null 2>&1; then
  PY=$(command -v python3)
  log "using $PY, which already has torch"
else
  log "creating .venv"
  python3 -m venv .venv
  PY=.venv/bin/python
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  log "installing ${TORCH_SPEC:-torch==2.14.1} (from the local wheel cache where there is one)"
  "$PY" -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.14.1}"
fi
missing=$("$PY" - <<'PY'
import importlib.util
need = {"yaml": "pyyaml", "pytest": "pytest", "numpy": "numpy", "ninja": "ninja",
        "cmake": "cmake", "pybind11": "pybind11"}
missing = [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]
# (Python 3.11's venv has setuptools 65 without the `wheel` package: build_backend.py packs the
# wheel itself there.)
print(" ".join(missing))
PY
)
if [ -n "$missing" ]; then
  log "installing $missing"
  "$PY" -m pip install -q --disable-pip-version-check $missing
fi

# The environment's own cmake and ninja (pip packages) come before the system's: an old system
# CMake does not know nvcc's C++20 dialect.
PATH="$(dirname "$PY"):$PATH"
export PATH

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

stamp_file=$("$PY" -c "import sys; print(sys.prefix)")/.nsa_ext_build_stamp
stamp=$( (cat setup.py build_backend.py CMakeLists.txt pyproject.toml 2>/dev/null; find csrc -type f -print0 2>/dev/null \
          | sort -z | xargs -0 cat 2>/dev/null; echo "${NSA_EXT_SKIP_CUDA_BUILD:-}${TORCH_CUDA_ARCH_LIST:-}") \
        | sha256sum | cut -c1-16)
installed_here=$("$PY" -c "import nsa_ext, os; print(os.path.dirname(nsa_ext.__file__))" 2>/dev/null || true)
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ] || [ "$installed_here" != "$ROOT/nsa_ext" ]; then
  log "installing nsa_ext (pip install --no-build-isolation -e .)"
  "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >&2
  echo "$stamp" > "$stamp_file"
fi
echo "$PY"
