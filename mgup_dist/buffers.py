"""A param group's local buffers for one step: flat views of its params, gradients and
state (created at the first step), the step counters and bias corrections, and the CPU
scratch kept between steps (at most one byte a parameter).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from . import rules as R
from .kernels.base import Bufs
from .layout import Layout, local_of, real_of
from .state import init_state

__all__ = ["SparseGradientError", "GroupBuffers", "gather", "bias_corrections", "workspace"]


class SparseGradientError(ValueError, RuntimeError):
    """Sparse gradients have no dense score to rank (a ValueError and a RuntimeError, as torch raises)."""


class GroupBuffers:
    __slots__ = ("bufs", "layouts", "has_grad", "writeback", "device", "float_dtype", "key")

    def __init__(self, bufs: Bufs, layouts: List[Layout], has_grad: List[bool], writeback: List, device, float_dtype,
                 key):
        self.bufs, self.layouts, self.has_grad, self.writeback = bufs, layouts, has_grad, writeback
        self.device, self.float_dtype = device, float_dtype
        self.key = key  # the params and their layouts: the same key, the same plan


def gather(opt, group, rule: R.Rule) -> GroupBuffers:
    """Flat local views of the group's params, grads and state (a complex param as its real
    view, as torch's AdamW; a non-contiguous param stepped on a copy written back after),
    the step counters raised by one and the bias corrections of every live buffer."""
    params = group["params"]
    static = _static(opt, params)
    if static.plain:
        return _gather_plain(opt, group, rule, static)
    cls_name = type(opt).__name__
    locs, grads, has_grad, writeback = [], [], [], []
    states: Dict[str, List[Optional[torch.Tensor]]] = {name: [] for name in rule.state}
    names = rule.state
    steps = []
    for p in params:
        g = p.grad
        lp = real_of(local_of(p))
        if g is None:  # no gradient this step; an empty shard still steps: its state exists as on the other ranks (DCP)
            has_grad.append(False)
            locs.append(None)
            grads.append(None)
            for name in names:
                states[name].append(None)
            continue
        if g.is_sparse:
            raise SparseGradientError(f"{cls_name} does not support sparse gradients")
        lg = real_of(local_of(g))
        if lg.shape != lp.shape:
            raise ValueError(f"{cls_name}: a gradient of shape {tuple(lg.shape)} for a parameter of local shape "
                             f"{tuple(lp.shape)}")
        has_grad.append(True)
        if lp.is_contiguous():
            locs.append(lp.view(-1))
        else:
            flat = lp.contiguous().view(-1)
            writeback.append((lp, flat))
            locs.append(flat)
        grads.append(lg.reshape(-1))
        st = opt.state[p]
        if len(st) == 0:
            init_state(st, p, rule, group["capturable"], opt.fp32_state)
        for name in names:
            states[name].append(real_of(local_of(st[name])).view(-1))
        if rule.step:
            steps.append(st["step"])
    bc1, bc2 = bias_corrections(group, steps, has_grad, opt.__dict__.setdefault("_beta_tables", {}))
    return GroupBuffers(Bufs(locs, grads, states, bc1, bc2), static.layouts, has_grad, writeback, static.device,
                        static.float_dtype, static.key)


class _Static:
    """What a group's step needs of its params that does not change from step to step."""

    __slots__ = ("key", "layouts", "plain", "device", "float_dtype", "views", "__weakref__")

    def __init__(self, key, layouts, plain, device, float_dtype):
        self.key, self.layouts, self.plain, self.device, self.float_dtype = key, layouts, plain, device, float_dtype
        self.views: Dict = {}  # (param index, state name) -> (state tensor, its flat view)


def _static(opt, params) -> _Static:
    """Cached per param list: the layouts, the device, the scratch dtype, and whether every
    param is a plain contiguous real tensor (no DTensor, no complex): then a step reads
    params and state through flat views made once (``_gather_plain``)."""
    key = (tuple(map(id, params)), id(opt.state), getattr(opt, "_layout_version", 0))
    cache = opt.__dict__.setdefault("_static", {})
    hit = cache.get(key[0])
    if hit is not None and hit.key == key:
        return hit
    layouts = [opt.layout_of(p) for p in params]
    locs = [real_of(local_of(p)) for p in params]
    plain = all(p is lp and lp.is_contiguous() for p, lp in zip(params, locs))
    fdt = torch.float64 if any(lp.dtype == torch.float64 for lp in locs) else torch.float32
    hit = cache[key[0]] = _Static(key, layouts, plain, locs[0].device, fdt)
    return hit


