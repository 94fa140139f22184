#!/usr/bin/env bash
# The acceptance run of one new GPU node: one CUDA GPU, no network, about 6 to 7 minutes on an
# H100 (the timeouts below add up to 465 s).  Works with the node's own torch and Triton
# (torch 2.11 + Triton 3.6, torch 2.13 + Triton 3.9) and `python3` where there is no `python`.
#
#   bash launch/gpu_checks.sh                 OUT: a new temporary folder, printed first
#   OUT=/path bash launch/gpu_checks.sh
#   DRY_RUN=1 bash launch/gpu_checks.sh       the commands and the time budget; runs and writes nothing
#
# OUT gets at most 7 files of at most 1 MB each:
#   summary.md       the summary table first: CUDA tests passed/failed, the selection checked
#                    against the generic select on the GPU's own scores, step ms against fused
#                    AdamW (eager and CUDA graph) of MGUPAdamW / CMGUPAdamW / MGUPLion / MGUPMuon,
#                    tokens/s of adamw / mgup_adamw / cmgup_adamw on the 130M model; then the
#                    failed commands and the profiler's kernel table of one step
#   pytest_cuda.txt  tests/test_cuda.py alone (the GPU tests; no CPU-only or interpreter tests)
#   env.txt          nvidia-smi, python / torch / Triton / numpy versions
#   bench_cuda.txt   python -m mgup_dist.bench_cuda (rows, select check, kernel table)
#   bench.json       the same rows and check, read by launch/gpu_summary.py
#   train.txt        STEPS (20) steps of mgup-dist train --model 130m per optimizer, --no-save
#   failures         only when a command failed: "exit CODE: COMMAND" (124: timed out)
# One failing check does not stop the others.  The training runs write their run folders to a
# scratch folder outside OUT, removed at the end; they save no checkpoint.
set -euo pipefail
cd "${BASH_SOURCE[0]%/*}/.." || exit 2
DRY=${DRY_RUN:-0}
STEPS=${STEPS:-20}
PY=${PYTHON:-$(command -v python || command -v python3 || true)}
if [ -z "$PY" ]; then
  echo "gpu_checks.sh: neither python nor python3 is on PATH (or set PYTHON=/path/to/python)" >&2
  exit 2
fi
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-"<a new temporary folder>"}
  SCRATCH="<a scratch folder>"
else
  OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks.XXXXXX")}
  mkdir -p "$OUT" || exit 2
  SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks_runs.XXXXXX") || exit 2
  trap 'rm -rf "$SCRATCH"' EXIT
fi
echo "gpu_checks: output folder $OUT"
# offline: no hub lookups (the training data is the embedded text, byte tokens)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

BUDGET=0
# run SECONDS LOG CMD...: CMD under timeout, output appended to OUT/LOG (capped at 1 MB);
# a failure is recorded in OUT/failures, not fatal
run() {
  local secs=$1 log=$2
  shift 2
  BUDGET=$((BUDGET + secs))
  echo "+ timeout $secs $* >> $OUT/$log"
  [ "$DRY" = 1 ] && return 0
  local rc=0
  timeout -k 5 "$secs" "$@" >> "$OUT/$log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || echo "exit $rc: $*" >> "$OUT/failures"
  if [ "$(wc -c < "$OUT/$log")" -gt 1000000 ]; then  # keep the head and the end
    { head -c 300000 "$OUT/$log"; printf '\n[... cut to 1 MB ...]\n'; tail -c 650000 "$OUT/$log"; } > "$OUT/$log.cut"
    mv "$OUT/$log.cut" "$OUT/$log"
  fi
  return 0
}

# the CUDA tests first, in a process of their own
run 140 pytest_cuda.txt "$PY" -m pytest -q -p no:cacheprovider -rfE tests/test_cuda.py
run 15 env.txt "$PY" launch/gpu_summary.py --env
run 150 bench_cuda.txt "$PY" -m mgup_dist.bench_cuda --model llama130m --steps 20 --json "$OUT/bench.json"
for opt in adamw mgup_adamw cmgup_adamw; do
  [ "$DRY" = 1 ] || echo "== train $opt" >> "$OUT/train.txt"
  run 50 train.txt "$PY" -m mgup_dist.train --model 130m --device cuda --global-batch 128 --micro-batch 64 \
      --seq-len 256 --steps "$STEPS" --log-every 10 --eval-every 100000 --eval-tokens 16384 --no-save \
      --no-plots --no-tensorboard --no-progress --optimizer "$opt" --name "gpu-check-$opt" \
      --out-dir "$SCRATCH/$opt" --resume never
done
BUDGET=$((BUDGET + 10))
echo "+ timeout 10 $PY launch/gpu_summary.py $OUT > $OUT/summary.md"
echo "gpu_checks: time budget $BUDGET s (the sum of the timeouts; at most 480)"
[ "$DRY" = 1 ] && exit 0
timeout 10 "$PY" launch/gpu_summary.py "$OUT" > "$OUT/summary.md" 2>&1 || echo "exit $?: gpu_summary.py" >> "$OUT/summary.md"
cat "$OUT/summary.md"
echo "gpu_checks: files in $OUT"
ls -l "$OUT"
