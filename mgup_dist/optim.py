"""MGUP optimizers: thin ``torch.optim.Optimizer`` classes, in torch's shape.

Each class holds its options and state (torch's names, so DeepSpeed, DCP and Megatron
checkpoint converters carry it) and each parameter's :class:`Layout`; ``step`` hands every
param group to the pipeline (``mgup_dist.pipeline.step_group``: buffers -> plan, agreement,
backend -> direction, select, apply).  What a group's values must satisfy lives in
``mgup_dist.options``, the state's creation and loaded-state checks in ``mgup_dist.state``,
the cross-rank agreement in ``mgup_dist.agreement``.  No math lives here.
"""
from __future__ import annotations

import itertools
import warnings
import weakref
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch.optim import Optimizer

from .agreement import StepAgreement
from .buffers import SparseGradientError, workspace
from .layout import Layout, default_layout, is_dtensor, local_of, real_of
from .options import (
    GROUP_DEFAULTS,
    MGUP_KEYS,
    MODES,
    REFUSED,
    check_group,
    check_mgup,
    check_muon_options,
    optional_bool,
    revalidate,
)
from .pipeline import step_group
from .rules import RULES
from .state import RULE_CLASS, check_loaded, fp32_to_keep, init_state, numeric_steps_to_tensors

__all__ = ["MODES", "MGUPAdamW", "MGUPLion", "MGUPMuon", "CMGUPAdamW", "CMGUPLion", "CMGUPMuon", "OPTIMIZERS",
           "SparseGradientError"]

_DEFAULTS_WHERE = " (the optimizer's defaults)"


