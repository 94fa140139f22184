"""MGUP optimizers: thin ``torch.optim.Optimizer`` classes.

They validate hyperparameters, own the state (with torch's names, so DeepSpeed, DCP
and Megatron checkpoint converters carry it), know each parameter's :class:`Layout`,
and call ``functional`` and ``selection``.  No math lives here.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from . import functional as F
from .layout import Layout, whole_layout
from .selection import SCOPES, Entry, collective_group, kth_and_unique, num_selected, select_masks, topk_mask_

__all__ = [
    "MODES",
    "MGUPAdamW",
    "MGUPLion",
    "MGUPMuon",
    "CMGUPAdamW",
    "CMGUPLion",
    "CMGUPMuon",
    "OPTIMIZERS",
    "SparseGradientError",
]

MODES = ("topk", "cautious")
DEFAULT_ALPHA, DEFAULT_GAMMA = 2.0, 0.5  # the paper's robust setting, tau = 0.5


class SparseGradientError(ValueError, RuntimeError):
    """Sparse gradients have no dense score to rank (a ValueError and a RuntimeError, as torch raises)."""


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is not None and _is_dtensor(t):
        return t.to_local()
    return t


def _check_range(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    """ValueError naming the parameter and its allowed interval."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
        hi is not None and (value > hi or (hi_open and value == hi))
    )
    if bad:
        interval = f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _mgup_options(group: Dict[str, Any], where: str) -> None:
    """Validate and normalise the MGUP keys of a param group in place (tau -> alpha, gamma)."""
    mode = group.get("mode")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}{where}")
    scope = group.get("scope")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}{where}")
    tau = group.get("tau")
    if tau is not None:
        if group.get("alpha") is not None or group.get("gamma") is not None:
            raise ValueError(
                f"tau is shorthand for alpha=1/tau, gamma=tau: give either tau or alpha/gamma, not both{where}"
            )
        _check_range("tau", tau, 0, 1, lo_open=True)
        group["alpha"], group["gamma"], group["tau"] = 1.0 / tau, float(tau), None
    if group.get("alpha") is None:
        group["alpha"] = DEFAULT_ALPHA
    if group.get("gamma") is None:
        group["gamma"] = DEFAULT_GAMMA
    _check_range("mask_ratio", group["mask_ratio"], 0, 1)
    _check_range("alpha", group["alpha"], 0, None, lo_open=True)
    _check_range("gamma", group["gamma"], 0, group["alpha"])
    if not isinstance(group.get("normalize"), bool):
        raise ValueError(f"normalize must be True or False, got {group.get('normalize')!r}{where}")
    if group.get("foreach") not in (None, True, False):
        raise ValueError(f"foreach must be None, True or False, got {group.get('foreach')!r}{where}")
    if group.setdefault("compile", False) not in (True, False):
        raise ValueError(f"compile must be True or False, got {group.get('compile')!r}{where}")


