"""Atomic, rotating checkpoints: ``<out>/checkpoints/step_00001234/``.

Every rank writes its part into ``step_N.tmp/``; after a barrier rank 0 renames it to
``step_N`` with ``os.replace`` (atomic on POSIX), so a directory named ``step_N`` is
always complete: a worker killed mid-write leaves only a ``.tmp`` that the next save
removes.  Multi-node runs need the output directory on a shared filesystem.

Integrity: rank 0 writes ``manifest.json`` (size and sha256 of every other file) as the
last file inside ``step_N.tmp`` before the rename, so a ``step_N`` directory is usable
only if every file still has its recorded size and hash.  A truncated file or a flipped
bit (model.pt, optimizer.pt, a DCP ``.distcp``, a DeepSpeed shard) is found before any
of it is loaded; resume then falls back to the newest checkpoint that verifies.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = ["list_checkpoints", "latest_checkpoint", "checkpoint_step", "rng_state", "set_rng_state",
           "barrier", "save_checkpoint", "write_manifest", "verify_checkpoint", "candidate_checkpoints", "MANIFEST"]

_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: str) -> List[str]:
    """Every regular file under ``root`` as a '/'-separated relative path, except the manifest."""
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(path: str) -> None:
    """Size + sha256 of every file of the checkpoint directory ``path`` (rank 0, after
    all ranks wrote their parts).  Written via a temporary name and ``os.replace``."""
    files = {rel: {"size": os.path.getsize(os.path.join(path, rel)), "sha256": _sha256(os.path.join(path, rel))}
             for rel in _files(path)}
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST))


def verify_checkpoint(path: str) -> Optional[str]:
    """None when ``path`` is a complete checkpoint whose files match its manifest;
    otherwise the reason it is unusable (first problem found)."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        return f"no {MANIFEST} (incomplete, or written by a version without checksums)"
    try:
        with open(mpath) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST}: {e}"
    if "trainer_state.pt" not in files:
        return "the manifest lists no trainer_state.pt"
    for rel, want in sorted(files.items()):
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        size = os.path.getsize(full)
        if size != want["size"]:
            return f"{rel} has {size} bytes, the manifest says {want['size']} (truncated or overwritten)"
        if _sha256(full) != want["sha256"]:
            return f"{rel} fails its sha256 check (corrupted)"
    extra = sorted(set(_files(path)) - set(files))
    if extra:
        return f"files not in the manifest: {extra[:5]}"
    return None


def candidate_checkpoints(ckpt_root: str) -> List[str]:
    """Every ``step_N`` directory, oldest first, complete or not (resume verifies each)."""
    if not os.path.isdir(ckpt_root):
        return []
    found = [(int(m.group(1)), os.path.join(ckpt_root, d)) for d in os.listdir(ckpt_root)
             if (m := _STEP_DIR.match(d)) and os.path.isdir(os.path.join(ckpt_root, d))]
    return [p for _, p in sorted(found)]


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
        write_manifest(tmp)   # last: covers every file of every rank (shared filesystem)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final
