"""MGUP optimizers: thin ``torch.optim.Optimizer`` classes.

They validate hyperparameters, own the state (with torch's names, so DeepSpeed, DCP and
Megatron checkpoint converters carry it), know each parameter's :class:`Layout`, and hand
each param group to the pipeline (``mgup_dist.pipeline``: direction -> select -> apply)
with the backend of its device (``mgup_dist.kernels``).  No math lives here.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch.optim import Optimizer

from . import rules as R
from .collectives import all_gather_object, world_size
from .kernels import BACKENDS, Bufs, get_backend
from .layout import Layout, default_layout
from .pipeline import GroupStep, run_group
from .plan import SCOPES, build_plan, chunk_cap, collective_group

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


def _real(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A complex tensor as its real view (torch.view_as_real: [..., 2], each real and
    imaginary part one coordinate, as torch's AdamW steps complex params); others as given."""
    if t is not None and t.is_complex():
        return torch.view_as_real(t)
    return t


def _lr_0d(lr):
    """A one-element lr tensor of any shape ((), (1,), (1, 1)) as a 0-d view: the kernels
    broadcast it against flat buffers and read it as a scalar (torch's AdamW accepts all three)."""
    if isinstance(lr, torch.Tensor) and lr.ndim > 0 and lr.numel() == 1:
        return lr.view(())
    return lr


