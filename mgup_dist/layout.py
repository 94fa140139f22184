"""How a local buffer maps to original parameter tensors.

Every framework (plain / DDP, FSDP2, FSDP1, DeepSpeed ZeRO, Megatron's distributed
optimizer) hands the optimizer *local* buffers whose elements belong to original
tensors.  A :class:`Layout` describes that once:

    local_buffer[seg.local_start : seg.local_start + seg.length]
        == original_tensor[seg.tensor_id].flatten()[seg.global_start : seg.global_start + seg.length]

Elements of the local buffer covered by no segment are padding: they are never
scored, never selected and receive no update from MGUP's scale (their phi is gamma
and their gradient is zero in every framework we support).

The math (``functional``) and the selection (``selection``) see only local tensors
plus a layout; integrations only build layouts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Optional, Tuple

import torch

__all__ = ["Segment", "Layout", "whole_layout", "dtensor_layout", "flat_param_layout", "default_layout", "chunk_rows",
           "is_dtensor", "local_of", "real_of"]


@dataclass(frozen=True)
class Segment:
    """One contiguous piece of one original tensor inside a local buffer.

    ``tensor_id`` must name the same original tensor on every rank of the layout's
    group (an int in the model's parameter order is the usual choice); tie-breaking
    and the ``global`` scope order tensors by it, so ids must be mutually comparable.
    ``global_shape`` is needed only by rules that look at the whole matrix (Muon).
    """

    tensor_id: Hashable
    local_start: int
    length: int
    global_start: int
    global_numel: int
    global_shape: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        assert self.local_start >= 0 and self.length >= 0, self
        assert 0 <= self.global_start and self.global_start + self.length <= self.global_numel, self
        if self.global_shape is not None:
            assert math.prod(self.global_shape) == self.global_numel, self

    @property
    def is_whole(self) -> bool:
        """True when this rank holds the entire original tensor in this segment."""
        return self.length == self.global_numel

    @property
    def is_split(self) -> bool:
        """True when other ranks hold the rest of this tensor (needs communication)."""
        return 0 < self.length < self.global_numel


@dataclass(frozen=True)
class Layout:
    """Segments of one local buffer, plus the group of ranks sharing those tensors.

    ``group`` is the process group over which split tensors are resolved (the shard
    group: for HSDP only the shard axis, never the replicate axis).  ``None`` means
    the default group when something is split, and no communication when nothing is.
    ``numel`` is the local buffer's element count (segments may leave padding).

    ``collective`` lists ``(tensor_id, global_numel)`` of every tensor that this
    buffer resolves together with the other ranks of ``group`` under ``scope="tensor"``:
    the tensors split across ranks.  It must be *identical, in the same order, on every
    rank* for the corresponding buffer (the integration knows the global partitioning,
    so it can say this without communication), and it includes tensors of which this
    rank holds nothing: every rank enters every collective.  A segment that is split
    (``0 < length < global_numel``) must name a tensor listed here.
    """

    segments: Tuple[Segment, ...]
    numel: int
    group: Optional[object] = field(default=None, compare=False)
    collective: Tuple[Tuple[Hashable, int], ...] = ()

    def __post_init__(self):
        end = 0
        for seg in sorted(self.segments, key=lambda s: s.local_start):
            assert seg.local_start >= end, f"overlapping segments in layout: {self.segments}"
            end = seg.local_start + seg.length
        assert end <= self.numel, f"segments run past the local buffer ({end} > {self.numel})"
        listed = {tid for tid, _ in self.collective}
        for seg in self.segments:
            assert not seg.is_split or seg.tensor_id in listed, (
                f"segment of tensor {seg.tensor_id!r} is split across ranks but not listed in Layout.collective"
            )

    @property
    def has_split(self) -> bool:
        return any(s.is_split for s in self.segments)

    @property
    def covers_whole_buffer(self) -> bool:
        """One segment that is the whole tensor and the whole buffer: the plain case."""
        return len(self.segments) == 1 and self.segments[0].is_whole and self.segments[0].length == self.numel


def whole_layout(tensor: torch.Tensor, tensor_id: Hashable) -> Layout:
    """Layout of an unsharded parameter (single device, DDP): one whole segment."""
    n = tensor.numel()
    return Layout(
        segments=(Segment(tensor_id, 0, n, 0, n, tuple(tensor.shape)),) if n else (),
        numel=n,
    )


# ------------------------------------------------------------------------ DTensor
# A DTensor's placement is torch's own type, not a framework's: its layout lives here so that
# the optimizers need no integration to read an FSDP2 / HSDP parameter.

def chunk_rows(dim0: int, world: int, coord: int) -> Tuple[int, int]:
    """Rows ``[start, end)`` that ``torch.chunk(dim0 rows, world)`` gives to ``coord``.

    ``torch.chunk`` makes pieces of ``ceil(dim0 / world)`` rows; the last non-empty
    piece is shorter and ranks past it get nothing (so e.g. 3 rows over 4 ranks is
    1, 1, 1, 0 and 9 rows over 4 ranks is 3, 3, 3, 0).
    """
    if world < 1 or not 0 <= coord < world:
        raise ValueError(f"chunk_rows: need world >= 1 and 0 <= coord < world, got world={world}, coord={coord}")
    if dim0 <= 0:
        return 0, 0
    c = -(-dim0 // world)
    start = min(coord * c, dim0)
    return start, min(start + c, dim0)


def _holders(dim0: int, world: int) -> int:
    """How many ranks hold a non-empty piece of a ``dim0``-row tensor (global info)."""
    if dim0 <= 0:
        return 0
    c = -(-dim0 // world)
    return -(-dim0 // c)


def _is_strided_shard(placement) -> bool:
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(placement, _StridedShard)


def dtensor_layout(param, tensor_id: Hashable) -> Layout:
    """Layout of one FSDP2 DTensor parameter's local shard (``param.to_local()``).

    Supported placements: ``Shard(0)`` on at most one mesh dimension, ``Replicate()``
    on the others (FSDP2 and HSDP).  A fully replicated DTensor is whole on every rank.
    The local shard is a contiguous range of the flattened tensor; ``collective`` lists
    the tensor when more than one rank of the shard dimension holds a non-empty piece,
    a fact that depends only on the global shape and the mesh, so every rank agrees.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(param, DTensor):
        raise ValueError(f"dtensor_layout: param must be a DTensor, got {type(param).__name__}")
    mesh = param.device_mesh
    placements = tuple(param.placements)
    shape = tuple(param.shape)
    numel = math.prod(shape)
    local = param.to_local()

    shard_dims = []
    for d, pl in enumerate(placements):
        if isinstance(pl, Replicate):
            continue
        if isinstance(pl, Shard) and not _is_strided_shard(pl):
            dim = pl.dim if pl.dim >= 0 else pl.dim + len(shape)
            if dim != 0:
                raise ValueError(
                    f"dtensor_layout: placement {pl} on mesh dim {d} is not supported; allowed: Shard(0) "
                    "(FSDP2's default; a Shard(dim>0) local piece is not a contiguous range of the flat tensor) "
                    "and Replicate(); declare the layout of such a parameter with optimizer.set_layout(param, "
                    "Layout(...)) or step its local tensor"
                )
            shard_dims.append(d)
            continue
        raise ValueError(
            f"dtensor_layout: placement {pl} on mesh dim {d} is not supported; allowed: Shard(0) and Replicate() "
            "(tensor-parallel DTensors are not handled by the FSDP layout); declare the layout of such a parameter "
            "with optimizer.set_layout(param, Layout(...)) or step its local tensor"
        )
    if len(shard_dims) > 1:
        raise ValueError(
            f"dtensor_layout: placements {placements} shard dim 0 on several mesh dims; allowed: Shard(0) on one "
            "mesh dim (FSDP2 / HSDP)"
        )

    if not shard_dims:  # replicated: every rank holds the whole tensor, nothing to resolve
        assert local.numel() == numel, (tuple(local.shape), shape)
        return whole_layout(local.reshape(shape) if numel else local, tensor_id)

    d = shard_dims[0]
    world = mesh.size(d)
    coord = mesh.get_local_rank(d)
    dim0 = shape[0]
    row = numel // dim0 if dim0 else 0
    r0, r1 = chunk_rows(dim0, world, coord)
    length = (r1 - r0) * row
    # The arithmetic above must be what the DTensor really holds; a mismatch means a
    # placement rule we do not model (e.g. a padded local tensor), and silently wrong
    # offsets would select the wrong elements.
    assert local.numel() == length, (
        f"dtensor_layout: local shard of tensor {tensor_id!r} (global shape {shape}, {placements}) has "
        f"{local.numel()} elements; torch.chunk rows {r0}:{r1} give {length}"
    )
    assert local.is_contiguous(), "dtensor_layout: FSDP2's Shard(0) local tensor is expected contiguous"
    split = _holders(dim0, world) > 1
    segs = (Segment(tensor_id, 0, length, r0 * row, numel, shape),) if length else ()
    return Layout(
        segments=segs,
        numel=length,
        group=mesh.get_group(d) if world > 1 else None,
        collective=((tensor_id, numel),) if split else (),
    )


_DTENSOR: list = []  # DTensor's class, imported once (a step asks for every param)


def is_dtensor(t) -> bool:
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - torch without DTensor
            DTensor = ()
        _DTENSOR.append(DTensor)
    return isinstance(t, _DTENSOR[0])


def local_of(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """What this rank holds of ``t``: a DTensor's local shard, any other tensor itself."""
    if t is not None and is_dtensor(t):
        return t.to_local()
    return t


def real_of(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A complex tensor as its real view (torch.view_as_real: [..., 2], each real and
    imaginary part one coordinate, as torch's AdamW steps complex params); others as given."""
    if t is not None and t.is_complex():
        return torch.view_as_real(t)
    return t


# ------------------------------------------------------------------- the default layout
# An optimizer steps a parameter nobody declared a layout for with the layout below.  A
# buffer whose layout cannot be read from the tensor itself (a ZeRO flat partition, an FSDP1
# original parameter's local piece) is refused by name: a whole layout over it would run
# top-K over the buffer instead of over each original tensor -- another algorithm.  Every
# check reads facts identical on every rank (types, FSDP's global shard metadata, DeepSpeed's
# attributes, whether the optimizer was built with the tensor), never local data.

#: how a tensor of FSDP1's FlatParameter is named when the optimizer learns the layout itself:
#: ints above every default id (the running parameter index), ordered as ``(j, i)``
FLAT_ID_BASE = 1 << 32


def _is_flat_param(t) -> bool:
    # FSDP1 marks its FlatParameter (torch's own isinstance check reads the same flag); read
    # the flag instead of importing FSDP
    return bool(getattr(t, "_is_flat_param", False))


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_ATTACH = "call mgup_dist.integrations.fsdp.attach_fsdp1_layouts(optimizer, fsdp_model) on every rank after building the optimizer"


def flat_param_layout(flat_param, tensor_id: int, whole_matrices: bool = False) -> Layout:
    """Layout of an FSDP1 ``FlatParameter``'s local shard, read from the FlatParameter alone.

    FSDP1 concatenates the flattened original tensors (with padding) and gives rank ``r``
    the unsharded flat elements ``[r*S, (r+1)*S)``, ``S`` the shard size; the FlatParameter
    records this rank's piece of each tensor (``_shard_param_infos``) and every tensor's
    global size, so the segments need no handle.  Tensor ``i`` gets id
    ``(tensor_id + 1) * FLAT_ID_BASE + i``.  A tensor is split when its range crosses a
    multiple of ``S`` (global facts: every rank lists the same).  The one thing the
    FlatParameter does not carry is its process group: when a tensor is split this needs
    the shard group to be the whole default group (``W = padded size / S`` equals the world
    size, FULL_SHARD / SHARD_GRAD_OP over all ranks); otherwise (HYBRID_SHARD, a sub-group)
    it refuses and names :func:`~mgup_dist.integrations.fsdp.attach_fsdp1_layouts`, which
    reads the group from FSDP's handle.
    """
    if whole_matrices:
        raise ValueError(
            "MGUPMuon steps an FSDP1 FlatParameter, which mixes matrices and vectors in one 1-D buffer (every "
            "matrix would silently run AdamW); build it with MGUPMuon(fsdp1_muon_param_groups(model), ...) on a "
            f"use_orig_params=True model and {_ATTACH}"
        )
    numels = [int(n) for n in flat_param._numels]
    shapes = [tuple(s) for s in flat_param._shapes]
    infos = flat_param._shard_param_infos
    S = int(flat_param._sharded_size.numel())
    if flat_param.numel() != S or len(infos) != len(numels):
        raise ValueError(
            f"an FSDP1 FlatParameter of {flat_param.numel()} elements is not in its sharded state ({S}); step the "
            f"optimizer outside forward / summon_full_params, or {_ATTACH}"
        )
    starts, off = [], 0
    for n, pad in zip(flat_param._numels_with_padding, flat_param._is_padding_mask):
        if not pad:
            starts.append(off)
        off += int(n)
    segs, collective = [], []
    for i, (info, start, n, shp) in enumerate(zip(infos, starts, numels, shapes)):
        tid = (tensor_id + 1) * FLAT_ID_BASE + i
        if n and start // S != (start + n - 1) // S:
            collective.append((tid, n))
        if info.in_shard and info.numel_in_shard:
            segs.append(Segment(tid, int(info.offset_in_shard), int(info.numel_in_shard),
                                int(info.intra_param_start_idx), n, shp))
    if collective:
        # FSDP sets the padded unsharded size at its lazy init (the first forward)
        padded = getattr(flat_param, "_padded_unsharded_size", None)
        if padded is None:
            raise ValueError(
                f"an FSDP1 FlatParameter is stepped before the model's first forward, so its shard group size is "
                f"not known yet; {_ATTACH}"
            )
        if padded.numel() // S != _world():
            raise ValueError(
                f"an FSDP1 FlatParameter is sharded over {padded.numel() // S} of {_world()} ranks (HYBRID_SHARD or "
                f"a process sub-group), which the FlatParameter does not name; {_ATTACH}"
            )
    return Layout(segments=tuple(segs), numel=S, group=None, collective=tuple(collective))


def default_layout(param, tensor_id: int, *, replaced: bool = False, whole_matrices: bool = False) -> Layout:
    """The layout of a parameter no layout was declared for (``optimizer.layout_of``).

    * a DTensor: :func:`dtensor_layout` (FSDP2 / HSDP; other placements are refused);
    * an FSDP1 ``FlatParameter``: :func:`flat_param_layout`, learnt from the FlatParameter;
    * an FSDP1 original parameter (``use_orig_params=True``) with more than one rank: its
      local piece does not say which range of the tensor it is: refused, naming
      ``attach_fsdp1_layouts``;
    * a DeepSpeed ZeRO partition (``ds_id``), or any tensor the optimizer was not built with
      (``replaced``: a wrapper such as DeepSpeed's ZeRO / BF16 optimizer swapped its param
      groups' tensors for flat buffers): refused, naming the DeepSpeed registration;
    * anything else is a whole tensor (a complex one as its real view, 2 coordinates an element).
    ``whole_matrices``: the optimizer's rule looks at whole matrices (MGUPMuon).
    """
    if is_dtensor(param):
        return dtensor_layout(param, tensor_id)
    if _is_flat_param(param):
        return flat_param_layout(param, tensor_id, whole_matrices)
    if getattr(param, "_fsdp_flattened", False) and _world() > 1:
        raise ValueError(
            f"parameter {tensor_id} is an FSDP1 parameter (use_orig_params=True) whose local piece does not say "
            f"which range of the tensor it holds; {_ATTACH}"
        )
    if replaced or hasattr(param, "ds_id"):
        raise ValueError(
            f"the optimizer steps a buffer it was not built with (param-group tensor {tensor_id}, "
            f"{param.numel()} elements): a wrapper such as DeepSpeed's ZeRO optimizer replaced the parameters, and "
            "per-tensor top-K needs to know which slice belongs to which tensor; with DeepSpeed, "
            "`import mgup_dist.deepspeed` before deepspeed.initialize (or launch with `python -m mgup_dist.run`), "
            "otherwise declare each buffer's layout with optimizer.set_layout(tensor, Layout(...))"
        )
    return whole_layout(torch.view_as_real(param) if param.is_complex() else param, tensor_id)
