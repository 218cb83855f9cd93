#!/usr/bin/env bash
# On a machine with 2 GPUs, from the repository root:  bash benchmarks/device/run_distributed.sh
# Several GPUs (issue 11, docs/distributed.md), 1 vs 2 GPUs in the same run:
#   1. the 2-GPU tests of tests/test_distributed.py (a tiny model split over cuda:0 and cuda:1 edits as on one GPU);
#   2. data parallel, GPT-J shapes (random weights), torchrun with 1 then 2 ranks: the statistics pass over
#      MEMIT_FAST_DIST_TOKENS tokens (default 2,000,000) and MEMIT_FAST_DIST_EDITS edits (default 2000);
#   3. one process, NeoX-20B shapes split over the 2 GPUs (random bf16 weights made on the GPUs): a short
#      statistics pass and 32 edits; with MEMIT_FAST_DIST_70B=1 also Llama-3-70B shapes (2 critical layers, 8 edits;
#      give it MEMIT_FAST_DEVICE_BUDGET=540 or more, else it is skipped for lack of time).
# Each stage has a time limit inside MEMIT_FAST_DEVICE_BUDGET seconds (default 420). Files go to $OUT (3):
# run.log, records.jsonl (merge it with `python benchmarks/results_store.py merge OUT/records.jsonl`),
# summary.txt (the table: seconds, speed-up, scaling efficiency, time in collectives, peak memory per GPU,
# per-rank phase times), printed last. Needs the tokenizer at .device/tokenizer and .device/data/counterfact_250.json.
# MEMIT_FAST_DIST_TINY=1: tiny shapes on the CPU (gloo), to prove the script (about 2 minutes on 2 cores).
set -u
OUT=${OUT:-$PWD/device_out}
PY=${PYTHON:-python3}
BUDGET=${MEMIT_FAST_DEVICE_BUDGET:-420}
TOKENS=${MEMIT_FAST_DIST_TOKENS:-2000000}
EDITS=${MEMIT_FAST_DIST_EDITS:-2000}
SPLIT_TOKENS=200000 SPLIT_EDITS=32
TINY=()
if [[ -n "${MEMIT_FAST_DIST_TINY:-}" ]]; then
  TINY=(--tiny); TOKENS=${MEMIT_FAST_DIST_TOKENS:-20000}; EDITS=${MEMIT_FAST_DIST_EDITS:-12}; SPLIT_TOKENS=20000 SPLIT_EDITS=8
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
export MEMIT_FAST_COMMIT=${MEMIT_FAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export NCCL_NVLS_ENABLE=0  # no NVLink multicast
LOG=$OUT/run.log
REC=$OUT/records.jsonl
. "$(dirname "$0")/stage.sh"
{
  echo "== $(date -u +%FT%TZ) commit $MEMIT_FAST_COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  nvidia-smi topo -m 2>&1 | head -5
  "$PY" -c 'import torch, transformers, accelerate; print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__, "gpus", torch.cuda.device_count())'
} >>"$LOG" 2>&1
RUN=("$PY" -m torch.distributed.run --standalone)
BENCH=(-m benchmarks.distributed_bench)
[[ -z "${MEMIT_FAST_DIST_TINY:-}" ]] && stage gpu_tests 50 "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_distributed.py -k "split or balanced or refused"
stage dp_1gpu 185 "${RUN[@]}" --nproc-per-node 1 "${BENCH[@]}" dp "${TINY[@]}" --stats-tokens "$TOKENS" --edits "$EDITS" --records "$REC"
stage dp_2gpu 115 "${RUN[@]}" --nproc-per-node 2 "${BENCH[@]}" dp "${TINY[@]}" --stats-tokens "$TOKENS" --edits "$EDITS" --records "$REC"
stage split_neox20b 70 "$PY" "${BENCH[@]}" split "${TINY[@]}" --model neox-20b --gpus 2 --stats-tokens "$SPLIT_TOKENS" --edits "$SPLIT_EDITS" --records "$REC"
if [[ -n "${MEMIT_FAST_DIST_70B:-}" ]]; then
  stage split_llama70b 120 "$PY" "${BENCH[@]}" split "${TINY[@]}" --model llama-3-70b --gpus 2 --layers 2 --stats-tokens 65536 --edits 8 --records "$REC"
fi
{
  echo "== results"
  "$PY" "${BENCH[@]}" summary --records "$REC" --append-scaling 2>&1
  echo "== stages (budget ${BUDGET}s, ${SECONDS}s used)"; printf '%s\n' "${STATUS[@]}"
  grep -h -E "passed|failed|Error|error:" "$LOG" | tail -15
} | tee "$OUT/summary.txt"
