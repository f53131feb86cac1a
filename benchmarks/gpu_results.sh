#!/usr/bin/env bash
# The GPU half of the results, in one time-boxed call (a lent GPU is held for minutes, not
# hours): the CUDA test, the OT and matching benchmarks on CUDA, and the defense table with
# a larger model (otc-vit-small) and dataset, beside a sweep of OTCCLIP settings at the
# demo's size (three seeds each, fp32 and one thread per run as on the CPU). The large table
# trains at the trainer's default precision (bf16 autocast on CUDA); while the tables run,
# the test files that train or score run once more on this machine, where their device is
# CUDA.
#
#   bash benchmarks/gpu_results.sh OUT [SECONDS]      # on a machine with a CUDA GPU
#   GPU_RESULTS_QUICK=1 bash benchmarks/gpu_results.sh /tmp/g 300   # a CPU dry run
#
# What runs can be narrowed for a follow-up call (the defaults are the first call's):
#   GPU_BENCH=0                       skip the CUDA tests and benchmarks
#   GPU_LARGE="ROWS/SEEDS/JOBS"       the large table's first pass, e.g. "otcclip/0 1 2/3"
#                                     (default "clean none otcclip safeclip roclip/0/5", then
#                                     none and otcclip on seeds 1 and 2 while time is left;
#                                     "" skips the large table)
#   GPU_SWEEP="NAME:KEY=V KEY=V;..."  the sweep's configurations (3 seeds each, "" for none)
#
# Every stage has its own time limit, and the tables run until SECONDS have passed; then
# the runs still going are stopped (SIGINT, so their workers end too) and each table is
# written from what finished (`defense_table.py --report-only`: a run cut short is
# reported missing, not guessed). Logs and tables land in OUT; OUT/gpu_results.tar.gz
# holds them all without weights or data.
set -uo pipefail
OUT=${1:?usage: gpu_results.sh OUT [SECONDS]}
BUDGET=${2:-3600}
PY=${PYTHON:-python3}
QUICK=${GPU_RESULTS_QUICK:-0}
T0=$SECONDS
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "[gpu_results $((SECONDS - T0))s] $*"; }
stage() { # NAME LIMIT CMD...: run CMD under LIMIT seconds, output to OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  log "$name (limit ${limit}s, $(left)s left): $*"
  timeout -s INT -k 15 "$limit" "$@" >"$OUT/$name.txt" 2>&1
  log "$name: exit $?"
  tail -n 25 "$OUT/$name.txt"
}

if [ "$QUICK" = 1 ]; then
  DEVICE=cpu
  TABLE_SIZE=(--quick)
  LARGE_SIZE=(--quick)
  BENCH_OT=(--quick)
  BENCH_MATCH=(--quick)
  THREADS=1
else
  DEVICE=cuda
  TABLE_SIZE=()
  LARGE_SIZE=(--scenes 40000)
  BENCH_OT=(--pairs 65536)
  BENCH_MATCH=()
  THREADS=2
fi

