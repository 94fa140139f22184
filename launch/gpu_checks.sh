#!/usr/bin/env bash
# The GPU checks of the engine, as one prepared run for a machine with one CUDA GPU (the
# project's device sessions have 15 minutes: this takes about 6).  Everything it prints and
# writes goes under OUT (default ./gpu_out):
#   1. the CUDA tests (tests/test_cuda.py: float64 equivalence on CUDA, masks bitwise equal to
#      the CPU selection, a step under torch.cuda.set_sync_debug_mode("error"), CUDA-graph
#      capture == eager, bf16) and the Triton interpreter tests, compiled for real;
#   2. mgup-dist bench --device cuda on LLaMA-130M shapes, fp32 and bf16;
#   3. training tokens/s of adamw / mgup_adamw / cmgup_adamw on the 130M model.
# Usage: OUT=$OUT bash launch/gpu_checks.sh      (DRY_RUN=1 prints the commands only)
set -euo pipefail
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-40}
# one failing check must not stop the others: its exit code is recorded instead
run() { echo "+ $*"; [ "${DRY_RUN:-0}" = 1 ] || "$@" || echo "exit $?: $*" >> "$OUT/failures.txt"; }
[ "${DRY_RUN:-0}" = 1 ] || mkdir -p "$OUT"
[ "${DRY_RUN:-0}" = 1 ] || nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
run python -m pytest -q tests/test_cuda.py tests/test_triton_interpret.py tests/test_engine.py tests/test_equivalence.py \
    -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
run python -m mgup_dist.bench --device cuda --model llama130m --steps 20 --warmup 3 --naive-steps 5 --muon-steps 3 \
    --compile off > "$OUT/bench_fp32.txt" 2>&1
run python -m mgup_dist.bench --device cuda --model llama130m --dtype bfloat16 --steps 20 --warmup 3 --naive-steps 5 \
    --optimizers MGUPAdamW CMGUPAdamW MGUPLion --compile off > "$OUT/bench_bf16.txt" 2>&1
for opt in adamw mgup_adamw cmgup_adamw; do
  run python -m mgup_dist.train --model 130m --device cuda --global-batch 128 --micro-batch 64 --seq-len 256 \
      --steps "$STEPS" --eval-every 100000 --save-every 0 --no-plots --no-tensorboard --no-progress --optimizer "$opt" \
      --out-dir "$OUT/train-$opt" --resume never > "$OUT/train-$opt.txt" 2>&1
done
grep -h "tokens" "$OUT"/train-*.txt | tail -n 6 || true
tail -n 3 "$OUT/pytest.txt" || true