class _MGUPOptimizer(Optimizer):
    """Shared machinery: MGUP options, layouts, workspaces, the three-phase step."""

    def __init__(self, params, defaults: Dict[str, Any], fp32_state: Optional[bool]):
        if fp32_state not in (None, True, False):
            raise ValueError(f"fp32_state must be None (auto), True or False, got {fp32_state!r}")
        self.fp32_state = fp32_state
        self._layouts: Dict[int, Tuple[torch.Tensor, Layout]] = {}
        self._ws: Dict[int, Tuple[torch.Tensor, ...]] = {}
        super().__init__(params, defaults)

    # -- param groups ---------------------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f" (param group {len(self.param_groups) - 1})"
        try:
            self._validate_group(group, where)
            _mgup_options(group, where)
            for p in group["params"]:
                if p.is_sparse:
                    raise SparseGradientError(f"{type(self).__name__} does not support sparse parameters")
        except ValueError:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch casts loaded floating state to the param dtype; fp32 state of half-precision
        params is put back in fp32 (the saved values, not the rounded ones)."""
        keep = {}
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            st = state_dict["state"].get(pid, {})
            if self._state_dtype(_local(p)) == torch.float32 and p.dtype != torch.float32:
                keep[id(p)] = {k: v for k, v in st.items() if torch.is_tensor(v) and k != "step" and v.dtype == torch.float32}
        super().load_state_dict(state_dict)
        for p in params:
            for k, v in keep.get(id(p), {}).items():
                self.state[p][k] = v.to(device=p.device, copy=True)
            st = self.state.get(p, {})
            if torch.is_tensor(st.get("step")):
                # torch hands 'step' over uncopied: a live source optimizer would share the counter
                st["step"] = st["step"].clone()

    def _validate_group(self, group: Dict[str, Any], where: str) -> None:
        _check_range("lr", group["lr"], 0, None)
        _check_range("weight_decay", group["weight_decay"], 0, None)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_layouts", {})
        self.__dict__.setdefault("_ws", {})
        self.__dict__.setdefault("fp32_state", None)
        for group in self.param_groups:
            for key, val in (("mode", "topk"), ("scope", "tensor"), ("normalize", False), ("foreach", None), ("compile", False)):
                group.setdefault(key, val)

    # -- layouts --------------------------------------------------------------------------
    def set_layout(self, param: torch.Tensor, layout: Layout) -> None:
        """Declare how ``param``'s local buffer maps to original tensors.  Call it on every
        rank, for the tensor object the optimizer's param groups hold."""
        if not isinstance(layout, Layout):
            raise ValueError(f"layout must be a mgup_dist.layout.Layout, got {type(layout).__name__}")
        local = _local(param)
        if layout.numel != local.numel():
            raise ValueError(
                f"layout describes a buffer of {layout.numel} elements but the parameter holds {local.numel()} locally"
            )
        self._layouts[id(param)] = (param, layout)
        self._ws.pop(id(param), None)

    def layout_of(self, param: torch.Tensor) -> Layout:
        hit = self._layouts.get(id(param))
        if hit is not None and hit[0] is param:
            return hit[1]
        tid = self._default_tensor_id(param)
        if _is_dtensor(param):
            from .integrations.fsdp import dtensor_layout

            layout = dtensor_layout(param, tid)
        else:
            layout = whole_layout(param, tid)
        self._layouts[id(param)] = (param, layout)
        return layout

    def _default_tensor_id(self, param) -> int:
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p is param:
                    return i
                i += 1
        raise ValueError("set_layout/layout_of: the tensor is not in this optimizer's param groups")

    # -- workspaces -----------------------------------------------------------------------
    def _workspace(self, p: torch.Tensor, local: torch.Tensor, update_dtype: torch.dtype):
        """(update, score, mask, phi) buffers of the local shape, kept across steps."""
        ws = self._ws.get(id(p))
        if ws is None or ws[0].shape != local.shape or ws[0].dtype != update_dtype:
            score_dtype = torch.float64 if update_dtype == torch.float64 else torch.float32
            u = torch.empty(local.shape, dtype=update_dtype, device=local.device)
            s = torch.empty(local.shape, dtype=score_dtype, device=local.device)
            mk = torch.empty(local.shape, dtype=torch.bool, device=local.device)
            phi = s if score_dtype == update_dtype else torch.empty_like(u)
            ws = (u, s, mk, phi)
            self._ws[id(p)] = ws
        return ws

    def _state_dtype(self, local: torch.Tensor) -> torch.dtype:
        """fp32 state on request, and by default for fp16 params: Adam's (1-b2)*g^2 and eps
        = 1e-8 lie below fp16's smallest subnormal, so fp16 moments turn m / (sqrt(v)+eps)
        into m / 0.  bf16 has fp32's exponent range and keeps the param dtype by default."""
        if local.dtype in (torch.float16, torch.bfloat16):
            if self.fp32_state or (self.fp32_state is None and local.dtype == torch.float16):
                return torch.float32
        return local.dtype

    def _zeros_state(self, p: torch.Tensor) -> torch.Tensor:
        """A zero state tensor like p (a DTensor when p is one), in the state dtype."""
        return torch.zeros_like(p, dtype=self._state_dtype(_local(p)), memory_format=torch.preserve_format)

    # -- step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _foreach(self, group) -> bool:
        # The foreach path runs the same ops in the same order as the for-loop path; it is
        # the default because it saves per-tensor dispatch everywhere.
        return True if group["foreach"] is None else group["foreach"]

    def _collect(self, group):
        """Locals of the group's params: (param, local param, local grad or None, layout)."""
        out = []
        for p in group["params"]:
            g = p.grad
            if g is not None and g.is_sparse:
                raise SparseGradientError(f"{type(self).__name__} does not support sparse gradients")
            out.append((p, _local(p), _local(g), self.layout_of(p)))
        return out

    def _select(self, group, items, scores, masks) -> List[Entry]:
        """Phase 2: the mask of coordinates that get alpha.  Every rank gets here for every
        param group, with or without gradients, because selection may communicate."""
        entries, j = [], 0
        for p, lp, lg, layout in items:
            if lg is None:
                entries.append(Entry(layout, None, None))
            else:
                entries.append(Entry(layout, scores[j].reshape(-1), masks[j].reshape(-1)))
                j += 1
        if group["mode"] == "cautious":
            live = [e for e in entries if e.scores is not None]
            F.cautious_masks([e.scores for e in live], [e.mask for e in live])
        else:
            select_masks(entries, group["mask_ratio"], group["scope"], self._shared_scratch(scores))
        return entries

    def _shared_scratch(self, scores) -> Optional[torch.Tensor]:
        """One reusable buffer for the threshold search of every tensor of a step."""
        if not scores:
            return None
        n = max(s.numel() for s in scores)
        dtype, device = scores[0].dtype, scores[0].device
        buf = self._ws.get("shared_scratch")
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(n, dtype=dtype, device=device)
            self._ws["shared_scratch"] = buf
        return buf

    def _normalize(self, group, entries: List[Entry], phis: List[torch.Tensor]) -> None:
        """Liang et al.'s Cautious normalisation: phi /= max(mean(phi), 1e-3), the mean over
        the selection unit: the original tensor (summed across ranks when split) for
        scope 'tensor', the local piece for 'shard', the whole param group for 'global*'."""
        alpha, gamma, scope = group["alpha"], group["gamma"], group["scope"]
        collective = sorted({tid for e in entries for tid, _ in e.layout.collective})
        index = {tid: i for i, tid in enumerate(collective)}
        # counts: [selected, elements] per collective tensor, then for the whole group
        counts = torch.zeros(len(collective) + 1, 2, dtype=torch.int64)
        per_seg = []
        live = iter(phis)
        for e in entries:
            phi = next(live) if e.mask is not None else None
            for seg in e.layout.segments:
                if phi is None or seg.length == 0:
                    continue
                c = int(e.mask[seg.local_start: seg.local_start + seg.length].sum())
                per_seg.append((phi, seg, c))
                counts[-1] += torch.tensor([c, seg.length])
                if seg.tensor_id in index:
                    counts[index[seg.tensor_id]] += torch.tensor([c, seg.length])
        grp = collective_group([e.layout for e in entries])
        structured = any(e.layout.group is not None or e.layout.collective for e in entries)
        if structured and dist.is_available() and dist.is_initialized() and dist.get_world_size(grp) > 1:
            dist.all_reduce(counts, group=grp)
        for phi, seg, c in per_seg:
            if scope.startswith("global"):
                cnt, n = counts[-1].tolist()
            elif scope == "tensor" and seg.tensor_id in index:
                cnt, n = counts[index[seg.tensor_id]].tolist()
            else:
                cnt, n = c, seg.length
            mean = (alpha * cnt + gamma * (n - cnt)) / n
            phi[seg.local_start: seg.local_start + seg.length].div_(max(mean, 1e-3))

    def _compiled_ok(self, group, items) -> bool:
        """The fused compiled kernels cover whole tensors with per-tensor top-K or the sign
        rule, without normalisation; everything else takes the general path."""
        return (
            group["compile"]
            and not group["normalize"]
            and (group["mode"] == "cautious" or group["scope"] in ("tensor", "shard"))
            and all(
                lay.covers_whole_buffer and lp.is_contiguous() and lg.is_contiguous()  # flat views write through
                for _, lp, lg, lay in items
                if lg is not None and lp.numel()
            )
        )

    def _run_compiled(self, group, items, phase1, cautious) -> None:
        """Fused path: per tensor, phase 1 in one kernel (``phase1(p, g, u, s, scratch)``),
        the K-th score by introselect, phase 3 in one kernel; in cautious mode the whole
        step is one kernel (``cautious(p, pflat, gflat, consts)``).  A tensor whose
        threshold reaches -inf/NaN, or has K in {0, N}, is finished by the general mask
        path, so the selection is the same."""
        lr = _lr_value(group["lr"])
        consts = tuple(_scalar(x) for x in (group["alpha"], group["gamma"], lr, 1 - lr * group["weight_decay"]))
        for p, lp, lg, lay in items:
            if lg is None or lp.numel() == 0:
                continue
            pf, gf = lp.reshape(-1), lg.reshape(-1)
            if group["mode"] == "cautious":
                cautious(p, pf, gf, consts)
                continue
            u, sc, mk, phi = (t.reshape(-1) for t in self._workspace(p, lp, self._state_dtype(lp)))
            scratch = self._shared_scratch([sc])[: sc.numel()]
            phase1(p, gf, u, sc, scratch)
            n = lp.numel()
            k = num_selected(group["mask_ratio"], n)
            if 0 < k < n:
                t, unique = kth_and_unique(scratch, k)
                if t != -math.inf:
                    if not unique:
                        # More scores equal t than the K-th place needs: the lower indices win.
                        # Push the losing ties below t, so that s >= t still selects exactly K.
                        need = k - int((sc > t).sum())
                        ties = torch.nonzero(sc == t).flatten()
                        sc[ties[need:]] = -math.inf
                    F.compiled("_apply_threshold_k2")(pf, u, sc, _scalar(t), *consts)
                    continue
            topk_mask_(sc, k, mk, scratch)
            F.fill_phi([mk], [phi], group["alpha"], group["gamma"])
            F.apply_update([pf], [u], [phi], lrs=[lr], weight_decay=group["weight_decay"], foreach=False)

    def _run(self, group, items, direction) -> None:
        """The three phases for one param group."""
        with_grad = [it for it in items if it[2] is not None]
        foreach = self._foreach(group)
        ws = [self._workspace(p, lp, self._state_dtype(lp)) for p, lp, _, _ in with_grad]
        updates, scores, masks, phis = (list(x) for x in zip(*ws)) if ws else ([], [], [], [])
        direction(with_grad, updates, scores, foreach)
        entries = self._select(group, items, scores, masks)
        flat_phis = [ph.reshape(-1) for ph in phis]
        F.fill_phi([m.reshape(-1) for m in masks], flat_phis, group["alpha"], group["gamma"])
        if group["normalize"]:
            self._normalize(group, entries, flat_phis)
        lr = _lr_value(group["lr"])
        F.apply_update(
            [lp for _, lp, _, _ in with_grad], updates, phis, lrs=[lr] * len(with_grad),
            weight_decay=group["weight_decay"], foreach=foreach,
        )


