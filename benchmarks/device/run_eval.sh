#!/usr/bin/env bash
# CounterFact (all 250 records) and zsRE (all 300), each edited all at once on the GPU, with the
# unedited model's figures beside the edited one's: JSON + Markdown per dataset under $OUT, and
# their metrics appended as records to $OUT/records.jsonl (benchmarks/results_store.py add-eval).
#
# Usage, from the repo root on the device machine (H100, no internet):
#   benchmarks/device/run_eval.sh GGUF [DATA_DIR] [CORPUS]
#     GGUF      the default model's GGUF file, e.g. /tmp/model/smollm2.gguf
#     DATA_DIR  holding counterfact_250.json and zsre_eval_300.json (default .device/data)
#     CORPUS    statistics corpus for memit_fast.apply (default DATA_DIR/wikitext-2-raw-wiki.test.raw)
#   EVAL_SETS="counterfact zsre" (default) picks the datasets, e.g. one per device call;
#   EVAL_ARGS adds options (e.g. "--edit-batch 50 --sequential").
# Writes at most 7 files: eval_gpu.txt, eval_log.txt, eval_{counterfact_250,zsre_300}.{json,md}, records.jsonl.
set -euo pipefail
gguf=${1:?usage: run_eval.sh GGUF [DATA_DIR] [CORPUS]}
data=${2:-.device/data}
corpus=${3:-$data/wikitext-2-raw-wiki.test.raw}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true; } > "$out/eval_gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$out/eval_gpu.txt"
declare -A files=([counterfact]=counterfact_250 [zsre]=zsre_eval_300)
declare -A names=([counterfact]=counterfact_250 [zsre]=zsre_300)
for set in ${EVAL_SETS:-counterfact zsre}; do
  python -m memit_fast.eval --model-gguf "$gguf" --device cuda --batch-size 256 \
    --corpus "$corpus" --cache-dir /tmp/memit_fast_cache ${EVAL_ARGS:-} \
    --data "$data/${files[$set]}.json" \
    --out "$out/eval_${names[$set]}" --overwrite 2>&1 | tee -a "$out/eval_log.txt"
  python benchmarks/results_store.py --path "$out/records.jsonl" add-eval "$out/eval_${names[$set]}/results.json" \
    --command "benchmarks/device/run_eval.sh GGUF (EVAL_ARGS=${EVAL_ARGS:-})"
done
