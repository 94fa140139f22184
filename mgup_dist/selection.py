"""Which coordinates get ``alpha``: the K largest alignment scores of each selection unit.

Definition (the reference semantics every path reproduces exactly): within a unit of
``N`` elements, rank scores in descending order, NaN lowest and ``-0.0 == +0.0``; ties go
to the lower flat index of the original tensor (``scope="global"``: the lower
``(tensor_id, flat index)``).  The first ``K = floor(mask_ratio * N)`` get ``alpha``.

How (phase 2 of the pipeline, per chunk; see ``mgup_dist.plan``)
------------------------------------------------------------------
Scores are order-preserving integer keys (``kernels.base.keys_``).  The K-th key of every
unit of a chunk is found at once by radix select: per pass a histogram of the next digit
of the keys that still match the unit's prefix (12 bits, then 10: three passes for 32-bit
keys, seven for 64-bit), then on the device, per unit, the digit where the count from the
top reaches the K still needed.  For a split chunk (units spread over ranks) each pass's
histograms of all its units travel in one ``all_reduce``.  Then the ties: the number of
keys equal to the K-th key per piece, in one vector over all ranks' pieces (one
``all_reduce``), an exclusive prefix in index order, and each piece keeps its first
``take`` ties.  Everything stays on the device: no host synchronisation, so a step can be
captured in a CUDA graph.  A backend may replace the radix select of chunks held whole on
this rank by something faster (CPU: introselect).

Collectives per split chunk and step: ``len(radix_widths) + 1`` all-reduces of
``n_units x (4096 | 1024)`` and ``n_slots`` int64, whatever the tensors' sizes (the torch-ops
backend's own select: one per pass of its digit widths, chosen from the chunk's global sizes,
plus one for the ties).  ``choose_digit`` and ``tie_cutoff`` are the two decisions of the
selection, as small functions every backend's kernels are tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .collectives import all_reduce_sum
from .kernels.base import float_of_key, key_of, keys_, radix_widths
from .layout import Layout
from .plan import SCOPES, build_plan, num_selected

__all__ = [
    "SCOPES",
    "num_selected",
    "threshold",
    "choose_digit",
    "tie_cutoff",
    "selected_counts",
    "approx_threshold",
    "float_keys",
    "topk_mask_",
    "select_masks",
    "Entry",
]


def unit_tables(chunk, device):
    """Device tables of a chunk, made once (no host-to-device copy in later steps): per piece
    its slot (n_slots for padding), unit and length; per slot its unit; per unit its first
    slot, K and N."""
    key = ("selection", device)
    t = chunk.cache.get(key)
    if t is None:
        first = [chunk.n_slots] * chunk.n_units
        for i, u in reversed(list(enumerate(chunk.slot_unit))):
            first[u] = i
        t = {
            "piece_slot": torch.tensor([p.slot if p.unit >= 0 else chunk.n_slots for p in chunk.pieces] or [0], device=device),
            "piece_unit": torch.tensor([p.unit if p.unit >= 0 else chunk.n_units for p in chunk.pieces] or [0], device=device),
            "slot_unit": torch.tensor(list(chunk.slot_unit) + [chunk.n_units], dtype=torch.int64, device=device),
            "first_slot": torch.tensor(first + [chunk.n_slots], dtype=torch.int64, device=device),
            "k": torch.tensor(chunk.k, dtype=torch.int64, device=device),
            "n": torch.tensor(chunk.n, dtype=torch.int64, device=device),
            "lengths": torch.tensor([p.length for p in chunk.pieces] or [0], dtype=torch.int64, device=device),
        }
        chunk.cache[key] = t
    return t


def threshold(backend, chunk, keys: torch.Tensor, hist0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The K-th key of every unit of ``chunk`` (int tensor [n_units]); the keys are left so
    that ``key >= t[unit]`` selects exactly K per unit (losing ties are lowered by one).
    Enters ``len(radix_widths) + 1`` collectives when ``chunk.split``, on every rank."""
    ity = keys.dtype
    dev = keys.device
    U = chunk.n_units
    if not chunk.split:
        fast = backend.select_local(chunk, keys)
        if fast is not None:
            return fast
    tab = unit_tables(chunk, dev)
    k_rem = tab["k"].clone()
    prefix = None
    widths = radix_widths(torch.iinfo(ity).bits)
    for p, w in enumerate(widths):
        hist = hist0 if (p == 0 and hist0 is not None) else backend.histogram(chunk, keys, prefix, p)
        if chunk.split:
            all_reduce_sum(hist, chunk.group)
        b, k_rem = choose_digit(hist, k_rem)
        prefix = b - (1 << (w - 1)) if p == 0 else (prefix << w) | b
    t_key = torch.where(tab["k"] > 0, prefix, torch.full_like(prefix, torch.iinfo(ity).max)).to(ity)
    if U == 0:
        return t_key
    # ties at t: the first k_rem in index order over all ranks' pieces are selected
    ties = backend.tie_counts(chunk, keys, t_key)
    slots = torch.zeros(chunk.n_slots + 1, dtype=torch.int64, device=dev)
    if chunk.pieces:
        slots.scatter_add_(0, tab["piece_slot"][: len(chunk.pieces)], ties)
    if chunk.split:
        all_reduce_sum(slots, chunk.group)
    if chunk.pieces:
        take = tie_cutoff(slots, k_rem, tab["slot_unit"], tab["first_slot"])
        backend.resolve_ties(chunk, keys, t_key, take.index_select(0, tab["piece_slot"][: len(chunk.pieces)]))
    return t_key


