#!/usr/bin/env bash
# Builds csrc/ (memit_fast._native) and the tests' CPU stand-in for cuBLAS/cuSOLVER
# (tests/cpu_cuda_libs.cpp) with warnings as errors, and smoke-tests the module: imports, ABI
# version, a clear error for a missing library and for a bad operand.
# Needs cmake, a C++17 compiler and pybind11; no GPU and no CUDA toolkit. CI calls this.
# Usage: tools/compile_check.sh [OUT]: the module and the stand-in are left in OUT (default: a
# temporary folder, removed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
B=$(mktemp -d)
trap 'rm -rf "$B"' EXIT
OUT=${1:-$B/out}
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake --fresh -S . -B "$B" "${GEN[@]}" -DMEMIT_FAST_WERROR=ON -DMEMIT_FAST_CPU_STAND_IN=ON \
  -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$OUT" >"$B/configure.log" || { cat "$B/configure.log"; exit 1; }
cmake --build "$B"
PYTHONPATH="$OUT" "$PY" - <<'PYEOF'
import _native
assert _native.ABI_VERSION == 2, _native.ABI_VERSION
for fn in ("load_cuda_libs", "potrf_plan", "potrf", "potrs", "syrk", "trsm"):
    assert callable(getattr(_native, fn)), fn
try:
    _native.load_cuda_libs("libcublas.so.0-missing", "libcusolver.so.0-missing")
except RuntimeError as e:
    assert "libcublas.so.0-missing" in str(e), e
else:
    raise SystemExit("loading a missing library did not fail")
assert not _native.cuda_libs_loaded()
try:  # operands are checked before any library call
    _native.potrf_plan(_native.Buffer(16, [4, 4], [4, 1], "float16", 0), True, 0, 0)
except ValueError as e:
    assert "potrf_plan: a must be float32 or float64, not float16" in str(e), e
else:
    raise SystemExit("a float16 operand was not refused")
print("compile_check: ok")
PYEOF
