#!/usr/bin/env bash
# On the GPU machine, from the repository root:  bash benchmarks/device/run_native.sh
# Builds memit_fast._native from a clean tree (one command, no internet), runs the kernel /
# solver / native tests, the kernel benchmarks, and prints a summary last. Every stage logs to
# $OUT (default ./device_out; 8 files) and the next stage runs whatever happened. About 5
# minutes; every stage has a time limit and all of them fit in MEMIT_FAST_DEVICE_BUDGET seconds
# (default 450, under the 8 minutes of one device call). MEMIT_FAST_POTRF_BLOCK=0 /
# MEMIT_FAST_POTRS_BLOCK=0 switch the blocked potrf / potrs off (one cuSOLVER call each).
# MEMIT_FAST_BENCH_TINY=1: small benchmark sizes (to try the script on a CPU machine).
# Results: $OUT/records.jsonl (tests, kernels_device, bench_kernels; benchmarks/results_store.py).
set -u
OUT=${OUT:-$PWD/device_out}
PY=${PYTHON:-python3}
BUDGET=${MEMIT_FAST_DEVICE_BUDGET:-450}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MEMIT_FAST_COMMIT=${MEMIT_FAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
STATUS=()
stage() {  # stage NAME SECONDS LOG CMD...: run with a time limit (SIGINT first: pytest still reports)
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$SECONDS left=$((BUDGET - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then STATUS+=("$name: skipped, out of time"); return; fi
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$log"
  timeout -s INT -k 20 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  STATUS+=("$name: rc=$rc in $((SECONDS - t0))s")
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$log"
}

{
  nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit --format=csv
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(nvidia-cu(blas|solver)|pybind11|cmake|ninja|setuptools|pytest)"
  echo "commit $MEMIT_FAST_COMMIT"
} >"$OUT/env.txt" 2>&1

# 1. build from a clean tree: one command
rm -rf build memit_fast/_native*.so
stage build 150 "$OUT/build.log" env MEMIT_FAST_BUILD_NATIVE=1 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
"$PY" -m memit_fast info >>"$OUT/env.txt" 2>&1

# 2. tests of the kernels, solves and native module: the GPU ones, then the CPU ones as CI runs
#    them (no CUDA device visible: torch paths, Triton in its interpreter, the CMake compile check)
TESTS="tests/test_native_build.py tests/test_solve.py tests/test_kernels_capture.py tests/test_kernels_covariance.py tests/test_kernels_gram.py"
stage tests_gpu 150 "$OUT/tests.log" "$PY" -m pytest -p no:cacheprovider -q -rfE -m "cuda or native" $TESTS
stage tests_cpu 60 "$OUT/tests.log" env CUDA_VISIBLE_DEVICES= "$PY" -m pytest -p no:cacheprovider -q -rfE \
  -m "not cuda and not native" $TESTS
"$PY" benchmarks/results_store.py --path "$OUT/records.jsonl" add-pytest "$OUT/tests.log" --name "kernel and solve tests (GPU, then CPU)" \
  --command "pytest -m 'cuda or native' $TESTS; CUDA_VISIBLE_DEVICES= pytest -m 'not cuda and not native' $TESTS" >>"$OUT/tests.log" 2>&1

# 3. benchmarks: ceilings, every kernel at real sizes, table + JSON
stage kernels_device 180 "$OUT/bench.log" "$PY" benchmarks/kernels_device.py --records "$OUT/records.jsonl" \
  ${MEMIT_FAST_BENCH_TINY:+--tiny}
stage bench_kernels 60 "$OUT/bench.log" "$PY" -m pytest -p no:cacheprovider -q benchmarks/bench_kernels.py \
  --records "$OUT/records.jsonl" --benchmark-columns=median,iqr,rounds

# 4. what the compiler made of the covariance kernel: registers, spills, tensor-core instructions
{
  OBJ=$(command -v cuobjdump || ls "$("$PY" -c 'import triton, os; print(os.path.dirname(triton.__file__))')"/backends/nvidia/bin/cuobjdump)
  for f in $(ls -t ~/.triton/cache/*/_syrk_lower*.cubin ~/.triton/cache/*/_split_fp16x3*.cubin 2>/dev/null | head -12); do
    echo "$f"; "$OBJ" --dump-resource-usage "$f" | grep -o -E "REG:[0-9]+ STACK:[0-9]+ SHARED:[0-9]+"
    "$OBJ" --dump-sass "$f" | grep -o -E "HGMMA\.[0-9x]+\.[A-Z0-9.]+|UTMALDG|LDGSTS|LDL|STL|STG\.E[.0-9A-Z]*|LDG\.E[.0-9A-Z]*" | sort | uniq -c
  done
} >"$OUT/triton_kernels.txt" 2>&1

# 5. summary, last
{
  echo "== stages"; printf '%s\n' "${STATUS[@]}"
  echo "== native"; tail -1 "$OUT/env.txt"
  echo "== tests (gpu, then cpu)"; grep -E "^[0-9]+ (passed|failed|skipped)|no tests ran" "$OUT/tests.log" | tail -4
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -15
  echo "== benchmarks (kernels_device table)"; sed -n '/^section /,/^=== kernels_device/p' "$OUT/bench.log" | head -90
  echo "== bench_kernels"; grep -E "passed|failed" "$OUT/bench.log" | tail -1
} | tee "$OUT/summary.txt"
