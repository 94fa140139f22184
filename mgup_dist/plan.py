"""The plan of a param group: which ranges of which local buffers are scored, selected and
updated together.  Built on the host from layouts only (facts identical on every rank),
cached, and rebuilt when a layout or the group's scope changes.

Terms
-----
* **buffer**: a param's local tensor, flattened (a whole tensor, a DTensor shard, a ZeRO
  partition, an FSDP1 FlatParameter shard).
* **piece**: a contiguous range of one buffer that lies in one segment of one original
  tensor (or in padding, which is updated with ``gamma`` and never selected).
* **unit**: what one top-K ranges over (``scope``): an original tensor (``tensor``), a
  piece (``shard``), or the whole param group (``global``).
* **chunk**: pieces processed together.  Phase 1 writes their order keys into one scratch
  of ``chunk.numel`` elements, so the scratch, not the model, bounds a step's extra memory.
  A *split* chunk holds units resolved with other ranks: every rank builds the same split
  chunks, in the same order, from ``Layout.collective``, and enters the same collectives.

Memory bound: a local chunk holds at most ``max(largest piece, cap)`` elements; a split
chunk at most ``max(largest split tensor, world * cap)`` elements of the *global* tensors,
of which this rank holds its share.  ``cap`` is the optimizer's ``chunk_elems``; by default
``CHUNK_ELEMS`` (4M) on the CPU, where a chunk costs no launches and its scratch is kept
between steps, and ``DEVICE_CHUNK_ELEMS`` (256M: one chunk for a 130M model or a 7B model's
ZeRO/FSDP shard on 64 ranks) on accelerators, where every chunk repeats each phase's launches
and the scratch (4 bytes an element) is returned to the caching allocator after the step.
``scope="global"`` is one chunk (the whole group is one unit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

from .collectives import all_gather_object, world_size
from .layout import Layout

__all__ = ["CHUNK_ELEMS", "DEVICE_CHUNK_ELEMS", "chunk_cap", "Piece", "Chunk", "GroupPlan", "build_plan", "num_selected", "SCOPES"]

SCOPES = ("tensor", "shard", "global", "global_approx")
CHUNK_ELEMS = 1 << 22  # 4M elements: below this, chunking buys no memory and costs launches
DEVICE_CHUNK_ELEMS = 1 << 28  # 256M elements (1 GiB of fp32 keys): launches per step do not grow with the model


def chunk_cap(device_type: str, chunk_elems=None) -> int:
    """The chunk cap of a param group: ``chunk_elems`` when given, else by device type (a
    fact identical on every rank, so every rank builds the same split chunks)."""
    if chunk_elems is not None:
        return int(chunk_elems)
    return CHUNK_ELEMS if device_type == "cpu" else DEVICE_CHUNK_ELEMS


def num_selected(mask_ratio: float, n: int) -> int:
    """K = floor(mask_ratio * N), computed so that e.g. 0.57 * 100 gives 57, not 56 (a float
    product that falls short of an integer by rounding only counts as that integer)."""
    k = math.floor(mask_ratio * n + 1e-9 * max(n, 1))
    return max(0, min(n, k))


@dataclass(frozen=True)
class Piece:
    buf: int  # index of the buffer in the group's param order
    start: int  # offset in the flat local buffer
    length: int
    unit: int  # unit index within the chunk; -1: padding
    order: Tuple  # position within the unit, comparable across ranks (tie order)
    offset: int  # offset in the chunk's scratch
    slot: int  # index of this piece in the chunk's tie-count vector (all ranks' pieces)
    shape: Optional[Tuple[int, ...]] = None  # the original tensor's shape (Muon's whole-matrix step)
    tensor: int = -1  # index into Chunk.tensors when the original tensor is split across ranks
    gstart: int = 0  # global_start of the piece in its original tensor


@dataclass
class Chunk:
    pieces: Tuple[Piece, ...]
    numel: int
    k: Tuple[int, ...]  # K per unit
    n: Tuple[int, ...]  # N per unit (all ranks)
    split: bool  # resolved together with the other ranks of ``group``
    n_slots: int  # pieces of this chunk's units over all ranks
    group: object = None
    slot_unit: Tuple[int, ...] = ()  # unit of every slot
    tensors: Tuple[Tuple[Hashable, int], ...] = ()  # split tensors held in this chunk (all ranks): (id, numel)
    collective: bool = False  # every rank enters this chunk (selection or whole-matrix assembly)
    # per split tensor: its shape, and the ranks (indices in ``group``) that hold a piece of it
    # (None when this rank holds none): Muon batches a split tensor's Newton-Schulz with the
    # same-shape tensors of the same holders, a composition every holder shares
    tensor_shapes: Tuple[Optional[Tuple[int, ...]], ...] = ()
    tensor_holders: Tuple[Optional[Tuple[int, ...]], ...] = ()
    cache: Dict = field(default_factory=dict)  # device tables, owned by the backend

    @property
    def n_units(self) -> int:
        return len(self.k)

    def active(self, has_grad: Sequence[bool]) -> "Chunk":
        """The chunk restricted to buffers that have a gradient this step (same units, same
        slots: the collectives do not change shape)."""
        key = ("active", tuple(has_grad))  # finer than the pieces' own buffers: the same chunk, cached per pattern
        hit = self.cache.get(key)
        if hit is None:
            pieces, off = [], 0
            for p in self.pieces:
                if has_grad[p.buf]:
                    pieces.append(Piece(p.buf, p.start, p.length, p.unit, p.order, off, p.slot, p.shape, p.tensor, p.gstart))
                    off += p.length
            hit = Chunk(tuple(pieces), off, self.k, self.n, self.split, self.n_slots, self.group, self.slot_unit, self.tensors,
                        self.collective, tensor_shapes=self.tensor_shapes, tensor_holders=self.tensor_holders)
            self.cache[key] = hit
        return hit


@dataclass
class GroupPlan:
    chunks: List[Chunk]
    scope: str
    mask_ratio: float
    group: object  # process group of the split chunks (None: default)
    world: int


def collective_group(layouts: Sequence[Layout]):
    """The one process group over which a param group's split tensors are resolved."""
    groups = {id(lay.group): lay.group for lay in layouts if lay.collective or lay.group is not None}
    if len(groups) > 1:
        raise ValueError(
            "all parameters of one param group must share one process group in their layouts "
            f"(found {len(groups)} different groups); put differently-sharded params in separate param groups"
        )
    return next(iter(groups.values())) if groups else None


