"""Layouts for PyTorch FSDP: FSDP2 (``fully_shard``, DTensor) and FSDP1 (``FlatParameter``).

Both FSDPs keep, on each rank, a contiguous range of each original tensor's
*flattened* elements, so a rank's piece is one :class:`~mgup_dist.layout.Segment`
per tensor.  Everything here is computed from the global partitioning rule, which
every rank knows without communication, so ``Layout.collective`` (the tensors split
across ranks) is identical on every rank -- including ranks that hold an empty piece.

FSDP2 (``fully_shard``)
    Each parameter is a DTensor placed ``Shard(0)`` on the shard mesh dimension
    (HSDP: a 2-D mesh ``(replicate, shard)``; the selection group is the shard
    dimension's group only -- the replicas hold identical copies and must not be
    counted twice).  Rows are split by ``torch.chunk``: ``c = ceil(dim0 / W)`` rows per
    rank, so rank ``r`` holds rows ``[r*c, min((r+1)*c, dim0))`` (possibly none), i.e.
    flat elements ``[r*c*row, ...)`` with ``row = numel / dim0``.  The optimizer calls
    :func:`dtensor_layout` itself for every DTensor parameter without an explicit
    layout; nothing to attach.

FSDP1 (``FullyShardedDataParallel``)
    Each ``FlatParameter`` concatenates the flattened original tensors (with alignment
    padding between them when ``use_orig_params=True``), is padded to a multiple of
    ``W`` and chunked evenly: rank ``r`` holds unsharded flat elements
    ``[r*S, (r+1)*S)`` with ``S`` the padded shard size.  Call
    :func:`attach_fsdp1_layouts` once after building the optimizer (on every rank).  Without
    it, an optimizer holding FlatParameters (``use_orig_params=False``) reads each one's
    layout itself (:func:`mgup_dist.layout.flat_param_layout`, when sharded over all ranks),
    and one holding original parameters refuses at its first step, naming this call.

DDP / single process
    Every tensor is whole on every rank; the optimizer's default whole layout is
    right and no layout needs attaching.
"""
from __future__ import annotations

from itertools import accumulate
from typing import Dict, Hashable, List, Sequence, Tuple

import torch

from mgup_dist.layout import Layout, Segment, _holders, chunk_rows, dtensor_layout, whole_layout  # noqa: F401  (re-exported)

__all__ = [
    "chunk_rows",
    "dtensor_layout",
    "flat_param_layouts",
    "fsdp1_layouts",
    "attach_fsdp1_layouts",
    "fsdp1_muon_param_groups",
]


# --------------------------------------------------------------------------- FSDP2


# --------------------------------------------------------------------------- FSDP1


def _flat_param_global_info(flat_param) -> Tuple[List[int], List[int], List[Tuple[int, ...]]]:
    """Unsharded-flat start offset, numel and shape of each original (non-padding) tensor."""
    starts_all = [0] + list(accumulate(flat_param._numels_with_padding))[:-1]
    starts = [s for s, pad in zip(starts_all, flat_param._is_padding_mask) if not pad]
    numels = list(flat_param._numels)
    shapes = [tuple(s) for s in flat_param._shapes]
    assert len(starts) == len(numels) == len(shapes) == flat_param._num_params
    return starts, numels, shapes


