"""Every collective MGUP issues, in one place.

Which ones run is decided by the caller from facts identical on every rank (the plan built
from layouts), never from local data, so every rank enters each of them, also with no
gradient or an empty shard.  All carry device tensors of the scores' device (NCCL on CUDA,
HCCL on NPU, gloo on CPU) in dtypes every backend accepts (int64, float32); none reads
a value back to the host.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["world_size", "all_reduce_sum", "all_gather_object"]


def world_size(group=None) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over ``group`` (a no-op on one rank)."""
    assert t.dtype in (torch.int64, torch.int32, torch.float32, torch.float64), t.dtype
    if world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def all_gather_object(obj, group=None) -> Optional[list]:
    """Host objects from every rank: plan building and agreement checks only, never per step."""
    n = world_size(group)
    if n == 1:
        return [obj]
    out = [None] * n
    dist.all_gather_object(out, obj, group=group)
    return out
