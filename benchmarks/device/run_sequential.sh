#!/usr/bin/env bash
# On the GPU machine, from the repository root:  bash benchmarks/device/run_sequential.sh MODE
# Sequential editing (issue 12), MEMIT against AlphaEdit (docs/sequential.md). MODE:
#   default  the default model (SmolLM2-135M from the GGUF at .device/, MEMIT_FAST_DEFAULT_GGUF or
#            MEMIT_FAST_SEQ_GGUF) over all 250 CounterFact and all 300 zsRE records in batches of 25,
#            both methods: four processes at once on the visible GPU (data set x method), metrics
#            after every batch (records so far, first batch, GE). Budget 190 s.
#   gptj     GPT-J shapes with random weights (benchmarks/synthetic.py), bf16, one method
#            (MEMIT_FAST_SEQ_METHOD: memit or alphaedit) on the visible GPU: one-shot MEMIT of the
#            first N requests (the baseline per edit, after a warm-up apply of 8), then
#            MEMIT_FAST_SEQ_BATCHES (10) batches of N = MEMIT_FAST_SEQ_N (1000) edits, seconds per batch;
#            alphaedit also times the null-space eigh in float64 and float32. Budget 530 s.
# Each run works in its own folder, $OUT/default or $OUT/gptj_<method>, and leaves two files in
# $OUT: <folder>.tar.gz (run.log, records.jsonl (merge: python benchmarks/results_store.py merge
# records.jsonl), gpu_mem.csv (nvidia-smi every 5 s), summary.txt; default also eval_{cf,zsre}_<method>/
# results.json + report.md, report.md of both methods, curves.png) and <folder>.summary.txt.
# MEMIT_FAST_SEQ_BUDGET overrides the budget (seconds from the script's start; each stage gets
# what is left, SIGINT at its limit so the batches done are reported).
# CPU proof of the mechanics: MEMIT_FAST_SEQ_TINY=1 (default: the first 2 records in batches of 1,
# short generations, the local package's default model; gptj: the tiny GPT-J, N=4, 3 batches).
set -u
MODE=${1:-}
[[ $MODE == default || $MODE == gptj ]] || { echo "usage: $0 default|gptj   (gptj: MEMIT_FAST_SEQ_METHOD=memit|alphaedit)" >&2; exit 2; }
OUT=${OUT:-$PWD/device_out}
PY=${PYTHON:-python3}
TINY=${MEMIT_FAST_SEQ_TINY:-}
if [[ $MODE == gptj ]]; then
  METHOD=${MEMIT_FAST_SEQ_METHOD:-}
  [[ $METHOD == memit || $METHOD == alphaedit ]] || { echo "gptj: set MEMIT_FAST_SEQ_METHOD to memit or alphaedit" >&2; exit 2; }
  NAME=gptj_$METHOD
  BUDGET=${MEMIT_FAST_SEQ_BUDGET:-530}
else
  NAME=default
  BUDGET=${MEMIT_FAST_SEQ_BUDGET:-$([[ -n $TINY ]] && echo 1800 || echo 190)}
fi
D=$OUT/$NAME
rm -rf "$D" && mkdir -p "$D"
STAGE_MIN=10 STAGE_KILL=10 STAGE_SCALE=1
. "$(dirname "$0")/stage.sh"
device_env "$D/run.log"
pack() {  # the folder as one archive and its summary beside it (the device returns few files)
  [[ -n ${MEM_PID:-} ]] && kill "$MEM_PID" 2>/dev/null
  cp "$D/summary.txt" "$OUT/$NAME.summary.txt" 2>/dev/null
  tar -czf "$OUT/$NAME.tar.gz" -C "$OUT" "$NAME" && rm -rf "$D"
}
trap pack EXIT
trap 'exit 130' INT TERM
{
  echo "== $(date -u +%FT%TZ) commit $MEMIT_FAST_COMMIT, mode $NAME, budget ${BUDGET}s, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used --format=csv 2>&1
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
} >>"$LOG" 2>&1
command -v nvidia-smi >/dev/null && { nvidia-smi --query-gpu=timestamp,index,memory.used,utilization.gpu --format=csv -l 5 >"$D/gpu_mem.csv" 2>/dev/null & MEM_PID=$!; }

