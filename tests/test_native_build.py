"""The native module: it builds from csrc/ without a GPU, and memit_fast says clearly when it cannot use it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memit_fast import native

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_compile_check_builds_and_imports():
    r = subprocess.run(["bash", "tools/compile_check.sh"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0 and "compile_check: ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_unavailable_native_raises_with_reason():
    if native.available():
        pytest.skip("native module is available here")
    reason = native.why_unavailable()
    assert isinstance(reason, str) and reason
    with pytest.raises(native.NativeUnavailableError, match="unavailable: "):
        native.lib()


def test_diagnosis_names_native_state():
    r = subprocess.run([sys.executable, "-m", "memit_fast", "info"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "torch " in r.stdout and ("native: loaded" in r.stdout or "native: not used: " in r.stdout)


def test_switch_off(monkeypatch):
    monkeypatch.setenv("MEMIT_FAST_NATIVE", "0")
    r = subprocess.run([sys.executable, "-m", "memit_fast", "info"], cwd=ROOT, capture_output=True, text=True)
    assert "switched off by MEMIT_FAST_NATIVE=0" in r.stdout


@pytest.mark.native
def test_native_loaded_on_cuda():
    assert native.available() and native.why_unavailable() is None
    lib = native.lib()
    x = torch.eye(4, dtype=torch.float64, device="cuda")
    assert lib.potrf_workspace(True, True, 4, 4, **native.call_args(x)) >= 0
