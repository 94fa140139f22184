#!/usr/bin/env bash
# The GPU checks of the CUDA engine, as one run on a machine with one CUDA GPU (about 5 minutes
# on an H200).  Every command runs under `timeout`; logs go under OUT (default ./gpu_out):
#   pytest_cuda.txt        tests/test_cuda.py alone (CUDA tests: float64 equivalence, select equal to
#                          the CPU select, padding-only chunk, bf16 NaN, no synchronisation,
#                          CUDA-graph replay == eager, capture refused without capturable)
#   pytest_triton.txt      the compiled-kernel checks (PTX, launch counts) in their own process
#   pytest_interpret.txt   the interpreter tests, TRITON_INTERPRET=1, in their own process
#   pytest_core.txt        engine and equivalence tests with CUDA present
#   bench_fp32.txt         python -m mgup_dist.bench_cuda: eager and CUDA-graph step times against
#   bench_bf16.txt         AdamW(fused=True), and a torch.profiler kernel table of one step
#   train-*.txt            tokens/s of adamw / mgup_adamw / cmgup_adamw on the 130M model
#   failures.txt           the commands that failed (one failing check does not stop the others)
# Usage: OUT=/path bash launch/gpu_checks.sh       DRY_RUN=1 bash launch/gpu_checks.sh prints the commands
set -euo pipefail
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-30}
DRY=${DRY_RUN:-0}
[ "$DRY" = 1 ] || mkdir -p "$OUT"

# run SECONDS LOG CMD...: CMD under timeout, output to OUT/LOG; a failure is recorded, not fatal
run() {
  local secs=$1 log=$2
  shift 2
  echo "+ timeout $secs $* > $OUT/$log"
  [ "$DRY" = 1 ] && return 0
  timeout "$secs" "$@" > "$OUT/$log" 2>&1 || echo "exit $?: $*" >> "$OUT/failures.txt"
}

[ "$DRY" = 1 ] || { nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true; }
run 150 pytest_cuda.txt python -m pytest -q -p no:cacheprovider tests/test_cuda.py
run 90 pytest_triton.txt python -m pytest -q -p no:cacheprovider tests/test_triton_compile.py tests/test_triton_launches.py
run 240 pytest_interpret.txt env TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/test_triton_interpret.py
run 150 pytest_core.txt python -m pytest -q -p no:cacheprovider -x tests/test_engine.py tests/test_equivalence.py
run 120 bench_fp32.txt python -m mgup_dist.bench_cuda --model llama130m --steps 20
run 90 bench_bf16.txt python -m mgup_dist.bench_cuda --model llama130m --dtype bfloat16 --steps 20 --no-profile
for opt in adamw mgup_adamw cmgup_adamw; do
  run 120 "train-$opt.txt" python -m mgup_dist.train --model 130m --device cuda --global-batch 128 --micro-batch 64 \
      --seq-len 256 --steps "$STEPS" --eval-every 100000 --save-every 0 --no-plots --no-tensorboard --no-progress \
      --optimizer "$opt" --name "gpu-check-$opt" --out-dir "$OUT/train-$opt" --resume never
done
if [ "$DRY" != 1 ]; then
  grep -h "tokens" "$OUT"/train-*.txt | tail -n 6 || true
  tail -n 1 "$OUT"/pytest_*.txt || true
  cat "$OUT/failures.txt" 2>/dev/null || echo "all checks exited 0"
fi