def flat_param_layouts(
    handle, ids: Sequence[Hashable]
) -> Tuple[Layout, List[Layout]]:
    """Layouts of one FSDP1 ``FlatParamHandle``'s local shard.

    Returns ``(flat_layout, per_param_layouts)``: the layout of the sharded
    ``FlatParameter`` itself (what the optimizer holds when ``use_orig_params=False``)
    and one layout per original parameter, over that parameter's local 1-D view (what
    it holds when ``use_orig_params=True``).  ``ids[i]`` is the tensor id of the i-th
    original parameter (``flat_param._fqns[i]``).

    The global partitioning: rank ``r`` owns unsharded flat elements ``[r*S, (r+1)*S)``,
    ``S = numel of the padded shard``; tensor ``i`` occupying ``[start_i, start_i+n_i)``
    is split iff that range meets more than one rank's interval.  Segments are derived
    from this rule and checked against FSDP's own ``_shard_param_infos``.
    """
    flat_param = handle.flat_param
    starts, numels, shapes = _flat_param_global_info(flat_param)
    assert len(ids) == len(numels), (len(ids), len(numels))
    group = handle.process_group

    if not handle.uses_sharded_strategy:
        # NO_SHARD (e.g. world size 1): the flat parameter is whole; with
        # use_orig_params the original params are unflattened full views.
        segs = tuple(
            Segment(tid, s, n, 0, n, shp) for tid, s, n, shp in zip(ids, starts, numels, shapes) if n
        )
        flat = Layout(segments=segs, numel=flat_param.numel(), group=None, collective=())
        per = [
            Layout(segments=(Segment(tid, 0, n, 0, n, shp),) if n else (), numel=n, group=None)
            for tid, n, shp in zip(ids, numels, shapes)
        ]
        return flat, per

    rank = handle.rank
    S = flat_param._sharded_size.numel()
    assert flat_param.numel() == S, (flat_param.numel(), S)
    lo, hi = rank * S, (rank + 1) * S

    segs, per, collective = [], [], []
    for i, (tid, start, n, shp) in enumerate(zip(ids, starts, numels, shapes)):
        split = n > 0 and start // S != (start + n - 1) // S
        if split:
            collective.append((tid, n))
        a, b = max(start, lo), min(start + n, hi)
        info = flat_param._shard_param_infos[i]
        if b > a:
            seg = Segment(tid, a - lo, b - a, a - start, n, shp)
            assert info.in_shard and (info.offset_in_shard, info.numel_in_shard, info.intra_param_start_idx) == (
                seg.local_start, seg.length, seg.global_start
            ), (f"FSDP1 layout of {flat_param._fqns[i]} disagrees with FSDP's _shard_param_infos", info, seg)
            segs.append(seg)
            view_seg = (Segment(tid, 0, b - a, a - start, n, shp),)
            view_numel = b - a
        else:
            assert not info.in_shard or not info.numel_in_shard, (flat_param._fqns[i], info)
            view_seg, view_numel = (), 0
        per.append(
            Layout(
                segments=view_seg,
                numel=view_numel,
                group=group,
                collective=((tid, n),) if split else (),
            )
        )
    flat = Layout(segments=tuple(segs), numel=S, group=group, collective=tuple(collective))
    return flat, per


def fsdp1_layouts(optimizer: torch.optim.Optimizer, fsdp_model: torch.nn.Module) -> Dict[torch.Tensor, Layout]:
    """Map every parameter in ``optimizer``'s groups to its layout under FSDP1.

    Tensor ids (identical on every rank because every rank builds the same optimizer):

    * ``use_orig_params=False``: the optimizer holds ``FlatParameter`` s; tensor ``i``
      of the flat parameter at running optimizer index ``j`` gets id ``(j, i)``.
    * ``use_orig_params=True``: the optimizer holds the original parameters; each gets
      its running optimizer index ``j`` (the optimizer's own default id scheme).

    Parameters the optimizer holds that FSDP does not manage (ignored modules) get
    whole layouts with an id of the same type.
    """
    from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

    handles = _get_fsdp_handles(fsdp_model)
    if not handles:
        raise ValueError("fsdp_model: no FullyShardedDataParallel handle found; wrap the model with FSDP first")
    order: Dict[int, int] = {}
    params: List[torch.Tensor] = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            order[id(p)] = len(params)
            params.append(p)

    flat_of = {id(h.flat_param): h for h in handles}
    orig_of = {}
    for h in handles:
        for i, p in enumerate(h.flat_param._params or ()):
            orig_of[id(p)] = (h, i)
    uses_flat = any(id(p) in flat_of for p in params)
    uses_orig = any(id(p) in orig_of for p in params)
    if uses_flat and uses_orig:
        raise ValueError("optimizer: holds both FlatParameters and original parameters of one FSDP model")

    out: Dict[torch.Tensor, Layout] = {}
    done = set()
    for p in params:
        j = order[id(p)]
        if id(p) in flat_of:
            h = flat_of[id(p)]
            flat, _ = flat_param_layouts(h, [(j, i) for i in range(h.flat_param._num_params)])
            out[p] = flat
        elif id(p) in orig_of:
            h, _ = orig_of[id(p)]
            if id(h) in done:
                continue
            done.add(id(h))
            # ids of this handle's tensors: their optimizer indices; a tensor the
            # optimizer does not hold still needs a stable, comparable id (it may be
            # split and must appear in collective), so give it one past the end.
            ids = []
            for i, q in enumerate(h.flat_param._params):
                ids.append(order.get(id(q), len(params) + 10**6 * (1 + handles.index(h)) + i))
            _, per = flat_param_layouts(h, ids)
            for q, lay in zip(h.flat_param._params, per):
                if id(q) in order:
                    out[q] = lay
        else:
            out[p] = whole_layout(p, (j, 0) if uses_flat else j)
    # Every optimizer param must have a layout (tensor objects hash by identity).
    assert len(out) == len(params), (len(out), len(params))
    return out