{
  date -u
  nvidia-smi 2>&1 || true
  "$PY" -c "import torch, otcclip; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  echo "cpus $(nproc)"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

BENCH=${GPU_BENCH:-1}
LARGE_FIRST=${GPU_LARGE-"clean none otcclip safeclip roclip/0/5"}
SWEEP_SPEC=${GPU_SWEEP-"lambda1-ramp2:lambda_inter=1 inter_ramp=2;lambda1-ramp2-warmup2:lambda_inter=1 inter_ramp=2 warmup_epochs=2;warmup2:warmup_epochs=2"}

if [ "$BENCH" = 1 ]; then
  if [ "$DEVICE" = cuda ]; then
    stage tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_ot.py -k cuda -rs
  fi
  stage bench_ot 120 "$PY" benchmarks/bench_ot.py --device "$DEVICE" --threads 8 "${BENCH_OT[@]}"
  stage bench_match 150 "$PY" benchmarks/bench_match.py --device "$DEVICE" --threads 8 \
    "${BENCH_MATCH[@]}"
fi

# The tables share the machine: the large table's workers ($THREADS threads each) and three
# one-thread workers per sweep configuration.
COMMON=(--set ot_compile=off --threads "$THREADS")
LARGE=(--out "$OUT/table-large" "${LARGE_SIZE[@]}" --set model=otc-vit-small "${COMMON[@]}")
SWEEP=("${TABLE_SIZE[@]}" --set ot_compile=off --threads 1 --set precision=fp32)
SWEEP_NAMES=()
SWEEP_SETS=()
IFS=';' read -ra configs <<<"$SWEEP_SPEC"
for config in "${configs[@]}"; do
  [ -n "$config" ] || continue
  SWEEP_NAMES+=("${config%%:*}")
  SWEEP_SETS+=("${config#*:}")
done

deadline=$(($(left) - 45)) # leaves time for the reports and the archive
log "tables until $((SECONDS - T0 + deadline))s"
running=()
if [ -n "$LARGE_FIRST" ]; then
  IFS=/ read -r large_rows large_seeds large_jobs <<<"$LARGE_FIRST"
  (
    # shellcheck disable=SC2086 # rows and seeds are word lists
    timeout -s INT -k 20 "$deadline" "$PY" benchmarks/defense_table.py "${LARGE[@]}" \
      --rows $large_rows --seeds $large_seeds --jobs "$large_jobs"
    timeout -s INT -k 20 "$(($(left) - 45))" "$PY" benchmarks/defense_table.py "${LARGE[@]}" \
      --rows none otcclip --seeds 1 2 --jobs 4
  ) >"$OUT/table-large.txt" 2>&1 &
  running+=($!)
fi
for i in "${!SWEEP_NAMES[@]}"; do
  sets=()
  for s in ${SWEEP_SETS[$i]}; do sets+=(--set "$s"); done
  timeout -s INT -k 20 "$deadline" "$PY" benchmarks/defense_table.py \
    --out "$OUT/sweep-${SWEEP_NAMES[$i]}" "${SWEEP[@]}" "${sets[@]}" \
    --rows otcclip --seeds 0 1 2 --jobs 3 >"$OUT/sweep-${SWEEP_NAMES[$i]}.txt" 2>&1 &
  running+=($!)
done
if [ "$DEVICE" = cuda ] && [ "$BENCH" = 1 ]; then
  timeout -s INT -k 15 "$deadline" "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/test_ot.py tests/test_losses.py tests/test_matching.py tests/test_train.py \
    >"$OUT/tests-cuda-training.txt" 2>&1 &
  running+=($!)
fi
wait "${running[@]}"
tail -n 5 "$OUT/tests-cuda-training.txt" 2>/dev/null
log "tables stopped"

if [ -n "$LARGE_FIRST" ]; then
  "$PY" benchmarks/defense_table.py "${LARGE[@]}" --rows clean none otcclip safeclip roclip \
    --seeds 0 1 2 --jobs 4 --report-only >"$OUT/report-large.txt" 2>&1
  tail -n 30 "$OUT/report-large.txt"
fi
for i in "${!SWEEP_NAMES[@]}"; do
  sets=()
  for s in ${SWEEP_SETS[$i]}; do sets+=(--set "$s"); done
  "$PY" benchmarks/defense_table.py --out "$OUT/sweep-${SWEEP_NAMES[$i]}" "${SWEEP[@]}" \
    "${sets[@]}" --rows otcclip --seeds 0 1 2 --jobs 1 --report-only \
    >"$OUT/report-sweep-${SWEEP_NAMES[$i]}.txt" 2>&1
  log "sweep ${SWEEP_NAMES[$i]}"
  grep -E '^\| otcclip' "$OUT/report-sweep-${SWEEP_NAMES[$i]}.txt"
done
tar -C "$OUT" -czf "$OUT.tar.gz" --exclude='*.safetensors' --exclude='*.parquet' \
  --exclude='checkpoints' --exclude='*.npz' --exclude='gpu_results.tar.gz' . &&
  mv "$OUT.tar.gz" "$OUT/gpu_results.tar.gz"
log "done; $(du -h "$OUT/gpu_results.tar.gz" | cut -f1) archive"
