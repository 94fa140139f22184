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
this rank by something faster (CPU: introselect), and that of split chunks (CPU: a bracket
from a sample, agreed with the same reduce).

Collectives per split chunk and step: ``len(radix_widths) + 1`` all-reduces of
``n_units x (4096 | 1024)`` and ``n_slots`` int64, whatever the tensors' sizes (the torch-ops
backend's own select: one per pass of its digit widths, chosen from the chunk's global sizes,
plus one for the ties; the CPU backend's bracket select: the sample, the counts with the
first digit histogram of the bracket, one per further pass over the bracket (none to two
for float32 scores), the ties only where some unit has more ties than it selects).
``choose_digit`` and ``tie_cutoff`` are the two decisions of the selection, as small
functions every backend's kernels are tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .collectives import all_reduce_sum
from .radix import choose_digit, float_of_key, key_of, keys_, radix_widths, tie_cutoff, unit_tables
from .layout import Layout
from .plan import SCOPES, build_plan, num_selected

Reduce = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "SCOPES",
    "num_selected",
    "select",
    "chunk_reduce",
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


def select(backend, chunk, keys: torch.Tensor, hist0: Optional[torch.Tensor], reduce: Reduce):
    """Phase 2 of a top-K chunk: the backend's own select when it has one, else the radix
    select below over its primitives.  ``reduce`` (``chunk_reduce``) is the only way either
    communicates: what it does, and so which collectives run, the plan alone decides."""
    t = backend.select(chunk, keys, hist0, reduce)
    return threshold(backend, chunk, keys, hist0, reduce) if t is None else t


def chunk_reduce(chunk) -> Reduce:
    """The sum over the ranks of a split chunk's group (in place), the identity otherwise:
    decided by the plan (identical on every rank), so every rank enters the same all-reduces."""
    if not chunk.split:
        return _identity
    group = chunk.group
    return lambda t: all_reduce_sum(t, group)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def threshold(backend, chunk, keys: torch.Tensor, hist0: Optional[torch.Tensor] = None,
              reduce: Optional[Reduce] = None) -> torch.Tensor:
    """The K-th key of every unit of ``chunk`` (int tensor [n_units]); the keys are left so
    that ``key >= t[unit]`` selects exactly K per unit (losing ties are lowered by one).
    Enters ``len(radix_widths) + 1`` collectives when ``chunk.split``, on every rank."""
    reduce = chunk_reduce(chunk) if reduce is None else reduce
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
        reduce(hist)
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
    reduce(slots)
    if chunk.pieces:
        take = tie_cutoff(slots, k_rem, tab["slot_unit"], tab["first_slot"])
        backend.resolve_ties(chunk, keys, t_key, take.index_select(0, tab["piece_slot"][: len(chunk.pieces)]))
    return t_key


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
