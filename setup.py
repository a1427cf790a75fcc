"""Build of nsa_ext: pure Python always, the CUDA extension `nsa_ext._C` where it can be built.

The compiled part is described once, in CMakeLists.txt; `CMakeBuild` below runs CMake (Ninja
generator) with Torch found through `torch.utils.cmake_prefix_path` and pybind11 through
`pybind11.get_cmake_dir()`. Install with the environment's torch:

    pip install --no-build-isolation .        # or -e . for an editable install

Build knobs (environment variables, read here and nowhere else):
    NSA_EXT_SKIP_CUDA_BUILD=1   pure-Python install, no extension
    NSA_EXT_CUDA_ARCHS          CUDA architectures, e.g. "9.0" or "8.0;9.0+PTX"
    TORCH_CUDA_ARCH_LIST        used when NSA_EXT_CUDA_ARCHS is unset; default "8.0;8.6;8.9;9.0"
    NSA_EXT_ALLOW_NO_CUDA=1     a failing CUDA build (nvcc present) falls back to pure Python
                                instead of failing the install
    NSA_EXT_PTXAS_VERBOSE=1     -Xptxas -v (registers, spills) in the build log
    MAX_JOBS                    parallel compile jobs (ninja -j)
    NVCC_THREADS                nvcc --threads per job (default 1)
    CUDA_HOME                   the CUDA toolkit; /usr/local/cuda when unset and nvcc is there

Where the extension cannot be built (no torch, torch without CUDA, no nvcc, no cmake/ninja/
pybind11, or skipped) the install still succeeds and prints one message saying why; the CUDA
backend then reports the same through `nsa_ext._ext.unavailable_reason()`.

CMake and Ninja are looked for in the running interpreter's environment first (the `cmake` and
`ninja` pip packages put their binaries next to `sys.executable`, in `sysconfig`'s scripts folder
and in their own package folders), then on PATH: `venv/bin/python -m pip install .` works with
the venv not activated and an older CMake first on PATH. A CMake older than the one
CMakeLists.txt asks for fails the build with one line saying which version was found, which is
needed and `pip install cmake`.

With build isolation (a plain `pip install .`), torch is not importable in pip's temporary
build environment; the facts the build needs (torch's CMake files, pybind11, the pip CUDA
headers) are then read from the interpreter's own environment (`python -I`), which is the torch
the package will run with, so the extension is built all the same.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _say(message: str) -> None:
    # pip shows a build's output only with -v; stderr also lands in its log on failure.
    print(f"nsa_ext setup: {message}", file=sys.stderr, flush=True)


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    # torch.utils.cpp_extension guesses /usr/local from `which nvcc` when nvcc is a wrapper
    # script in /usr/local/bin; the real toolkit is /usr/local/cuda.
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(os.path.realpath(nvcc)).parent.parent)
    return None


def environment_facts() -> dict:
    """What the build needs from the Python environment, as plain data: torch (version, CUDA,
    CMake files), pybind11's CMake files, and the CUDA headers and nvrtc of pip's nvidia-*
    wheels (which a bare toolkit may lack and Torch's CMake config asks for). Self-contained:
    `_facts_of_the_interpreter` runs its source in the interpreter's own environment."""
    import sys as _sys
    from pathlib import Path as _Path

    facts = {}
    for tool in ("cmake", "ninja"):
        try:   # the cmake and ninja pip packages say where their real binaries are
            module = __import__(tool)
            facts[f"{tool}_bin_dir"] = str(module.CMAKE_BIN_DIR if tool == "cmake" else module.BIN_DIR)
        except (ImportError, AttributeError):
            pass
    try:
        import torch
        import torch.utils
    except ImportError:
        return facts
    facts.update(torch_version=torch.__version__, torch_cuda=torch.version.cuda,
                 torch_cmake_prefix_path=torch.utils.cmake_prefix_path)
    try:
        import pybind11
        facts["pybind11_dir"] = pybind11.get_cmake_dir()
    except ImportError:
        pass
    try:
        import nvidia  # noqa: F401  (namespace package of the nvidia-* wheels)
    except ImportError:
        return facts
    bases = [_Path(b) for b in getattr(_sys.modules["nvidia"], "__path__", [])]
    for base in bases:
        for sub in ("cu13", "cu12", "cuda_runtime", "cuda_nvrtc"):
            if (base / sub / "include").is_dir() and "pip_nvidia_include" not in facts:
                facts["pip_nvidia_include"] = str(base / sub / "include")
        found = [p for p in sorted(base.glob("*/lib/libnvrtc.so*"))
                 if "builtins" not in p.name and "alt" not in p.name]
        if found and "pip_nvrtc" not in facts:
            facts["pip_nvrtc"] = str(found[0])
    return facts


def _facts_of_the_interpreter() -> dict:
    """environment_facts() in the interpreter's own environment: `python -I` ignores the
    PYTHONPATH through which pip's build isolation hides the installed packages."""
    # The function's own source (setuptools runs this file through exec(), where
    # inspect.getsource cannot find it).
    text = (ROOT / "setup.py").read_text()
    node = next(n for n in ast.parse(text).body
                if isinstance(n, ast.FunctionDef) and n.name == "environment_facts")
    code = ast.get_source_segment(text, node) + \
        "\nimport json\nprint(json.dumps(environment_facts()))\n"
    try:
        out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                             timeout=300, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}