if [[ $MODE == gptj ]]; then
  if [[ -n $TINY ]]; then
    BENCH=(--tiny --per-batch 4 --batches 3 --device cpu --data ${MEMIT_FAST_SEQ_DATA:-../shared/data}/counterfact_250.json)
  else
    BENCH=(--per-batch "${MEMIT_FAST_SEQ_N:-1000}" --batches "${MEMIT_FAST_SEQ_BATCHES:-10}" --tokenizer .device/tokenizer --data .device/data/counterfact_250.json)
  fi
  [[ $METHOD == alphaedit ]] && BENCH+=(--eigh-float32)
  left=$((BUDGET - SECONDS - 5))
  stage "$NAME" "$left" "$PY" -m benchmarks.sequential_bench time --model gpt-j-6b --methods "$METHOD" --one-shot "${BENCH[@]}" \
    --budget $((left - 15)) --records "$D/records.jsonl"
  {
    echo "== GPT-J shapes, $METHOD: one-shot MEMIT baseline and seconds per batch"
    grep -E "^(gpt-j|null space|eigh in float32|N = |one-shot|peak)" "$LOG"
    sed -n '/^seconds per batch/,$p' "$LOG" | grep -v "^===" | head -30
    echo "== stages (budget ${BUDGET}s, ${SECONDS}s used)"; printf '%s\n' "${STATUS[@]}"
    grep -h -E "Error|error:" "$LOG" | tail -5
  } >"$D/summary.txt"
  cat "$D/summary.txt"
  exit 0
fi

if [[ -n $TINY ]]; then
  data=${MEMIT_FAST_SEQ_DATA:-../shared/data}
  DEV=(--device cpu --edits 2 --edit-batch 1 --fluency-records 1 --gen-length 12)
else
  data=.device/data
  [[ -n "${MEMIT_FAST_SEQ_GGUF:-}" ]] && export MEMIT_FAST_DEFAULT_GGUF=$MEMIT_FAST_SEQ_GGUF
  export MEMIT_FAST_CACHE=/tmp/memit_fast_cache
  DEV=(--device cuda --batch-size 256 --edit-batch 25 --n-samples 2000)
  stage convert 45 "$PY" -c "import memit_fast; print(memit_fast.default_model.convert())"
fi
# Four processes at once (the model is small): each its own log, limit, and results; SIGINT at
# the limit keeps the batches done. 12 s are kept for the joined report, curves and archive.
left=$((BUDGET - SECONDS - 12))
threads=$([[ -n $TINY ]] && echo 1 || echo 3)
jobs_run=()
for set in cf:counterfact_250.json zsre:zsre_eval_300.json; do
  for method in alphaedit memit; do
    ( LOG=$D/run_${set%%:*}_$method.log STATUS=()
      OMP_NUM_THREADS=$threads stage "seq_${set%%:*}_$method" "$left" "$PY" -m memit_fast.eval --sequential --method "$method" --quiet --no-plot \
        --corpus $data/wikitext-2-raw-wiki.test.raw "${DEV[@]}" --data "$data/${set#*:}" --out "$D/eval_${set%%:*}_$method"
      printf '%s\n' "${STATUS[@]}" >"$D/status_${set%%:*}_$method" ) &
    jobs_run+=($!)
  done
done
wait "${jobs_run[@]}"  # these four only: a bare wait would also wait for the nvidia-smi sampler, which never ends
for f in "$D"/run_*.log; do { echo "##### $(basename "$f")"; cat "$f"; } >>"$LOG"; rm -f "$f"; done
for f in "$D"/status_*; do STATUS+=("$(cat "$f")"); rm -f "$f"; done
results=("$D"/eval_*/results.json)
if [[ -f ${results[0]} ]]; then
  for f in "${results[@]}"; do
    "$PY" -m benchmarks.sequential_bench records "$f" --path "$D/records.jsonl" --command "bash benchmarks/device/run_sequential.sh default" >>"$LOG" 2>&1
  done
  "$PY" -m memit_fast.eval.sequential "${results[@]}" --out "$D/curves.png" --report "$D/report.md" >>"$LOG" 2>&1 || echo "no curves.png (matplotlib missing?)" >>"$LOG"
fi
{
  echo "== sequential eval, both methods (final tables)"
  [[ -f $D/report.md ]] && awk '/^## |INTERRUPTED/ {print; next} /^After the last batch/ {p = 1} /^### / {p = 0} p' "$D/report.md"
  echo "== edit seconds per batch"
  for f in "${results[@]}"; do
    [[ -f $f ]] && "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); [print(r["kind"], m, " ".join(f"{s:.2f}" for s in v["edit_s"])) for m, v in r["methods"].items()]' "$f"
  done
  echo "== stages (budget ${BUDGET}s, ${SECONDS}s used)"; printf '%s\n' "${STATUS[@]}"
  grep -h -E "Error|error:" "$LOG" | tail -5
} >"$D/summary.txt"
cat "$D/summary.txt"
