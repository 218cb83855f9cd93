#!/usr/bin/env bash
# On the GPU machine, from the repository root:  bash benchmarks/device/run_forward.sh
# The forward-path run (issue 8): optionally the native build (MEMIT_FAST_FORWARD_BUILD=1), the
# GPU tests (MEMIT_FAST_FORWARD_TESTS: paths, or none; MEMIT_FAST_FORWARD_MARK: a marker expression), then edit profiles (fast mode,
# statistics cached) for each MODEL:EDITS of MEMIT_FAST_FORWARD_RUNS (default
# "gpt-j-6b:1000,5000"), then the statistics pass at 1M tokens (MEMIT_FAST_FORWARD_NO_STATS=1 skips it).
# With MEMIT_FAST_FORWARD_GGUF=FILE (the default model, shared/tools/device-model-parts), first:
# CounterFact-250 and zsRE-300 edited all at once with the default model (eval, WikiText-2
# statistics from 2,000 lines) and the z steps' histogram on CounterFact-250. Each stage has a time limit inside MEMIT_FAST_DEVICE_BUDGET seconds (default 540);
# files go to $OUT (at most 8): run.log, records.jsonl (merge it with
# `python benchmarks/results_store.py merge OUT/records.jsonl`), summary.txt, printed last.
# Needs the tokenizer at .device/tokenizer (shared/tools/device-model-parts saves it).
set -u
OUT=${OUT:-$PWD/device_out}
PY=${PYTHON:-python3}
BUDGET=${MEMIT_FAST_DEVICE_BUDGET:-540}
RUNS=${MEMIT_FAST_FORWARD_RUNS-gpt-j-6b:1000,5000}  # set and empty: no edit runs
. "$(dirname "$0")/stage.sh"
device_env "$OUT/run.log"
log_machine
if [[ -n "${MEMIT_FAST_FORWARD_GGUF:-}" ]]; then
  export MEMIT_FAST_DEFAULT_GGUF=$MEMIT_FAST_FORWARD_GGUF MEMIT_FAST_CACHE=/tmp/memit_fast_cache
  data=.device/data
  stage convert 90 "$PY" -c "import memit_fast; print(memit_fast.default_model.convert())"
  EV=("$PY" -m memit_fast.eval --device cuda --batch-size 256 --corpus $data/wikitext-2-raw-wiki.test.raw --n-samples 2000 --quiet)
  stage eval_cf 150 "${EV[@]}" --data $data/counterfact_250.json --out "$OUT/eval_counterfact_250"
  stage eval_zsre 90 "${EV[@]}" --data $data/zsre_eval_300.json --out "$OUT/eval_zsre_300"
  "$PY" benchmarks/results_store.py --path "$OUT/records.jsonl" add-eval "$OUT"/eval_*/results.json --command "bash benchmarks/device/run_forward.sh (MEMIT_FAST_FORWARD_GGUF)" >>"$LOG" 2>&1
  stage z_steps 90 "$PY" -m benchmarks.z_steps --data $data/counterfact_250.json --records "$OUT/records.jsonl"
fi
if [[ -n "${MEMIT_FAST_FORWARD_BUILD:-}" ]]; then
  rm -rf build memit_fast/_native*.so
  stage build 120 env MEMIT_FAST_BUILD_NATIVE=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  "$PY" -m memit_fast info >>"$LOG" 2>&1
fi
MARK=(); [[ -n "${MEMIT_FAST_FORWARD_MARK:-}" ]] && MARK=(-m "$MEMIT_FAST_FORWARD_MARK")
if [[ "${MEMIT_FAST_FORWARD_TESTS:-}" != none ]]; then
  stage gpu_tests 150 "$PY" -m pytest -q -rfE -p no:cacheprovider "${MARK[@]}" ${MEMIT_FAST_FORWARD_TESTS:-tests/test_gpu_paths.py tests/test_layouts.py}
fi
for run in $RUNS; do
  m=${run%%:*}; limit=${MEMIT_FAST_FORWARD_LIMIT:-330}
  stage "profile_$m" $limit "$PY" -m benchmarks.profile_edits --model "$m" --edits "${run#*:}" --reference-subset 0 \
    --records "$OUT/records.jsonl" --tokenizer .device/tokenizer --budget $((limit - 20)) ${MEMIT_FAST_FORWARD_ARGS:-}
done
if [[ -z "${MEMIT_FAST_FORWARD_NO_STATS:-}" ]]; then
  stage stats 150 "$PY" -m benchmarks.profile_edits --model gpt-j-6b --edits none --reference-subset 0 --stats --stats-tokens 1000000 \
    --stats-tokens-per-layer 100000 --records "$OUT/records.jsonl" --tokenizer .device/tokenizer --tag stats --budget 130
fi
[[ "${MEMIT_FAST_FORWARD_TESTS:-}" != none ]] && "$PY" benchmarks/results_store.py --path "$OUT/records.jsonl" add-pytest "$LOG" --name "gpu tests (run_forward.sh)" >>"$LOG" 2>&1
"$PY" benchmarks/plot_results.py --records "$OUT/records.jsonl" --out "$OUT/tables" --no-plot >/dev/null 2>>"$LOG"
{
  echo "== results"; cat "$OUT/tables/results.md" 2>/dev/null; rm -rf "$OUT/tables"
  echo "== stages (budget ${BUDGET}s, ${SECONDS}s used)"; printf '%s\n' "${STATUS[@]}"
  grep -h -E "passed|failed|error|Error" "$LOG" | tail -15
} | tee "$OUT/summary.txt"
