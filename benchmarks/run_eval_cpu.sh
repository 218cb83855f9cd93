#!/usr/bin/env bash
# The first 20 CounterFact and 20 zsRE records, edited all at once on the CPU with the default
# model, before/after tables into benchmarks/results/ (JSON + Markdown).
# Usage, from the repo root: benchmarks/run_eval_cpu.sh [DATA_DIR] [CORPUS]
#   DATA_DIR  default ../shared/data;  CORPUS  default DATA_DIR/wikitext-2-raw-wiki.test.raw
#   EVAL_ARGS adds options (e.g. "--no-edit" for the unedited figures only).
set -euo pipefail
data=${1:-../shared/data}
corpus=${2:-$data/wikitext-2-raw-wiki.test.raw}
out=benchmarks/results
tag=${EVAL_TAG:-cpu_20}
for set in counterfact_250 zsre_eval_300; do
  python -m memit_fast.eval --device cpu --edits 20 --corpus "$corpus" ${EVAL_ARGS:-} \
    --data "$data/$set.json" --out "$out/eval_${set%%_*}_$tag.json" --markdown "$out/eval_${set%%_*}_$tag.md"
done
