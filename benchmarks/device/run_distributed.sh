#!/usr/bin/env bash
# On a machine with 2 GPUs, from the repository root:  bash benchmarks/device/run_distributed.sh [dp|split|keys]
# Several GPUs (issue 11, docs/distributed.md). Both modes first run the 2-GPU tests of tests/test_distributed.py
# (`-m cuda`: tiny models of every family split over cuda:0 and cuda:1, blocks in order and alternating; forward,
# statistics, z, keys and deltas equal to one GPU's).
# dp (default): data parallel, GPT-J shapes (random weights), torchrun with 1 then 2 ranks: the statistics pass over
#   MEMIT_FAST_DIST_TOKENS tokens (default 2,000,000) and MEMIT_FAST_DIST_EDITS edits (default 2000). Budget 420 s.
# split: one process, a model split over the 2 GPUs (random bf16 weights made on the GPUs, never on the CPU):
#   NeoX-20B shapes: the statistics pass over MEMIT_FAST_SPLIT_TOKENS tokens (default 1,000,000) and
#   MEMIT_FAST_SPLIT_NEOX_EDITS edits (default 1000); Llama-3-70B shapes, the last MEMIT_FAST_SPLIT_LLAMA_LAYERS (5)
#   of its preset's critical layers: the same statistics pass and MEMIT_FAST_SPLIT_LLAMA_EDITS edits (default 128:
#   1,000 do not fit the call; the summary gives the time per edit, and 1,000 edits' time marked extrapolated).
#   Budget 545 s.
# keys: the phases after z at MEMIT_FAST_DIST_EDITS edits (default 10000) with z of one step (`--z-steps 1`), 1 then 2
#   ranks, then 2 ranks at 4,000 edits with rank 0 under torch.profiler (why the key phase did not halve on two GPUs in
#   session 5, when it is linear on one: benchmarks/NOTES.md, session 7). Budget 300 s.
# Each stage has a time limit inside MEMIT_FAST_DEVICE_BUDGET seconds; a benchmark appends each phase's record as soon
# as the phase ends. Files go to $OUT (4): run.log, records.jsonl (merge it with
# `python benchmarks/results_store.py merge OUT/records.jsonl`), gpu_memory.csv (nvidia-smi every 2 s: memory used
# per GPU), summary.txt (the tables and the stages' outcomes), printed last. Needs the tokenizer at .device/tokenizer
# and .device/data/counterfact_250.json.
# MEMIT_FAST_DIST_TINY=1: tiny shapes on the CPU (gloo), no GPU tests, to prove the script (a few minutes on 2 cores).
# MEMIT_FAST_DIST_TESTS=0 skips the GPU tests; MEMIT_FAST_DIST_LIMIT_1 / _2 set the dp stages' limits (185 / 115 s).
# 10,000 edits on 1 and 2 GPUs in one call (about 290 + 160 s with the Triton attention, predicted):
#   MEMIT_FAST_DIST_TOKENS=0 MEMIT_FAST_DIST_EDITS=10000 MEMIT_FAST_DIST_TESTS=0 MEMIT_FAST_DIST_LIMIT_1=340 \
#   MEMIT_FAST_DIST_LIMIT_2=220 MEMIT_FAST_DEVICE_BUDGET=575 bash benchmarks/device/run_distributed.sh dp
set -u
MODE=${1:-dp}
[[ "$MODE" == dp || "$MODE" == split || "$MODE" == keys ]] || { echo "usage: $0 [dp|split|keys]" >&2; exit 2; }
OUT=${OUT:-$PWD/device_out}
PY=${PYTHON:-python3}
case $MODE in split) BUDGET=${MEMIT_FAST_DEVICE_BUDGET:-545} ;; keys) BUDGET=${MEMIT_FAST_DEVICE_BUDGET:-300} ;; *) BUDGET=${MEMIT_FAST_DEVICE_BUDGET:-420} ;; esac
TOKENS=${MEMIT_FAST_DIST_TOKENS:-2000000}
if [[ "$MODE" == keys ]]; then EDITS=${MEMIT_FAST_DIST_EDITS:-10000}; else EDITS=${MEMIT_FAST_DIST_EDITS:-2000}; fi
SPLIT_TOKENS=${MEMIT_FAST_SPLIT_TOKENS:-1000000}
NEOX_EDITS=${MEMIT_FAST_SPLIT_NEOX_EDITS:-1000}
LLAMA_EDITS=${MEMIT_FAST_SPLIT_LLAMA_EDITS:-128}
LLAMA_LAYERS=${MEMIT_FAST_SPLIT_LLAMA_LAYERS:-5}
TINY=()
if [[ -n "${MEMIT_FAST_DIST_TINY:-}" ]]; then
  TINY=(--tiny); TOKENS=${MEMIT_FAST_DIST_TOKENS:-20000}; EDITS=${MEMIT_FAST_DIST_EDITS:-12}
  SPLIT_TOKENS=${MEMIT_FAST_SPLIT_TOKENS:-20000}; NEOX_EDITS=${MEMIT_FAST_SPLIT_NEOX_EDITS:-8}; LLAMA_EDITS=${MEMIT_FAST_SPLIT_LLAMA_EDITS:-4}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export NCCL_NVLS_ENABLE=0  # no NVLink multicast
