#!/usr/bin/env bash
# On the GPU machine, from the repository root:  bash benchmarks/device/run_attention.sh
# z's attention over its cached prefix (issue 8): the kernels' GPU tests
# (tests/test_kernels_prefix_attention.py), then `z_probe` at the default chunk with the per-row
# cache for MEMIT_FAST_ATTN_PROBE (default "triton,split", eager, 6 steps, profiles of
# triton and split at the default chunk), then MEMIT_FAST_ATTN_EDITS GPT-J edits (default 1000) with the Triton kernels
# and with their twin (MEMIT_FAST_ATTENTION_KERNEL=0), one after the other on the same GPU.
# Each stage has a time limit inside MEMIT_FAST_DEVICE_BUDGET seconds (default 540); files go to
# $OUT: run.log, records.jsonl (merge with `python benchmarks/results_store.py merge`), summary.txt.
# Needs the tokenizer at .device/tokenizer.
set -u
OUT=${OUT:-$PWD/device_out}
PY=${PYTHON:-python3}
BUDGET=${MEMIT_FAST_DEVICE_BUDGET:-540}
EDITS=${MEMIT_FAST_ATTN_EDITS:-1000}
. "$(dirname "$0")/stage.sh"
device_env "$OUT/run.log"
log_machine
stage kernel_tests 90 "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_kernels_prefix_attention.py
stage z_probe 200 "$PY" -m benchmarks.z_probe --model gpt-j-6b --chunk-tokens 0 --prefix per-row --compile off --steps 6 \
  --attention "${MEMIT_FAST_ATTN_PROBE:-triton,split}" --tokenizer .device/tokenizer --profile-rows 30 --profile-chunk-tokens 0
if [[ "$EDITS" != 0 ]]; then
  for kernel in 1 0; do
    stage "edits_kernel$kernel" 150 env MEMIT_FAST_ATTENTION_KERNEL=$kernel "$PY" -m benchmarks.profile_edits --model gpt-j-6b \
      --edits "$EDITS" --reference-subset 0 --records "$OUT/records.jsonl" --tokenizer .device/tokenizer --budget 130
  done
fi
"$PY" benchmarks/plot_results.py --records "$OUT/records.jsonl" --out "$OUT/tables" --no-plot >/dev/null 2>>"$LOG"
{
  echo "== results"; cat "$OUT/tables/results.md" 2>/dev/null; rm -rf "$OUT/tables"
  grep -E "chunk .* ms/step|profile of 3 steps|_prefix_attention_(fwd|bwd): " "$LOG"
  echo "== stages (budget ${BUDGET}s, ${SECONDS}s used)"; printf '%s\n' "${STATUS[@]}"
  grep -h -E "passed|failed|error|Error" "$LOG" | tail -15
} | tee "$OUT/summary.txt"
