#!/usr/bin/env bash
# On the GPU machine, from the repository root:  bash benchmarks/device/run_profile.sh
# End-to-end profiles of memit_fast.apply (benchmarks/profile_edits.py) on random-weight models,
# most important numbers first:
#   gptj    GPT-J 6B: fast 100 edits (seconds), the reference mode on 32 requests + its one-layer
#           measurements (keys on 1000 requests, the dense fp64 solve at each N), fast 10,000 edits,
#           fast 1,000, then a torch.profiler trace of 8 edits if time is left
#   stats   GPT-J statistics: compute_stats fused (all six layers, one pass) vs one pass per layer
#   gptj_mem  GPT-J fast 1,000 edits with z chunks capped at 2048 suffix tokens (--chunk-tokens):
#           the peak memory of z does not grow with N, so this shows the cap's peak and cost
#   gpt2xl  GPT-2 XL: fast 100 and 1,000, reference on 16 requests
#   llama   Llama-3-8B: fast 100 and 1,000, reference on 16 requests
# Each stage is one process with a time limit (SIGINT at the limit: the profiler writes what it
# has) and its own budget, inside MEMIT_FAST_PROFILE_BUDGET seconds in all (default 540); a failed
# stage is logged and the next runs. Files under $OUT (at most 8): run.log, records.jsonl (every
# stage appends its records: benchmarks/results_store.py), summary.txt (stages and every table),
# the trace (.json.gz). Prints the summary last. Then, here:
#   python benchmarks/results_store.py merge DEVICE_OUT/records.jsonl && python benchmarks/plot_results.py
# Settings: MEMIT_FAST_PROFILE_STAGES (default "gptj stats gptj_mem gpt2xl llama"),
#   MEMIT_FAST_PROFILE_GPTJ_EDITS (default 100,10000,1000), MEMIT_FAST_PROFILE_REF (default 32),
#   MEMIT_FAST_BENCH_TINY=1 (tiny configs, few edits: to try this script on a CPU machine).
# Needs: memit_fast importable from the repo root (the native module is used if built, not
# rebuilt here), the tokenizer at .device/tokenizer, CounterFact at .device/data/counterfact_250.json.
set -u
OUT=${OUT:-$PWD/device_out}
PY=${PYTHON:-python3}
BUDGET=${MEMIT_FAST_PROFILE_BUDGET:-540}
STAGES=${MEMIT_FAST_PROFILE_STAGES:-gptj stats gptj_mem gpt2xl llama}
GPTJ_EDITS=${MEMIT_FAST_PROFILE_GPTJ_EDITS:-100,10000,1000}
REF=${MEMIT_FAST_PROFILE_REF:-32}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-20}
export MEMIT_FAST_COMMIT=${MEMIT_FAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
LOG=$OUT/run.log
COMMON=(--records "$OUT/records.jsonl" --tokenizer .device/tokenizer)
[[ -f .device/data/counterfact_250.json ]] && COMMON+=(--data .device/data/counterfact_250.json)
TINY=()
if [[ -n "${MEMIT_FAST_BENCH_TINY:-}" ]]; then
  TINY=(--tiny --steps 3 --reference-keys-requests 16 --stats-tokens 8000 --stats-tokens-per-layer 4000)
  GPTJ_EDITS=${MEMIT_FAST_PROFILE_GPTJ_EDITS:-8,64,16}; REF=${MEMIT_FAST_PROFILE_REF:-2}
  MEMIT_FAST_PROFILE_OTHER_EDITS=${MEMIT_FAST_PROFILE_OTHER_EDITS:-8,32}; MEMIT_FAST_PROFILE_MEM_EDITS=${MEMIT_FAST_PROFILE_MEM_EDITS:-16}
fi
STATUS=()

stage() {  # stage NAME LIMIT ARGS...: profile_edits with a time limit and a budget 15 s under it
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((BUDGET - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 40)); then STATUS+=("$name: skipped, ${left}s of the budget left"); return; fi
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$LOG"
  timeout -s INT -k 20 "$limit" "$PY" -m benchmarks.profile_edits "${COMMON[@]}" --budget $((limit - 15)) "$@" "${TINY[@]}" >>"$LOG" 2>&1
  local rc=$?
  STATUS+=("$name: rc=$rc in $((SECONDS - t0))s")
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
}

{
  echo "== environment ($(date -u +%FT%TZ), commit $MEMIT_FAST_COMMIT)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1
  "$PY" -m memit_fast info 2>&1
  [[ -f .device/data/counterfact_250.json ]] || echo "WARNING: .device/data/counterfact_250.json missing: using shared/data or the built-in records"
} >>"$LOG"

for s in $STAGES; do
  case $s in
    gptj) stage gptj 480 --model gpt-j-6b --edits "$GPTJ_EDITS" --reference-subset "$REF" --torch-profile "$OUT" ;;
    gptj_mem) stage gptj_mem 110 --model gpt-j-6b --edits "${MEMIT_FAST_PROFILE_MEM_EDITS:-1000}" --reference-subset 0 --chunk-tokens 2048 --tag chunk2048 ;;
    stats) stage stats 120 --model gpt-j-6b --edits none --reference-subset 0 --stats --tag stats ;;
    gpt2xl) stage gpt2xl 100 --model gpt2-xl --edits "${MEMIT_FAST_PROFILE_OTHER_EDITS:-100,1000}" --reference-subset $((REF > 16 ? 16 : REF)) --reference-keys-requests 500 ;;
    llama) stage llama 130 --model llama-3-8b --edits "${MEMIT_FAST_PROFILE_OTHER_EDITS:-100,1000}" --reference-subset $((REF > 16 ? 16 : REF)) --reference-keys-requests 500 ;;
    *) STATUS+=("$s: unknown stage (gptj, stats, gptj_mem, gpt2xl, llama)") ;;
  esac
done
rm -f "$OUT"/trace_*_ops.txt

# Tables of every profile (plot_results.py; results.md is folded into summary.txt: 8 files at most), then the summary, last
TABLES=${TMPDIR:-/tmp}/memit_fast_tables
"$PY" benchmarks/plot_results.py --records "$OUT/records.jsonl" --out "$TABLES" --no-plot >/dev/null 2>>"$LOG" || echo "plot_results failed (see run.log)" >>"$LOG"
{
  echo "== results"; cat "$TABLES/results.md" 2>/dev/null
  echo "== files"; ls -la "$OUT"
  echo "== stages (budget ${BUDGET}s, ${SECONDS}s used)"; printf '%s\n' "${STATUS[@]}"
  grep -h -E "^\[profile\] .*(error|skipped|interrupted)" "$LOG" | head -20
} | tee "$OUT/summary.txt"