def _check_range(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False, where: str = "") -> None:
    """ValueError naming the parameter and its allowed interval (always finite)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}{where}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}{where}")
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
        hi is not None and (value > hi or (hi_open and value == hi))
    )
    if bad:
        interval = f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}{where}")


def _check_choice(name: str, value, allowed, where: str) -> None:
    if isinstance(value, bool) and not all(isinstance(a, bool) or a is None for a in allowed):
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}{where}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}{where}")


#: keys the optimizers accept with a torch meaning they cannot honour, and what to do instead
_REFUSED = {
    "amsgrad": "MGUP has no AMSGrad variant; use amsgrad=False",
    "differentiable": "MGUP's selection is not differentiable; use differentiable=False",
    "fused": "MGUP chooses its fused kernels itself (backend='auto': Triton on CUDA, Inductor with compile=True on CPU); drop fused=",
}


def _mgup_options(group: Dict[str, Any], where: str) -> None:
    """Validate and normalise the MGUP keys of a param group in place (tau -> alpha, gamma)."""
    _check_choice("mode", group.get("mode"), MODES, where)
    _check_choice("scope", group.get("scope"), SCOPES, where)
    _check_choice("convention", group.get("convention", "torch"), R.CONVENTIONS, where)
    _check_choice("backend", group.get("backend", "auto"), BACKENDS, where)
    tau = group.get("tau")
    if tau is not None:
        if group.get("alpha") is not None or group.get("gamma") is not None:
            raise ValueError(
                f"tau is shorthand for alpha=1/tau, gamma=tau: give either tau or alpha/gamma, not both{where}"
            )
        _check_range("tau", tau, 0, 1, lo_open=True, where=where)
        group["alpha"], group["gamma"], group["tau"] = 1.0 / tau, float(tau), None
    if group.get("alpha") is None:
        group["alpha"] = DEFAULT_ALPHA
    if group.get("gamma") is None:
        group["gamma"] = DEFAULT_GAMMA
    _check_range("mask_ratio", group["mask_ratio"], 0, 1, where=where)
    _check_range("alpha", group["alpha"], 0, None, lo_open=True, where=where)
    _check_range("gamma", group["gamma"], 0, group["alpha"], where=where)
    for key in ("normalize", "maximize", "capturable", "correct_bias"):
        if not isinstance(group.get(key, False), bool):
            raise ValueError(f"{key} must be True or False, got {group.get(key)!r}{where}")
    if group.get("foreach") not in (None, True, False):
        raise ValueError(f"foreach must be None, True or False, got {group.get('foreach')!r}{where}")
    ce = group.setdefault("chunk_elems", None)
    if ce is not None and (isinstance(ce, bool) or not isinstance(ce, int) or ce < 1):
        raise ValueError(f"chunk_elems must be None (by device) or an integer >= 1, got {ce!r}{where}")
    if group.setdefault("compile", False) not in (True, False):
        raise ValueError(f"compile must be True or False, got {group.get('compile')!r}{where}")
    for key, why in _REFUSED.items():
        if group.get(key):
            raise ValueError(f"{key}={group[key]!r} is not supported: {why}{where}")


def _check_backend_device(group: Dict[str, Any], where: str) -> None:
    """backend="triton" runs CUDA kernels: CPU params are refused here rather than by
    Triton at the first launch ('0 active drivers')."""
    if group.get("backend") != "triton":
        return
    for i, p in enumerate(group["params"]):
        if _local(p).device.type == "cpu":
            raise ValueError(
                f"backend='triton' runs CUDA kernels, but parameter {i} is on the CPU{where}; "
                "use backend='auto' or 'cpu' for CPU params"
            )


#: what decides which collectives run and what is selected: checked across ranks
_AGREE = ("rule", "mode", "scope", "mask_ratio", "alpha", "gamma", "normalize", "convention", "chunk_elems")
#: what shapes every update and may change between steps (a scheduler's lr): checked
#: across ranks every step (``check_agreement="step"``) or when the plan is built ("plan")
_AGREE_STEP = ("lr", "betas", "eps", "weight_decay", "maximize", "momentum", "nesterov", "ns_steps", "correct_bias")
#: accelerators: the result of step t's agreement all-reduce is read at step t + this
#: (long finished by then: no stall), identically on every rank
_AGREE_LAG = 8


class _MGUPOptimizer(Optimizer):
    """Shared machinery: MGUP options, layouts, the plan cache, the step."""

    rule_name = "adamw"

    def __init__(self, params, defaults: Dict[str, Any], fp32_state: Optional[bool]):
        if fp32_state not in (None, True, False):
            raise ValueError(f"fp32_state must be None (auto), True or False, got {fp32_state!r}")
        self.fp32_state = fp32_state
        self._layouts: Dict[int, Tuple[torch.Tensor, Layout]] = {}
        self._plans: Dict[int, Tuple[Any, Any]] = {}
        self._scratch: Dict[Any, torch.Tensor] = {}
        defaults.setdefault("rule", self.rule_name)
        for key, val in (("maximize", False), ("capturable", False), ("convention", "torch"), ("correct_bias", True), ("backend", "auto")):
            defaults.setdefault(key, val)
        for key in _REFUSED:
            defaults.setdefault(key, False)
        _mgup_options(defaults, " (the optimizer's defaults)")  # opt.defaults shows the resolved alpha/gamma
        # the hyperparameters before the params, as torch's optimizers check them
        self._validate_group(dict(defaults, params=[]), " (the optimizer's defaults)")
        super().__init__(params, defaults)

    # -- param groups ---------------------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if isinstance(param_group, dict) and param_group.get("tau") is not None:
            # tau -> (1/tau, tau) for this group: the defaults' resolved alpha/gamma must not
            # fill in first (torch copies every default the group lacks); alpha/gamma given
            # in the same dict as tau are still refused by _mgup_options
            param_group = dict(param_group)
            param_group.setdefault("alpha", None)
            param_group.setdefault("gamma", None)
        where = f" (param group {len(self.param_groups)})"
        super().add_param_group(param_group)
        group = self.param_groups[-1]
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
                if p.dtype.is_complex and (_is_dtensor(p) or group.get("rule") == "muon"):
                    raise ValueError(
                        f"{type(self).__name__}: parameter {i} is complex ({p.dtype}); complex params are stepped as "
                        "their real view on whole tensors with the AdamW or Lion rule only, not as a DTensor or in a "
                        f"use_muon=True group{where}"
                    )
        except ValueError:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise

    def _validate(self, group: Dict[str, Any], where: str) -> None:
        """Everything a group's values must satisfy; remembers what was validated, so that
        ``step`` re-validates only a group whose values changed since."""
        self._validate_group(group, where)
        _mgup_options(group, where)
        _check_backend_device(group, where)
        group["_validated"] = self._snapshot(group)

    @staticmethod
    def _snapshot(group) -> tuple:
        return tuple(
            (k, v if not isinstance(v, torch.Tensor) else ("tensor", v.data_ptr()))
            for k, v in sorted(group.items(), key=lambda kv: kv[0]) if k not in ("params", "_validated")
        )

    def _revalidate(self) -> None:
        if torch.compiler.is_compiling():
            # traced, a python hyperparameter is a guard (a changed value recompiles, and the
            # eager step that follows re-validates); a tensor lr is not read back to the host
            return
        for i, group in enumerate(self.param_groups):
            if group.get("_validated") != self._snapshot(group):
                old = dict(group.get("_validated") or ())
                if (group.get("tau") is not None and old.get("tau") is None
                        and (group.get("alpha"), group.get("gamma")) == (old.get("alpha"), old.get("gamma"))):
                    group["alpha"] = group["gamma"] = None  # tau set after construction: it gives alpha and gamma
                self._validate(group, f" (param group {i}, changed after construction)")

    def _validate_group(self, group: Dict[str, Any], where: str) -> None:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"lr as a Tensor must be 1-element, got a tensor of shape {tuple(lr.shape)}{where}")
        if isinstance(lr, torch.Tensor) and lr.device.type != "cpu" and not group.get("capturable"):
            raise ValueError(f"lr is a {lr.device.type} tensor: pass capturable=True (CUDA graphs) or a float{where}")
        if not (isinstance(lr, torch.Tensor) and lr.device.type != "cpu"):
            _check_range("lr", lr, 0, None, where=where)
        _check_range("weight_decay", group["weight_decay"], 0, None, where=where)
        if group.get("rule", self.rule_name) not in R.RULES:
            raise ValueError(f"rule must be one of {tuple(R.RULES)}, got {group.get('rule')!r}{where}")

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads an MGUP state dict, or a torch optimizer's whose state this rule can
        continue from (``torch.optim.AdamW`` into ``MGUPAdamW``): its moments and step are
        carried over and the MGUP hyperparameters of this optimizer are kept (a warning
        says which were taken from where).  Another rule's state is refused by name.
        torch casts loaded floating state to the param dtype: fp32 state of
        half-precision params is put back in fp32 (the saved values, not rounded ones)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}"
            )
        foreign = []
        for i, (saved, mine) in enumerate(zip(saved_groups, self.param_groups)):
            rule = saved.get("rule")
            want = mine["rule"]
            if rule is not None and rule != want:
                raise ValueError(
                    f"load_state_dict: param group {i} holds {rule!r} state ({_RULE_CLASS.get(rule, rule)}); "
                    f"this {type(self).__name__} group runs {want!r}: load it into {_RULE_CLASS.get(rule, rule)} instead"
                )
            if rule is None:
                foreign.append(i)
        self._check_state_names(state_dict)
        self._check_state_tensors(state_dict)
        kept = {i: {k: v for k, v in self.param_groups[i].items() if k not in ("params",)} for i in foreign}
        keep = {}
        saved_ids = [pid for g in saved_groups for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            st = state_dict["state"].get(pid, {})
            if self._state_dtype(_local(p)) == torch.float32 and p.dtype != torch.float32:
                keep[id(p)] = {k: v for k, v in st.items() if torch.is_tensor(v) and k != "step" and v.dtype == torch.float32}
        super().load_state_dict(state_dict)
        for i, mine in kept.items():
            group = self.param_groups[i]
            taken = sorted(k for k in group if k in mine and k not in _MGUP_KEYS and k != "_validated")
            for k, v in mine.items():
                if k in _MGUP_KEYS or k not in group:
                    group[k] = v
            warnings.warn(
                f"{type(self).__name__}.load_state_dict: param group {i} comes from a non-MGUP optimizer: its moments, "
                f"step and {', '.join(taken)} were loaded; the MGUP settings of this optimizer were kept "
                f"({', '.join(f'{k}={mine[k]!r}' for k in _MGUP_KEYS if k in mine)})",
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

    def _check_state_names(self, state_dict) -> None:
        """The saved state of each param must be this rule's (a subset of its names)."""
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        rules_of = [self._rule(g).name for g in self.param_groups for _ in g["params"]]
        for pid, rule in zip(saved_ids, rules_of):
            st = state_dict["state"].get(pid)
            if not st:
                continue
            allowed = set(R.RULES[rule].state) | ({"step"} if R.RULES[rule].step else set())
            known = {"step", "max_exp_avg_sq"} | {n for r in R.RULES.values() for n in r.state}
            extra = sorted((set(st) & known) - allowed)  # another rule's names (keys nobody knows pass, as in torch)
            if extra:
                names = sorted(st)
                raise ValueError(
                    f"load_state_dict: a parameter's saved state has {names}, which is not {rule!r} state "
                    f"(expected {sorted(allowed)}); it comes from another optimizer: load it into that one"
                )

    def _check_state_tensors(self, state_dict) -> None:
        """Each saved state must fit its param: every name of the rule present, each state
        tensor floating (complex for a complex param) with the param's local shape (a flat
        state of the same size also fits: the step reads it flat).  Otherwise a ValueError
        naming the param and the key now, not a wrong step later (torch would cast and
        load a 4x5 moment into a 3x3 param, and a step would read its first 9 values)."""
        saved = state_dict["param_groups"]
        if any(len(s["params"]) != len(m["params"]) for s, m in zip(saved, self.param_groups)):
            return  # torch's load_state_dict refuses this with its own message
        for gi, (sg, group) in enumerate(zip(saved, self.param_groups)):
            rule = self._rule(group)
            required = list(rule.state) + (["step"] if rule.step else [])
            for pos, (pid, p) in enumerate(zip(sg["params"], group["params"])):
                st = state_dict["state"].get(pid)
                if not st:
                    continue  # not stepped yet: created at the first step
                where = f"param group {gi}, parameter {pos}"
                missing = [k for k in required if k not in st]
                if missing:
                    raise ValueError(
                        f"load_state_dict: the saved state of {where} lacks {missing} (has {sorted(st)}); "
                        f"{rule.name!r} state needs {required}"
                    )
                if rule.step:
                    step = st["step"]
                    bad = (torch.is_tensor(step) and step.numel() != 1) or (
                        not torch.is_tensor(step) and (isinstance(step, bool) or not isinstance(step, (int, float))))
                    if bad:
                        shown = f"a tensor of shape {tuple(step.shape)}" if torch.is_tensor(step) else repr(step)
                        raise ValueError(f"load_state_dict: 'step' of {where} must be a number or a one-element "
                                         f"tensor, got {shown}")
                local = _local(p)
                for k in rule.state:
                    v = st[k]
                    if not torch.is_tensor(v):
                        raise ValueError(f"load_state_dict: {k!r} of {where} must be a tensor, got {type(v).__name__}")
                    lv = _local(v)
                    ok_dtype = lv.dtype.is_complex if local.dtype.is_complex else lv.dtype.is_floating_point
                    if not ok_dtype:
                        raise ValueError(
                            f"load_state_dict: {k!r} of {where} is {lv.dtype}; the param is {local.dtype}: "
                            f"expected a {'complex' if local.dtype.is_complex else 'floating'} tensor"
                        )
                    fits = lv.shape == local.shape or (lv.ndim == 1 and lv.numel() == local.numel())
                    if not fits:
                        raise ValueError(
                            f"load_state_dict: {k!r} of {where} has shape {tuple(lv.shape)}, the param's local shape "
                            f"is {tuple(local.shape)}: the state belongs to another parameter or model"
                        )

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_layouts", {})
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_scratch", {})
        self.__dict__.setdefault("_given", {id(p): weakref.ref(p) for g in self.param_groups for p in g["params"]})
        self.__dict__.setdefault("fp32_state", None)
        self.__dict__.setdefault("_adamw_ids", set())  # MGUPMuon: ids of another process's tensors mean nothing
        for group in self.param_groups:
            for key, val in (
                ("mode", "topk"), ("scope", "tensor"), ("normalize", False), ("foreach", None), ("compile", False),
                ("maximize", False), ("capturable", False), ("convention", "torch"), ("correct_bias", True),
                ("backend", "auto"), ("rule", self.rule_name), ("chunk_elems", None),
            ):
                group.setdefault(key, val)
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not torch.is_tensor(st["step"]):
                    # a numeric step (older checkpoints, hand-built state): the float32 0-d counter
                    # the step increments in place, on the device only with capturable (as torch)
                    dev = _local(p).device if group["capturable"] else torch.device("cpu")
                    st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32, device=dev)

    def __getstate__(self):
        # torch pickles defaults, state and param_groups only: fp32_state decides the state
        # dtype of params added later, so a copy must keep it
        state = super().__getstate__()
        state["fp32_state"] = self.fp32_state
        return state

    def state_dict(self):
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g.pop("_validated", None)
        return sd

    # -- layouts --------------------------------------------------------------------------
    def set_layout(self, param: torch.Tensor, layout: Layout) -> None:
        """Declare how ``param``'s local buffer maps to original tensors.  Call it on every
        rank, for the tensor object the optimizer's param groups hold."""
        if not isinstance(layout, Layout):
            raise ValueError(f"layout must be a mgup_dist.layout.Layout, got {type(layout).__name__}")
        local = _real(_local(param))  # complex: the real view's elements
        if layout.numel != local.numel():
            raise ValueError(
                f"layout describes a buffer of {layout.numel} elements but the parameter holds {local.numel()} locally"
            )
        self._layouts[id(param)] = (param, layout)
        self._plans.clear()

    def layout_of(self, param: torch.Tensor) -> Layout:
        hit = self._layouts.get(id(param))
        if hit is not None and hit[0] is param:
            return hit[1]
        tid = self._default_tensor_id(param)
        given = self._given.get(id(param))  # a buffer a wrapper swapped in has a layout only its wrapper knows
        layout = default_layout(param, tid, replaced=given is None or given() is not param,
                                whole_matrices="use_muon" in self.defaults)
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

    # -- state ----------------------------------------------------------------------------
    def _state_dtype(self, local: torch.Tensor) -> torch.dtype:
        """fp32 state on request, and by default for fp16 params: Adam's (1-b2)*g^2 and eps
        = 1e-8 lie below fp16's smallest subnormal, so fp16 moments turn m / (sqrt(v)+eps)
        into m / 0.  bf16 has fp32's exponent range and keeps the param dtype by default."""
        if local.dtype in (torch.float16, torch.bfloat16):
            if self.fp32_state or (self.fp32_state is None and local.dtype == torch.float16):
                return torch.float32
        return local.dtype

    def _zeros_state(self, p: torch.Tensor) -> torch.Tensor:
        """A zero state tensor like p (a DTensor when p is one), in the state dtype, contiguous."""
        return torch.zeros_like(p, dtype=self._state_dtype(_local(p)), memory_format=torch.contiguous_format)

    def _rule(self, group) -> R.Rule:
        return R.RULES[group["rule"]]

    def _init_state(self, p, rule: R.Rule, group) -> Dict[str, torch.Tensor]:
        state = self.state[p]
        if len(state) == 0:
            if rule.step:
                dev = _local(p).device if group["capturable"] else torch.device("cpu")
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=dev)
            for name in rule.state:
                state[name] = self._zeros_state(p)
        return state

    def init_state(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Create ``p``'s state (zeros, step 0) if it has none, as the first step would;
        frameworks that save state before the first step (Megatron) call this."""
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return self._init_state(p, self._rule(group), group)
        raise ValueError("init_state: the tensor is not in this optimizer's param groups")

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
        self._revalidate()
        self._check_step_agreement()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _plan(self, group, layouts: List[Layout], rule: R.Rule, device: torch.device):
        """The group's plan (from layouts and hyperparameters only), built on the first step
        and after a change; building it checks, across the ranks of the group's process
        group, that the hyperparameters that decide collectives and selection agree."""
        cap = chunk_cap(device.type, group.get("chunk_elems"))
        key = (tuple(id(lay) for lay in layouts), group["scope"], group["mask_ratio"], rule.matrix, cap, *(group[k] for k in _AGREE))
        hit = self._plans.get(id(group))
        if hit is not None and hit[0] == key:
            return hit[1]
        self._check_agreement(group, layouts)
        plan = build_plan(layouts, group["scope"], group["mask_ratio"], assemble=rule.matrix, cap=cap)
        self._plans[id(group)] = (key, plan)
        return plan

    def _check_agreement(self, group, layouts: List[Layout]) -> None:
        """ValueError naming the first hyperparameter on which the ranks differ (instead of
        silently drifting replicas or a collective that never completes)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if any(lay.collective for lay in layouts):  # Layout.collective is the same on every rank
            pg = collective_group(layouts)
        elif getattr(self, "_replica_group", False) is not False:
            pg = self._replica_group  # declared replicated (DDP): see replicated()
        else:
            return  # plain tensors: this optimizer may be rank-local (pipeline stages, references)
        if world_size(pg) == 1:
            return
        mine = {k: group[k] for k in _AGREE}
        if self.check_agreement == "plan":
            mine.update({k: group[k] for k in _AGREE_STEP if k in group and not torch.is_tensor(group[k])})
        mine["split tensors (id, numel)"] = sorted({c for lay in layouts for c in lay.collective}, key=repr)
        if all(lay.group is None and not lay.collective for lay in layouts):
            mine["param shapes"] = [tuple(p.shape) for p in group["params"]]
        everyone = all_gather_object(mine, pg)
        for k in mine:
            vals = [d[k] for d in everyone]
            if any(v != vals[0] for v in vals):
                shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(vals))
                raise ValueError(
                    f"{type(self).__name__}: the ranks disagree on {k} ({shown}); every rank must use the same "
                    f"{k} for a param group (it decides what is selected and which collectives run)"
                )

    def replicated(self, process_group=None) -> "_MGUPOptimizer":
        """Declare that this optimizer runs replicated over ``process_group`` (DDP: the same
        params and gradients on every rank).  Then the first step (and the first after a
        change) checks that all ranks agree on the hyperparameters that decide the selection,
        and raises a ValueError naming the parameter and the ranks' values instead of
        letting the replicas drift apart.  Sharded layouts (FSDP, ZeRO, Megatron) are
        checked over their own group without this.  Returns self."""
        self._replica_group = process_group
        self._plans.clear()
        return self

    #: "step": every step one all-reduce (int64 MAX of [bits, -bits]) of each distributed
    #: group's _AGREE_STEP values, compared exactly; on CPU/gloo checked at once, on
    #: accelerators read _AGREE_LAG steps later (no host synchronisation).  "plan": only
    #: when the plan is built (first step, after a change of _AGREE): no per-step
    #: collective, but an lr changed by a scheduler on one rank only goes unnoticed.
    check_agreement = "step"

    def _agreement_pg(self, group):
        """(True, process group) when ``group`` must agree across ranks, else (False, None)."""
        layouts = [self.layout_of(p) for p in group["params"]]
        if any(lay.collective or lay.group is not None for lay in layouts):
            return True, collective_group(layouts)
        if getattr(self, "_replica_group", False) is not False:
            return True, self._replica_group
        return False, None

    def _check_step_agreement(self) -> None:
        import torch.distributed as dist

        if self.check_agreement not in ("step", "plan"):
            raise ValueError(f"check_agreement must be 'step' or 'plan', got {self.check_agreement!r}")
        pending = self.__dict__.setdefault("_agree_pending", [])
        while pending and pending[0][0] <= self.__dict__.get("_agree_step", 0):
            _, args = pending.pop(0)
            self._raise_on_disagreement(*args)
        self._agree_step = self.__dict__.get("_agree_step", 0) + 1
        if self.check_agreement != "step" or not (dist.is_available() and dist.is_initialized()):
            return
        if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return  # a traced or captured step replays without its host side: checked by the eager steps
        by_pg: Dict[int, Tuple[Any, List]] = {}
        for i, group in enumerate(self.param_groups):
            if not group["params"]:
                continue
            needed, pg = self._agreement_pg(group)
            if not needed or world_size(pg) == 1:
                continue
            entry = by_pg.setdefault(id(pg), (pg, []))
            for k in _AGREE_STEP:
                v = group.get(k)
                if v is None or torch.is_tensor(v):   # a device-tensor lr (capturable) is not read on the host
                    continue
                for j, x in enumerate(v if isinstance(v, (tuple, list)) else (v,)):
                    entry[1].append((i, k if not isinstance(v, (tuple, list)) else f"{k}[{j}]", float(x), x))
        for pg, entries in by_pg.values():
            backend = str(dist.get_backend(pg))
            device = torch.device("cpu") if "gloo" in backend else _local(self.param_groups[entries[0][0]]["params"][0]).device
            vals = torch.tensor([e[2] for e in entries], dtype=torch.float64) + 0.0   # -0.0 -> 0.0
            bits = vals.view(torch.int64)
            buf = torch.cat([bits, -bits])
            if device.type == "cpu":
                dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=pg)
                self._raise_on_disagreement(buf, entries, pg)
                continue
            # pinned both ways and an event: the host never waits on the stream's newer work
            buf = buf.pin_memory().to(device, non_blocking=True)
            dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=pg)
            host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
            host.copy_(buf, non_blocking=True)
            event = torch.get_device_module(device).Event()
            event.record()
            pending.append((self._agree_step + _AGREE_LAG, (host, entries, pg, event)))

    def _raise_on_disagreement(self, buf: torch.Tensor, entries: List, pg, event=None) -> None:
        if event is not None:
            event.synchronize()   # recorded _AGREE_LAG steps ago: long complete
        n = len(entries)
        differ = (buf[:n] != -buf[n:]).tolist()
        if not any(differ):
            return
        # rare path, entered by every rank of pg at once (they all read the same result)
        mine = [e[3] for e in entries]
        everyone = all_gather_object(mine, pg)
        j = differ.index(True)
        i, k = entries[j][:2]
        shown = ", ".join(f"rank {r}: {vals[j]!r}" for r, vals in enumerate(everyone))
        raise ValueError(
            f"{type(self).__name__}: the ranks disagree on {k} of param group {i} ({shown}); every rank must step "
            f"with the same {k.split('[')[0]} (also after a scheduler changes it), or the replicas / shards drift apart"
        )

    def _workspace(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat buffer of >= n elements.  CPU: kept across steps and grown as needed
        (writing fresh memory costs several times more than reusing it: page faults), up to
        one byte per parameter of this optimizer in all (the bound on what MGUP holds beyond
        AdamW's state); a larger chunk's scratch (a tensor over ~25 % of the model, in
        4-byte keys) is made for the step and freed.  Other devices: fresh from the caching
        allocator, so nothing is held between steps."""
        if device.type != "cpu":
            return torch.empty(n, dtype=dtype, device=device)
        key = dtype
        buf = self._scratch.get(key)
        if buf is not None and buf.numel() >= n:
            return buf
        itemsize = torch.empty((), dtype=dtype).element_size()
        budget = sum(_local(p).numel() for g in self.param_groups for p in g["params"])
        budget -= sum(b.untyped_storage().nbytes() for k, b in self._scratch.items() if k != key)
        if n * itemsize > budget:
            return torch.empty(n, dtype=dtype)
        buf = torch.empty(n, dtype=dtype)
        self._scratch[key] = buf
        return buf

    def release_scratch(self) -> None:
        """Free the CPU scratch kept between steps (it is re-made on the next step)."""
        self._scratch.clear()

    def _step_group(self, group):
        self._run_rule(group, self._rule(group), group["params"])

    def _bias_corrections(self, group, steps: List[torch.Tensor], has_grad: List[bool]):
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
        torch._foreach_add_(steps, 1)
        b1, b2 = group["betas"]
        if not group["capturable"] and not torch.compiler.is_compiling():
            ts = iter(torch.stack(steps).tolist())  # host tensors: no device synchronisation
            per = [(1 - b1 ** t, 1 - b2 ** t) for t in ts]
        else:
            x = torch.stack(steps)
            if x.device.type == "cpu":
                x = x.to(torch.float64)
            cache = self.__dict__.setdefault("_beta_tables", {})
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

    def _run_rule(self, group, rule: R.Rule, params: List[torch.Tensor]) -> None:
        if not params:
            return
        locs, grads, layouts, has_grad, writeback = [], [], [], [], []
        for p in params:
            g = p.grad
            if g is not None and g.is_sparse:
                raise SparseGradientError(f"{type(self).__name__} does not support sparse gradients")
            lp, lg = _real(_local(p)), _real(_local(g))  # complex: its real view, as torch's AdamW
            if lg is not None and lg.shape != lp.shape:
                raise ValueError(
                    f"{type(self).__name__}: a gradient of shape {tuple(lg.shape)} for a parameter of local shape "
                    f"{tuple(lp.shape)}"
                )
            layouts.append(self.layout_of(p))
            live = lg is not None  # also an empty shard: its state exists as on the other ranks (DCP)
            has_grad.append(live)
            flat = lp.view(-1) if lp.is_contiguous() else lp.contiguous().view(-1)
            if not lp.is_contiguous() and live:
                writeback.append((lp, flat))
            locs.append(flat if live else None)
            grads.append(lg.reshape(-1) if live else None)
        states: Dict[str, List[Optional[torch.Tensor]]] = {name: [] for name in rule.state}
        steps = []
        for p, live in zip(params, has_grad):
            if not live:
                for name in rule.state:
                    states[name].append(None)
                continue
            st = self._init_state(p, rule, group)
            for name in rule.state:
                states[name].append(_real(_local(st[name])).view(-1))
            if rule.step:
                steps.append(st["step"])
        bc1, bc2 = self._bias_corrections(group, steps, has_grad)
        device = _local(params[0]).device
        wide = any(_real(_local(p)).dtype == torch.float64 for p in params)
        fdt = torch.float64 if wide else torch.float32
        plan = self._plan(group, layouts, rule, device)
        if group["backend"] == "triton" and device.type == "cpu":
            _check_backend_device(group, " (at step)")
        foreach = True if group["foreach"] is None else group["foreach"]
        backend = get_backend(device, foreach=foreach, compile=group["compile"], kind=group["backend"])
        hp = {k: v for k, v in group.items() if k not in ("params", "_validated")}
        hp["lr"] = _lr_0d(hp["lr"])
        # the last statement: torch.compile(opt.step) breaks the graph inside, and nothing
        # (no view of a param) must be live in the frame it resumes afterwards
        return run_group(backend, GroupStep(rule, hp, plan, Bufs(locs, grads, states, bc1, bc2), has_grad, device, fdt,
                                            lambda n, dtype, dev: self._workspace(n, dtype, dev), writeback))


_MGUP_KEYS = ("mode", "mask_ratio", "alpha", "gamma", "tau", "scope", "normalize", "foreach", "compile", "backend", "chunk_elems",
              "convention", "correct_bias", "rule")
_RULE_CLASS = {"adamw": "MGUPAdamW", "lion": "MGUPLion", "muon": "MGUPMuon"}


def _check_betas(betas, names=("betas[0]", "betas[1]"), where="") -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}{where}")
    for name, b in zip(names, betas):
        _check_range(name, b, 0, 1, hi_open=True, where=where)


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

    def _validate_group(self, group, where):
        super()._validate_group(group, where)
        _check_betas(group["betas"], where=where)
        _check_range("eps", group["eps"], 0, None, where=where)


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

    def _validate_group(self, group, where):
        super()._validate_group(group, where)
        _check_betas(group["betas"], where=where)


class MGUPMuon(MGUPAdamW):
    r"""Muon (Moonlight form) with MGUP's per-coordinate scale, AdamW for the rest.

    Matrices (``use_muon=True`` groups; by default every 2-D param not listed in
    ``adamw_params``): ``buf = mu*buf + g``, ``x = g + mu*buf`` (Nesterov), score
    ``s = x * g`` (momentum before orthogonalisation), ``u = NS5(x)`` on the *whole*
    matrix (pieces held by other ranks are gathered), ``p *= 1 - lr*wd``,
    ``p -= lr * 0.2*sqrt(max(A,B)) * phi * u``.  Other params: MGUP-AdamW with
    ``betas``/``eps`` and the same lr.  ``ns_dtype``: the dtype Newton-Schulz runs in
    ("auto": bfloat16 on CUDA as Muon's authors do, the param dtype (fp32 for half
    params) elsewhere; "param"; or a torch dtype).
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
        _check_muon_options(ns_steps, momentum, nesterov, ns_dtype)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, mode=mode, mask_ratio=mask_ratio,
            alpha=alpha, gamma=gamma, tau=tau, scope=scope, normalize=normalize, convention=convention,
            maximize=maximize, backend=backend, foreach=foreach, compile=compile, chunk_elems=chunk_elems,
            momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype, use_muon=None,
        )
        _MGUPOptimizer.__init__(self, params, defaults, fp32_state)

    def _validate_group(self, group, where):
        if group.get("use_muon") is None:
            group["use_muon"] = all(p.ndim == 2 and id(p) not in self._adamw_ids for p in group["params"])
        group["rule"] = "muon" if group["use_muon"] else "adamw"
        super()._validate_group(group, where)
        _check_muon_options(group["ns_steps"], group["momentum"], group["nesterov"], group["ns_dtype"], where)
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


def _check_muon_options(ns_steps, momentum, nesterov, ns_dtype="auto", where="") -> None:
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
        raise ValueError(f"ns_steps must be an integer >= 1, got {ns_steps!r}{where}")
    _check_range("momentum", momentum, 0, 1, hi_open=True, where=where)
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov must be True or False, got {nesterov!r}{where}")
    if not (ns_dtype in ("auto", "param") or isinstance(ns_dtype, torch.dtype) and ns_dtype.is_floating_point):
        raise ValueError(f"ns_dtype must be 'auto', 'param' or a floating torch dtype, got {ns_dtype!r}{where}")


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
