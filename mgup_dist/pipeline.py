"""One MGUP step of one param group: direction -> select -> apply, chunk by chunk.

    step_group: buffers.gather, the plan (cached; built with the ranks' agreement), the backend
    for chunk in plan:                              (mgup_dist.plan: from layouts, cached)
        keys  = backend.score(rule, ...)            phase 1: moments, u, s = u*g -> order keys
        t     = selection.select(backend, ...)      phase 2: K-th key per unit, ties (cautious: a constant)
        backend.apply(rule, ..., t)                 phase 3: phi, weight decay, the step

The scratch of a chunk (its keys) is the only per-step memory besides what a backend
needs transiently; ``u`` is recomputed in phase 3 instead of kept.  Which chunks run, and
so which collectives, comes from the plan, identical on every rank: a chunk marked
``collective`` is entered by every rank even with no local piece or no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

from . import buffers, selection
from .agreement import AGREE, check_at_plan
from .collectives import all_reduce_sum
from .kernels import get_backend
from .kernels.base import Bufs
from .options import check_backend_device, lr_0d
from .plan import build_plan, chunk_cap
from .rules import RULES, Rule, muon_lr_scale, newton_schulz_batched

__all__ = ["GroupStep", "step_group", "run_group"]


@dataclass
class GroupStep:
    """What the optimizer hands the pipeline for one param group."""

    rule: Rule
    hp: Dict  # the group's hyperparameters (lr, weight_decay, alpha, gamma, betas, ...)
    plan: object  # plan.GroupPlan
    bufs: Bufs
    has_grad: List[bool]
    device: torch.device
    float_dtype: torch.dtype  # scratch: float32, float64 for float64 params
    scratch: Callable  # scratch(n, dtype, device) -> flat tensor of >= n elements
    writeback: List = ()  # (param, contiguous copy): non-contiguous params are stepped on a copy


def step_group(opt, group) -> None:
    """One param group's step: its buffers (``mgup_dist.buffers``), its plan (cached on the
    optimizer; building one checks the ranks' agreement), the backend of its device, then
    the three phases (``run_group``)."""
    if not group["params"]:
        return
    rule = RULES[group["rule"]]
    gb = buffers.gather(opt, group, rule)
    plan = _plan(opt, group, gb, rule)
    if group["backend"] == "triton" and gb.device.type == "cpu":
        check_backend_device(group, lambda p: gb.device, " (at step)")
    foreach = True if group["foreach"] is None else group["foreach"]
    backend = get_backend(gb.device, foreach=foreach, compile=group["compile"], kind=group["backend"])
    hp = {k: v for k, v in group.items() if k not in ("params", "_validated")}
    hp["lr"] = lr_0d(hp["lr"])
    # the last statement: torch.compile(opt.step) breaks the graph inside, and nothing
    # (no view of a param) must be live in the frame it resumes afterwards
    return run_group(backend, GroupStep(rule, hp, plan, gb.bufs, gb.has_grad, gb.device, gb.float_dtype,
                                        opt._workspace, gb.writeback))


def _plan(opt, group, gb, rule: Rule):
    """The group's plan (from layouts and hyperparameters only), built on the first step
    and after a change; building it checks, across the ranks of the group's process
    group, that the hyperparameters that decide collectives and selection agree."""
    layouts = gb.layouts
    cap = chunk_cap(gb.device.type, group.get("chunk_elems"))
    key = (gb.key, group["scope"], group["mask_ratio"], rule.matrix, cap, *(group[k] for k in AGREE))
    hit = opt._plans.get(id(group))
    if hit is not None and hit[0] == key:
        return hit[1]
    check_at_plan(type(opt).__name__, group, layouts, getattr(opt, "_replica_group", False), opt.check_agreement)
    plan = build_plan(layouts, group["scope"], group["mask_ratio"], assemble=rule.matrix, cap=cap)
    opt._plans[id(group)] = (key, plan)
    return plan


def run_group(backend, st: GroupStep) -> None:
    hp = dict(st.hp, state=st.rule.state)
    mode, normalize = hp["mode"], hp["normalize"]
    # Cautious: phi = alpha where s > 0, i.e. key(s) >= key(smallest positive) = 1; the
    # authors' variant takes s >= 0, key 0.
    t_const = 0 if hp.get("convention") == "authors" else 1
    if st.rule.matrix:
        hp["matrix_hook"] = _muon_hook(st, hp)
    for chunk in st.plan.chunks:
        c = chunk.active(st.has_grad)
        if not c.pieces and not c.collective:
            continue
        if mode == "cautious" and not normalize and c.pieces and not st.rule.matrix:
            if backend.cautious(st.rule, hp, c, st.bufs, t_const):
                continue
        scratch = st.scratch(c.numel, st.float_dtype, st.device)[: c.numel]
        hist0 = backend.score(st.rule, hp, c, st.bufs, scratch) if c.pieces else None
        keys = scratch.view(torch.int64 if st.float_dtype == torch.float64 else torch.int32)
        denom = None
        approx = st.plan.scope == "global_approx"
        if mode == "cautious" or approx:
            if mode == "cautious":
                t = torch.full((c.n_units,), t_const, dtype=keys.dtype, device=st.device)
            else:
                t = selection.approx_threshold(backend, c, keys, st.plan.mask_ratio)
            if normalize:  # the mean of phi needs the count of alpha: summed over the ranks of a unit
                over_ranks = c.split or (approx and c.collective)
                denom = _denominator(hp, *selection.selected_counts(backend, c, keys, t, over_ranks))
        else:
            t = selection.select(backend, c, keys, hist0, selection.chunk_reduce(c))
            if normalize:  # top-K selects exactly K of each unit's N: the mean of phi is known
                denom = _topk_denominator(hp, c, st.device)
        backend.apply(st.rule, hp, c, st.bufs, scratch, t, denom)
    for param, flat in st.writeback:
        param.copy_(flat.view(param.shape))


def _denominator(hp, counts: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Liang et al.: phi / max(mean(phi), 1e-3), mean over the unit."""
    n = n.clamp_min(1).to(torch.float64)
    c = counts.to(torch.float64)
    mean = (hp["alpha"] * c + hp["gamma"] * (n - c)) / n
    return mean.clamp_min(1e-3)


