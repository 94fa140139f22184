"""Which coordinates get ``alpha``: the K largest alignment scores of a scope.

Definition (the reference semantics every path reproduces exactly): within a scope
of ``N`` elements, rank scores in descending order, NaN lowest and ``-0.0 == +0.0``;
ties go to the lower flat index of the original tensor (for ``scope="global"``: the
lower ``(tensor_id, flat index)``).  The first ``K = floor(mask_ratio * N)`` get
``alpha``, the rest ``gamma``.

How it is computed
------------------
* A scope held whole on this rank: the K-th largest value ``t`` (``numpy`` introselect
  on CPU, ``torch.kthvalue`` elsewhere), then ``mask = s >= t``; only when more than
  the needed number of elements equal ``t`` is a prefix count over the ties done.
  No ``topk`` + scatter: a threshold and an elementwise compare are O(N).
* A scope split across ranks: radix select on order-preserving integer keys.  Per
  pass every rank histograms the next digit of the keys that still match the prefix,
  one ``all_reduce`` carries the histograms of *all* split tensors together, and the
  prefix grows by that digit.  Digits are 12 bits, then 10 (three passes for fp32 keys,
  seven for fp64): a 12-bit first digit cuts an octave of scores 16 ways, so the
  candidates kept after the one pass that reads every element are a few percent.
  Then the exact K-th key is known on every rank; ties at it are resolved by a global
  prefix count only when they exceed what is needed.  Communication per step is
  ``(4096 + 1024 + 1024) x n_split`` integers whatever the tensors' size.

Every rank enters every collective: the set of split tensors comes from
``Layout.collective`` (identical on all ranks), not from which gradients exist.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .layout import Layout

__all__ = [
    "SCOPES",
    "num_selected",
    "topk_mask_",
    "select_masks",
    "collective_group",
    "float_keys",
    "kth_and_unique",
]

SCOPES = ("tensor", "shard", "global", "global_approx")


def num_selected(mask_ratio: float, n: int) -> int:
    """K = floor(mask_ratio * N), computed so that e.g. 0.3 * 10 gives 3, not 2."""
    k = math.floor(mask_ratio * n + 1e-9 * max(n, 1))
    return max(0, min(n, k))


# --------------------------------------------------------------------------- keys
def float_keys(s: torch.Tensor) -> torch.Tensor:
    """Order-preserving signed integer keys of float scores (int32 for <= 32-bit
    floats, int64 for float64): ``a < b  <=>  key(a) < key(b)``, with ``-0.0`` mapped
    to ``+0.0`` and every NaN to the smallest key, so NaN ranks lowest."""
    dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    return _keys_inplace(torch.empty(s.shape, dtype=dtype, device=s.device).copy_(s), None)


# ----------------------------------------------------------------- local selection
def kth_and_unique(scratch: torch.Tensor, k: int) -> Tuple[float, bool]:
    """For NaN-free flat scores in ``scratch`` (reordered in place) and 1 <= k <= n, return
    ``(t, unique)``: t is the k-th largest value; unique means exactly k elements are
    >= t (no tie across the K boundary), so ``s >= t`` selects exactly the top k.
    Introselect leaves the k largest after index n-k, hence unique <=> max(rest) < t:
    one read of the rest instead of a counting pass."""
    n = scratch.numel()
    if scratch.device.type == "cpu":
        a = scratch.numpy()
        a.partition(n - k)  # O(n) introselect, ~1-2 ns an element
        t = a[n - k]
        return float(t), bool(n == k or a[: n - k].max() < t)
    t = torch.kthvalue(scratch, n - k + 1).values.item()
    return t, bool(n == k or torch.kthvalue(scratch, n - k).values.item() < t)


def nan_free_copy(s: torch.Tensor, scratch: Optional[torch.Tensor]) -> torch.Tensor:
    """``s`` flattened with NaN -> -inf, written into ``scratch`` when it fits."""
    n = s.numel()
    if scratch is None or scratch.numel() < n or scratch.dtype != s.dtype or scratch.device != s.device:
        scratch = torch.empty(n, dtype=s.dtype, device=s.device)
    return torch.nan_to_num(s.reshape(-1), nan=-math.inf, out=scratch[:n])


def _first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Keep only the first ``count`` True entries of a flat bool mask (in place).  Ties
    are few, so their indices (nonzero: a pass over bytes) beat a full int64 cumsum."""
    if count <= 0:
        return mask.zero_()
    idx = torch.nonzero(mask).flatten()
    if idx.numel() > count:
        mask[idx[count:]] = False
    return mask