# split: the statistics' large buffers next to the weights (expandable segments: less fragmentation)
[[ "$MODE" == split ]] && export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
REC=$OUT/records.jsonl
. "$(dirname "$0")/stage.sh"
device_env "$OUT/run.log"
{
  echo "== $(date -u +%FT%TZ) commit $MEMIT_FAST_COMMIT mode $MODE budget ${BUDGET}s"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  nvidia-smi topo -m 2>&1 | head -5
  "$PY" -c 'import torch, transformers, accelerate; print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__, "gpus", torch.cuda.device_count())'
} >>"$LOG" 2>&1
SAMPLER=
if [[ -z "${MEMIT_FAST_DIST_TINY:-}" ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,index,memory.used --format=csv,noheader -lms 2000 >"$OUT/gpu_memory.csv" 2>&1 &
  SAMPLER=$!
fi
RUN=("$PY" -m torch.distributed.run --standalone)
BENCH=(-m benchmarks.distributed_bench)
if [[ -z "${MEMIT_FAST_DIST_TINY:-}" && "${MEMIT_FAST_DIST_TESTS:-1}" != 0 && "$MODE" != keys ]]; then
  stage gpu_tests 60 "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_distributed.py -m cuda
  "$PY" benchmarks/results_store.py --path "$REC" add-pytest "$LOG" --name "distributed GPU tests" \
    --command "pytest tests/test_distributed.py -m cuda" >>"$LOG" 2>&1
fi
if [[ "$MODE" == dp ]]; then
  stage dp_1gpu "${MEMIT_FAST_DIST_LIMIT_1:-185}" "${RUN[@]}" --nproc-per-node 1 "${BENCH[@]}" dp "${TINY[@]}" --stats-tokens "$TOKENS" --edits "$EDITS" --records "$REC"
  stage dp_2gpu "${MEMIT_FAST_DIST_LIMIT_2:-115}" "${RUN[@]}" --nproc-per-node 2 "${BENCH[@]}" dp "${TINY[@]}" --stats-tokens "$TOKENS" --edits "$EDITS" --records "$REC"
elif [[ "$MODE" == keys ]]; then
  KEYS=(dp "${TINY[@]}" --stats-tokens 0 --z-steps 1 --records "$REC")
  stage keys_1gpu 90 "${RUN[@]}" --nproc-per-node 1 "${BENCH[@]}" "${KEYS[@]}" --edits "$EDITS"
  stage keys_2gpu 70 "${RUN[@]}" --nproc-per-node 2 "${BENCH[@]}" "${KEYS[@]}" --edits "$EDITS"
  stage keys_2gpu_profile 120 "${RUN[@]}" --nproc-per-node 2 "${BENCH[@]}" "${KEYS[@]}" --edits $((EDITS * 2 / 5)) --profile-rows 40
else
  stage split_neox20b 270 "$PY" "${BENCH[@]}" split "${TINY[@]}" --model neox-20b --gpus 2 --stats-tokens "$SPLIT_TOKENS" \
    --edits "$NEOX_EDITS" --records "$REC"
  stage split_llama70b 300 "$PY" "${BENCH[@]}" split "${TINY[@]}" --model llama-3-70b --gpus 2 --layers "$LLAMA_LAYERS" \
    --stats-tokens "$SPLIT_TOKENS" --edits "$LLAMA_EDITS" --records "$REC"
fi
[[ -n "$SAMPLER" ]] && kill "$SAMPLER" 2>/dev/null
{
  echo "== results"
  "$PY" "${BENCH[@]}" summary --records "$REC" --append-scaling 2>&1
  echo "== stages (mode $MODE, budget ${BUDGET}s, ${SECONDS}s used)"; printf '%s\n' "${STATUS[@]}"
  if [[ -s "$OUT/gpu_memory.csv" ]]; then
    echo "== most memory used per GPU (nvidia-smi, MiB)"
    awk -F', ' '{m=$3+0; if (m > max[$2]) max[$2]=m} END {for (g in max) print "GPU " g ": " max[g]}' "$OUT/gpu_memory.csv"
  fi
  grep -h -E "passed|failed|Error|error:" "$LOG" | tail -15
} | tee "$OUT/summary.txt"
