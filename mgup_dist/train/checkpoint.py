"""Atomic, rotating checkpoints: ``<out>/checkpoints/step_00001234/``.

Every rank writes its part into ``step_N.tmp/``; after a barrier rank 0 renames it to
``step_N`` with ``os.replace`` (atomic on POSIX), so a directory named ``step_N`` is
always complete: a worker killed mid-write leaves only a ``.tmp`` that the next save
removes.  Multi-node runs need the output directory on a shared filesystem.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = ["list_checkpoints", "latest_checkpoint", "checkpoint_step", "rng_state", "set_rng_state",
           "barrier", "save_checkpoint"]

_STEP_DIR = re.compile(r"^step_(\d+)$")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def list_checkpoints(ckpt_root: str) -> List[str]:
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for d in os.listdir(ckpt_root):
        m = _STEP_DIR.match(d)
        if m and os.path.isfile(os.path.join(ckpt_root, d, "trainer_state.pt")):
            found.append((int(m.group(1)), os.path.join(ckpt_root, d)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: str) -> Optional[str]:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def checkpoint_step(path: str) -> int:
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else -1


def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if device.type != "cpu":
        state["device"] = torch.get_device_module(device).get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if device.type != "cpu" and "device" in state:
        torch.get_device_module(device).set_rng_state(state["device"], device)


def save_checkpoint(ckpt_root: str, step: int, engine, trainer_state: dict, rank: int, keep: int) -> str:
    """Collective: every rank calls it.  ``trainer_state`` holds this rank's entries
    (data position, RNG) under ``per_rank`` plus shared ones; rank 0 gathers the per-rank
    entries and writes ``trainer_state.pt`` last, which marks the directory complete."""
    final = os.path.join(ckpt_root, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    barrier()
    engine.save(tmp, rank)
    per_rank = trainer_state.pop("per_rank")
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, per_rank)
    else:
        gathered = [per_rank]
    barrier()
    if rank == 0:
        trainer_state["per_rank"] = gathered
        torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final
