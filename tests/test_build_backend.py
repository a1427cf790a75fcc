"""build_backend.py, the package's PEP 517 backend: where setuptools cannot make a wheel (before
70.1 without the `wheel` package) it packs setup.py's build into a wheel itself. Its pieces with
fakes, and one real pure-Python wheel built that way and read back."""
import base64
import csv
import hashlib
import importlib.util
import io
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def build_leftovers():
    """What a setup.py run may leave in the source tree (other tests may add other names)."""
    return sorted(p.name for p in ROOT.iterdir()
                  if p.name == "build" or p.name.endswith(".egg-info"))


@pytest.fixture(scope="module")
def backend():
    spec = importlib.util.spec_from_file_location("nsa_build_backend", ROOT / "build_backend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setuptools_builds_where_it_can(backend, monkeypatch):
    import builtins

    import setuptools

    real_import = builtins.__import__

    def no_wheel(name, *args, **kwargs):
        if name == "wheel":
            raise ImportError("No module named 'wheel'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wheel)
    monkeypatch.setattr(setuptools, "__version__", "65.5.0")
    assert not backend._setuptools_makes_wheels()
    assert backend.get_requires_for_build_wheel() == []      # nothing for pip to look for
    monkeypatch.setattr(setuptools, "__version__", "70.1.0")
    assert backend._setuptools_makes_wheels()


def test_egg_info_requirements_become_metadata(backend, tmp_path):
    egg = tmp_path / "x.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: nsa-ext\nVersion: 0.1.0\n"
                                  "Requires-Python: >=3.9\n\nLong description.\n")
    (egg / "requires.txt").write_text("pyyaml\n\n[:python_version < \"3.11\"]\ntomli\n\n"
                                      "[test]\npytest\nnumpy\n")
    metadata = backend._metadata(egg)
    head, _, body = metadata.partition("\n\n")
    lines = head.splitlines()
    assert lines[:4] == ["Metadata-Version: 2.1", "Name: nsa-ext", "Version: 0.1.0",
                         "Requires-Python: >=3.9"]
    assert lines[4:] == ["Requires-Dist: pyyaml",
                         'Requires-Dist: tomli; (python_version < "3.11")',
                         "Provides-Extra: test",
                         'Requires-Dist: pytest; extra == "test"',
                         'Requires-Dist: numpy; extra == "test"']
    assert body == "Long description.\n"


def test_tags(backend):
    assert backend._tag(False) == "py3-none-any"
    python, abi, platform = backend._tag(True).split("-")
    assert python == abi and python.startswith("cp") and platform and "." not in platform


def _record_ok(whl: zipfile.ZipFile, record_name: str) -> None:
    rows = list(csv.reader(io.StringIO(whl.read(record_name).decode())))
    assert sorted(r[0] for r in rows) == sorted(whl.namelist())
    for name, digest, size in rows:
        if name == record_name:
            assert digest == size == ""
            continue
        data = whl.read(name)
        expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert digest == f"sha256={expected}" and int(size) == len(data), name


def test_a_pure_python_wheel_built_without_setuptools_wheel_support(backend, tmp_path,
                                                                    monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("NSA_EXT_SKIP_CUDA_BUILD", "1")
    before = build_leftovers()
    name = backend._own_wheel(tmp_path, editable=False)
    assert build_leftovers() == before
    assert name == "nsa_ext-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(tmp_path / name) as whl:
        names = set(whl.namelist())
        assert {"nsa_ext/__init__.py", "nsa_ext/base.yaml", "triton_ref/__init__.py"} <= names
        assert not any(n.startswith(("tests/", "bench/")) or n == "build_backend.py" for n in names)
        info = "nsa_ext-0.1.0.dist-info"
        metadata = whl.read(f"{info}/METADATA").decode()
        assert "Version: 0.1.0" in metadata and "Requires-Dist: pyyaml" in metadata
        wheel = whl.read(f"{info}/WHEEL").decode()
        assert "Root-Is-Purelib: true" in wheel and "Tag: py3-none-any" in wheel
        _record_ok(whl, f"{info}/RECORD")


def test_an_editable_wheel_names_the_source_tree(backend, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("NSA_EXT_SKIP_CUDA_BUILD", "1")
    before = build_leftovers()
    name = backend._own_wheel(tmp_path, editable=True)
    assert build_leftovers() == before
    assert name.startswith("nsa_ext-0.1.0-") and name.endswith(".whl")
    with zipfile.ZipFile(tmp_path / name) as whl:
        info = "nsa_ext-0.1.0.dist-info"
        assert sorted(whl.namelist()) == sorted(["__editable__.nsa_ext-0.1.0.pth",
                                                 f"{info}/METADATA", f"{info}/WHEEL",
                                                 f"{info}/top_level.txt", f"{info}/RECORD"])
        assert whl.read("__editable__.nsa_ext-0.1.0.pth").decode() == f"{ROOT}\n"
        _record_ok(whl, f"{info}/RECORD")
