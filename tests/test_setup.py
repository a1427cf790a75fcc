"""setup.py's discovery of CMake and Ninja (the running interpreter's environment first, then
PATH) and its CMake version check, with fake tools; setup.py is imported, never run."""
import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("nsa_ext_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)      # __name__ is not "__main__": setup() does not run
    return module


def fake_tool(folder: Path, name: str, version: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{name} version {version}'\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def environment(tmp_path, monkeypatch, setup_py):
    """An interpreter environment at tmp/env/bin with no tools yet, and PATH = tmp/path only."""
    env_bin = tmp_path / "env" / "bin"
    env_bin.mkdir(parents=True)
    path_dir = tmp_path / "path"
    path_dir.mkdir()
    monkeypatch.setattr(setup_py.sys, "executable", str(env_bin / "python"))
    monkeypatch.setattr(setup_py.sysconfig, "get_path", lambda name, *a, **k: str(env_bin))
    # No cmake / ninja pip package: the facts that would name their binary folders are empty.
    monkeypatch.setattr(setup_py, "environment_facts", lambda: {})
    monkeypatch.setenv("PATH", str(path_dir))
    return env_bin, path_dir


def test_minimum_comes_from_cmakelists(setup_py, tmp_path):
    assert setup_py.cmake_minimum() >= (3, 25, 2)        # nvcc's CUDA20 dialect
    other = tmp_path / "CMakeLists.txt"
    other.write_text("# x\ncmake_minimum_required( VERSION 3.27.1 )\nproject(x)\n")
    assert setup_py.cmake_minimum(other) == (3, 27, 1)


@pytest.mark.skipif(os.name != "posix", reason="fake tools are shell scripts")
def test_too_old_cmake_on_path_fails_with_one_clear_line(setup_py, environment):
    _, path_dir = environment
    fake_tool(path_dir, "cmake", "3.25.1")
    with pytest.raises(setup_py.CMakeTooOld) as info:
        setup_py.find_cmake((3, 25, 2))
    message = str(info.value)
    assert "\n" not in message
    assert "CMake 3.25.1" in message and ">= 3.25.2" in message and "pip install cmake" in message
    assert str(path_dir / "cmake") in message


@pytest.mark.skipif(os.name != "posix", reason="fake tools are shell scripts")
def test_environment_cmake_comes_before_path(setup_py, environment):
    env_bin, path_dir = environment
    fake_tool(path_dir, "cmake", "3.25.0")
    mine = fake_tool(env_bin, "cmake", "4.1.2")
    assert setup_py.tool_candidates("cmake")[0] == str(mine)
    assert setup_py.find_cmake((3, 25, 2)) == str(mine)


@pytest.mark.skipif(os.name != "posix", reason="fake tools are shell scripts")
def test_a_new_enough_cmake_later_on_path_is_taken(setup_py, environment):
    env_bin, path_dir = environment
    fake_tool(env_bin, "cmake", "3.22.1")
    newer = fake_tool(path_dir, "cmake", "3.31.6")
    assert setup_py.find_cmake((3, 25, 2)) == str(newer)


def test_no_cmake_at_all_is_none(setup_py, environment):
    assert setup_py.find_cmake((3, 25, 2)) is None
    assert setup_py.find_ninja() is None


@pytest.mark.skipif(os.name != "posix", reason="fake tools are shell scripts")
def test_ninja_from_the_environment_first(setup_py, environment):
    env_bin, path_dir = environment
    fake_tool(path_dir, "ninja", "1.10")
    mine = fake_tool(env_bin, "ninja", "1.13")
    assert setup_py.find_ninja() == str(mine)


def test_versions_parse(setup_py):
    assert setup_py.parse_version("3.25.2") == (3, 25, 2)
    assert setup_py.parse_version("4.0.0-rc1") == (4, 0, 0)
    assert setup_py.version_text((3, 25, 2)) == "3.25.2"


@pytest.mark.skipif(os.name != "posix", reason="fake tools are shell scripts")
def test_the_pip_package_binary_folder_comes_first(setup_py, environment, tmp_path):
    env_bin, _ = environment
    fake_tool(env_bin, "cmake", "of a broken entry point")
    real = fake_tool(tmp_path / "site" / "cmake" / "data" / "bin", "cmake", "4.0.3")
    facts = {"cmake_bin_dir": str(real.parent)}
    assert setup_py.tool_candidates("cmake", facts)[0] == str(real)
    assert setup_py.find_cmake((3, 25, 2), facts) == str(real)


def test_environment_facts_are_plain_data(setup_py):
    facts = setup_py.environment_facts()
    import json  # noqa: E401
    json.dumps(facts)                     # what the `python -I` probe sends back
    pytest.importorskip("torch")
    assert "torch_version" in facts and "torch_cmake_prefix_path" in facts


def test_the_isolated_build_probe_reads_the_interpreter_environment(setup_py):
    pytest.importorskip("torch")
    facts = setup_py._facts_of_the_interpreter()
    assert facts == setup_py.environment_facts() or "torch_version" in facts