def _pack(items: List[Tuple[int, ...]], sizes: List[int], cap: int) -> List[List[int]]:
    """Greedy consecutive packing of items into bins of at most ``cap`` (an item larger than
    cap gets a bin of its own)."""
    bins, cur, used = [], [], 0
    for i, sz in zip(items, sizes):
        if cur and used + sz > cap:
            bins.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += sz
    if cur:
        bins.append(cur)
    return bins


def build_plan(layouts: Sequence[Layout], scope: str, mask_ratio: float, assemble: bool = False,
               cap: Optional[int] = None) -> GroupPlan:
    """Pieces, units and chunks of a param group from its buffers' layouts (one per param,
    in param order).  ``assemble``: the rule needs each split tensor whole (Muon), so split
    tensors go into chunks identical on every rank whatever the scope.  Collective (one
    all_gather_object, at plan time) when the group has split tensors: then every rank
    must call it at the same point.  ``cap``: the chunk cap (``chunk_cap``; default
    ``CHUNK_ELEMS``)."""
    cap_local = CHUNK_ELEMS if cap is None else cap
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    group = collective_group(layouts)
    world = world_size(group)
    distributed = world > 1 and any(lay.group is not None or lay.collective for lay in layouts)
    collective: Dict[Hashable, int] = {}
    for lay in layouts:
        for tid, numel in lay.collective:
            prev = collective.setdefault(tid, numel)
            assert prev == numel, f"tensor {tid!r} listed with two sizes ({prev}, {numel})"

    # every range of every buffer: (buf, start, length, segment or None)
    ranges = []
    for b, lay in enumerate(layouts):
        pos = 0
        for seg in sorted(lay.segments, key=lambda s: s.local_start):
            if seg.local_start > pos:
                ranges.append((b, pos, seg.local_start - pos, None))
            if seg.length:
                ranges.append((b, seg.local_start, seg.length, seg))
            pos = seg.local_start + seg.length
        if lay.numel > pos:
            ranges.append((b, pos, lay.numel - pos, None))
    pads = [(b, s, n) for b, s, n, seg in ranges if seg is None]
    segs = [(b, s, n, seg) for b, s, n, seg in ranges if seg is not None]

    if scope in ("global", "global_approx"):
        # one unit, the whole group; global_approx selects locally (its collective is the
        # averaged threshold), so only "global" is a split chunk
        tensors = tuple(sorted(collective.items()))
        tix = {t: i for i, (t, _) in enumerate(tensors)}
        units = [(0, (seg.tensor_id, seg.global_start), b, s, n, seg, tix.get(seg.tensor_id, -1)) for b, s, n, seg in segs]
        split = distributed and scope == "global"
        chunk = _make_chunk(units, pads, {0: None}, split, group, world, mask_ratio, tensors, distributed)
        return GroupPlan([chunk], scope, mask_ratio, group, world)

    split_ids = sorted(collective) if (scope == "tensor" or assemble) else []
    split_set = set(split_ids)
    local, split_pieces = [], {t: [] for t in split_ids}
    for b, s, n, seg in segs:
        if seg.tensor_id in split_set:
            split_pieces[seg.tensor_id].append((b, s, n, seg))
        else:
            assert scope != "tensor" or not seg.is_split, f"segment {seg} is split but its tensor is not in Layout.collective"
            local.append((b, s, n, seg))
    local += [(b, s, n, None) for b, s, n in pads]

    chunks: List[Chunk] = []
    # local chunks: whole tensors (tensor scope), pieces (shard scope), padding
    sizes = [n for _, _, n, _ in local]
    for bin_ in _pack(local, sizes, max([cap_local] + sizes)):
        units, bpads, unit_n = [], [], {}
        for b, s, n, seg in bin_:
            if seg is None:
                bpads.append((b, s, n))
                continue
            j = len(unit_n)
            unit_n[j] = n if scope == "shard" else seg.global_numel
            units.append((j, (seg.global_start,), b, s, n, seg, -1))
        chunks.append(_make_chunk(units, bpads, unit_n, False, group, 1, mask_ratio, (), False))

    # split chunks: the same on every rank (from Layout.collective); per tensor units
    # (scope "tensor", resolved with the other ranks) or per piece (scope "shard", local)
    if split_ids:
        cap_split = max(max(collective.values()), world * cap_local)
        for bin_ in _pack(split_ids, [collective[t] for t in split_ids], cap_split):
            tensors = tuple((t, collective[t]) for t in bin_)
            units, unit_n = [], {}
            for i, tid in enumerate(bin_):
                for b, s, n, seg in split_pieces[tid]:
                    if scope == "shard":
                        j = len(unit_n)
                        unit_n[j] = n
                    else:
                        j = i
                        unit_n[j] = collective[tid]
                    units.append((j, (seg.global_start,), b, s, n, seg, i))
                if scope != "shard":
                    unit_n.setdefault(i, collective[tid])
            split = scope != "shard"
            chunks.append(_make_chunk(units, [], unit_n, split, group, world, mask_ratio, tensors, True))
    return GroupPlan(chunks, scope, mask_ratio, group, world)


