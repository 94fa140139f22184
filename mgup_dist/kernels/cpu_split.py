"""Exact top-K of tensors split over ranks, on the CPU: the collective bracket select.

A unit (an original tensor) of ``N`` keys lies in pieces on several ranks; the K-th largest
key over all of them is wanted, and the ties at it go to the lower flat index (over all
ranks' pieces, in index order, as ``radix.tie_cutoff``).  Where the selection of a whole
tensor (``cpu._select_units``) brackets the K-th key with a sample and counts one pass over
the keys, this does the same with the sums that ``reduce`` makes over the ranks:

1. **sample** (one all-reduce of ``min(N, SAMPLE)`` keys per unit): the sample positions are
   flat indices of the whole tensor, fixed by ``N`` (``bracket._sample_idx``, the positions a
   single process uses); each rank writes the keys at the positions it holds, zeros
   elsewhere, and the sum is the sample of the whole tensor on every rank.  Sorted, it
   gives the bracket ``[lo, hi]`` of the K-th key (the sample rank of the K-th largest +- 4
   standard deviations); a unit sampled whole (``N <= SAMPLE``) gives ``lo = hi`` = its
   K-th key.
2. **count** (one all-reduce of ``2 + 2^w`` int64 per unit): one pass over the local keys
   (threads, blocks of ``COUNT_BLOCK``) counts ``#(key > hi)`` and keeps the keys in the
   bracket (the candidates, ~3 % of them); with the counts travels the first digit
   histogram of the candidates' offsets ``key - lo``.  The bracket holds the K-th key when
   ``#(> hi) < K <= #(> hi) + #(in [lo, hi])``; where it does not for some unit (a sample
   that is not representative), the caller runs the exact radix select of the whole
   chunk instead: decided from the reduced counts, so on every rank alike.
3. **radix on the candidates** (one all-reduce of ``2^w`` int64 per unit and further pass):
   the digits of ``key - lo``, ``w <= 11`` bits a pass, as many passes as the widest
   bracket of the chunk needs (0 when every bracket is one key; 2 for a typical bracket
   of fp32 scores), each pass ``radix.choose_digit`` on the summed histograms.
4. **ties** (one all-reduce of the chunk's tie-count slots, only when some unit has more
   keys equal to its K-th key than it selects: known from the last histogram): per piece
   its ties at ``t``, ``radix.tie_cutoff``, and each piece lowers its losing ties to
   ``t - 1``, lowest index first.

Every rank makes the same reduce calls in the same order: their number and sizes follow
from the plan and from reduced data only; a rank that holds nothing of a unit (or of the
chunk) contributes zeros.  The result is bit for bit the selection of one process.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import numpy as np
import torch

from ..radix import choose_digit, tie_cutoff, unit_tables
from .bracket import COUNT_BLOCK, SAMPLE, _lower_ties, _sample_idx

__all__ = ["bracket_select", "bracket_applies", "RADIX_BITS"]

#: digit bits of one radix pass over the candidates (2048 bins a unit: one pass resolves a
#: bracket of 2048 keys, two a bracket of 4M keys)
RADIX_BITS = 11


def bracket_applies(chunk) -> bool:
    """A plan fact: every unit of the split chunk is one tensor (scope ``tensor``, or
    ``global`` over a single tensor), so flat indices of the tensor place the sample."""
    return chunk.split and chunk.n_units > 0 and tuple(chunk.n) == tuple(numel for _, numel in chunk.tensors)


def _tables(chunk):
    """Per unit its sample (positions, offset in the sample buffer, size); per local piece
    the sample entries it holds.  Made once per chunk (plan facts and local layout only)."""
    key = ("cpu_bracket",)
    t = chunk.cache.get(key)
    if t is not None:
        return t
    units = []
    off = 0
    for u, (n, k) in enumerate(zip(chunk.n, chunk.k)):
        if k == 0 or n == 0:
            units.append(None)  # nothing selected: no sample, no bracket
            continue
        pos = np.arange(n, dtype=np.int64) if n <= SAMPLE else _sample_idx(n).astype(np.int64)
        units.append((off, pos))
        off += pos.size
    pieces = []
    for pc in chunk.pieces:
        if pc.unit < 0 or units[pc.unit] is None:
            pieces.append(None)
            continue
        base, pos = units[pc.unit]
        a, b = np.searchsorted(pos, [pc.gstart, pc.gstart + pc.length])
        pieces.append((base + a, base + b, pos[a:b] - pc.gstart))
    t = {"units": units, "pieces": pieces, "size": off}
    chunk.cache[key] = t
    return t


def _widths(nbits: int) -> List[int]:
    """Digit widths of the radix passes over offsets of ``nbits`` bits: the fewest passes of
    at most RADIX_BITS, the bits spread evenly (none for a one-key bracket)."""
    if nbits <= 0:
        return []
    passes = -(-nbits // RADIX_BITS)
    base, extra = divmod(nbits, passes)
    return [base + (1 if i < extra else 0) for i in range(passes)]


def _count(a: np.ndarray, lo: int, hi: int):
    """One block of the counting pass: #(a > hi) and the keys in [lo, hi]."""
    gt = a > hi
    inb = a >= lo
    np.logical_xor(inb, gt, out=inb)  # gt is a subset of inb: what is left lies in [lo, hi]
    return int(np.count_nonzero(gt)), a[inb]


