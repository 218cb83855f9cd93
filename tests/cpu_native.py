"""The compiled native module on the CPU. tools/compile_check.sh builds memit_fast._native and
tests/cpu_cuda_libs.cpp, host-memory stand-ins for the cuSOLVER / cuBLAS functions the module
loads (same prototypes, column-major, only the named triangle read or written). The fixture
`stand_in` points memit_fast.native at that build, loaded with the stand-ins, so the whole native
layer (descriptor checks, blocked factor and solve, block offsets) runs on CPU tensors.
Test modules import the fixtures they use by name."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memit_fast import native

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def native_build(tmp_path_factory) -> Path:
    """The folder holding the module and the stand-in, built once per session by compile_check.sh."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    out = tmp_path_factory.mktemp("native")
    r = subprocess.run(["bash", "tools/compile_check.sh", str(out)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0 and "compile_check: ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def compiled(native_build):
    """That build of _native, imported, with the stand-in loaded as both libraries."""
    spec = importlib.util.spec_from_file_location("_native", next(native_build.glob("_native*.so")))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    stand_in = str(native_build / "libmemit_cpu_cuda_libs.so")
    mod.load_cuda_libs(stand_in, stand_in)
    return mod


@pytest.fixture
def stand_in(compiled, monkeypatch):
    """memit_fast.native calls go to the compiled module over the CPU stand-in."""
    monkeypatch.setattr(native, "_module", compiled)
    monkeypatch.setattr(native, "_loaded", True)
    return compiled
