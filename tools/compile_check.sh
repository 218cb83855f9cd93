#!/usr/bin/env bash
# Builds csrc/ (memit_fast._native) with warnings as errors into a temporary folder and
# smoke-tests the module: imports, ABI version, a clear error for a missing library.
# Needs cmake, a C++17 compiler and pybind11; no GPU and no CUDA toolkit. CI calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
B=$(mktemp -d)
trap 'rm -rf "$B"' EXIT
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake --fresh -S . -B "$B" "${GEN[@]}" -DMEMIT_FAST_WERROR=ON -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$B/out" >"$B/configure.log" \
  || { cat "$B/configure.log"; exit 1; }
cmake --build "$B"
PYTHONPATH="$B/out" "$PY" - <<'PYEOF'
import _native
assert _native.ABI_VERSION == 1, _native.ABI_VERSION
for fn in ("load_cuda_libs", "potrf_workspace", "potrf", "potrs", "syrk", "trsm"):
    assert callable(getattr(_native, fn)), fn
try:
    _native.load_cuda_libs("libcublas.so.0-missing", "libcusolver.so.0-missing")
except RuntimeError as e:
    assert "libcublas.so.0-missing" in str(e), e
else:
    raise SystemExit("loading a missing library did not fail")
assert not _native.cuda_libs_loaded()
print("compile_check: ok")
PYEOF
