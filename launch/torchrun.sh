#!/usr/bin/env bash
# Single-node `mgup-dist train` under torchrun (elastic: restarts from the last checkpoint).
#
#   launch/torchrun.sh [train flags...]
#   NPROC=8 launch/torchrun.sh --config configs/runs/galore_c4_llama130m_gpu.yaml --optimizer mgup_adamw
#   DRY_RUN=1 launch/torchrun.sh ...        # print the exact command, run nothing
#
# Environment (defaults):
#   NPROC          processes on this node (1; one per GPU/NPU, or CPU processes on gloo)
#   MAX_RESTARTS   torchrun --max-restarts: a failed worker restarts the group, which resumes (0)
#   RDZV_ENDPOINT  c10d rendezvous host:port (empty: --standalone, a free local port)
#   TORCHRUN       the torchrun executable (torchrun)
#   DRY_RUN        1: print the command instead of running it
set -euo pipefail

NPROC=${NPROC:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}
TORCHRUN=${TORCHRUN:-torchrun}

if [[ -n "$RDZV_ENDPOINT" ]]; then
  rdzv=(--nnodes 1 --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT")
else
  rdzv=(--standalone --nnodes 1)
fi
cmd=("$TORCHRUN" "${rdzv[@]}" --nproc_per_node "$NPROC" --max-restarts "$MAX_RESTARTS"
     -m mgup_dist.train "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
