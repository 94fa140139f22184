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

__all__ = ["Segment", "Layout", "whole_layout"]


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