def topk_mask_(s: torch.Tensor, k: int, out: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Write into the flat bool ``out`` exactly ``k`` True entries: the k largest of
    the flat scores ``s`` (NaN lowest, ties to the lower index)."""
    n = s.numel()
    if k <= 0:
        return out.zero_()
    if k >= n:
        return out.fill_(True)
    t, unique = kth_and_unique(nan_free_copy(s, scratch), k)
    if t == -math.inf:
        # The selection reaches into -inf / NaN scores, where "NaN below -inf" matters:
        # rank on exact integer keys instead.
        keys = float_keys(s)
        kt = torch.kthvalue(keys, n - k + 1).values
        torch.gt(keys, kt, out=out)
        need = k - int(out.sum())
        return out.logical_or_(_first_true(keys == kt, need))
    torch.ge(s, t, out=out)  # NaN >= t is False: NaN ranks lowest
    if not unique:  # more elements equal t than needed: lower index wins
        torch.gt(s, t, out=out)
        need = k - int(out.sum())
        out.logical_or_(_first_true(s == t, need))
    return out


# ------------------------------------------------------------ distributed radix
def collective_group(layouts: Sequence[Layout]):
    """The one process group over which the collective tensors of a param group are
    resolved (None: the default group)."""
    groups = {id(l.group): l.group for l in layouts if l.collective or l.group is not None}
    if len(groups) > 1:
        raise ValueError(
            "all parameters of one param group must share one process group in their layouts "
            f"(found {len(groups)} different groups); put differently-sharded params in separate param groups"
        )
    return next(iter(groups.values())) if groups else None


def _world(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


@dataclass
class _Piece:
    scores: torch.Tensor  # flat view of local scores
    mask: torch.Tensor  # flat bool view to write
    order: Tuple  # tie-break position, comparable across ranks: (global_start,) or (tensor_id, global_start)
    keys: Optional[torch.Tensor] = None

    def key_view(self, tmp: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The order keys of this piece, computed once, *in place* over its scores."""
        if self.keys is None:
            self.keys = _keys_inplace(self.scores, tmp)
        return self.keys


def _keys_inplace(x: torch.Tensor, tmp: Optional[torch.Tensor]) -> torch.Tensor:
    """Overwrite the flat float scores ``x`` with ``float_keys(x)`` and return that integer
    view: same order keys, no new full-size tensor but a bool NaN mask (a dozen ms
    saved per 10M elements on a CPU compared with ``float_keys``)."""
    wide = x.dtype == torch.float64
    ity, sign_free = (torch.int64, 0x7FFFFFFFFFFFFFFF) if wide else (torch.int32, 0x7FFFFFFF)
    assert x.dtype in (torch.float32, torch.float64) and x.is_contiguous(), (x.dtype, x.stride())
    nan = torch.isnan(x)
    has_nan = bool(nan.any())
    x.add_(0.0)  # IEEE: -0.0 + 0.0 == +0.0
    bits = x.view(ity)
    n = bits.numel()
    if tmp is not None and tmp.device == x.device and tmp.numel() * tmp.element_size() >= n * bits.element_size():
        t = tmp.reshape(-1).view(torch.uint8)[: n * bits.element_size()].view(ity)
    else:
        t = torch.empty_like(bits)
    torch.bitwise_right_shift(bits, bits.element_size() * 8 - 1, out=t)
    t.bitwise_and_(sign_free)
    bits.bitwise_xor_(t)
    return bits.masked_fill_(nan, torch.iinfo(ity).min) if has_nan else bits


def _radix_widths(nbits: int) -> List[int]:
    """Bits resolved per pass: 12 first (4096 bins: an octave of scores cut 16 ways, so the
    candidates kept after pass 0 are a few percent), then 10 at a time."""
    widths, left = [12], nbits - 12
    while left > 0:
        widths.append(min(10, left))
        left -= widths[-1]
    return widths


def _radix_kth(
    unit_pieces: List[List[_Piece]], unit_k: List[int], group, dtype: torch.dtype,
    scratch: Optional[torch.Tensor] = None,
) -> None:
    """Exact distributed top-K for several units at once; writes the masks of the pieces.

    ``unit_pieces[j]`` are this rank's pieces of unit j (possibly none); ``unit_k[j]`` is
    K of the whole unit.  All ranks call with the same number of units in the same order.
    The pieces' scores are overwritten by their order keys.
    """
    m = len(unit_k)
    if m == 0:
        return
    wide = dtype == torch.float64
    nbytes = 8 if wide else 4
    ity = torch.int64 if wide else torch.int32
    # Digits are read from the unsigned key (key ^ sign bit), most significant first, so
    # that digit order is key order.  Pass 0 reads every element (the top 12 bits by an
    # arithmetic shift, offset to be non-negative) and keeps only the keys in the chosen
    # bin; the later passes see that small candidate set.
    widths = _radix_widths(8 * nbytes)
    top_shift = 8 * nbytes - widths[0]
    top_off = 1 << (widths[0] - 1)  # arithmetic shift leaves [-2^(w-1), 2^(w-1)): offset it
    prefix = [0] * m
    k_rem = list(unit_k)
    tie_total = [0] * m
    cand: List[torch.Tensor] = [torch.empty(0, dtype=ity)] * m
    done_bits = 0
    for p, width in enumerate(widths):
        nbins = 1 << width
        shift = 8 * nbytes - done_bits - width
        hist = torch.zeros(m, nbins, dtype=torch.int64)
        for j in range(m):
            if k_rem[j] <= 0:
                continue
            if p == 0:
                for piece in unit_pieces[j]:
                    if piece.scores.numel():
                        hist[j] += torch.bincount((piece.key_view(scratch) >> top_shift).add_(top_off), minlength=nbins)
            elif cand[j].numel():
                hist[j] = torch.bincount((cand[j] >> shift) & (nbins - 1), minlength=nbins)
        if _world(group) > 1:  # every rank holds the same units: all enter
            dist.all_reduce(hist, group=group)
        for j in range(m):
            if k_rem[j] <= 0:
                continue
            h = hist[j]
            # largest digit b such that count(digit > b) < k_rem <= count(digit >= b)
            above = torch.flip(torch.cumsum(torch.flip(h, (0,)), 0), (0,))  # above[b] = count(digit >= b)
            b = int(torch.nonzero(above >= k_rem[j]).max())
            acc = int(above[b] - h[b])
            k_rem[j] -= acc
            prefix[j] = (prefix[j] << width) | b
            tie_total[j] = int(h[b])
            if p == 0:
                kept = [
                    pc.key_view(scratch)[(pc.key_view(scratch) >> top_shift) == (b - top_off)]
                    for pc in unit_pieces[j] if pc.scores.numel()
                ]
                cand[j] = torch.cat(kept) if kept else torch.empty(0, dtype=ity)
            elif cand[j].numel():
                c = cand[j]
                cand[j] = c[((c >> shift) & (nbins - 1)) == b]
        done_bits += width
    # Threshold key per unit (signed), number of ties to take.
    thresholds = []
    for j in range(m):
        if unit_k[j] <= 0:
            thresholds.append(None)
            continue
        u = prefix[j]
        top = 1 << (8 * nbytes - 1)
        signed = u - top  # undo the sign-bit flip of the top byte
        thresholds.append(signed)
    # Units whose ties exceed the number needed: a global prefix count over positions.
    tied = [j for j in range(m) if thresholds[j] is not None and tie_total[j] > k_rem[j]]
    local_ties: Dict[int, List[Tuple[Tuple, int]]] = {}
    for j in range(m):
        for piece in unit_pieces[j]:
            if thresholds[j] is None:
                piece.mask.zero_()
                continue
            pk = piece.key_view()
            if j in tied:
                torch.gt(pk, thresholds[j], out=piece.mask)
            else:
                torch.ge(pk, thresholds[j], out=piece.mask)
            if j in tied:
                local_ties.setdefault(j, []).append((piece.order, int((pk == thresholds[j]).sum())))
    if tied:
        mine = [(j, order, cnt) for j in tied for order, cnt in local_ties.get(j, [])]
        if _world(group) > 1:
            gathered: List = [None] * _world(group)
            dist.all_gather_object(gathered, mine, group=group)
            everything = [x for part in gathered for x in part]
        else:
            everything = mine
        for j in tied:
            for piece in unit_pieces[j]:
                before = sum(cnt for jj, order, cnt in everything if jj == j and order < piece.order)
                take = min(max(k_rem[j] - before, 0), k_rem[j])
                pk = piece.key_view()
                piece.mask.logical_or_(_first_true(pk == thresholds[j], take))


# --------------------------------------------------------------------- scopes
@dataclass
class Entry:
    """One local buffer of a param group: its layout, and (when it has a gradient) its
    flat scores and the flat bool mask to fill."""

    layout: Layout
    scores: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]