def _lr_value(lr) -> float:
    return lr.item() if isinstance(lr, torch.Tensor) else float(lr)


def _scalar(x: float) -> torch.Tensor:
    """A 0-d scalar for the compiled kernels: a changing value never recompiles them.
    float64, so that fp64 parameters see the exact value (a 0-d tensor never promotes
    a dimensioned fp32/bf16 operand)."""
    return torch.tensor(x, dtype=torch.float64)


class MGUPAdamW(_MGUPOptimizer):
    r"""AdamW whose per-coordinate step is scaled by MGUP.

    ``u = m_hat / (sqrt(v_hat) + eps)``, score ``s = u * g``; in ``mode="topk"`` the
    ``floor(mask_ratio * N)`` largest scores of each selection unit (``scope``) get
    ``alpha * lr``, the rest ``gamma * lr``; in ``mode="cautious"`` coordinates with
    ``s > 0`` get ``alpha``.  ``alpha=1, gamma=0, mode="cautious", normalize=True`` is
    the Cautious AdamW of Liang et al. (a baseline: it can fail to converge).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        mode: str = "topk",
        mask_ratio: float = 0.5,
        alpha: Optional[float] = None,
        gamma: Optional[float] = None,
        tau: Optional[float] = None,
        scope: str = "tensor",
        normalize: bool = False,
        foreach: Optional[bool] = None,
        compile: bool = False,
        fp32_state: Optional[bool] = None,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, mode=mode, mask_ratio=mask_ratio,
            alpha=alpha, gamma=gamma, tau=tau, scope=scope, normalize=normalize, foreach=foreach, compile=compile,
        )
        super().__init__(params, defaults, fp32_state)

    def _validate_group(self, group, where):
        super()._validate_group(group, where)
        _check_betas(group["betas"])
        _check_range("eps", group["eps"], 0, None)

    def _init_adamw_state(self, p, state):
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = self._zeros_state(p)
            state["exp_avg_sq"] = self._zeros_state(p)

    def _adamw_direction(self, group):
        beta1, beta2 = group["betas"]

        def run(with_grad, updates, scores, foreach):
            states = [self.state[p] for p, _, _, _ in with_grad]
            F.adamw_direction(
                [lg for _, _, lg, _ in with_grad],
                [_local(s["exp_avg"]) for s in states],
                [_local(s["exp_avg_sq"]) for s in states],
                [s["step"] for s in states],
                updates,
                scores,
                beta1=beta1, beta2=beta2, eps=group["eps"], foreach=foreach,
            )

        return run

    def _step_group(self, group):
        items = self._collect(group)
        for p, lp, lg, _ in items:
            if lg is not None:
                self._init_adamw_state(p, self.state[p])
        if self._compiled_ok(group, items):
            b1, b2 = _scalar(group["betas"][0]), _scalar(group["betas"][1])
            eps = _scalar(group["eps"])

            def moments(p):
                st = self.state[p]
                st["step"].add_(1)
                t = st["step"].item()
                bc = (_scalar(1 - group["betas"][0] ** t), _scalar(1 - group["betas"][1] ** t))
                return _local(st["exp_avg"]).reshape(-1), _local(st["exp_avg_sq"]).reshape(-1), bc

            def phase1(p, g, u, s, scratch):
                m, v, (bc1, bc2) = moments(p)
                F.compiled("_adamw_k1")(g, m, v, u, s, scratch, b1, b2, bc1, bc2, eps)

            def cautious(p, pf, gf, consts):
                m, v, (bc1, bc2) = moments(p)
                F.compiled("_adamw_cautious_k")(pf, gf, m, v, b1, b2, bc1, bc2, eps, *consts)

            self._run_compiled(group, items, phase1, cautious)
            return
        self._run(group, items, self._adamw_direction(group))


def _check_betas(betas, names=("betas[0]", "betas[1]")) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for name, b in zip(names, betas):
        _check_range(name, b, 0, 1, hi_open=True)


class MGUPLion(_MGUPOptimizer):
    r"""Lion (Chen et al. 2023) with MGUP's per-coordinate scale.

    ``u = sign(b1*m + (1-b1)*g)``, score ``s = u * g``, ``p -= lr*phi*u``,
    then ``m = b2*m + (1-b2)*g``.  State: ``exp_avg``.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: Tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        mode: str = "topk",
        mask_ratio: float = 0.5,
        alpha: Optional[float] = None,
        gamma: Optional[float] = None,
        tau: Optional[float] = None,
        scope: str = "tensor",
        normalize: bool = False,
        foreach: Optional[bool] = None,
        compile: bool = False,
        fp32_state: Optional[bool] = None,
    ):
        defaults = dict(
            lr=lr, betas=betas, weight_decay=weight_decay, mode=mode, mask_ratio=mask_ratio, alpha=alpha,
            gamma=gamma, tau=tau, scope=scope, normalize=normalize, foreach=foreach, compile=compile,
        )
        super().__init__(params, defaults, fp32_state)

    def _validate_group(self, group, where):
        super()._validate_group(group, where)
        _check_betas(group["betas"])

    def _step_group(self, group):
        items = self._collect(group)
        for p, lp, lg, _ in items:
            if lg is not None and len(self.state[p]) == 0:
                self.state[p]["exp_avg"] = self._zeros_state(p)
        beta1, beta2 = group["betas"]
        if self._compiled_ok(group, items):
            b1, b2 = _scalar(beta1), _scalar(beta2)

            def phase1(p, g, u, s, scratch):
                F.compiled("_lion_k1")(g, _local(self.state[p]["exp_avg"]).reshape(-1), u, s, scratch, b1, b2)

            def cautious(p, pf, gf, consts):
                F.compiled("_lion_cautious_k")(pf, gf, _local(self.state[p]["exp_avg"]).reshape(-1), b1, b2, *consts)

            self._run_compiled(group, items, phase1, cautious)
            return

        def run(with_grad, updates, scores, foreach):
            F.lion_direction(
                [lg for _, _, lg, _ in with_grad],
                [_local(self.state[p]["exp_avg"]) for p, _, _, _ in with_grad],
                updates, scores, beta1=beta1, beta2=beta2, foreach=foreach,
            )

        self._run(group, items, run)