def _make_chunk(units, pads, unit_n, split, group, world, mask_ratio, tensors, collective) -> Chunk:
    """units: (unit, order, buf, start, length, segment, tensor index); pads: (buf, start,
    length).  Pieces are laid out in (unit, order) order, so that a unit's pieces are
    consecutive in the scratch and the tie prefix runs in index order.  Slots number the
    pieces of all ranks in (unit, order) order; for a split chunk they are agreed with one
    all_gather_object here, at plan time (not per step)."""
    units = sorted(units, key=lambda u: (u[0], u[1]))
    mine = [(u[0], u[1]) for u in units]
    held = sorted({(u[6], tuple(u[5].global_shape) if u[5].global_shape is not None else None) for u in units if u[6] >= 0})
    gathered = None
    if world > 1 and (split or tensors):
        gathered = all_gather_object((mine, [u[4] for u in units], held), group)
    if split and world > 1:
        everyone = sorted({(j, o) for part, _, _ in gathered for j, o in part})
        total = sum(sum(ls) for _, ls, _ in gathered)
    else:
        everyone = mine
        total = sum(u[4] for u in units)
    shapes, holders = [None] * len(tensors), [None] * len(tensors)
    for r, part in enumerate([g[2] for g in gathered] if gathered is not None else [held]):
        for i, shape in part:
            shapes[i] = shape
            holders[i] = (holders[i] or ()) + (r,)
    mine_t = {i for i, _ in held}
    holders = [h if i in mine_t else None for i, h in enumerate(holders)]
    if unit_n.get(0, 0) is None:  # global scope: N is the group's size over all ranks
        unit_n = {0: total}
    slot_of = {key: i for i, key in enumerate(everyone)}
    pieces, off = [], 0
    for j, order, b, s, n, seg, ti in units:
        pieces.append(Piece(b, s, n, j, order, off, slot_of[(j, order)], seg.global_shape, ti, seg.global_start))
        off += n
    for b, s, n in pads:
        pieces.append(Piece(b, s, n, -1, (), off, -1))
        off += n
    ns = tuple(unit_n[j] for j in range(len(unit_n)))
    ks = tuple(num_selected(mask_ratio, n) for n in ns)
    return Chunk(tuple(pieces), off, ks, ns, split, len(everyone), group, tuple(j for j, _ in everyone), tensors, collective,
                 tensor_shapes=tuple(shapes), tensor_holders=tuple(holders))
