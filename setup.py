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
"""
from __future__ import annotations

import os
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


def _pip_nvidia_dir() -> Path | None:
    """site-packages/nvidia/cu13 (or cu12): CUDA library headers and nvrtc from pip's wheels,
    which a bare toolkit may lack and Torch's CMake config asks for."""
    try:
        import nvidia  # noqa: F401  (namespace package of the nvidia-* wheels)
    except ImportError:
        return None
    for base in getattr(sys.modules["nvidia"], "__path__", []):
        for sub in ("cu13", "cu12", "cuda_runtime", "cuda_nvrtc"):
            folder = Path(base) / sub
            if (folder / "include").is_dir():
                return folder
    return None


def _pip_nvrtc() -> str | None:
    try:
        import nvidia  # noqa: F401
    except ImportError:
        return None
    for base in getattr(sys.modules["nvidia"], "__path__", []):
        found = sorted(Path(base).glob("*/lib/libnvrtc.so*"))
        found = [p for p in found if "builtins" not in p.name and "alt" not in p.name]
        if found:
            return str(found[0])
    return None


def cuda_build_blocker() -> tuple[str | None, dict]:
    """(why the extension cannot be built or None, facts for the build)."""
    if _flag("NSA_EXT_SKIP_CUDA_BUILD"):
        return "NSA_EXT_SKIP_CUDA_BUILD=1", {}
    try:
        import torch
        import torch.utils
    except ImportError:
        return ("torch is not importable in the build environment "
                "(install torch first and use pip install --no-build-isolation)"), {}
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) has no CUDA support", {}
    cuda_home = _cuda_home()
    nvcc = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    if nvcc is None or not nvcc.is_file():
        return ("nvcc was not found (set CUDA_HOME to a CUDA toolkit with bin/nvcc, "
                f"version matching torch's CUDA {torch.version.cuda})"), {}
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (pip install {tool})", {}
    try:
        import pybind11
    except ImportError:
        return "pybind11 is not importable (pip install pybind11)", {}
    return None, {"torch": torch, "cuda_home": cuda_home, "nvcc": str(nvcc),
                  "pybind11_dir": pybind11.get_cmake_dir()}


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Builds each CMakeExtension with CMake + Ninja; skips (with one message) where it cannot."""

    def run(self):
        blocker, facts = cuda_build_blocker()
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
        torch = facts["torch"]
        archs = (os.environ.get("NSA_EXT_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
                 or DEFAULT_ARCHS).replace(",", ";").replace(" ", ";")
        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, CUDA_HOME=facts["cuda_home"], TORCH_CUDA_ARCH_LIST=archs)
        args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
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
        pip_nvidia = _pip_nvidia_dir()
        if pip_nvidia is not None:
            # Library headers (cusparse.h, cublas_v2.h ...) that Torch's headers may include and
            # a bare toolkit lacks.
            args.append(f"-DNSA_EXT_EXTRA_INCLUDE_DIRS={pip_nvidia / 'include'}")
        # nvrtc, which Torch's CMake config insists on finding (the kernels do not use it).
        cuda_home = Path(facts["cuda_home"])
        toolkit_nvrtc = list(cuda_home.glob("lib*/libnvrtc.so*")) + \
            list(cuda_home.glob("targets/*/lib/libnvrtc.so*"))
        pip_nvrtc = _pip_nvrtc()
        if not toolkit_nvrtc and pip_nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={pip_nvrtc}")
        _say(f"building the CUDA extension for archs {archs} (torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}, nvcc {facts['nvcc']})")
        subprocess.run(args, cwd=ROOT, env=env, check=True)
        build = ["cmake", "--build", str(build_dir)]
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


setup(
    ext_modules=[CMakeExtension("nsa_ext._C")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
)