class _MGUPOptimizer(Optimizer):
    """What every MGUP optimizer shares: options, state, layouts, the step."""

    rule_name = "adamw"
    #: "step": every step one fixed-size all-reduce checks that the ranks of a sharded or
    #: replicated group agree on the hyperparameters (``mgup_dist.agreement``); "plan": only
    #: when the plan is built (no per-step collective; a scheduler's change on one rank
    #: goes unnoticed).
    check_agreement = "step"

    def __init__(self, params, defaults: Dict[str, Any], fp32_state: Optional[bool]):
        optional_bool("fp32_state", fp32_state)
        self.fp32_state = fp32_state
        self._layouts: Dict[int, Tuple[torch.Tensor, Layout]] = {}
        self._plans: Dict[int, Tuple[Any, Any]] = {}
        self._scratch: Dict[Any, torch.Tensor] = {}
        self._agreement = StepAgreement()
        defaults.setdefault("rule", self.rule_name)
        for key, val in (("maximize", False), ("capturable", False), ("convention", "torch"), ("correct_bias", True), ("backend", "auto")):
            defaults.setdefault(key, val)
        for key in REFUSED:
            defaults.setdefault(key, False)
        check_mgup(defaults, _DEFAULTS_WHERE)  # opt.defaults shows the resolved alpha/gamma
        # the hyperparameters before the params, as torch's optimizers check them
        self._validate(dict(defaults, params=[]), _DEFAULTS_WHERE, mgup=False)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if isinstance(param_group, dict) and param_group.get("tau") is not None:
            # tau -> (1/tau, tau) for this group: the defaults' resolved alpha/gamma must not
            # fill in first (torch copies every default the group lacks); alpha/gamma given
            # in the same dict as tau are still refused by check_mgup
            param_group = dict(param_group, alpha=param_group.get("alpha"), gamma=param_group.get("gamma"))
        where = f" (param group {len(self.param_groups)})"
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # the tensors it is built with: a buffer a wrapper swaps in later has a layout only the wrapper knows
        self.__dict__.setdefault("_given", {}).update((id(p), weakref.ref(p)) for p in group["params"])
        try:
            self._validate(group, where)
            for i, p in enumerate(group["params"]):
                if p.is_sparse:
                    raise SparseGradientError(f"{type(self).__name__} does not support sparse parameters")
                if not (p.dtype.is_floating_point or p.dtype.is_complex):
                    raise ValueError(
                        f"{type(self).__name__} optimizes floating or complex tensors; parameter {i} is {p.dtype}{where}"
                    )
                if p.dtype.is_complex and (is_dtensor(p) or group.get("rule") == "muon"):
                    raise ValueError(
                        f"{type(self).__name__}: parameter {i} is complex ({p.dtype}); complex params are stepped as "
                        "their real view on whole tensors with the AdamW or Lion rule only, not as a DTensor or in a "
                        f"use_muon=True group{where}"
                    )
        except ValueError:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise

    def _validate(self, group: Dict[str, Any], where: str, mgup: bool = True) -> None:
        check_group(group, where, lambda p: local_of(p).device, mgup)

    # -- step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        # as torch's optimizers: capturing a step in a CUDA graph needs capturable=True (step
        # counters and bias corrections on the device); otherwise replays would reuse the
        # captured bias corrections for ever
        check = getattr(self, "_accelerator_graph_capture_health_check", None) or self._cuda_graph_capture_health_check
        check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        revalidate(self.param_groups, self._validate)
        self._agreement(type(self).__name__, self.param_groups, self.layout_of, getattr(self, "_replica_group", False),
                        self.check_agreement)
        for group in self.param_groups:
            step_group(self, group)
        return loss

    def _workspace(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return workspace(self._scratch, 0, n, dtype, device)
        key = tuple(map(id, itertools.chain.from_iterable(g["params"] for g in self.param_groups)))
        hit = self.__dict__.get("_budget")
        if hit is None or hit[0] != key:
            hit = self._budget = (key, sum(local_of(p).numel() for g in self.param_groups for p in g["params"]))
        return workspace(self._scratch, hit[1], n, dtype, device)

    def release_scratch(self) -> None:
        """Free the CPU scratch kept between steps (it is re-made on the next step)."""
        self._scratch.clear()

    def replicated(self, process_group=None) -> "_MGUPOptimizer":
        """Declare that this optimizer runs replicated over ``process_group`` (DDP: the same
        params and gradients on every rank).  Then the ranks' hyperparameters are checked
        to agree (``check_agreement``), and a ValueError names the parameter and the ranks'
        values instead of letting the replicas drift apart.  Sharded layouts (FSDP, ZeRO,
        Megatron) are checked over their own group without this.  Returns self."""
        self._replica_group = process_group
        self._plans.clear()
        return self

    # -- state ----------------------------------------------------------------------------
    def init_state(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Create ``p``'s state (zeros, step 0) if it has none, as the first step would;
        frameworks that save state before the first step (Megatron) call this."""
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return init_state(self.state[p], p, RULES[group["rule"]], group["capturable"], self.fp32_state)
        raise ValueError("init_state: the tensor is not in this optimizer's param groups")

    def state_dict(self):
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g.pop("_validated", None)
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads an MGUP state dict, or a torch optimizer's whose state this rule can
        continue from (``torch.optim.AdamW`` into ``MGUPAdamW``): its moments and step are
        carried over and the MGUP hyperparameters of this optimizer are kept (a warning
        says which were taken from where).  Another rule's state is refused by name.
        torch casts loaded floating state to the param dtype: fp32 state of
        half-precision params is put back in fp32 (the saved values, not rounded ones)."""
        foreign = check_loaded(state_dict, self.param_groups, type(self).__name__)
        kept = {i: {k: v for k, v in self.param_groups[i].items() if k != "params"} for i in foreign}
        params = [p for g in self.param_groups for p in g["params"]]
        keep = fp32_to_keep(state_dict, params, self.fp32_state)
        super().load_state_dict(state_dict)
        for i, mine in kept.items():
            group = self.param_groups[i]
            taken = sorted(k for k in group if k in mine and k not in MGUP_KEYS and k != "_validated")
            for k, v in mine.items():
                if k in MGUP_KEYS or k not in group:
                    group[k] = v
            warnings.warn(
                f"{type(self).__name__}.load_state_dict: param group {i} comes from a non-MGUP optimizer: its moments, "
                f"step and {', '.join(taken)} were loaded; the MGUP settings of this optimizer were kept "
                f"({', '.join(f'{k}={mine[k]!r}' for k in MGUP_KEYS if k in mine)})",
                stacklevel=2,
            )
        for i, group in enumerate(self.param_groups):
            self._validate(group, f" (param group {i} of the loaded state dict)")
        for p in params:
            for k, v in keep.get(id(p), {}).items():
                self.state[p][k] = v.to(device=p.device, copy=True)
            st = self.state.get(p, {})
            if torch.is_tensor(st.get("step")):
                # torch hands 'step' over uncopied: a live source optimizer would share the counter
                st["step"] = st["step"].clone()
        self._plans.clear()

    def __setstate__(self, state):
        super().__setstate__(state)
        for key, val in (("_layouts", {}), ("_plans", {}), ("_scratch", {}), ("fp32_state", None),
                         ("_adamw_ids", set())):  # MGUPMuon: ids of another process's tensors mean nothing
            self.__dict__.setdefault(key, val)
        self.__dict__.setdefault("_agreement", StepAgreement())
        self.__dict__.setdefault("_given", {id(p): weakref.ref(p) for g in self.param_groups for p in g["params"]})
        self.__dict__.pop("_static", None)  # flat views of the state tensors this replaces
        for group in self.param_groups:
            for key, val in GROUP_DEFAULTS + (("rule", self.rule_name),):
                group.setdefault(key, val)
            numeric_steps_to_tensors(self.state, group)

    def __getstate__(self):
        # torch pickles defaults, state and param_groups only: fp32_state decides the state
        # dtype of params added later, so a copy must keep it
        state = super().__getstate__()
        state["fp32_state"] = self.fp32_state
        return state

    # -- layouts --------------------------------------------------------------------------
    def set_layout(self, param: torch.Tensor, layout: Layout) -> None:
        """Declare how ``param``'s local buffer maps to original tensors.  Call it on every
        rank, for the tensor object the optimizer's param groups hold."""
        if not isinstance(layout, Layout):
            raise ValueError(f"layout must be a mgup_dist.layout.Layout, got {type(layout).__name__}")
        local = real_of(local_of(param))  # complex: the real view's elements
        if layout.numel != local.numel():
            raise ValueError(
                f"layout describes a buffer of {layout.numel} elements but the parameter holds {local.numel()} locally"
            )
        self._layouts[id(param)] = (param, layout)
        self._layout_version = getattr(self, "_layout_version", 0) + 1
        self._plans.clear()

    def layout_of(self, param: torch.Tensor) -> Layout:
        hit = self._layouts.get(id(param))
        if hit is not None and hit[0] is param:
            return hit[1]
        tid = next((i for i, p in enumerate(p for g in self.param_groups for p in g["params"]) if p is param), None)
        if tid is None:
            raise ValueError("set_layout/layout_of: the tensor is not in this optimizer's param groups")
        given = self._given.get(id(param))
        layout = default_layout(param, tid, replaced=given is None or given() is not param,
                                whole_matrices="use_muon" in self.defaults)
        self._layouts[id(param)] = (param, layout)
        return layout


_COMMON_DOC = """
    MGUP options (keyword-only): ``mode`` ("topk" | "cautious"), ``mask_ratio`` (K = floor(r*N)),
    ``alpha`` / ``gamma`` or ``tau`` (alpha = 1/tau, gamma = tau), ``scope`` ("tensor" | "shard" |
    "global" | "global_approx"), ``normalize`` (Liang et al.'s phi / mean(phi)), ``convention``
    ("torch" | "authors": the MGUP authors' eps placement, bias correction in the step size,
    cautious s >= 0), ``correct_bias`` (authors' convention only),
    ``maximize``, ``capturable`` (step counter on the device, lr may be a device tensor: CUDA
    graphs), ``backend`` ("auto" | "cpu" | "triton" | "torch"), ``foreach``, ``compile`` (CPU:
    Inductor-fused phases), ``chunk_elems`` (elements scored and selected together: None = 4M on
    the CPU, 256M on accelerators; the step's scratch is 4 bytes a chunk element), ``fp32_state``.  ``amsgrad``, ``fused`` and ``differentiable`` are
    refused with a ValueError that says what to use instead.

    As torch's optimizers: ``lr`` may be a one-element CPU tensor of any shape (a device tensor
    needs ``capturable=True``); a group may carry its own options, ``tau`` included; params may
    be ``named_parameters()`` (names in ``state_dict()``); a numeric ``step`` in a loaded state
    becomes the tensor counter.  Complex params are stepped as their real view
    (``torch.view_as_real``: each real and imaginary part is one coordinate of the score and of
    top-K), whole tensors with the AdamW or Lion rule (not DTensors, not Muon's matrices);
    integer params are refused.
"""


class MGUPAdamW(_MGUPOptimizer):
    __doc__ = r"""AdamW whose per-coordinate step is scaled by MGUP.

    ``u = m_hat / (sqrt(v_hat) + eps)``, score ``s = u * g``; in ``mode="topk"`` the
    ``floor(mask_ratio * N)`` largest scores of each selection unit (``scope``) get
    ``alpha * lr``, the rest ``gamma * lr``; in ``mode="cautious"`` coordinates with
    ``s > 0`` get ``alpha``.  ``alpha=1, gamma=0, mode="cautious", normalize=True`` is
    the Cautious AdamW of Liang et al. (a baseline: it can fail to converge).
    """ + _COMMON_DOC

    rule_name = "adamw"

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
        convention: str = "torch",
        correct_bias: bool = True,
        maximize: bool = False,
        capturable: bool = False,
        backend: str = "auto",
        foreach: Optional[bool] = None,
        compile: bool = False,
        chunk_elems: Optional[int] = None,
        fp32_state: Optional[bool] = None,
        amsgrad: bool = False,
        fused: Optional[bool] = None,
        differentiable: bool = False,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, mode=mode, mask_ratio=mask_ratio,
            alpha=alpha, gamma=gamma, tau=tau, scope=scope, normalize=normalize, convention=convention,
            correct_bias=correct_bias, maximize=maximize, capturable=capturable, backend=backend,
            foreach=foreach, compile=compile, chunk_elems=chunk_elems, amsgrad=amsgrad, fused=fused,
            differentiable=differentiable,
        )
        super().__init__(params, defaults, fp32_state)


class MGUPLion(_MGUPOptimizer):
    __doc__ = r"""Lion (Chen et al. 2023) with MGUP's per-coordinate scale.

    ``u = sign(b1*m + (1-b1)*g)``, score ``s = u * g``, ``p -= lr*phi*u``,
    then ``m = b2*m + (1-b2)*g``.  State: ``exp_avg``.
    """ + _COMMON_DOC

    rule_name = "lion"

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
        convention: str = "torch",
        maximize: bool = False,
        capturable: bool = False,
        backend: str = "auto",
        foreach: Optional[bool] = None,
        compile: bool = False,
        chunk_elems: Optional[int] = None,
        fp32_state: Optional[bool] = None,
    ):
        defaults = dict(
            lr=lr, betas=betas, weight_decay=weight_decay, mode=mode, mask_ratio=mask_ratio, alpha=alpha,
            gamma=gamma, tau=tau, scope=scope, normalize=normalize, convention=convention, maximize=maximize,
            capturable=capturable, backend=backend, foreach=foreach, compile=compile, chunk_elems=chunk_elems,
        )
        super().__init__(params, defaults, fp32_state)


