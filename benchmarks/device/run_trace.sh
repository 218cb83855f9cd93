#!/usr/bin/env bash
# On the GPU machine, from the repository root:  bash benchmarks/device/run_trace.sh   (about 300 s)
# Causal tracing (issue 13, docs/tracing.md):
#  1. `memit-fast trace` over all 1,209 known facts on the default model (bfloat16, 10 noise
#     samples, the facts whose attribute the model predicts, about 280 in float32 on the CPU):
#     average heatmaps + suggested layers (stopped after 75 s of tracing if not done);
#  2. speed at GPT-J shapes (random weights): 100 known facts traced in the fast mode as facts/s
#     (blocks of 16 facts, none started after 95 s), beside the original structure (one
#     restoration per forward) timed on 60 restorations in the same run and extrapolated per fact;
#  3. CounterFact-250 edited all at once with the suggested layers and with the preset's
#     (float32, WikiText-2 statistics from 2,000 lines, no fluency).
# Needs .device/tokenizer, .device/data/{known_1000,counterfact_250}.json,
# .device/data/wikitext-2-raw-wiki.test.raw and MEMIT_FAST_DEFAULT_GGUF (the default model's GGUF).
# Files to $OUT (8): run.log, records.jsonl (merge: python benchmarks/results_store.py merge
# OUT/records.jsonl), summary.txt, trace_known/{trace.json,average.png,hparams.json,facts/2 PNGs}.
# MEMIT_FAST_TRACE_TINY=1: the CPU proof (the same stages on a tiny random Llama, 1,000-token vocabulary:
# 4 facts, 2 samples, 4 CounterFact edits; tiny GPT-J speed; with MEMIT_FAST_DEVICE_BUDGET=1500), data from MEMIT_FAST_TRACE_DATA (default .device/data).
set -u
OUT=${OUT:-$PWD/device_out}
PY=${PYTHON:-python3}
BUDGET=${MEMIT_FAST_DEVICE_BUDGET:-320}
DATA=${MEMIT_FAST_TRACE_DATA:-.device/data}
TINY=${MEMIT_FAST_TRACE_TINY:-}
export MEMIT_FAST_CACHE=${MEMIT_FAST_CACHE:-/tmp/memit_fast_cache}
STAGE_MIN=15 STAGE_KILL=10
. "$(dirname "$0")/stage.sh"
device_env "$OUT/run.log"
{
  echo "== $(date -u +%FT%TZ) commit $MEMIT_FAST_COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
} >>"$LOG" 2>&1
TR=$OUT/trace_known
# the full run; MEMIT_FAST_TRACE_TINY=1 runs the same stages on a tiny random Llama on the CPU
# (stage limits: the tracing time plus room for loading, CUDA start-up and the figures)
M=(); DEV=(--device cuda); TRACE=(--dtype bfloat16 --max-seconds 75); EVAL=(--batch-size 256 --n-samples 2000)
SPEED=(--facts 100 --tokenizer .device/tokenizer --max-seconds 95 --reference-forwards 60); T_TRACE=110; T_EVAL=35; T_SPEED=135
if [[ -n "$TINY" ]]; then
  "$PY" - /tmp/trace_tiny_model <<'EOF' >>"$LOG" 2>&1
import sys, torch
from transformers import AutoModelForCausalLM
from benchmarks import synthetic
tok = synthetic.fallback_tokenizer()
config = synthetic.make_config("llama-3-8b", tiny=True)
config.vocab_size = len(tok)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config).save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
EOF
  M=(--model /tmp/trace_tiny_model); DEV=(--device cpu); TRACE=(--limit 4 --samples 2 --answer model --max-seconds 240)
  EVAL=(--edits 4 --n-samples 50); SPEED=(--tiny --facts 6 --samples 2 --max-seconds 20 --reference-forwards 10); T_TRACE=300; T_EVAL=300; T_SPEED=300
else
  stage convert 45 "$PY" -c "import memit_fast; print(memit_fast.default_model.convert())"
fi
# all 1,209 facts; --max-seconds keeps the stage inside its limit (facts left are reported)
stage trace_known $T_TRACE "$PY" -m memit_fast trace "${M[@]}" "${DEV[@]}" --data $DATA/known_1000.json --answer given \
  --suggest --fact-plots 2 --quiet --out "$TR" --overwrite "${TRACE[@]}"
[[ -f "$TR/trace.json" ]] && "$PY" -m benchmarks.trace_bench --from-trace "$TR/trace.json" --records "$OUT/records.jsonl" \
  --command "bash benchmarks/device/run_trace.sh (memit-fast trace, all known facts)" >>"$LOG" 2>&1
stage speed_gptj $T_SPEED "$PY" -m benchmarks.trace_bench --model gpt-j-6b --data $DATA/known_1000.json --records "$OUT/records.jsonl" "${SPEED[@]}"
EV=("$PY" -m memit_fast.eval "${M[@]}" "${DEV[@]}" --corpus $DATA/wikitext-2-raw-wiki.test.raw --no-fluency --quiet
    --data $DATA/counterfact_250.json --overwrite "${EVAL[@]}")
if [[ -f "$TR/hparams.json" ]]; then
  stage eval_suggested $T_EVAL "${EV[@]}" --hparams "$TR/hparams.json" --out /tmp/trace_eval_suggested
  "$PY" benchmarks/results_store.py --path "$OUT/records.jsonl" add-eval /tmp/trace_eval_suggested/results.json \
    --command "bash benchmarks/device/run_trace.sh (eval, suggested layers from trace_known/hparams.json)" >>"$LOG" 2>&1
fi
stage eval_preset $T_EVAL "${EV[@]}" --out /tmp/trace_eval_preset
"$PY" benchmarks/results_store.py --path "$OUT/records.jsonl" add-eval /tmp/trace_eval_preset/results.json \
  --command "bash benchmarks/device/run_trace.sh (eval, preset layers)" >>"$LOG" 2>&1
{
  echo "== trace of the known facts"
  "$PY" - "$TR/trace.json" <<'EOF' 2>/dev/null || echo "(no trace.json)"
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
print(f"traced {s['facts_traced']} facts ({s['facts_skipped']} skipped) in {s['seconds']:.1f} s; total effect {s['average_total_effect']:.3f}")
print(f"suggested layers {s.get('suggested_layers')} (preset {s.get('preset_layers')})")
g = s["token_groups"].index("last subject token")
print("MLP AIE at the last subject token:", " ".join(f"{x:.3f}" for x in s["average_indirect_effect"]["mlp"][g]))
EOF
  for e in suggested preset; do echo "== eval $e"; sed -n '/| metric/,/^$/p' /tmp/trace_eval_$e/report.md 2>/dev/null | head -14; done
  echo "== speed"; grep -E "^(fast|reference)" "$LOG"
  echo "== stages (budget ${BUDGET}s, ${SECONDS}s used)"; printf '%s\n' "${STATUS[@]}"
} | tee "$OUT/summary.txt"