class MGUPMuon(MGUPAdamW):
    r"""Muon (Moonlight form) with MGUP's per-coordinate scale, AdamW for the rest.

    Matrices (``use_muon=True`` groups; by default every 2-D param not listed in
    ``adamw_params``): ``buf = mu*buf + g``, ``x = g + mu*buf`` (Nesterov), score
    ``s = x * g`` (momentum before orthogonalisation), ``u = NS5(x)`` on the *whole*
    matrix (pieces held by other ranks are gathered), ``p *= 1 - lr*wd``,
    ``p -= lr * 0.2*sqrt(max(A,B)) * phi * u``.  Other params: MGUP-AdamW with
    ``betas``/``eps`` and the same lr.
    """

    def __init__(
        self,
        params,
        lr: float = 2e-2,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        betas: Tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        adamw_params: Optional[Iterable[torch.Tensor]] = None,
        *,
        mode: str = "topk",
        mask_ratio: float = 0.5,
        alpha: Optional[float] = None,
        gamma: Optional[float] = None,
        tau: Optional[float] = None,
        scope: str = "tensor",
        normalize: bool = False,
        foreach: Optional[bool] = None,
        compile: bool = False,
        fp32_state: Optional[bool] = None,
    ):
        self._adamw_ids = {id(p) for p in (adamw_params or [])}
        params = list(params)
        if params and not isinstance(params[0], dict):
            muon = [p for p in params if p.ndim == 2 and id(p) not in self._adamw_ids]
            other = [p for p in params if not (p.ndim == 2 and id(p) not in self._adamw_ids)]
            extra = [p for p in (adamw_params or []) if all(p is not q for q in params)]
            params = [g for g in ({"params": muon, "use_muon": True}, {"params": other + extra, "use_muon": False}) if g["params"]]
        _check_muon_options(ns_steps, momentum, nesterov)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, mode=mode, mask_ratio=mask_ratio,
            alpha=alpha, gamma=gamma, tau=tau, scope=scope, normalize=normalize, foreach=foreach, compile=compile,
            momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, use_muon=None,
        )
        _MGUPOptimizer.__init__(self, params, defaults, fp32_state)

    def _validate_group(self, group, where):
        super()._validate_group(group, where)
        _check_muon_options(group["ns_steps"], group["momentum"], group["nesterov"])
        if group.get("use_muon") is None:
            group["use_muon"] = all(p.ndim == 2 and id(p) not in self._adamw_ids for p in group["params"])
        if group["use_muon"]:
            for i, p in enumerate(group["params"]):
                shape = tuple(p.shape)
                # 1-D may be a flat shard of matrices (FSDP1, ZeRO): its layout is checked later
                if len(shape) not in (1, 2):
                    raise ValueError(
                        f"MGUPMuon: a use_muon=True param group holds a {len(shape)}-D parameter (index {i}, shape "
                        f"{shape}){where}; Muon orthogonalises 2-D matrices only: put it in a group with "
                        "use_muon=False (AdamW) or pass it in adamw_params"
                    )

    def set_layout(self, param, layout):
        super().set_layout(param, layout)
        for group in self.param_groups:
            if group.get("use_muon") and any(p is param for p in group["params"]):
                for seg in layout.segments:
                    if seg.global_shape is None or len(seg.global_shape) != 2:
                        raise ValueError(
                            f"MGUPMuon: a use_muon=True group holds a parameter whose layout segment for tensor "
                            f"{seg.tensor_id!r} has global_shape={seg.global_shape}; Muon needs 2-D matrices"
                        )

    def _step_group(self, group):
        if not group["use_muon"]:
            return super()._step_group(group)
        items = self._collect(group)
        for p, lp, lg, _ in items:
            if lg is not None and len(self.state[p]) == 0:
                self.state[p]["momentum_buffer"] = self._zeros_state(p)
        def run(with_grad, updates, scores, foreach):
            F.muon_direction(
                [lg for _, _, lg, _ in with_grad],
                [_local(self.state[p]["momentum_buffer"]) for p, _, _, _ in with_grad],
                updates, scores, momentum=group["momentum"], nesterov=group["nesterov"], foreach=foreach,
            )
            self._orthogonalise(group, items, updates)

        self._run(group, items, run)

    def _orthogonalise(self, group, items, updates) -> None:
        """Replace each segment of x in ``updates`` by lr_scale * NS5(full matrix)[segment].
        Split matrices are assembled with one all_reduce of zero-padded full buffers (x + 0
        is exact), in the sorted order of Layout.collective, which every rank shares."""
        ns = group["ns_steps"]
        upd = {}
        j = 0
        for p, lp, lg, lay in items:
            if lg is not None:
                upd[id(p)] = updates[j].reshape(-1)
                j += 1
        collective = {}
        for _, _, _, lay in items:
            for tid, numel in lay.collective:
                collective.setdefault(tid, numel)
        split_ids = sorted(collective)
        pieces = {}  # tensor_id -> list of (flat local view, seg)
        for p, lp, lg, lay in items:
            for seg in lay.segments:
                if seg.global_shape is None or len(seg.global_shape) != 2:
                    raise ValueError(
                        f"MGUPMuon: a use_muon=True param group holds tensor {seg.tensor_id!r} of shape "
                        f"{seg.global_shape}; Muon orthogonalises 2-D matrices only: put it in a group with "
                        "use_muon=False (AdamW) or pass it in adamw_params"
                    )
                if seg.length and id(p) in upd:
                    pieces.setdefault(seg.tensor_id, []).append((upd[id(p)][seg.local_start: seg.local_start + seg.length], seg))
        if split_ids:
            grp = collective_group([lay for _, _, _, lay in items])
            dtype = next((u.dtype for u in upd.values()), None)
            # every rank must agree on the dtype of the buffer: use fp32 unless fp64 params
            dtype = torch.float64 if dtype == torch.float64 else torch.float32
            offsets, total = {}, 0
            for tid in split_ids:
                offsets[tid] = total
                total += collective[tid]
            device = next((u.device for u in upd.values()), torch.device("cpu"))
            full = torch.zeros(total, dtype=dtype, device=device)
            for tid in split_ids:
                for view, seg in pieces.get(tid, []):
                    full[offsets[tid] + seg.global_start: offsets[tid] + seg.global_start + seg.length].copy_(view)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size(grp) > 1:
                dist.all_reduce(full, group=grp)
            for tid in split_ids:
                if tid not in pieces:
                    continue
                shape = next(seg.global_shape for _, seg in pieces[tid])
                o = F.newton_schulz(full[offsets[tid]: offsets[tid] + collective[tid]].view(shape), ns) * F.muon_lr_scale(shape)
                flat = o.reshape(-1)
                for view, seg in pieces[tid]:
                    view.copy_(flat[seg.global_start: seg.global_start + seg.length])
        for tid, plist in pieces.items():
            if tid in collective:
                continue
            for view, seg in plist:
                assert seg.is_whole, seg
                o = F.newton_schulz(view.view(seg.global_shape), ns) * F.muon_lr_scale(seg.global_shape)
                view.copy_(o.reshape(-1))


