"""The native module: it builds from csrc/ without a GPU, checks its operands in C++, and
memit_fast says clearly when it cannot use it."""

import subprocess
import sys

import pytest
import torch

from cpu_native import ROOT, compiled, native_build, stand_in  # noqa: F401 - fixtures
from memit_fast import native


def test_compile_check_builds_and_imports(compiled):  # noqa: F811
    assert compiled.ABI_VERSION == native.ABI_VERSION and compiled.cuda_libs_loaded()


def _raises(match, fn, *args):
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_descriptor_checks(stand_in):  # noqa: F811
    """Every operand is checked in C++ before any library call: dtype, shape, strides, device, sizes."""
    g, k = torch.eye(6, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    _raises("potrf_plan: a must be float32 or float64, not float16", native.potrf, g.half(), True, 0)
    _raises(r"potrf_plan: a must be square, got shape \(6, 5\)", native.potrf, g[:, :5].contiguous(), True, 0)
    _raises("syrk: a must be float64, not float32", native.syrk, k.float(), g, True, False, 1.0, 0.0)
    _raises(r"syrk: a gives op\(a\) with 6 rows .* c is 5 x 5", native.syrk, k, g[:5, :5].contiguous(), True, True, 1.0, 0.0)
    _raises(r"trsm: b must have contiguous rows \(unit last stride\), got strides \(1, 3\)",
            native.trsm, g, torch.randn(6, 3, dtype=torch.float64).mT, True, True, False)
    _raises("trsm: b is 6 x 4 .* t is 5 x 5 on the left", native.trsm, g[:5, :5].contiguous(), k.mT.contiguous(), True, True, False)
    _raises("potrs: b has 4 rows", native.potrs, g, k.contiguous(), True, 0, torch.zeros(1, dtype=torch.int32))
    _raises("potrs: info must be int32, not int64", native.potrs, g, k.mT.contiguous(), True, 0, torch.zeros(1, dtype=torch.int64))
    buf = lambda t, device=-1: stand_in.Buffer(t.data_ptr(), list(t.shape), list(t.stride()), str(t.dtype)[6:], device)  # noqa: E731
    _raises("syrk: a is on device 1, the other operands on -1", stand_in.syrk, buf(k, 1), buf(g), True, False, 1.0, 0.0, 0)
    _raises(r"has row stride 2, need >= 6", stand_in.syrk, stand_in.Buffer(k.data_ptr(), [6, 6], [2, 1], "float64", -1), buf(g), True, False, 1.0, 0.0, 0)
    lwork, offsets = stand_in.potrf_plan(buf(g), True, 2, 0)
    info = torch.zeros(len(offsets) + 1, dtype=torch.int32)
    _raises(f"potrf: info has {len(offsets) + 1} elements, need {len(offsets)}", stand_in.potrf, buf(g), True, 2, buf(g.new_empty(lwork)), buf(info), 0)
    _raises(f"potrf: work has 1 elements, need at least {lwork}", stand_in.potrf, buf(g), True, 2, buf(g.new_empty(1)), buf(info[:-1]), 0)


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
    x = torch.eye(4, dtype=torch.float64, device="cuda") * 4
    assert int(native.potrf(x, True, 0)) == 0 and torch.equal(x.tril(), 2 * torch.eye(4, dtype=torch.float64, device="cuda"))
    with pytest.raises(ValueError, match="is on device -1, the other operands on 0"):
        native.potrs(x, torch.ones(1, 4, dtype=torch.float64), True, 0, torch.zeros(1, dtype=torch.int32, device="cuda"))
