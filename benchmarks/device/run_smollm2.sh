#!/usr/bin/env bash
# SmolLM2-135M (the default model) on the GPU machine, from the repository root:
#   bash benchmarks/device/run_smollm2.sh GGUF
# GGUF: the model file (see shared/tools/device-model-parts); .device/data holds
# counterfact_250.json, zsre_eval_300.json and wikitext-2-raw-wiki.test.raw.
# Stages (each with a time limit; a failed stage is logged and the next runs):
#   build   the native module (cuSOLVER solves)
#   demo    `memit-fast demo` on the GPU (preset: statistics sampled from the model)
#   cf      CounterFact, all 250 records edited at once, before/after, fluency included
#   zsre    zsRE, all 300 records edited at once
#   sweep   layers x lambda on CounterFact-250 (no fluency): how the preset was chosen
# Statistics for cf/zsre/sweep: WikiText-2 test, 2000 documents (lines). At most 8 files in $OUT.
set -u
gguf=${1:?usage: run_smollm2.sh GGUF}
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
data=.device/data
corpus=$data/wikitext-2-raw-wiki.test.raw
export MEMIT_FAST_DEFAULT_GGUF=$gguf MEMIT_FAST_CACHE=/tmp/memit_fast_cache PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export MEMIT_FAST_COMMIT=${MEMIT_FAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
LOG=$OUT/log.txt
STATUS=()
stage() {  # stage NAME LIMIT CMD...
  local name=$1 limit=$2 t0=$SECONDS; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)" >>"$LOG"
  timeout -s INT -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  STATUS+=("$name: rc=$rc in $((SECONDS - t0))s")
}
{ date -u +%FT%TZ; echo "commit $MEMIT_FAST_COMMIT"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } >"$OUT/env.txt" 2>&1
stage build 120 env MEMIT_FAST_BUILD_NATIVE=1 python3 -m pip install --no-build-isolation --no-deps -e .
python3 -m memit_fast info >>"$OUT/env.txt" 2>&1
stage convert 90 python3 -c "import memit_fast; print(memit_fast.default_model.convert())"
stage demo 150 bash -c "python3 -m memit_fast.cli demo --quiet > $OUT/demo_gpu.txt 2>&1"
EV=(python3 -m memit_fast.eval --device cuda --batch-size 256 --corpus "$corpus" --n-samples 2000)
stage cf 240 "${EV[@]}" --data $data/counterfact_250.json --out "$OUT/eval_counterfact_250"
stage zsre 120 "${EV[@]}" --data $data/zsre_eval_300.json --out "$OUT/eval_zsre_300"
python3 benchmarks/results_store.py --path "$OUT/records.jsonl" add-eval "$OUT"/eval_*/results.json --command "bash benchmarks/device/run_smollm2.sh (memit_fast.eval)" >>"$LOG" 2>&1
stage sweep 200 python3 -m benchmarks.sweep_smollm2 --data $data/counterfact_250.json --corpus "$corpus" --records "$OUT/records.jsonl"
{ echo "== stages"; printf '%s\n' "${STATUS[@]}"; echo "== demo"; cat "$OUT/demo_gpu.txt"
  for f in "$OUT"/eval_*/report.md; do echo "== $f"; cat "$f"; done
  echo "== sweep"; grep -E "^\{" "$LOG" | tail -8; } | tee -a "$LOG"