def _distributed(entries: Sequence[Entry], group) -> bool:
    """Whether this param group resolves its scope with the other ranks.  Decided from the
    layouts' structure only, so that every rank decides alike."""
    return _world(group) > 1 and any(e.layout.group is not None or e.layout.collective for e in entries)


def select_masks(entries: Sequence[Entry], mask_ratio: float, scope: str, scratch: Optional[torch.Tensor] = None) -> None:
    """Fill ``entry.mask`` for every entry with scores, following ``scope``.

    Must be called on every rank of the layouts' group, with entries for every buffer of
    the param group (also those without gradient: ``scores=None``).  Scores of pieces
    resolved across ranks are overwritten (by their order keys): the optimizer needs
    only the masks afterwards."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    for e in entries:
        if e.mask is not None:
            e.mask.zero_()  # padding (no segment) is never selected
    if scope == "shard":
        for e in entries:
            if e.scores is None:
                continue
            for seg in e.layout.segments:
                sl = slice(seg.local_start, seg.local_start + seg.length)
                topk_mask_(e.scores[sl], num_selected(mask_ratio, seg.length), e.mask[sl], scratch)
        return
    group = collective_group([e.layout for e in entries])
    if scope == "tensor":
        _select_tensor_scope(entries, mask_ratio, group, scratch)
    elif scope == "global":
        _select_global_scope(entries, mask_ratio, group, scratch)
    else:
        _select_global_approx(entries, mask_ratio, group, scratch)


def _score_dtype(entries: Sequence[Entry]) -> torch.dtype:
    dts = {e.scores.dtype for e in entries if e.scores is not None}
    return torch.float64 if torch.float64 in dts else torch.float32


def _select_tensor_scope(entries, mask_ratio, group, scratch) -> None:
    collective: Dict[Hashable, int] = {}
    for e in entries:
        for tid, numel in e.layout.collective:
            prev = collective.setdefault(tid, numel)
            assert prev == numel, f"tensor {tid!r} listed with two sizes ({prev}, {numel})"
    units = sorted(collective)
    index = {t: j for j, t in enumerate(units)}
    unit_pieces: List[List[_Piece]] = [[] for _ in units]
    for e in entries:
        for seg in e.layout.segments:
            if e.scores is None or seg.length == 0:
                continue
            sl = slice(seg.local_start, seg.local_start + seg.length)
            if seg.tensor_id in index:
                unit_pieces[index[seg.tensor_id]].append(_Piece(e.scores[sl], e.mask[sl], (seg.global_start,)))
            else:
                assert seg.is_whole, f"segment {seg} is split but its tensor is not in Layout.collective"
                topk_mask_(e.scores[sl], num_selected(mask_ratio, seg.length), e.mask[sl], scratch)
    if units:
        ks = [num_selected(mask_ratio, collective[t]) for t in units]
        _radix_kth(unit_pieces, ks, group, _score_dtype(entries), scratch)


def _select_global_scope(entries, mask_ratio, group, scratch) -> None:
    pieces = []
    for e in entries:
        if e.scores is None:
            continue
        for seg in e.layout.segments:
            if seg.length:
                sl = slice(seg.local_start, seg.local_start + seg.length)
                pieces.append(_Piece(e.scores[sl], e.mask[sl], (seg.tensor_id, seg.global_start)))
    pieces.sort(key=lambda p: p.order)
    if _distributed(entries, group):
        # N of the whole group: each element counted once, on the rank that holds it.
        n_local = torch.tensor([sum(int(p.scores.numel()) for p in pieces)], dtype=torch.int64)
        dist.all_reduce(n_local, group=group)
        _radix_kth([pieces], [num_selected(mask_ratio, int(n_local))], group, _score_dtype(entries), scratch)
        return
    if not pieces:
        return
    flat = torch.cat([p.scores.reshape(-1) for p in pieces])
    mask = torch.empty(flat.numel(), dtype=torch.bool)
    topk_mask_(flat, num_selected(mask_ratio, flat.numel()), mask, scratch)
    off = 0
    for p in pieces:
        n = p.scores.numel()
        p.mask.copy_(mask[off:off + n])
        off += n


def _select_global_approx(entries, mask_ratio, group, scratch) -> None:
    """Opt-in approximation: each rank's local K-th value, averaged over ranks with one
    all_reduce; every element with a score >= that average is selected.  K is only
    approximately met; no tie-breaking."""
    flats = [e.scores.reshape(-1) for e in entries if e.scores is not None and e.scores.numel()]
    n = sum(f.numel() for f in flats)
    k = num_selected(mask_ratio, n)
    stat = torch.zeros(2, dtype=torch.float64)
    if n and k:
        flat = torch.cat(flats) if len(flats) > 1 else flats[0]
        t, _ = kth_and_unique(nan_free_copy(flat, scratch), k)
        if math.isfinite(t):
            stat[0], stat[1] = t, 1.0
    if _distributed(entries, group):
        dist.all_reduce(stat, group=group)
    t = stat[0].item() / stat[1].item() if stat[1] > 0 else math.inf
    for e in entries:
        if e.scores is not None:
            for seg in e.layout.segments:
                sl = slice(seg.local_start, seg.local_start + seg.length)
                torch.ge(e.scores[sl], t, out=e.mask[sl])