# ----------------------------------------------------------------------------------------------
# CMake and Ninja: the environment's own first, then PATH

def cmake_minimum(cmakelists: Path = ROOT / "CMakeLists.txt") -> tuple:
    """The version `cmake_minimum_required(VERSION x.y.z)` of CMakeLists.txt asks for."""
    found = re.search(r"cmake_minimum_required\s*\(\s*VERSION\s+([0-9.]+)", cmakelists.read_text())
    return parse_version(found.group(1)) if found else (3, 0)


def parse_version(text: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def version_text(version: tuple) -> str:
    return ".".join(str(part) for part in version)


def _tool_dirs_of_the_environment(tool: str, facts: dict) -> list:
    """Folders where the running interpreter's environment keeps `tool`'s binary: the pip
    package's own binary folder first (its entry point in bin/ is a Python script, which pip's
    build isolation breaks), then the folder of sys.executable and sysconfig's scripts folder."""
    dirs = [Path(facts[f"{tool}_bin_dir"])] if facts.get(f"{tool}_bin_dir") else []
    return dirs + [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]


def tool_candidates(tool: str, facts: dict | None = None) -> list:
    """Every distinct `tool` executable, the environment's first, then PATH's order."""
    found = []
    facts = environment_facts() if facts is None else facts
    paths = [str(d / tool) for d in _tool_dirs_of_the_environment(tool, facts)]
    paths += [str(Path(d) / tool) for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    for path in paths:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            real = os.path.realpath(path)
            if real not in [os.path.realpath(p) for p in found]:
                found.append(path)
    return found


def cmake_version(cmake: str) -> tuple | None:
    try:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"version\s+([0-9][0-9.]*)", out)
    return parse_version(found.group(1)) if found else None


class CMakeTooOld(RuntimeError):
    """Every CMake found is older than CMakeLists.txt needs; the message is one line."""


def find_cmake(needed: tuple | None = None, facts: dict | None = None) -> str | None:
    """The first CMake (environment first, then PATH) at least `needed`; None when there is no
    CMake at all; CMakeTooOld when there are only older ones."""
    needed = needed or cmake_minimum()
    seen = []
    for path in tool_candidates("cmake", facts):
        version = cmake_version(path)
        if version is not None and version >= needed:
            return path
        seen.append(f"{version_text(version) if version else 'of unknown version'} ({path})")
    if not seen:
        return None
    raise CMakeTooOld(
        f"nsa_ext: CMake {seen[0]} is too old: the CUDA extension needs CMake >= "
        f"{version_text(needed)} (CMakeLists.txt; nvcc's C++20 dialect); "
        f"`{sys.executable} -m pip install cmake` (or set NSA_EXT_SKIP_CUDA_BUILD=1)"
        + (f"; also found {', '.join(seen[1:])}" if len(seen) > 1 else ""))


def find_ninja(facts: dict | None = None) -> str | None:
    found = tool_candidates("ninja", facts)
    return found[0] if found else None


def cuda_build_blocker() -> tuple[str | None, dict]:
    """(why the extension cannot be built or None, facts for the build). Raises CMakeTooOld."""
    if _flag("NSA_EXT_SKIP_CUDA_BUILD"):
        return "NSA_EXT_SKIP_CUDA_BUILD=1", {}
    facts = environment_facts()
    if "torch_version" not in facts:
        # pip's build isolation hides the environment's torch; the interpreter's own has it.
        facts = _facts_of_the_interpreter()
    if "torch_version" not in facts:
        return ("torch is not importable, neither in the build environment nor in "
                f"{sys.executable}'s (install torch first)"), {}
    if facts["torch_cuda"] is None:
        return f"this torch ({facts['torch_version']}) has no CUDA support", {}
    cuda_home = _cuda_home()
    nvcc = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    if nvcc is None or not nvcc.is_file():
        return ("nvcc was not found (set CUDA_HOME to a CUDA toolkit with bin/nvcc, "
                f"version matching torch's CUDA {facts['torch_cuda']})"), {}
    ninja = find_ninja(facts)
    if ninja is None:
        return f"ninja was not found (`{sys.executable} -m pip install ninja`)", {}
    cmake = find_cmake(facts=facts)
    if cmake is None:
        return f"cmake was not found (`{sys.executable} -m pip install cmake`)", {}
    if "pybind11_dir" not in facts:
        return f"pybind11 is not importable (`{sys.executable} -m pip install pybind11`)", {}
    return None, dict(facts, cuda_home=cuda_home, nvcc=str(nvcc), cmake=cmake, ninja=ninja)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Builds each CMakeExtension with CMake + Ninja; skips (with one message) where it cannot."""

    def run(self):
        try:
            blocker, facts = cuda_build_blocker()
        except CMakeTooOld as err:
            if _flag("NSA_EXT_ALLOW_NO_CUDA"):
                _say(f"the CUDA backend is NOT built: {err}. NSA_EXT_ALLOW_NO_CUDA=1, so "
                     "installing pure Python.")
                return
            raise SystemExit(str(err)) from None
        if blocker is not None:
            _say(f"the CUDA backend is NOT built: {blocker}. Installing pure Python; "
                 "the Triton and SDPA backends still work.")
            return
        # Build into build_lib, then (editable installs) copy into the source tree, as
        # setuptools' own build_ext.run does.
        inplace, self.inplace = self.inplace, False
        try:
            for ext in self.extensions:
                self.build_cmake(ext, facts)
        except (subprocess.CalledProcessError, OSError) as err:
            if _flag("NSA_EXT_ALLOW_NO_CUDA"):
                _say(f"the CUDA backend is NOT built: its build failed ({err}); "
                     "NSA_EXT_ALLOW_NO_CUDA=1, so installing pure Python.")
                return
            raise RuntimeError(
                f"nsa_ext: building the CUDA extension failed ({err}). Fix the toolchain, or set "
                "NSA_EXT_SKIP_CUDA_BUILD=1 (no extension) or NSA_EXT_ALLOW_NO_CUDA=1 (fall back "
                "to pure Python when the build fails).") from err
        finally:
            self.inplace = inplace
        if inplace:
            self.copy_extensions_to_source()

    def build_cmake(self, ext: CMakeExtension, facts: dict) -> None:
        archs = (os.environ.get("NSA_EXT_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
                 or DEFAULT_ARCHS).replace(",", ";").replace(" ", ";")
        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, CUDA_HOME=facts["cuda_home"], TORCH_CUDA_ARCH_LIST=archs)
        args = [
            facts["cmake"], "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={facts['ninja']}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={facts['torch_cmake_prefix_path']}",
            f"-Dpybind11_DIR={facts['pybind11_dir']}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_CUDA_COMPILER={facts['nvcc']}",
            f"-DCUDA_TOOLKIT_ROOT_DIR={facts['cuda_home']}",
            f"-DCUDAToolkit_ROOT={facts['cuda_home']}",
            f"-DNSA_EXT_CUDA_ARCHS={archs}",
            f"-DNSA_EXT_MODULE_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX') or '.so'}",
            f"-DNSA_EXT_OUTPUT_DIR={output_dir}",
            f"-DNSA_EXT_NVCC_THREADS={os.environ.get('NVCC_THREADS', '1')}",
            f"-DNSA_EXT_PTXAS_VERBOSE={'ON' if _flag('NSA_EXT_PTXAS_VERBOSE') else 'OFF'}",
        ]
        if facts.get("pip_nvidia_include"):
            # Library headers (cusparse.h, cublas_v2.h ...) that Torch's headers may include and
            # a bare toolkit lacks.
            args.append(f"-DNSA_EXT_EXTRA_INCLUDE_DIRS={facts['pip_nvidia_include']}")
        # nvrtc, which Torch's CMake config insists on finding (the kernels do not use it).
        cuda_home = Path(facts["cuda_home"])
        toolkit_nvrtc = list(cuda_home.glob("lib*/libnvrtc.so*")) + \
            list(cuda_home.glob("targets/*/lib/libnvrtc.so*"))
        pip_nvrtc = facts.get("pip_nvrtc")
        if not toolkit_nvrtc and pip_nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={pip_nvrtc}")
        _say(f"building the CUDA extension for archs {archs} (torch {facts['torch_version']}, "
             f"CUDA {facts['torch_cuda']}, nvcc {facts['nvcc']}, cmake {facts['cmake']}, "
             f"ninja {facts['ninja']})")
        subprocess.run(args, cwd=ROOT, env=env, check=True)
        build = [facts["cmake"], "--build", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            build += ["--", f"-j{int(os.environ['MAX_JOBS'])}"]
        subprocess.run(build, cwd=ROOT, env=env, check=True)


class BuildPy(build_py):
    """Packs configs/base.yaml as nsa_ext/base.yaml (nsa_ext/config.py reads it there when the
    package is installed without the repository beside it)."""

    def run(self):
        super().run()
        source = ROOT / "configs" / "base.yaml"
        if source.is_file() and not getattr(self, "editable_mode", False):
            target = Path(self.build_lib) / "nsa_ext" / "base.yaml"
            target.parent.mkdir(parents=True, exist_ok=True)
            self.copy_file(str(source), str(target))


if __name__ == "__main__":   # tests import the helpers above without running setup()
    setup(
        ext_modules=[CMakeExtension("nsa_ext._C")],
        cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    )