def bracket_select(chunk, keys: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Optional[torch.Tensor]:
    """The K-th key of every unit of the split ``chunk`` (int tensor [n_units]; K = 0: the
    largest key), the losing ties lowered in ``keys`` so that ``key >= t`` is exactly the
    selection; or None, with ``keys`` untouched, when the bracket of some unit missed its
    K-th key (then the caller's radix select, entered by every rank alike, is exact)."""
    ity = keys.dtype
    info = np.iinfo(np.int64 if ity == torch.int64 else np.int32)
    U = chunk.n_units
    tab = _tables(chunk)
    arr = keys.numpy()
    live = [u for u in range(U) if tab["units"][u] is not None]
    if not live:  # K = 0 everywhere (a plan fact): nothing selected, nothing to agree on
        return torch.full((U,), info.max, dtype=ity)

    # 1. the sample of every unit, summed over the ranks
    sample = np.zeros(tab["size"], dtype=arr.dtype)
    for pc, ent in zip(chunk.pieces, tab["pieces"]):
        if ent is not None and ent[1] > ent[0]:
            sample[ent[0]: ent[1]] = arr[pc.offset: pc.offset + pc.length][ent[2]]
    reduce(torch.from_numpy(sample))
    lo = np.full(U, info.max, dtype=np.int64)
    hi = np.full(U, info.max, dtype=np.int64)
    for u in live:
        off, pos = tab["units"][u]
        n, k = chunk.n[u], chunk.k[u]
        s = np.sort(sample[off: off + pos.size])
        r = n - k  # ascending rank of the K-th largest
        if pos.size == n:  # the whole unit: its K-th key
            lo[u] = hi[u] = s[r]
            continue
        S = pos.size
        p = r / n
        js = r * S // n
        margin = int(4.0 * math.sqrt(S * p * (1 - p))) + 8
        lo[u] = s[js - margin] if js - margin >= 0 else info.min
        hi[u] = s[js + margin] if js + margin < S else info.max
    nbits = max((int(hi[u]) - int(lo[u])).bit_length() for u in live) if live else 0
    widths = _widths(nbits)

    # 2. the counting pass: #(> hi), the candidates in [lo, hi] (per piece, in index order)
    # on the calling thread (numpy in blocks of COUNT_BLOCK): no Python thread pool on top of
    # torch's OpenMP threads, which would fight for the same cores
    jobs = []
    for i, pc in enumerate(chunk.pieces):
        if tab["pieces"][i] is None or pc.length == 0:
            continue
        a = arr[pc.offset: pc.offset + pc.length]
        l, h = int(lo[pc.unit]), int(hi[pc.unit])
        jobs.append((i, [_count(a[j: j + COUNT_BLOCK], l, h) for j in range(0, pc.length, COUNT_BLOCK)]))
    c_gt = np.zeros(U, dtype=np.int64)
    c_in = np.zeros(U, dtype=np.int64)
    cand = {}  # piece index -> candidate offsets (key - lo) as uint64, in index order
    for i, parts in jobs:
        u = chunk.pieces[i].unit
        c_gt[u] += sum(g for g, _ in parts)
        vals = np.concatenate([v for _, v in parts]) if len(parts) > 1 else parts[0][1]
        c_in[u] += vals.size
        # offsets from lo in uint64: exact for any pair of int64 keys (0 <= key - lo < 2^64)
        cand[i] = vals.astype(np.int64).view(np.uint64) - np.int64(lo[u]).view(np.uint64)

    def histogram(p: int, prefix: Optional[np.ndarray]) -> np.ndarray:
        w = widths[p]
        shift = nbits - sum(widths[: p + 1])
        hist = np.zeros((U, 1 << w), dtype=np.int64)
        for i, c in cand.items():
            u = chunk.pieces[i].unit
            if prefix is not None:
                c = c[(c >> np.uint64(shift + w)) == prefix[u]]
                cand[i] = c
            hist[u] += np.bincount(((c >> np.uint64(shift)) & np.uint64((1 << w) - 1)).astype(np.int64), minlength=1 << w)
        return hist

    w0 = widths[0] if widths else 0
    buf = np.zeros((U, 2 + (1 << w0)), dtype=np.int64) if widths else np.zeros((U, 2), dtype=np.int64)
    buf[:, 0], buf[:, 1] = c_gt, c_in
    if widths:
        buf[:, 2:] = histogram(0, None)
    reduce(torch.from_numpy(buf))
    c_gt, c_in = buf[:, 0].copy(), buf[:, 1].copy()
    k_all = np.asarray(chunk.k, dtype=np.int64)
    if any(not (c_gt[u] < k_all[u] <= c_gt[u] + c_in[u]) for u in live):
        return None  # the same on every rank: the counts are sums over all of them

    # 3. the K-th key among the candidates: radix passes over key - lo
    k_rem = torch.from_numpy(k_all - c_gt)  # how many of the candidates (from the top) are selected
    prefix = np.zeros(U, dtype=np.uint64)  # offsets from lo: up to 64 bits
    eq = torch.from_numpy(c_in.copy())  # keys equal to the K-th (no pass: every candidate is lo)
    for p, w in enumerate(widths):
        if p == 0:
            hist = torch.from_numpy(np.ascontiguousarray(buf[:, 2:]))
        else:
            hist = torch.from_numpy(histogram(p, prefix))
            reduce(hist)
        b, k_rem = choose_digit(hist, k_rem)
        eq = hist.gather(1, b[:, None])[:, 0]
        prefix = (prefix << np.uint64(w)) | b.numpy().astype(np.uint64)
    t = np.full(U, info.max, dtype=np.int64)
    for u in live:
        t[u] = int(lo[u]) + int(prefix[u])  # lo + offset: within [lo, hi], no wrap
    t_key = torch.from_numpy(t).to(ity)

    # 4. ties at t: the first k_rem in index order over all ranks' pieces
    if any(int(eq[u]) > int(k_rem[u]) for u in live):
        ut = unit_tables(chunk, keys.device)
        slots = torch.zeros(chunk.n_slots + 1, dtype=torch.int64)
        ties = {}
        for i, c in cand.items():
            pc = chunk.pieces[i]
            ties[i] = int(np.count_nonzero(c == prefix[pc.unit]))
            slots[pc.slot] += ties[i]
        reduce(slots)
        if chunk.pieces:
            take = tie_cutoff(slots, k_rem, ut["slot_unit"], ut["first_slot"]).tolist()
            lower = [(arr[chunk.pieces[i].offset: chunk.pieces[i].offset + chunk.pieces[i].length], t[chunk.pieces[i].unit],
                      take[chunk.pieces[i].slot]) for i, n in ties.items() if n > take[chunk.pieces[i].slot]]
            for a, tv, keep in lower:
                _lower_ties(a, tv, keep)
    return t_key
