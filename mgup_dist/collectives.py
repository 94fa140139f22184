"""Every collective MGUP issues, in one place.

Which ones run is decided by the caller from facts identical on every rank (the plan built
from layouts), never from local data, so every rank enters each of them, also with no
gradient or an empty shard.  All carry device tensors of the scores' device (NCCL on CUDA,
HCCL on NPU, gloo on CPU) in dtypes every backend accepts (int64, float32); none reads
a value back to the host.
"""
from __future__ import annotations

import atexit
import time
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["world_size", "all_reduce_sum", "all_reduce_max", "all_gather_object"]


def world_size(group=None) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over ``group`` (a no-op on one rank)."""
    return _all_reduce(t, group, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place maximum over ``group`` (a no-op on one rank)."""
    return _all_reduce(t, group, dist.ReduceOp.MAX)


def _all_reduce(t: torch.Tensor, group, op) -> torch.Tensor:
    assert t.dtype in (torch.int64, torch.int32, torch.float32, torch.float64), t.dtype
    if world_size(group) > 1:
        _guard_exit(group)
        dist.all_reduce(t, op=op, group=group)
    return t


# A gloo collective's tensors are released by one of the group's worker threads after the
# caller's wait() has returned, and releasing a tensor made in Python takes the GIL.  If the
# script ends first, the worker asks for the GIL while the interpreter finalizes, Python ends
# that thread, and the unwind through the C++ destructor aborts the process ("terminate
# called without an active exception", SIGABRT) although every rank finished: about one run
# in ten of examples/fsdp2.py on 2 CPUs, with or without destroy_process_group() and a barrier
# before it.  An exit hook that gives up the GIL for a while lets the worker finish first.
_GIL_RELEASE_AT_EXIT_S = 0.05
_groups_seen: set = set()
_exit_hook = [False]


def _guard_exit(group) -> None:
    """Registers the exit hook at this process's first collective on a gloo group."""
    if _exit_hook[0] or id(group) in _groups_seen:
        return
    _groups_seen.add(id(group))
    if "gloo" in str(dist.get_backend(group)).lower():
        atexit.register(time.sleep, _GIL_RELEASE_AT_EXIT_S)
        _exit_hook[0] = True


def all_gather_object(obj, group=None) -> Optional[list]:
    """Host objects from every rank: plan building and agreement checks only, never per step."""
    n = world_size(group)
    if n == 1:
        return [obj]
    out = [None] * n
    dist.all_gather_object(out, obj, group=group)
    return out