def _gather_plain(opt, group, rule: R.Rule, static: _Static) -> GroupBuffers:
    """``gather`` for plain tensors: the same buffers, with the state's flat views reused
    while the state tensor is the same object (``load_state_dict`` replaces them)."""
    params = group["params"]
    raw = [p.grad for p in params]
    has_grad = [g is not None for g in raw]
    for p, g in zip(params, raw):
        if g is not None and (g.is_sparse or g.shape != p.shape):
            if g.is_sparse:
                raise SparseGradientError(f"{type(opt).__name__} does not support sparse gradients")
            raise ValueError(f"{type(opt).__name__}: a gradient of shape {tuple(g.shape)} for a parameter of local "
                             f"shape {tuple(p.shape)}")
    locs = [p.view(-1) if g is not None else None for p, g in zip(params, raw)]
    grads = [g.reshape(-1) if g is not None else None for g in raw]
    names = rule.state
    states: Dict[str, List[Optional[torch.Tensor]]] = {name: [] for name in names}
    steps = []
    views = static.views
    opt_state = opt.state
    for i, (p, live) in enumerate(zip(params, has_grad)):
        if not live:
            for name in names:
                states[name].append(None)
            continue
        st = opt_state[p]
        if len(st) == 0:
            init_state(st, p, rule, group["capturable"], opt.fp32_state)
        for name in names:
            t = st[name]
            hit = views.get((i, name))
            if hit is None or hit[0] is not t:
                hit = views[(i, name)] = (t, real_of(local_of(t)).view(-1))
            states[name].append(hit[1])
        if rule.step:
            steps.append(st["step"])
    bc1, bc2 = bias_corrections(group, steps, has_grad, opt.__dict__.setdefault("_beta_tables", {}))
    return GroupBuffers(Bufs(locs, grads, states, bc1, bc2), static.layouts, has_grad, [], static.device,
                        static.float_dtype, static.key)


def bias_corrections(group, steps: List[torch.Tensor], has_grad: List[bool], cache: Dict):
    """t += 1 for every live param, and per buffer bc1 = 1 - beta1**t, bc2 = 1 - beta2**t
    (1.0 where unused).  A fixed number of ops for all params: one multi-tensor add; then
    either python floats (torch's host-side counter: read on the host, no device op), or,
    with the counters on the device (``capturable``) or under ``torch.compile``, one
    ``pow`` of a cached [[beta1], [beta2]] over the stacked counters, so that the values
    are computed in the graph (a python float there would be a guard, recompiling every
    step).  Host counters are raised to float64 first: the same values as the floats."""
    n = len(has_grad)
    if not steps:
        return [1.0] * n, [1.0] * n
    if steps[0].device.type == "cpu":
        # as torch's AdamW: the CPU counters take foreach's per-tensor fallback, which would
        # wrap the 1 in a new tensor for every counter; one cached CPU 1 instead
        one = cache.get("one")
        if one is None:
            one = cache["one"] = torch.tensor(1.0)
        torch._foreach_add_(steps, one, alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)
    b1, b2 = group["betas"]
    if not group["capturable"] and not torch.compiler.is_compiling():
        ts = iter(torch.stack(steps).tolist())  # host tensors: no device synchronisation
        per = [(1 - b1 ** t, 1 - b2 ** t) for t in ts]
    else:
        x = torch.stack(steps)
        if x.device.type == "cpu":
            x = x.to(torch.float64)
        key = (b1, b2, x.device, x.dtype)
        bt = cache.get(key)
        if bt is None:
            bt = cache[key] = torch.tensor([[b1], [b2]], dtype=x.dtype, device=x.device)
        bc = 1 - torch.pow(bt, x)  # [2, live params]
        per = list(zip(bc[0].unbind(0), bc[1].unbind(0)))
    it = iter(per)
    bc1, bc2 = [], []
    for live in has_grad:
        a, b = next(it) if live else (1.0, 1.0)
        bc1.append(a)
        bc2.append(b)
    return bc1, bc2


def workspace(kept: Dict[Any, torch.Tensor], budget_elems: int, n: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """A flat buffer of >= n elements.  CPU: kept across steps in ``kept`` (per dtype) and
    grown as needed (writing fresh memory costs several times more than reusing it: page
    faults), up to ``budget_elems`` bytes in all, one byte per parameter of the optimizer
    (the bound on what MGUP holds beyond AdamW's state); a larger chunk's scratch (a tensor
    over ~25 % of the model, in 4-byte keys) is made for the step and freed.  Other devices:
    fresh from the caching allocator, so nothing is held between steps."""
    if device.type != "cpu":
        return torch.empty(n, dtype=dtype, device=device)
    buf = kept.get(dtype)
    if buf is not None and buf.numel() >= n:
        return buf
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = budget_elems - sum(b.untyped_storage().nbytes() for k, b in kept.items() if k != dtype)
    if n * itemsize > budget:
        return torch.empty(n, dtype=dtype)
    buf = torch.empty(n, dtype=dtype)
    kept[dtype] = buf
    return buf
