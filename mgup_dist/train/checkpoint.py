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
only those (format 2).  torch.distributed.checkpoint (its ``.metadata`` and the non-tensor
items of its ``.distcp`` files) and DeepSpeed (its model and optimizer shards) unpickle
with no such limit: an unsigned checkpoint can run code when it is loaded.  The manifest
only detects damage (anyone can regenerate it), so with ``MGUP_CHECKPOINT_KEY`` set in the
environment rank 0 also writes ``manifest.sig``, HMAC-SHA256 under that key of the
manifest's bytes, and :func:`verify_checkpoint` (which runs before any file is loaded)
refuses a checkpoint whose signature is missing or does not match.  The manifest holds
every file's sha256 and no unlisted file is accepted, so the signature covers them all.
``python -m mgup_dist.train.checkpoint verify|sign DIR...`` checks checkpoints, or signs
ones the user trusts (written before the key was set).
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import random
import re
import shutil
import sys
from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = ["list_checkpoints", "latest_checkpoint", "checkpoint_step", "rng_state", "set_rng_state",
           "barrier", "save_checkpoint", "write_manifest", "verify_checkpoint", "candidate_checkpoints", "MANIFEST",
           "SIGNATURE", "KEY_ENV", "signing_key", "sign_manifest", "STATE_FORMAT", "load_trainer_state",
           "UnusableCheckpoint", "NoSpaceError", "CheckpointWriteError", "remove_path"]

_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
#: HMAC-SHA256 of ``manifest.json`` (hex), written when :data:`KEY_ENV` is set.
SIGNATURE = "manifest.sig"
#: The environment variable holding the checkpoint signing key.
KEY_ENV = "MGUP_CHECKPOINT_KEY"
_MIN_KEY_BYTES = 16
#: ``trainer_state.pt`` layout: 2 = tensors, numbers, strings and containers only (loads
#: with ``weights_only=True``).  Format 1 pickled numpy's RNG state and is refused.
STATE_FORMAT = 2


class UnusableCheckpoint(ValueError):
    """A checkpoint directory that cannot be resumed from (the message says why)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be put in place (a directory that cannot be created,
    replaced or removed); the message names the path and what to do."""


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
            if rel not in (MANIFEST, SIGNATURE):
                out.append(rel)
    return sorted(out)


def signing_key() -> Optional[bytes]:
    """The key of :data:`KEY_ENV` (UTF-8 bytes), None when unset or empty; a ValueError
    for a key too short to resist guessing."""
    key = os.environ.get(KEY_ENV, "")
    if not key:
        return None
    key_bytes = key.encode("utf-8")
    if len(key_bytes) < _MIN_KEY_BYTES:
        raise ValueError(f"{KEY_ENV}: the checkpoint signing key has {len(key_bytes)} bytes, at least "
                         f"{_MIN_KEY_BYTES} are needed (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    return key_bytes


def _mac(key: bytes, path: str) -> str:
    with open(os.path.join(path, MANIFEST), "rb") as f:
        return hmac.new(key, f.read(), hashlib.sha256).hexdigest()


def sign_manifest(path: str, key: bytes) -> None:
    """Write ``manifest.sig``: HMAC-SHA256 under ``key`` of the manifest's bytes (rank 0,
    after :func:`write_manifest`)."""
    tmp = os.path.join(path, SIGNATURE + ".tmp")
    with open(tmp, "w") as f:
        f.write(_mac(key, path) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, SIGNATURE))


def _check_signature(path: str, key: bytes) -> Optional[str]:
    spath = os.path.join(path, SIGNATURE)
    if not os.path.isfile(spath):
        return (f"unsigned: no {SIGNATURE} while {KEY_ENV} is set (its files could run code when loaded: "
                f"sign it with `python -m mgup_dist.train.checkpoint sign DIR` only if you trust where it came from)")
    try:
        with open(spath, "rb") as f:
            got = f.read().decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        return f"unreadable {SIGNATURE}: {type(e).__name__}: {e}"
    if not hmac.compare_digest(got, _mac(key, path)):
        return (f"{MANIFEST} does not match its signature {SIGNATURE} under {KEY_ENV} (changed after it was "
                "signed, or signed with another key): refused before any of its files is loaded")
    return None


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