def _topk_denominator(hp, chunk, device) -> torch.Tensor:
    key = ("topk_denominator", hp["alpha"], hp["gamma"], device)
    d = chunk.cache.get(key)
    if d is None:
        means = [max((hp["alpha"] * k + hp["gamma"] * (n - k)) / max(n, 1), 1e-3) for k, n in zip(chunk.k, chunk.n)]
        d = torch.tensor(means, dtype=torch.float64, device=device)
        chunk.cache[key] = d
    return d


def _muon_hook(st: GroupStep, hp) -> Callable:
    """u <- 0.2*sqrt(max(A,B)) * NS5(x) on each whole matrix, same-shape matrices batched.

    Matrices split across ranks are assembled with one all_reduce of zero-padded full buffers
    per chunk (x + 0 is exact), in the chunk's tensor order, which every rank shares.  Every
    rank holding a piece of a split matrix runs its Newton-Schulz in the same batch (the
    same-shape split tensors of the same holders, from the plan), so the result is identical
    on all of them; local whole matrices are batched among themselves."""
    ns_steps = hp["ns_steps"]
    want = hp.get("ns_dtype", "auto")
    # "auto": bfloat16, as torch.optim.Muon; "param": the scratch's float dtype (fp32, fp64)
    ns_dtype = torch.bfloat16 if want in (None, "auto") else st.float_dtype if want == "param" else want

    def hook(chunk, us: List[torch.Tensor]) -> None:
        mats = []  # (matrix view to orthogonalise in place, shape, batch key)
        for pc, u in zip(chunk.pieces, us):
            if pc.unit < 0 or pc.tensor >= 0:
                continue  # padding, or a piece of a split matrix (below)
            if pc.shape is None or len(pc.shape) != 2:
                _not_a_matrix(pc.shape)
            mats.append((u.view(pc.shape), pc.shape, None))
        full, offsets = None, []
        if chunk.tensors:
            total = 0
            for _, numel in chunk.tensors:
                offsets.append(total)
                total += numel
            full = torch.zeros(total, dtype=st.float_dtype, device=st.device)
            for pc, u in zip(chunk.pieces, us):
                if pc.tensor >= 0:
                    a = offsets[pc.tensor] + pc.gstart
                    full[a: a + pc.length].copy_(u)
            all_reduce_sum(full, chunk.group)
            assert len(chunk.tensor_shapes) == len(chunk.tensor_holders) == len(chunk.tensors), "plan without holders"
            for i, ((_, numel), shape, holders) in enumerate(zip(chunk.tensors, chunk.tensor_shapes, chunk.tensor_holders)):
                if holders is None:
                    continue  # no piece here: the holders orthogonalise it
                if shape is None or len(shape) != 2:
                    _not_a_matrix(shape)
                mats.append((full[offsets[i]: offsets[i] + numel].view(shape), shape, holders))
        _orthogonalise(mats, ns_steps, ns_dtype)
        if full is not None:
            for pc, u in zip(chunk.pieces, us):
                if pc.tensor >= 0:
                    a = offsets[pc.tensor] + pc.gstart
                    u.copy_(full[a: a + pc.length])

    return hook


def _orthogonalise(mats, ns_steps: int, dtype: torch.dtype) -> None:
    """x <- 0.2*sqrt(max(A,B)) * NS5(x) for every (x, shape, key) of ``mats``, in place.

    Matrices of one (rows, cols) class and key share one stacked Newton-Schulz: tall ones are
    transposed into the wide class (as torch.optim.Muon runs X^T when rows > cols), so
    (2048, 768) and (768, 2048) are one batch.  Gather and scatter are one multi-tensor copy
    each for all classes: the device ops are 5 (11 in float64) plus 15 per class (5 steps)."""
    mats = [(x, shape, key) for x, shape, key in mats if x.numel()]
    if not mats:
        return
    wide = [x.mT if shape[0] > shape[1] else x for x, shape, _ in mats]
    classes = {}
    for i, ((_, _, key), w) in enumerate(zip(mats, wide)):
        classes.setdefault((tuple(w.shape), key), []).append(i)
    stacks, dst = [], [None] * len(mats)
    for (shape, _), idx in classes.items():
        X = torch.empty((len(idx),) + shape, dtype=dtype, device=wide[0].device)
        stacks.append(X)
        for j, i in enumerate(idx):
            dst[i] = X[j]
    torch._foreach_copy_(dst, wide)
    outs = newton_schulz_batched(stacks, ns_steps, [muon_lr_scale(shape) for shape, _ in classes])
    res = [None] * len(mats)
    for O, idx in zip(outs, classes.values()):
        for j, i in enumerate(idx):
            res[i] = O[j]
    torch._foreach_copy_(wide, res)


def _not_a_matrix(shape) -> None:
    raise ValueError(
        f"MGUPMuon: a use_muon=True param group holds a tensor of shape {shape}; Muon orthogonalises 2-D "
        "matrices only: put it in a group with use_muon=False (AdamW) or pass it in adamw_params"
    )
