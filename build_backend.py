"""The package's PEP 517 build backend: setuptools' own, and where this environment's setuptools
cannot make a wheel, the same build packed into a wheel here.

`pip install --no-build-isolation .` (the install that sees the environment's torch) builds with
the environment's setuptools, which before 70.1 makes wheels only through the separate `wheel`
package. Python 3.11's venv comes with setuptools 65 and no `wheel`, and torch does not bring
either: `python3 -m venv env && env/bin/pip install torch && env/bin/pip install
--no-build-isolation .` would stop there. In that case this backend runs setup.py's `egg_info`
and `build` (build_py, and build_ext with the CUDA extension where it can be built: setup.py
decides and says why not) or, for `-e`, `build_ext --inplace`, and writes the wheel itself:
the built files (or, editable, a .pth naming the source tree), and the metadata converted from
egg-info to dist-info. Everywhere else every hook is setuptools.build_meta's.
"""
import base64
import csv
import hashlib
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import setuptools.build_meta as _setuptools
from setuptools.build_meta import build_sdist, get_requires_for_build_sdist  # noqa: F401

ROOT = Path(__file__).resolve().parent


def _setuptools_makes_wheels(editable: bool = False) -> bool:
    """Can this environment's setuptools build the wheel (editable: with PEP 660's hooks, 64+)?"""
    import setuptools

    if editable and not hasattr(_setuptools, "build_editable"):
        return False
    try:
        if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) >= (70, 1):
            return True
    except ValueError:
        return True
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


# --- the hooks ---

def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) \
        if _setuptools_makes_wheels() else []


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) \
        if _setuptools_makes_wheels(editable=True) else []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    if _setuptools_makes_wheels():
        return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)
    return _dist_info(Path(metadata_directory), False)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    if _setuptools_makes_wheels(editable=True):
        return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)
    return _dist_info(Path(metadata_directory), False)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    if _setuptools_makes_wheels():
        return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    return _own_wheel(Path(wheel_directory), editable=False)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    if _setuptools_makes_wheels(editable=True):
        return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    return _own_wheel(Path(wheel_directory), editable=True)


# --- the wheel this backend writes ---

def _setup(*args: str) -> None:
    print(f"nsa_ext: setuptools without wheel support here: setup.py {' '.join(args)}, "
          "wheel packed by build_backend.py", file=sys.stderr)
    subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, check=True)


def _dist_info(directory: Path, has_extension: bool, egg: Path = None) -> str:
    """Write <name>-<version>.dist-info (METADATA, WHEEL, top_level.txt) into `directory` from
    setup.py egg_info's output `egg` (made here when not given); returns its name."""
    if egg is None:
        with tempfile.TemporaryDirectory() as tmp:
            _setup("-q", "egg_info", "--egg-base", tmp)
            return _dist_info(directory, has_extension, next(Path(tmp).glob("*.egg-info")))
    metadata = _metadata(egg)
    fields = {}
    for line in metadata.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key in ("Name", "Version"):
            fields.setdefault(key, value)
    name = f"{_safe(fields['Name'])}-{_safe(fields['Version'])}.dist-info"
    out = directory / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "METADATA").write_text(metadata)
    if (egg / "top_level.txt").is_file():
        shutil.copy(egg / "top_level.txt", out / "top_level.txt")
    (out / "WHEEL").write_text(
        "Wheel-Version: 1.0\nGenerator: nsa_ext build_backend.py\n"
        f"Root-Is-Purelib: {'false' if has_extension else 'true'}\nTag: {_tag(has_extension)}\n")
    return name


def _metadata(egg: Path) -> str:
    """PKG-INFO with the requirements of requires.txt as Requires-Dist / Provides-Extra (what
    egg-info keeps apart and dist-info holds in METADATA)."""
    head, sep, body = (egg / "PKG-INFO").read_text().partition("\n\n")
    lines = [line for line in head.splitlines()
             if not line.startswith(("Requires-Dist:", "Provides-Extra:"))]
    requires = egg / "requires.txt"
    extra = marker = None
    if requires.is_file():
        for line in requires.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("["):              # [extra] or [extra:marker] or [:marker]
                section = line[1:-1]
                extra, _, marker = section.partition(":")
                if extra:
                    lines.append(f"Provides-Extra: {extra}")
                continue
            conditions = [f"({marker})"] if marker else []
            if extra:
                conditions.append(f'extra == "{extra}"')
            lines.append(f"Requires-Dist: {line}" +
                         (f"; {' and '.join(conditions)}" if conditions else ""))
    return "\n".join(lines) + ("\n\n" + body if sep else "\n")


def _safe(text: str) -> str:
    return text.replace("-", "_")


def _tag(has_extension: bool) -> str:
    if not has_extension:
        return "py3-none-any"
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    return f"{python}-{python}-{platform}"


def _own_wheel(wheel_directory: Path, editable: bool) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        # egg_info first, into the temporary folder (build_py runs it, by default into the tree);
        # the dist-info is made from it
        egg_info = ("egg_info", "--egg-base", str(tmp))
        if editable:
            _setup(*egg_info, "build_ext", "--inplace", "--build-lib", str(tmp / "lib"),
                   "--build-temp", str(tmp / "temp"))
            has_extension = any((ROOT / "nsa_ext").glob(f"_C*{suffix}"))
            files = {}
        else:
            lib = tmp / "lib"
            _setup(*egg_info, "build", "--build-base", str(tmp / "build"), "--build-lib", str(lib))
            has_extension = any(lib.rglob(f"*{suffix}"))
            files = {p.relative_to(lib).as_posix(): p.read_bytes()
                     for p in sorted(lib.rglob("*")) if p.is_file()}
        info = _dist_info(tmp / "meta", has_extension, next(tmp.glob("*.egg-info")))
        name_version = info[:-len(".dist-info")]
        if editable:      # the source tree on sys.path, as a static .pth
            files[f"__editable__.{name_version}.pth"] = f"{ROOT}\n".encode()
        for p in sorted((tmp / "meta" / info).iterdir()):
            files[f"{info}/{p.name}"] = p.read_bytes()
        wheel_name = f"{name_version}-{_tag(has_extension)}.whl"
        wheel_directory.mkdir(parents=True, exist_ok=True)
        _write_wheel(wheel_directory / wheel_name, files, f"{info}/RECORD")
    return wheel_name


def _write_wheel(path: Path, files: dict, record_name: str) -> None:
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        writer.writerow([name, f"sha256={digest}", len(data)])
    writer.writerow([record_name, "", ""])
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as whl:
        for name, data in files.items():
            whl.writestr(name, data)
        whl.writestr(record_name, record.getvalue())
    os.chmod(path, 0o644)
