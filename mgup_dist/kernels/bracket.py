"""The pieces of the CPU's exact bracket select shared by whole tensors (``cpu``) and tensors
split over ranks (``cpu_split``): the sample positions (fixed by a unit's size, so every rank
samples the same flat indices), and the lowering of the losing ties in index order."""
from __future__ import annotations

import numpy as np

__all__ = ["SAMPLE", "COUNT_BLOCK"]

#: largest sample of the bracket: the K-th key's sample rank has a standard deviation of
#: sqrt(S p (1-p)) <= 64; +-4 of them leave ~3 % of the keys inside the bracket.  Units
#: under 1M elements take n/64 samples (at least 1024: ~10 % inside the bracket), so that
#: sorting the sample never costs more than the counting pass.
SAMPLE = 1 << 14
#: elements per task of the counting pass (4 MB of int32 keys: one task's passes stay in L2/L3)
COUNT_BLOCK = 1 << 20

_SAMPLES: dict = {}


def _sample_idx(n: int) -> np.ndarray:
    """Fixed, sorted sample positions of a unit of n elements (they depend on n only: the
    selection is deterministic)."""
    idx = _SAMPLES.get(n)
    if idx is None:
        idx = np.sort(np.random.default_rng(n).integers(0, n, max(1024, min(SAMPLE, n >> 6))))
        if len(_SAMPLES) > 256:
            _SAMPLES.clear()
        _SAMPLES[n] = idx
    return idx


def _lower_ties(a: np.ndarray, t, need: int) -> None:
    """The ties at t after the first ``need`` (lowest index) drop to t - 1."""
    for i in range(0, a.size, COUNT_BLOCK):
        blk = a[i: i + COUNT_BLOCK]
        pos = np.flatnonzero(blk == t)
        if need >= pos.size:
            need -= pos.size
            continue
        blk[pos[need:]] -= 1
        need = 0
