"""The one place that reads configuration.

Precedence: environment variables > `configs/base.yaml` > the defaults below. The result is a
frozen `Settings` that the dispatcher and the backends receive; nothing else reads `os.environ`.

`configs/base.yaml` is found in the source checkout (editable installs, the repo) or, for an
installed wheel, as the copy `setup.py` packs into `nsa_ext/base.yaml`. `NSA_CONFIG=/path.yaml`
points at another file.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Optional

_PACKAGE_DIR = Path(__file__).resolve().parent
REPO_CONFIG = _PACKAGE_DIR.parent / "configs" / "base.yaml"
PACKAGED_CONFIG = _PACKAGE_DIR / "base.yaml"


class ConfigError(ValueError):
    """A configuration value that cannot be read; the message names its source."""


@dataclass(frozen=True)
class Settings:
    use_triton_sel: bool = True        # NSA_USE_TRITON_SEL
    triton_sel_force: bool = False     # NSA_TRITON_SEL_FORCE: kernel paths on SM 8.9 too
    sel_triton_group: bool = True      # NSA_SEL_TRITON_GROUP: group-centric Triton variant
    sel_schedule: str = "auto"         # NSA_SEL_SCHEDULE: Triton forward schedule (SCHEDULES)
    sel_triton_min_L: int = 0          # NSA_SEL_TRITON_MIN_L: min selected tokens per row, Triton
    sel_cuda_min_L: int = 0            # NSA_SEL_CUDA_MIN_L: same for the CUDA extension
    sdpa_gather_budget_mb: int = 512   # NSA_SDPA_GATHER_BUDGET_MB
    sel_tile_max_ctas: int = 0         # NSA_SEL_TILE_MAX_CTAS: Hopper tile grid cap (0: all fit)
    debug_triton: bool = False         # NSA_DEBUG_TRITON
    debug_log: bool = False            # NSA_DEBUG_LOG
    triton_interpret: bool = False     # TRITON_INTERPRET: Triton runs on the CPU (tests only)
    thresholds: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # per "smXY"
    source: str = "defaults"           # which file the non-env values came from
    from_env: tuple = ()               # the fields an environment variable set

    @property
    def debug(self) -> bool:
        return self.debug_log or self.debug_triton

    def min_len(self, backend: str, arch: Optional[str]) -> int:
        """The selected-length threshold for `backend` ("triton" or "cuda") on `arch` ("sm90")."""
        key = f"sel_{backend}_min_L"
        measured = self.thresholds.get(arch or "", {})
        if key in measured and key not in self.from_env:
            return int(measured[key])
        return int(getattr(self, key))


# (env var, Settings field, parser)
_ENV = (
    ("NSA_USE_TRITON_SEL", "use_triton_sel", "bool"),
    ("NSA_TRITON_SEL_FORCE", "triton_sel_force", "bool"),
    ("NSA_SEL_TRITON_GROUP", "sel_triton_group", "bool"),
    ("NSA_SEL_SCHEDULE", "sel_schedule", "schedule"),
    ("NSA_SEL_TRITON_MIN_L", "sel_triton_min_L", "int"),
    ("NSA_SEL_CUDA_MIN_L", "sel_cuda_min_L", "int"),
    ("NSA_SDPA_GATHER_BUDGET_MB", "sdpa_gather_budget_mb", "int"),
    ("NSA_SEL_TILE_MAX_CTAS", "sel_tile_max_ctas", "int"),
    ("NSA_DEBUG_TRITON", "debug_triton", "bool"),
    ("NSA_DEBUG_LOG", "debug_log", "bool"),
    ("TRITON_INTERPRET", "triton_interpret", "bool"),
)
SCHEDULES = ("auto", "row", "tile", "kv")   # nsa_ext/schedules: the Triton forward schedules
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(value, kind: str, where: str):
    if kind == "schedule":
        text = str(value).strip().lower()
        if text not in SCHEDULES:
            raise ConfigError(f"{where}: expected one of {', '.join(SCHEDULES)}, got {value!r}")
        return text
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{where}: expected a boolean (1/0, true/false), got {value!r}")
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a non-negative integer, got {value!r}")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{where}: expected a non-negative integer, got {value!r}") from None
    if number < 0:
        raise ConfigError(f"{where}: expected a non-negative integer, got {value!r}")
    return number


def config_path(environ: Mapping[str, str] = os.environ) -> Optional[Path]:
    if environ.get("NSA_CONFIG"):
        return Path(environ["NSA_CONFIG"])
    return _default_config_path()


@functools.lru_cache(maxsize=1)
def _default_config_path() -> Optional[Path]:
    for path in (REPO_CONFIG, PACKAGED_CONFIG):
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=8)
def _read_yaml(path: str, mtime: float) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the configuration: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    runtime = data.get("runtime", {}) or {}
    if not isinstance(runtime, dict):
        raise ConfigError(f"{path}: 'runtime' must be a mapping")
    return runtime


# CPython's os.environ keeps its variables encoded in `_data`, which every set and del through
# os.environ updates: reading the relevant keys there costs ~0.1 us each, against ~1 us through
# os.environ.get (which encodes the key and decodes the value), and load_settings runs on every
# call. Elsewhere (or for another mapping) the plain path below reads `environ` itself.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEYS = tuple(os.environ.encodekey(var) for var in [var for var, _, _ in _ENV] + ["NSA_CONFIG"])
except AttributeError:
    _ENV_DATA = _ENV_KEYS = None
_RECHECK_FILE_S = 1.0     # a cached Settings re-reads the YAML file's mtime at most this often
_FAST: dict = {}          # raw environment values -> (Settings, when the file was last checked)


def load_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """Settings from `environ` over the YAML file over defaults. Cheap (it runs on every call):
    cached on the relevant environment variables (a changed flag is seen at the next call) and
    the YAML file's mtime (an edited file is seen within _RECHECK_FILE_S seconds)."""
    if environ is os.environ and _ENV_DATA is not None:
        key = tuple(map(_ENV_DATA.get, _ENV_KEYS))
        hit = _FAST.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[1] < _RECHECK_FILE_S:
            return hit[0]
        settings = _load_settings(environ)
        if len(_FAST) > 64:
            _FAST.clear()
        _FAST[key] = (settings, now)
        return settings
    return _load_settings(environ)


