# Sourced by the device scripts (BUDGET set before the first stage):
#   device_env LOGFILE     what every device script sets: the log's folder made and LOG=LOGFILE, the
#                          repository on PYTHONPATH, unbuffered Python, tqdm every 30 s, the commit
#                          (MEMIT_FAST_COMMIT, for the records)
#   log_machine            appends the date, commit, GPU and versions to $LOG
#   stage NAME SECONDS CMD...
# runs CMD with a time limit of SECONDS x STAGE_SCALE, cut to what is left of BUDGET seconds;
# SIGINT first (so pytest and the benchmarks report what they have), KILL STAGE_KILL seconds
# later; output to $LOG; skipped when the limit would be under STAGE_MIN seconds. Each stage's
# outcome is appended to STATUS.
STATUS=()
stage() {
  local name=$1 limit=$(($2 * ${STAGE_SCALE:-1})); shift 2
  local t0=$SECONDS left=$((BUDGET - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < ${STAGE_MIN:-20})); then STATUS+=("$name: skipped, ${left}s left"); return; fi
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$LOG"
  timeout -s INT -k "${STAGE_KILL:-20}" "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  STATUS+=("$name: rc=$rc in $((SECONDS - t0))s")
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
}
log_machine() {
  {
    echo "== $(date -u +%FT%TZ) commit ${MEMIT_FAST_COMMIT:-unknown}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1
    "${PY:-python3}" -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__)'
  } >>"$LOG" 2>&1
}
device_env() {
  LOG=$1
  mkdir -p "$(dirname "$LOG")"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}
  export MEMIT_FAST_COMMIT=${MEMIT_FAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
}