def choose_digit(hist: torch.Tensor, k: torch.Tensor):
    """The digit choice of one radix pass, for every unit at once.

    ``hist``: int64 ``[units, bins]``, per unit the counts of each digit among its keys that
    match the prefix chosen so far; ``k``: int64 ``[units]``, how many of those keys (the
    largest) are still to be selected, ``0 <= k <= hist.sum(1)``.  Returns ``(b, k_new)``:
    ``b`` the largest digit with ``count(digit >= b) >= k`` (the K-th largest key has digit
    ``b``; ``k == 0``: the top bin), and ``k_new = k - count(digit > b)``, the number still to
    select among the keys with digit ``b`` (after the last pass: how many keys equal to the
    threshold are selected, lowest index first).  Every backend's selection matches this."""
    above = hist.flip(1).cumsum(1).flip(1)  # count(digit >= b)
    b = ((above >= k[:, None]).sum(1) - 1).clamp_(min=0)
    k_new = k - (above.gather(1, b[:, None])[:, 0] - hist.gather(1, b[:, None])[:, 0])
    return b, k_new


def tie_cutoff(slot_ties: torch.Tensor, k_rem: torch.Tensor, slot_unit: torch.Tensor, first_slot: torch.Tensor) -> torch.Tensor:
    """The tie cut-off: how many of each slot's keys equal to its unit's threshold are selected.

    ``slot_ties``: int64 ``[n_slots + 1]``, per slot (a piece of a unit, over all ranks, in
    index order; the last entry: padding) its keys equal to the unit's K-th key;
    ``k_rem``: ``[units]`` or ``[units + 1]``, the ties each unit selects (``choose_digit``'s
    last ``k_new``); ``slot_unit``: ``[n_slots + 1]`` (padding: ``units``);
    ``first_slot``: ``[units + 1]``, each unit's first slot.  Returns int64
    ``[n_slots + 1]``: ``max(0, k_rem[unit] - ties in the unit's earlier slots)``; a slot keeps
    its first that many ties (lowest index first), so the lower index wins across pieces and
    ranks."""
    U = first_slot.numel() - 1
    excl = slot_ties.cumsum(0) - slot_ties  # ties in earlier slots of the chunk
    before = excl - excl.index_select(0, first_slot).index_select(0, slot_unit)
    k_ext = k_rem if k_rem.numel() == U + 1 else torch.cat([k_rem, k_rem.new_zeros(1)])
    return (k_ext.to(torch.int64).index_select(0, slot_unit) - before).clamp_(min=0)


def selected_counts(backend, chunk, keys: torch.Tensor, t_key: torch.Tensor, over_ranks: bool):
    """How many keys of each unit are >= its threshold, and the unit's size (int64
    [n_units] each: every backend reduces int64), summed over the ranks of the chunk's group when ``over_ranks``
    (units spread over ranks): the normalisation of the cautious rule and of global_approx."""
    dev = keys.device
    counts = torch.zeros(chunk.n_units + 1, dtype=torch.int64, device=dev)
    if chunk.pieces:
        tab = unit_tables(chunk, dev)
        k = keys[: chunk.numel]
        unit = torch.repeat_interleave(tab["piece_unit"][: len(chunk.pieces)], tab["lengths"][: len(chunk.pieces)], output_size=chunk.numel)
        t_ext = torch.cat([t_key, t_key.new_full((1,), torch.iinfo(k.dtype).max)])
        counts.scatter_add_(0, unit, (k >= t_ext.index_select(0, unit)).to(torch.int64))
    counts = counts[: chunk.n_units].contiguous()
    n = unit_tables(chunk, dev)["n"].clone()
    if over_ranks:
        all_reduce_sum(counts, chunk.group)
        if not chunk.split:  # global_approx: N of the plan is this rank's share
            all_reduce_sum(n, chunk.group)
    return counts, n