class MGUPMuon(MGUPAdamW):
    r"""Muon (Moonlight form) with MGUP's per-coordinate scale, AdamW for the rest.

    Matrices (``use_muon=True`` groups; by default every 2-D param not listed in
    ``adamw_params``): ``buf = mu*buf + g``, ``x = g + mu*buf`` (Nesterov), score
    ``s = x * g`` (momentum before orthogonalisation), ``u = NS5(x)`` on the *whole*
    matrix (pieces held by other ranks are gathered), ``p *= 1 - lr*wd``,
    ``p -= lr * 0.2*sqrt(max(A,B)) * phi * u``.  Other params: MGUP-AdamW with
    ``betas``/``eps`` and the same lr.  ``ns_dtype``: the dtype Newton-Schulz runs in
    ("auto": bfloat16 on every device, as ``torch.optim.Muon``; "param": the param dtype,
    fp32 for half params; or a floating torch dtype).  Same-shape matrices run it batched.
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
        convention: str = "torch",
        maximize: bool = False,
        ns_dtype="auto",
        capturable: bool = False,
        backend: str = "auto",
        foreach: Optional[bool] = None,
        compile: bool = False,
        chunk_elems: Optional[int] = None,
        fp32_state: Optional[bool] = None,
    ):
        if isinstance(params, torch.Tensor):  # as torch.optim.Optimizer: a bare tensor is not a list of params
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or dicts, but got "
                + torch.typename(params)
            )
        adamw_params = [_tensor_of(p) for p in (adamw_params or [])]
        self._adamw_ids = {id(p) for p in adamw_params}
        params = list(params) if params is not None else params  # None: torch's TypeError, after the hyperparameters
        if params and not isinstance(params[0], dict):
            # split into matrices (Muon) and the rest (AdamW); (name, tensor) pairs stay pairs,
            # so that torch records param_names
            def is_matrix(p):
                t = _tensor_of(p)
                return isinstance(t, torch.Tensor) and t.ndim == 2 and id(t) not in self._adamw_ids

            muon = [p for p in params if is_matrix(p)]
            other = [p for p in params if not is_matrix(p)]
            named = any(isinstance(p, tuple) for p in params)
            extra = [p for p in adamw_params if all(p is not _tensor_of(q) for q in params)]
            if named and extra:
                raise ValueError("MGUPMuon: adamw_params not among named params need names too: pass them in params")
            params = [g for g in ({"params": muon, "use_muon": True}, {"params": other + extra, "use_muon": False}) if g["params"]]
        check_muon_options(ns_steps, momentum, nesterov, ns_dtype)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, mode=mode, mask_ratio=mask_ratio,
            alpha=alpha, gamma=gamma, tau=tau, scope=scope, normalize=normalize, convention=convention,
            maximize=maximize, backend=backend, foreach=foreach, compile=compile, chunk_elems=chunk_elems,
            momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype, use_muon=None,
            capturable=capturable,
        )
        _MGUPOptimizer.__init__(self, params, defaults, fp32_state)

    def _validate(self, group, where, mgup=True):
        if group.get("use_muon") is None:
            group["use_muon"] = all(p.ndim == 2 and id(p) not in self._adamw_ids for p in group["params"])
        group["rule"] = "muon" if group["use_muon"] else "adamw"
        super()._validate(group, where, mgup)
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


def _tensor_of(p):
    """The tensor of a params entry: a tensor, or torch's (name, tensor) pair."""
    return p[1] if isinstance(p, tuple) and len(p) == 2 else p


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
