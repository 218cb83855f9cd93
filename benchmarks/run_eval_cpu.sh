#!/usr/bin/env bash
# The first 20 CounterFact and 20 zsRE records, edited all at once on the CPU with the default
# model: the metrics appended as records to benchmarks/results/records.jsonl, the per-record
# values (JSON) kept in benchmarks/results/raw/eval_cpu/. Tables: python benchmarks/plot_results.py
# Usage, from the repo root: benchmarks/run_eval_cpu.sh [DATA_DIR] [CORPUS]
#   DATA_DIR  default ../shared/data;  CORPUS  default DATA_DIR/wikitext-2-raw-wiki.test.raw
#   EVAL_ARGS adds options (e.g. "--no-edit" for the unedited figures only); EVAL_TAG names the files.
set -euo pipefail
data=${1:-../shared/data}
corpus=${2:-$data/wikitext-2-raw-wiki.test.raw}
out=benchmarks/results/raw/eval_cpu
tag=${EVAL_TAG:-cpu_20}
for set in counterfact_250 zsre_eval_300; do
  dir="$out/eval_${set%%_*}_$tag"
  python -m memit_fast.eval --device cpu --edits 20 --corpus "$corpus" ${EVAL_ARGS:-} --data "$data/$set.json" --out "$dir" --overwrite
  python benchmarks/results_store.py add-eval "$dir/results.json" --command "benchmarks/run_eval_cpu.sh (EVAL_ARGS=${EVAL_ARGS:-} EVAL_TAG=$tag)"
done