def approx_threshold(backend, chunk, keys: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """``global_approx`` (opt-in): this rank's K-th key (K over its own elements), turned
    into a score, averaged over the ranks that have a finite one (one all_reduce), and
    back into a key: every element with a score >= that mean is selected; K is only
    approximately met and ties are not broken."""
    t = threshold(backend, chunk, keys)
    fdt = torch.float64 if keys.dtype == torch.int64 else torch.float32
    val = float_of_key(t.clone())
    ok = torch.isfinite(val) & (unit_tables(chunk, keys.device)["k"] > 0)
    stat = torch.stack([torch.where(ok, val, torch.zeros_like(val)).sum(), ok.sum().to(fdt)]).to(fdt)
    if chunk.collective:
        all_reduce_sum(stat, chunk.group)
    mean = torch.where(stat[1] > 0, stat[0] / stat[1].clamp_min(1), torch.full_like(stat[0], math.inf))
    # the keys were lowered at losing ties by threshold(); re-derive them is not needed:
    # approximate selection compares with the mean only, and t - 1 < mean's key when t < it
    return key_of(mean.reshape(1), keys.dtype).expand(chunk.n_units).contiguous()


# ------------------------------------------------------------------ standalone API
def float_keys(s: torch.Tensor) -> torch.Tensor:
    """Order keys of float scores as a new tensor (see ``kernels.base.keys_``)."""
    return key_of(s, torch.int64 if s.dtype == torch.float64 else torch.int32)


@dataclass
class Entry:
    """One local buffer of a param group: its layout, and (when it has a gradient) its flat
    scores and the flat bool mask to fill."""

    layout: Layout
    scores: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]


def select_masks(entries: Sequence[Entry], mask_ratio: float, scope: str, backend=None) -> None:
    """The selection on its own: fill ``entry.mask`` for every entry with scores, following
    ``scope`` (the optimizers do not go through here; tests and tools do).  Must be called
    on every rank of the layouts' group, with entries for every buffer of the param group
    (also those without gradient: ``scores=None``)."""
    from .kernels import get_backend

    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    plan = build_plan([e.layout for e in entries], scope, mask_ratio)
    live = [e.scores is not None for e in entries]
    wide = any(e.scores is not None and e.scores.dtype == torch.float64 for e in entries)
    fdt = torch.float64 if wide else torch.float32
    dev = next((e.scores.device for e in entries if e.scores is not None), torch.device("cpu"))
    backend = backend or get_backend(dev)
    for e in entries:
        if e.mask is not None:
            e.mask.zero_()
    for chunk in plan.chunks:
        c = chunk.active(live)
        scratch = torch.empty(c.numel, dtype=fdt, device=dev)
        for pc in c.pieces:
            scratch[pc.offset: pc.offset + pc.length].copy_(entries[pc.buf].scores.reshape(-1)[pc.start: pc.start + pc.length])
        keys = keys_(scratch)
        if scope == "global_approx":
            t = approx_threshold(backend, c, keys, mask_ratio)
        else:
            t = threshold(backend, c, keys)
        t_ext = torch.cat([t, t.new_full((1,), torch.iinfo(keys.dtype).max)])
        for pc in c.pieces:
            m = entries[pc.buf].mask.reshape(-1)[pc.start: pc.start + pc.length]
            torch.ge(keys[pc.offset: pc.offset + pc.length], t_ext[pc.unit], out=m)


def topk_mask_(s: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """Write into the flat bool ``out`` exactly ``k`` True entries: the k largest of the
    flat scores ``s`` (NaN lowest, ties to the lower index)."""
    from .layout import Segment

    n = s.numel()
    lay = Layout((Segment(0, 0, n, 0, n),) if n else (), n)
    ratio = k / n if n else 0.0
    e = Entry(lay, s.reshape(-1), out.reshape(-1))
    select_masks([e], ratio, "tensor")
    assert n == 0 or int(out.sum()) == k, (int(out.sum()), k)  # k/n * n floors back to k
    return out