def attach_fsdp1_layouts(optimizer: torch.optim.Optimizer, fsdp_model: torch.nn.Module) -> int:
    """Give every parameter of ``optimizer`` its FSDP1 layout (``optimizer.set_layout``).

    Call on every rank, after the optimizer is built and while the model is in its
    sharded state (after construction or after ``backward``; not inside a forward or
    ``summon_full_params``).  Returns the number of parameters given a layout.
    """
    if not hasattr(optimizer, "set_layout"):
        raise ValueError(f"optimizer: {type(optimizer).__name__} has no set_layout(); pass an mgup_dist optimizer")
    _check_muon_groups(optimizer, fsdp_model)
    layouts = fsdp1_layouts(optimizer, fsdp_model)
    for p, lay in layouts.items():
        optimizer.set_layout(p, lay)
    return len(layouts)


def _original_shapes(fsdp_model: torch.nn.Module) -> Dict[int, Tuple[int, ...]]:
    """id(original parameter) -> its unsharded shape, for use_orig_params=True models."""
    from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

    out = {}
    for h in _get_fsdp_handles(fsdp_model):
        fp = h.flat_param
        for p, shape in zip(fp._params or (), fp._shapes):
            out[id(p)] = tuple(shape)
    return out


def fsdp1_muon_param_groups(fsdp_model: torch.nn.Module, adamw_params=()) -> List[dict]:
    """Param groups for :class:`mgup_dist.MGUPMuon` on an FSDP1 ``use_orig_params=True`` model.

    Under FSDP1 every original parameter is a flat 1-D view of its local piece, so
    MGUPMuon cannot tell matrices from vectors by ``p.ndim``; this decides by the
    *original* shape: 2-D parameters not in ``adamw_params`` get ``use_muon=True``
    (orthogonalised as whole matrices, gathered across ranks), the rest AdamW.
    ``use_orig_params=False`` cannot work: one FlatParameter mixes matrices and vectors.
    """
    from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

    if any(h.flat_param._params is None for h in _get_fsdp_handles(fsdp_model)):
        raise ValueError(
            "fsdp_model: MGUPMuon under FSDP1 needs use_orig_params=True (a FlatParameter mixes matrices and "
            "vectors, and Muon orthogonalises each matrix separately)"
        )
    shapes = _original_shapes(fsdp_model)
    skip = {id(p) for p in adamw_params}
    muon, other = [], []
    for p in fsdp_model.parameters():
        shape = shapes.get(id(p), tuple(p.shape))
        (muon if len(shape) == 2 and id(p) not in skip else other).append(p)
    return [g for g in ({"params": muon, "use_muon": True}, {"params": other, "use_muon": False}) if g["params"]]


def _check_muon_groups(optimizer, fsdp_model) -> None:
    """Refuse the silent fallback: MGUPMuon decides ``use_muon`` by ``p.ndim``, and under
    FSDP1 every local parameter is 1-D, so by default no matrix would get Muon at all."""
    if not any("use_muon" in g for g in optimizer.param_groups):
        return
    if any(g.get("use_muon") for g in optimizer.param_groups):
        return
    from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

    if any(len(s) == 2 for h in _get_fsdp_handles(fsdp_model) for s in h.flat_param._shapes):
        raise ValueError(
            "optimizer: MGUPMuon on an FSDP1 model has no use_muon=True param group, so every matrix would "
            "silently run AdamW (FSDP1 hands the optimizer 1-D pieces); build it with "
            "MGUPMuon(fsdp1_muon_param_groups(model), ...) on a use_orig_params=True model"
        )
