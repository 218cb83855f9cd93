#!/usr/bin/env bash
# On a machine with two GPUs, from the repository root:
#   bash benchmarks/device/run_two_gpus.sh NAME0 'COMMAND0' NAME1 'COMMAND1'
# Runs COMMAND0 on GPU 0 (CUDA_VISIBLE_DEVICES=0, OUT=$JOBS/NAME0) and COMMAND1 on GPU 1 at the
# same time (two independent jobs: one call of the device measures both), then packs each
# job's folder into $OUT/NAME.tgz, the only files in $OUT (a device call returns at most 8
# files; JOBS defaults to /tmp/two_gpu_jobs). At PACK_AT seconds
# (default 560) the folders are packed as they are, so a job cut by the call's limit still
# returns what it wrote. A NAME of "-" leaves that GPU idle.
set -u
OUT=${OUT:-$PWD/device_out}
PACK_AT=${PACK_AT:-560}
JOBS=${JOBS:-/tmp/two_gpu_jobs}
mkdir -p "$OUT" "$JOBS"
pack() { for n in "$@"; do [[ -d "$JOBS/$n" ]] && tar -czf "$OUT/$n.tgz.part" -C "$JOBS" "$n" && mv "$OUT/$n.tgz.part" "$OUT/$n.tgz"; done; }
pids=()
for gpu in 0 1; do
  name=${1:-}; cmd=${2:-}; shift 2 || true
  [[ -z $name || $name == - ]] && continue
  dir=$JOBS/$name
  mkdir -p "$dir"
  ( export CUDA_VISIBLE_DEVICES=$gpu OUT=$dir; bash -c "$cmd" >"$dir/job.log" 2>&1; echo "rc=$?" >>"$dir/job.log" ) &
  pids+=($!); names+=("$name")
done
( sleep "$PACK_AT"; pack "${names[@]}"; echo "packed at ${PACK_AT}s" ) &
packer=$!
wait "${pids[@]}"
kill "$packer" 2>/dev/null
pack "${names[@]}"
for n in "${names[@]}"; do echo "== $n"; tail -n 25 "$JOBS/$n/summary.txt" 2>/dev/null || tail -n 15 "$JOBS/$n/job.log"; done