def verify_checkpoint(path: str, key: Optional[bytes] = None) -> Optional[str]:
    """None when ``path`` is a complete checkpoint whose files match its manifest (and,
    with a signing ``key``, whose manifest matches its signature); otherwise the reason it
    is unusable (first problem found).  Reads files as bytes only: nothing is unpickled."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        return f"no {MANIFEST} (incomplete, or written by a version without checksums)"
    if key is not None:
        why = _check_signature(path, key)
        if why is not None:
            return why
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


def remove_path(path: str) -> None:
    """Remove a checkpoint directory; a symbolic link (a checkpoint kept on another disk)
    is unlinked, never followed."""
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


def save_checkpoint(ckpt_root: str, step: int, engine, trainer_state: dict, rank: int, keep: int,
                    key: Optional[bytes] = None) -> str:
    """Collective: every rank calls it.  ``trainer_state`` holds this rank's entries
    (data position, RNG) under ``per_rank`` plus shared ones; rank 0 gathers the per-rank
    entries and writes ``trainer_state.pt`` last, which marks the directory complete.
    A write that fails (a full disk) fails on every rank, removes the partial
    ``step_N.tmp`` and leaves the older checkpoints as they were.  With a signing ``key``
    rank 0 signs the manifest (:func:`sign_manifest`)."""
    final = os.path.join(ckpt_root, f"step_{step:08d}")
    tmp = final + ".tmp"
    prep: Optional[BaseException] = None
    if rank == 0:
        try:
            os.makedirs(ckpt_root, exist_ok=True)
            if os.path.lexists(tmp):
                remove_path(tmp)
            os.makedirs(tmp)
        except OSError as e:
            prep = e
    if _any_rank(prep is not None):
        raise CheckpointWriteError(
            f"checkpoint: cannot create {tmp!r}" + (f" ({type(prep).__name__}: {prep})" if prep is not None else
                                                    " (see rank 0)") + "; is the checkpoints directory writable?"
        ) from prep
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
            if key is not None:
                sign_manifest(tmp, key)
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
    moved: Optional[BaseException] = None
    if rank == 0:
        try:
            if os.path.lexists(final):
                remove_path(final)
            os.replace(tmp, final)
        except OSError as e:
            moved = e
    if _any_rank(moved is not None):
        raise CheckpointWriteError(
            f"checkpoint: cannot replace {final!r} by the new {os.path.basename(tmp)}"
            + (f" ({type(moved).__name__}: {moved})" if moved is not None else " (see rank 0)")
            + "; make the checkpoints directory writable and rerun: the run resumes from the newest checkpoint "
              "that verifies"
        ) from moved
    if rank == 0:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            try:
                remove_path(old)
            except OSError as e:   # the new one is in place; an old one left over is only disk space
                print(f"[mgup-dist train] WARNING: checkpoint rotation could not remove {old!r} "
                      f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)
    barrier()
    return final


def _main(argv: List[str]) -> int:
    """``python -m mgup_dist.train.checkpoint verify|sign DIR...``: check checkpoints
    against their manifests (and signatures when :data:`KEY_ENV` is set), or sign ones
    whose files match their manifest, under :data:`KEY_ENV`."""
    if len(argv) < 2 or argv[0] not in ("verify", "sign"):
        print("usage: python -m mgup_dist.train.checkpoint verify|sign CHECKPOINT_DIR...", file=sys.stderr)
        return 2
    try:
        key = signing_key()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if argv[0] == "sign" and key is None:
        print(f"error: sign needs the key in {KEY_ENV}", file=sys.stderr)
        return 2
    bad = 0
    for path in argv[1:]:
        why = verify_checkpoint(path, key if argv[0] == "verify" else None)
        if why is None and argv[0] == "sign":
            sign_manifest(path, key)
        print(f"{path}: {'ok' if why is None else why}" + (" (signed)" if why is None and argv[0] == "sign" else ""))
        bad += why is not None
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
