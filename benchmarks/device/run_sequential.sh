#!/usr/bin/env bash
# On the GPU machine (one H200), from the repository root:  bash benchmarks/device/run_sequential.sh
# Sequential editing (issue 12), MEMIT against AlphaEdit (docs/sequential.md), in about 240 s:
#   1. the default model (SmolLM2-135M from the GGUF at .device/, MEMIT_FAST_DEFAULT_GGUF or
#      MEMIT_FAST_SEQ_GGUF) over all 250 CounterFact records and all 300 zsRE records, in batches of
#      25, both methods: metrics after every batch (records so far, first batch, GE);
#   2. GPT-J shapes with random weights (benchmarks/synthetic.py): 10 batches of N edits per method
#      (N = MEMIT_FAST_SEQ_N, default 30: GPT-J's z costs ~43 ms per edit, so 2 x 10 x 30 edits fit
#      the stage), the seconds per batch against the edits made before it.
# Each stage has a time limit inside MEMIT_FAST_SEQ_BUDGET seconds (default 240). Files in $OUT
# (8): run.log, records.jsonl (merge: python benchmarks/results_store.py merge OUT/records.jsonl),
# eval_cf/ and eval_zsre/ results.json + report.md, curves.png of both (when matplotlib is there; else
# draw it here: python -m memit_fast.eval.sequential OUT/eval_*/results.json --out curves.png), summary.txt.
# CPU proof of the mechanics: MEMIT_FAST_SEQ_TINY=1 (the first 2 records in batches of 1, short
# generations, the tiny GPT-J with N=4 for 3 batches; default model from the local package; stage
# limits x30, budget MEMIT_FAST_SEQ_BUDGET as given).
set -u
OUT=${OUT:-$PWD/device_out}
PY=${PYTHON:-python3}
BUDGET=${MEMIT_FAST_SEQ_BUDGET:-240}
N=${MEMIT_FAST_SEQ_N:-30}
TINY=${MEMIT_FAST_SEQ_TINY:-}
SCALE=${MEMIT_FAST_SEQ_LIMIT_SCALE:-$([[ -n $TINY ]] && echo 30 || echo 1)}  # stage limits x SCALE (a CPU check is slow)
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
export MEMIT_FAST_COMMIT=${MEMIT_FAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
LOG=$OUT/run.log
STAGE_MIN=10 STAGE_KILL=10 STAGE_SCALE=$SCALE
. "$(dirname "$0")/stage.sh"
{
  echo "== $(date -u +%FT%TZ) commit $MEMIT_FAST_COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
} >>"$LOG" 2>&1
if [[ -n "$TINY" ]]; then
  data=${MEMIT_FAST_SEQ_DATA:-../shared/data}
  DEV=(--device cpu --edits 2 --edit-batch 1 --fluency-records 1 --gen-length 12)
  BENCH=(--tiny --per-batch 4 --batches 3 --device cpu)
else
  data=.device/data
  [[ -n "${MEMIT_FAST_SEQ_GGUF:-}" ]] && export MEMIT_FAST_DEFAULT_GGUF=$MEMIT_FAST_SEQ_GGUF
  export MEMIT_FAST_CACHE=/tmp/memit_fast_cache
  DEV=(--device cuda --batch-size 256 --edit-batch 25 --n-samples 2000)
  BENCH=(--per-batch "$N" --batches 10 --tokenizer .device/tokenizer --data $data/counterfact_250.json)
  stage convert 45 "$PY" -c "import memit_fast; print(memit_fast.default_model.convert())"
fi
EV=("$PY" -m memit_fast.eval --sequential --method alphaedit,memit --corpus $data/wikitext-2-raw-wiki.test.raw --quiet --no-plot "${DEV[@]}")
stage seq_cf 85 "${EV[@]}" --data $data/counterfact_250.json --out "$OUT/eval_cf"
stage seq_zsre 55 "${EV[@]}" --data $data/zsre_eval_300.json --out "$OUT/eval_zsre"
for f in "$OUT"/eval_cf/results.json "$OUT"/eval_zsre/results.json; do
  [[ -f $f ]] && "$PY" -m benchmarks.sequential_bench records "$f" --path "$OUT/records.jsonl" --command "bash benchmarks/device/run_sequential.sh" >>"$LOG" 2>&1
done
"$PY" -m memit_fast.eval.sequential "$OUT"/eval_*/results.json --out "$OUT/curves.png" >>"$LOG" 2>&1 || echo "no curves.png (matplotlib missing?)" >>"$LOG"
left=$((BUDGET - SECONDS - 5))
stage gptj_batches $((left / SCALE)) "$PY" -m benchmarks.sequential_bench time --model gpt-j-6b "${BENCH[@]}" --budget $((left - 5)) --records "$OUT/records.jsonl"
{
  echo "== sequential eval (final tables)"
  for f in "$OUT"/eval_cf/report.md "$OUT"/eval_zsre/report.md; do [[ -f $f ]] && sed -n '/After the last batch/,/^### /p' "$f" | head -25; done
  echo "== GPT-J shapes, seconds per batch"
  sed -n '/^seconds per batch/,$p' "$LOG" | grep -v "^===" | head -25
  echo "== stages (budget ${BUDGET}s, ${SECONDS}s used)"; printf '%s\n' "${STATUS[@]}"
  grep -h -E "Error|error:" "$LOG" | tail -5
} | tee "$OUT/summary.txt"
