#!/usr/bin/env bash
# Four optimizers on the CPU, same seed / data order / schedule, run one
# after the other.  Run from the repository root:  bash results/cpu_tiny/run_all.sh
# Writes into a fresh folder, results/cpu_tiny.<date-time>/ (RES=DIR to choose it; the
# committed results/cpu_tiny/ is rewritten only when named: RES=results/cpu_tiny).
set -euo pipefail
export OMP_NUM_THREADS=1 PYTHONPATH="${PYTHONPATH:-$PWD}"
RES=${RES:-results/cpu_tiny.$(date -u +%Y%m%d-%H%M%S)}
if [ "$RES" != results/cpu_tiny ] && [ -e "$RES" ]; then
  echo "run_all.sh: $RES exists; choose another RES=DIR" >&2; exit 2
fi
RUNS=$(mktemp -d)
trap 'rm -rf "$RUNS"' EXIT
COMMON="--model tiny --dataset pysource --seq-len 256 --global-batch 16 --steps 200 --warmup-steps 20 --lr 3e-3 --seed 0 --eval-every 25 --eval-tokens 32768 --log-every 10 --save-every 0 --keep-checkpoints 1 --resume never --no-progress --no-tensorboard --no-plots"
for opt in adamw mgup_adamw cmgup_adamw cautious_adamw; do
  extra=""; [ "$opt" = mgup_adamw ] && extra="--tau 0.5"
  out=$RUNS/$opt
  cmd="nice -n 10 python -m mgup_dist.train $COMMON --optimizer $opt $extra --out-dir $out"
  mkdir -p "$RES/$opt"
  echo "$cmd" > "$RES/$opt/command.txt"
  $cmd > "$RES/$opt/log.txt" 2>&1
  cp "$out/metrics.jsonl" "$out/summary.json" "$out/config.json" "$RES/$opt/"
  rm -rf "$out/checkpoints"
done
echo "results in $RES"
