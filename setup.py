"""The native build of memit_fast (the package's metadata is in pyproject.toml). The native module memit_fast._native (csrc/, CMakeLists.txt) is built by CMake
(ninja generator when ninja is found). It needs a C++17 compiler and pybind11, no CUDA toolkit:
it loads cuSOLVER / cuBLAS at run time.

MEMIT_FAST_BUILD_NATIVE: unset = try, and on failure print why and install without it (the
PyTorch path then runs); 0 = skip; 1 = a failed build is an error.
On a machine without internet: pip install --no-build-isolation --no-deps -e .
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SWITCH = os.environ.get("MEMIT_FAST_BUILD_NATIVE", "")


def _tool(name: str) -> str | None:
    """An executable from PATH or from its pip package (cmake, ninja)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        module = __import__(name)
        path = Path(getattr(module, "BIN_DIR", getattr(module, "CMAKE_BIN_DIR", ""))) / name
        return str(path) if path.is_file() else None
    except ImportError:
        return None


class CMakeBuild(build_ext):
    """Builds each extension with CMake; an extension that was not built is dropped from
    self.extensions, so the install (editable or not) goes on without it."""

    def build_extensions(self) -> None:
        built = []
        for ext in self.extensions:
            if SWITCH == "0":
                print("memit_fast: MEMIT_FAST_BUILD_NATIVE=0, native module not built", file=sys.stderr)
                continue
            try:
                self._cmake(ext)
                built.append(ext)
            except Exception as e:  # noqa: BLE001 - any failure: report, and install the PyTorch path
                if SWITCH == "1":
                    raise
                print(f"memit_fast: native module not built ({e}); memit_fast runs on its PyTorch path. "
                      "Set MEMIT_FAST_BUILD_NATIVE=1 to make this an error.", file=sys.stderr)
        self.extensions = built

    def _cmake(self, ext: Extension) -> None:
        cmake = _tool("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found (pip install cmake)")
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "native"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        ninja = _tool("ninja")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        build_dir.mkdir(parents=True, exist_ok=True)
        # --fresh: a cache left by another environment (pip's isolated builds) must not be reused
        subprocess.run([cmake, "--fresh", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel"], check=True)


setup(
    ext_modules=[Extension("memit_fast._native", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
