"""``--dataset pysource``: an offline corpus from the Python source installed on this machine.

Real text of tens to hundreds of MB that every machine with Python has, no download:

* **Files**: every ``*.py`` under each root (default: the standard library and the
  site-packages directories of ``sysconfig``; ``--pysource-roots`` overrides).  A root
  nested inside another (site-packages inside the stdlib directory) is read once, as
  itself.  Symlinked directories are not followed.
* **Key** of a file: its path relative to its root, POSIX form (``json/decoder.py``,
  ``torch/nn/modules/linear.py``).  The key does not depend on where the root lives nor on
  which other packages are installed.
* **Split**: validation iff ``sha256("pysource-split:" + key)`` falls below
  ``VAL_FRACTION`` of the hash range.  A file's split is a function of its key alone, so
  installing another package never moves a file from train to validation or back.
* **Order**: by ``sha256("pysource-order:" + key)`` (ties: key, then root index): a fixed
  pseudo-random interleaving of all packages, identical on every machine for the same
  files, so a ``--pysource-max-bytes`` cap takes a sample across packages rather than
  the alphabetically first ones.
* **Exact duplicates** (same bytes; e.g. vendored copies) are dropped: the first file in
  the order above is kept, across both splits, so no text is in train and validation.
  (Caveat: a newly installed package that holds an exact copy of an existing file and
  sorts before it takes its place, possibly in the other split.)
* **Tokens**: the recipe's byte tokenizer (UTF-8 bytes 0..255 as they are in the file),
  each file followed by EOS (257).  Stored as int16 (2 bytes a token).

Windows, data order and resume work as for the embedded corpus
(:class:`~mgup_dist.train.windows.IndexedWindows`: the position is a function of the step).
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .windows import IndexedWindows, eval_windows

__all__ = ["VAL_FRACTION", "default_roots", "parse_roots", "list_files", "build_corpus", "PySourceWindows",
           "build_pysource"]

VAL_FRACTION = 0.02
_EOS = 257   # ByteTokenizer.eos_token_id


def default_roots() -> List[str]:
    """The stdlib directory, then purelib / platlib (site-packages), existing ones, deduplicated."""
    paths = sysconfig.get_paths()
    out: List[str] = []
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = paths.get(key)
        if p and os.path.isdir(p):
            p = os.path.realpath(p)
            if p not in out:
                out.append(p)
    return out


def parse_roots(spec) -> List[str]:
    """``None`` -> :func:`default_roots`; a string -> ``os.pathsep``- or comma-separated
    directories; a list -> as is.  Every root must be an existing directory."""
    if spec is None:
        roots = default_roots()
    elif isinstance(spec, str):
        roots = [r for part in spec.split(os.pathsep) for r in part.split(",") if r.strip()]
    else:
        roots = list(spec)
    if not roots:
        raise ValueError("pysource_roots: no directory given")
    out = []
    for r in roots:
        if not os.path.isdir(r):
            raise ValueError(f"pysource_roots: {r!r} is not a directory")
        r = os.path.realpath(r)
        if r not in out:
            out.append(r)
    return out


def _hash_unit(tag: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{tag}:{key}".encode("utf-8", "surrogateescape")).digest()[:8], "big")


def is_validation(key: str, val_fraction: float = VAL_FRACTION) -> bool:
    return _hash_unit("pysource-split", key) < val_fraction * 2.0 ** 64


def list_files(roots: Sequence[str]) -> List[Tuple[str, int, str]]:
    """``(key, root index, absolute path)`` of every ``*.py`` file, in the corpus order."""
    roots = [os.path.realpath(r) for r in roots]
    found: List[Tuple[int, str, int, str]] = []
    for ri, root in enumerate(roots):
        others = {r for r in roots if r != root and r.startswith(root + os.sep)}
        for dirpath, dirnames, filenames in os.walk(root):
            # a nested root is read as itself, not as part of this one
            dirnames[:] = sorted(d for d in dirnames if os.path.join(dirpath, d) not in others
                                 and d != "__pycache__")
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                path = os.path.join(dirpath, fn)
                if not os.path.isfile(path):   # broken links
                    continue
                key = os.path.relpath(path, root).replace(os.sep, "/")
                found.append((_hash_unit("pysource-order", key), key, ri, path))
    found.sort()
    return [(key, ri, path) for _, key, ri, path in found]


def build_corpus(roots: Sequence[str], max_bytes: Optional[int] = None, val_fraction: float = VAL_FRACTION) -> Dict:
    """Read, deduplicate and split.  Returns ``{"train": int16 tensor, "val": int16 tensor,
    "files": [(root index, key, split)] of the files kept, in stream order, "stats": {...}}``.
    ``max_bytes`` caps the source bytes taken into each split (files whole, in the corpus
    order; the file that crosses the cap is the last one taken)."""
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"pysource_max_bytes: must be positive, got {max_bytes}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: must be in (0, 1), got {val_fraction}")
    files = list_files(roots)
    if not files:
        raise ValueError(f"pysource_roots: no *.py files under {list(roots)}")
    seen = set()
    parts: Dict[str, List[np.ndarray]] = {"train": [], "val": []}
    nbytes = {"train": 0, "val": 0}
    nfiles = {"train": 0, "val": 0}
    dups = 0
    kept: List[Tuple[int, str, str]] = []
    eos = np.array([_EOS], dtype=np.int16)
    for key, ri, path in files:
        split = "val" if is_validation(key, val_fraction) else "train"
        if max_bytes is not None and nbytes[split] >= max_bytes:
            if all(max_bytes is not None and nbytes[s] >= max_bytes for s in nbytes):
                break
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:   # unreadable (permissions): not part of the corpus on this machine
            continue
        digest = hashlib.sha256(data).digest()
        if digest in seen:
            dups += 1
            continue
        seen.add(digest)
        parts[split].append(np.frombuffer(data, dtype=np.uint8).astype(np.int16))
        parts[split].append(eos)
        nbytes[split] += len(data)
        nfiles[split] += 1
        kept.append((ri, key, split))
    out = {}
    for split in ("train", "val"):
        if not parts[split]:
            raise ValueError(f"pysource_roots: the {split} split is empty ({nfiles['train']} train / "
                             f"{nfiles['val']} validation files); give more files")
        out[split] = torch.from_numpy(np.concatenate(parts[split]))
    out["files"] = kept
    out["stats"] = {"roots": list(roots), "files_seen": len(files), "duplicates_dropped": dups,
                    "train_files": nfiles["train"], "val_files": nfiles["val"],
                    "train_tokens": int(out["train"].numel()), "val_tokens": int(out["val"].numel())}
    return out


class PySourceWindows(IndexedWindows):
    """IndexedWindows over the int16 stream, handing out int64 ids."""

    def next_micro(self) -> torch.Tensor:
        return super().next_micro().long()


def build_pysource(cfg, rank: int, world_size: int, max_eval: int):
    """``(train IndexedWindows, val LongTensor, description)`` for ``--dataset pysource``."""
    roots = parse_roots(getattr(cfg, "pysource_roots", None))
    corpus = build_corpus(roots, getattr(cfg, "pysource_max_bytes", None))
    s = corpus["stats"]
    train = PySourceWindows(corpus["train"], cfg.seq_len, cfg.global_batch, cfg.micro_batch, rank,
                                   world_size, seed=cfg.seed)
    val = eval_windows(corpus["val"], cfg.seq_len, max_eval, rank, world_size).long()
    desc = (f"pysource: {s['train_files']} train / {s['val_files']} val files ({s['duplicates_dropped']} exact "
            f"duplicates dropped) from {', '.join(roots)}: {s['train_tokens']:,} train / {s['val_tokens']:,} val "
            f"tokens (byte)")
    return train, val, desc
