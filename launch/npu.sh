#!/usr/bin/env bash
# `mgup-dist train` on Ascend NPUs of one node (torch_npu, hccl).
#
#   launch/npu.sh --config configs/runs/mgup_c4_llama130m_npu.yaml
#   ASCEND_RT_VISIBLE_DEVICES=0,1,2,3 ENGINE=deepspeed launch/npu.sh ...
#   DRY_RUN=1 launch/npu.sh ...              # print the exact command, run nothing
#
# The training code asks mgup_dist.device for the device ("npu" -> torch_npu imported
# lazily) and the backend ("hccl"); MGUP runs its torch-ops backend there (docs/npu.md).
#
# Environment (defaults):
#   ASCEND_RT_VISIBLE_DEVICES  NPUs to use, comma separated (0); one process each
#   ENGINE                     ddp | fsdp2 | deepspeed (ddp)
#   DS_CONFIG                  DeepSpeed JSON for ENGINE=deepspeed (zero2)
#   MASTER_PORT                rendezvous port (29500)
#   MAX_RESTARTS               torchrun --max-restarts (0)
#   HCCL_CONNECT_TIMEOUT       seconds (1200)
#   ASCEND_SET_ENV             CANN environment script, sourced when it exists
#                              (/usr/local/Ascend/ascend-toolkit/set_env.sh)
#   DRY_RUN                    1: print the command instead of running it
#
# CANN's set_env.sh reads unset variables (e.g. $PYTHONPATH) and runs commands that
# return non-zero: it is sourced first, before `set -euo pipefail` takes effect.
ASCEND_SET_ENV=${ASCEND_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}
if [[ -f "$ASCEND_SET_ENV" ]]; then
  # shellcheck disable=SC1090
  source "$ASCEND_SET_ENV" || true
fi
set -euo pipefail

ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-0}
ENGINE=${ENGINE:-ddp}
DS_CONFIG=${DS_CONFIG:-zero2}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
IFS=, read -r -a _devs <<< "$ASCEND_RT_VISIBLE_DEVICES"
NPROC=${#_devs[@]}

envs=(ASCEND_RT_VISIBLE_DEVICES="$ASCEND_RT_VISIBLE_DEVICES" HCCL_CONNECT_TIMEOUT="$HCCL_CONNECT_TIMEOUT")
case "$ENGINE" in
  deepspeed)
    envs+=(DS_ACCELERATOR=npu)
    # --include, not --num_gpus: with --num_gpus the launcher drops ASCEND_RT_VISIBLE_DEVICES
    # ("ignoring it") and 4,5,6,7 would run on NPUs 0-3.
    cmd=(deepspeed --include "localhost:$ASCEND_RT_VISIBLE_DEVICES" --master_port "$MASTER_PORT" --no_local_rank --module mgup_dist.train
         --engine deepspeed --deepspeed-config "$DS_CONFIG" --device npu "$@") ;;
  ddp|fsdp2)
    cmd=(torchrun --nnodes 1 --nproc_per_node "$NPROC" --master_port "$MASTER_PORT" --max-restarts "$MAX_RESTARTS"
         -m mgup_dist.train --engine "$ENGINE" --device npu "$@") ;;
  *) echo "npu.sh: ENGINE must be ddp, fsdp2 or deepspeed, got '$ENGINE'" >&2; exit 2 ;;
esac

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' env "${envs[@]}" "${cmd[@]}"; echo
  exit 0
fi
exec env "${envs[@]}" "${cmd[@]}"