def _load_settings(environ: Mapping[str, str]) -> Settings:
    path = config_path(environ)
    try:
        mtime = path.stat().st_mtime if path is not None else None
    except OSError:
        mtime = None
    env = tuple(environ.get(var) for var, _, _ in _ENV)
    return _settings_for(env, environ.get("NSA_CONFIG"), str(path) if path else None, mtime)


@functools.lru_cache(maxsize=32)
def _settings_for(env: tuple, nsa_config, path_text, mtime) -> Settings:
    environ = {var: value for (var, _, _), value in zip(_ENV, env) if value is not None}
    if nsa_config is not None:
        environ["NSA_CONFIG"] = nsa_config
    return _read_settings(environ)


def _read_settings(environ: Mapping[str, str]) -> Settings:
    values = {}
    source = "defaults"
    path = config_path(environ)
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"NSA_CONFIG: no such file {str(path)!r}")
        runtime = _read_yaml(str(path), path.stat().st_mtime)
        source = str(path)
        for _, name, kind in _ENV:
            if name in runtime:
                values[name] = _parse(runtime[name], kind, f"{path}: runtime.{name}")
        thresholds = runtime.get("thresholds") or {}
        if not isinstance(thresholds, dict):
            raise ConfigError(f"{path}: runtime.thresholds must be a mapping of arch -> values")
        values["thresholds"] = {
            str(arch): {str(k): _parse(v, "int", f"{path}: runtime.thresholds.{arch}.{k}")
                        for k, v in (entry or {}).items()}
            for arch, entry in thresholds.items()}
    from_env = []
    for var, name, kind in _ENV:
        if var in environ:
            values[name] = _parse(environ[var], kind, var)
            from_env.append(name)
    return replace(Settings(), source=source, from_env=tuple(from_env), **values)
