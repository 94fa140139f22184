#!/usr/bin/env bash
# `mgup-dist train --engine deepspeed` through the DeepSpeed launcher (one or more nodes).
#
#   launch/deepspeed.sh [train flags...]
#   HOSTFILE=hostfile DS_CONFIG=zero2 launch/deepspeed.sh --model 130m --optimizer mgup_adamw
#   DRY_RUN=1 launch/deepspeed.sh ...       # print the exact command, run nothing
#
# Environment (defaults):
#   HOSTFILE      DeepSpeed hostfile, lines "host slots=N" (empty: this node only)
#   NUM_GPUS      devices of this node when no hostfile is given and CUDA_VISIBLE_DEVICES
#                 is unset: devices 0..NUM_GPUS-1 (1)
#   CUDA_VISIBLE_DEVICES  honoured on one node: passed as --include localhost:<list>
#                 (with --num_gpus the launcher would drop it and use devices 0..N-1)
#   MASTER_ADDR   rendezvous host (DeepSpeed's default: the first host)
#   MASTER_PORT   rendezvous port (29500)
#   DS_CONFIG     DeepSpeed JSON: a path or a name in configs/deepspeed (zero2)
#   DS_LAUNCHER   multi-node launcher: pdsh | openmpi | mvapich | slurm (pdsh)
#   DEEPSPEED     the deepspeed executable (deepspeed)
#   DEVICE_COUNT  devices of this node (default: DeepSpeed's count, get_accelerator().device_count())
#   DRY_RUN       1: print the command instead of running it (no device check)
#
# Without a hostfile the script first checks that this node has the devices asked for
# and exits with status 2 and what to do when it has not (e.g. a CPU machine: start CPU
# ranks with `NPROC=2 launch/torchrun.sh --engine deepspeed ...`).
set -euo pipefail

HOSTFILE=${HOSTFILE:-}
NUM_GPUS_SET=${NUM_GPUS:+1}
NUM_GPUS=${NUM_GPUS:-1}
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-zero2}
DS_LAUNCHER=${DS_LAUNCHER:-pdsh}
DEEPSPEED=${DEEPSPEED:-deepspeed}

cmd=("$DEEPSPEED")
if [[ -n "$HOSTFILE" ]]; then
  cmd+=(--hostfile "$HOSTFILE" --launcher "$DS_LAUNCHER")
elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -r -a _devs <<< "$CUDA_VISIBLE_DEVICES"
  if [[ -n "$NUM_GPUS_SET" && "$NUM_GPUS" != "${#_devs[@]}" ]]; then
    echo "deepspeed.sh: NUM_GPUS=$NUM_GPUS but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES lists ${#_devs[@]}; set one" >&2
    exit 2
  fi
  cmd+=(--include "localhost:$CUDA_VISIBLE_DEVICES")
else
  cmd+=(--include "localhost:$(seq -s, 0 $((NUM_GPUS - 1)))")
fi
[[ -n "${MASTER_ADDR:-}" ]] && cmd+=(--master_addr "$MASTER_ADDR")
cmd+=(--master_port "$MASTER_PORT" --no_local_rank --module mgup_dist.train
      --engine deepspeed --deepspeed-config "$DS_CONFIG" "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi

if [[ -z "$HOSTFILE" ]]; then
  # The launcher's own count of this node's devices (CUDA GPUs; on a CPU machine NUMA nodes).
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then want=${#_devs[@]}; else want=$NUM_GPUS; fi
  read -r kind have < <( { [[ -n "${DEVICE_COUNT:-}" ]] && echo "device $DEVICE_COUNT"; } ||
    python -c 'from deepspeed.accelerator import get_accelerator as g; a = g(); print(a.device_name(), a.device_count())' \
      2>/dev/null | tail -n 1 || true)
  have=${have:-0}
  if (( want > have )); then
    echo "deepspeed.sh: $want device(s) asked for (NUM_GPUS=$NUM_GPUS${CUDA_VISIBLE_DEVICES:+, CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES})" \
         "but DeepSpeed finds ${have} ${kind:-device}(s) on this node." >&2
    if [[ "${kind:-}" == cuda ]] && (( have > 0 )); then
      echo "  Set NUM_GPUS=$have or fewer, or give a HOSTFILE for several nodes." >&2
    else
      echo "  Without GPUs start CPU ranks with torchrun (gloo) instead:" \
           "NPROC=$want launch/torchrun.sh --engine deepspeed --deepspeed-config $DS_CONFIG [train flags...]" >&2
    fi
    exit 2
  fi
fi
exec "${cmd[@]}"
