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

Trust: everything this module and the trainer load is read with ``torch.load(...,
weights_only=True)`` (tensors and plain containers, no code); ``trainer_state.pt`` holds
only those (format 2).  torch.distributed.checkpoint's ``.metadata`` and DeepSpeed's
shards are unpickled by those libraries: a checkpoint directory must be as trusted as
code.
"""
from __future__ import annotations

import errno
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
           "barrier", "save_checkpoint", "write_manifest", "verify_checkpoint", "candidate_checkpoints", "MANIFEST",
           "STATE_FORMAT", "load_trainer_state", "UnusableCheckpoint", "NoSpaceError"]

_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
#: ``trainer_state.pt`` layout: 2 = tensors, numbers, strings and containers only (loads
#: with ``weights_only=True``).  Format 1 pickled numpy's RNG state and is refused.
STATE_FORMAT = 2


class UnusableCheckpoint(ValueError):
    """A checkpoint directory that cannot be resumed from (the message says why)."""


class NoSpaceError(OSError):
    """A checkpoint could not be written for lack of space (the message names the directory)."""


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
        with open(mpath, "rb") as f:
            files = json.loads(f.read().decode("utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST}: {type(e).__name__}: {e}"
    # A hand-edited or foreign manifest: every entry must be {"size": int, "sha256": str}.
    if not isinstance(files, dict):
        return f"malformed {MANIFEST}: 'files' must be an object of path -> {{size, sha256}}, got {type(files).__name__}"
    for rel, want in files.items():
        if not (isinstance(want, dict) and isinstance(want.get("size"), int) and not isinstance(want.get("size"), bool)
                and isinstance(want.get("sha256"), str)):
            return f"malformed {MANIFEST}: the entry of {rel!r} must hold an integer 'size' and a string 'sha256'"
        if os.path.isabs(rel) or ".." in rel.split("/"):
            return f"malformed {MANIFEST}: {rel!r} is not a path inside the checkpoint"
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
    """Every RNG a step may draw from, as tensors and numbers only (``weights_only`` loads it)."""
    version, words, gauss = random.getstate()
    state = {"python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:  # pragma: no cover
        pass
    if device.type != "cpu":
        state["device"] = torch.get_device_module(device).get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(w) for w in py["words"].tolist()), py["gauss"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if device.type != "cpu" and "device" in state:
        torch.get_device_module(device).set_rng_state(state["device"], device)


def load_trainer_state(path: str) -> dict:
    """``<path>/trainer_state.pt`` loaded with ``weights_only=True`` (no code runs); an
    UnusableCheckpoint saying why when it does not load or is of another format."""
    f = os.path.join(path, "trainer_state.pt")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:   # UnpicklingError, a truncated zip, ...: any failure means unusable
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UnusableCheckpoint(
            f"trainer_state.pt does not load as tensors and plain data (weights_only=True: {type(e).__name__}: "
            f"{first}); it was written by an mgup-dist version before format {STATE_FORMAT}, or is not a checkpoint "
            "of this program: resume it with the version that wrote it, or start over (--resume never)") from e
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt != STATE_FORMAT:
        raise UnusableCheckpoint(f"trainer_state.pt has format {fmt!r}, this version reads format {STATE_FORMAT}; "
                                 "resume it with the version that wrote it, or start over (--resume never)")
    return state


def _is_no_space(e: BaseException) -> bool:
    # torch.save reports a full disk from its zip writer as "[enforce fail at
    # inline_container.cc:...] unexpected pos" / "file write failed", not as ENOSPC.
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e)
    return "unexpected pos" in text or "file write failed" in text or "No space left" in text


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any (a collective: every rank calls it)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, bool(flag))
    return any(box)


def save_checkpoint(ckpt_root: str, step: int, engine, trainer_state: dict, rank: int, keep: int) -> str:
    """Collective: every rank calls it.  ``trainer_state`` holds this rank's entries
    (data position, RNG) under ``per_rank`` plus shared ones; rank 0 gathers the per-rank
    entries and writes ``trainer_state.pt`` last, which marks the directory complete.
    A write that fails (a full disk) fails on every rank, removes the partial
    ``step_N.tmp`` and leaves the older checkpoints as they were."""
    final = os.path.join(ckpt_root, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    barrier()
    err: Optional[BaseException] = None
    try:
        engine.save(tmp, rank)
    except BaseException as e:   # also DCP's CheckpointException (a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        err = e
    per_rank = trainer_state.pop("per_rank")
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, per_rank)
    else:
        gathered = [per_rank]
    barrier()
    if rank == 0 and err is None:
        trainer_state["per_rank"] = gathered
        trainer_state["format"] = STATE_FORMAT
        try:
            torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
            write_manifest(tmp)   # last: covers every file of every rank (shared filesystem)
        except (OSError, RuntimeError) as e:
            err = e
    if _any_rank(err is not None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        older = list_checkpoints(ckpt_root)
        keep_note = f"the checkpoints kept ({', '.join(os.path.basename(p) for p in older) or 'none'}) are intact"
        if err is None:
            raise RuntimeError(f"checkpoint: another rank failed to write {final!r}; the partial directory was "
                               f"removed and {keep_note}")
        if _is_no_space(err):
            free = shutil.disk_usage(ckpt_root).free if os.path.isdir(ckpt_root) else 0
            raise NoSpaceError(errno.ENOSPC, f"checkpoint: no space left on {ckpt_root!r} while writing step {step} "
                                             f"({free / 1e6:.0f} MB free now); the partial directory was removed and "
                                             f"{keep_note}: free space (or lower --keep-checkpoints) and rerun to "
                                             f"resume from the newest of them") from err
        raise RuntimeError(f"checkpoint: writing {final!r} failed ({type(err).__name__}: {err}); the partial "
                           f"directory was removed and {keep_note}") from err
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final