def _check_muon_options(ns_steps, momentum, nesterov) -> None:
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
        raise ValueError(f"ns_steps must be an integer >= 1, got {ns_steps!r}")
    _check_range("momentum", momentum, 0, 1, hi_open=True)
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov must be True or False, got {nesterov!r}")


def _cautious(cls, name: str, doc: str):
    class _C(cls):
        __doc__ = doc

        def __init__(self, params, *args, mode: str = "cautious", **kwargs):
            super().__init__(params, *args, mode=mode, **kwargs)

    _C.__name__ = _C.__qualname__ = name
    return _C


CMGUPAdamW = _cautious(MGUPAdamW, "CMGUPAdamW", "Cautious-MGUP AdamW: MGUPAdamW with mode='cautious' (phi = alpha where u*g > 0, else gamma).")
CMGUPLion = _cautious(MGUPLion, "CMGUPLion", "Cautious-MGUP Lion: MGUPLion with mode='cautious'.")
CMGUPMuon = _cautious(MGUPMuon, "CMGUPMuon", "Cautious-MGUP Muon: MGUPMuon with mode='cautious'.")

OPTIMIZERS = {
    "MGUPAdamW": MGUPAdamW,
    "CMGUPAdamW": CMGUPAdamW,
    "MGUPLion": MGUPLion,
    "CMGUPLion": CMGUPLion,
    "MGUPMuon": MGUPMuon,
    "CMGUPMuon": CMGUPMuon,
}
