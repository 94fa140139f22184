"""What a param group's values must satisfy: one ValueError naming the parameter and its
allowed values, checked at construction, at ``add_param_group``, after ``load_state_dict``
and, when a value changed since, at the next step.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from . import rules as R
from .kernels import BACKENDS
from .plan import SCOPES

__all__ = ["MODES", "DEFAULT_ALPHA", "DEFAULT_GAMMA", "REFUSED", "MGUP_KEYS", "GROUP_DEFAULTS", "check_range",
           "check_betas", "check_muon_options", "check_mgup", "check_group", "snapshot", "revalidate"]

MODES = ("topk", "cautious")
DEFAULT_ALPHA, DEFAULT_GAMMA = 2.0, 0.5  # the paper's robust setting, tau = 0.5

#: keys the optimizers accept with a torch meaning they cannot honour, and what to do instead
REFUSED = {
    "amsgrad": "MGUP has no AMSGrad variant; use amsgrad=False",
    "differentiable": "MGUP's selection is not differentiable; use differentiable=False",
    "fused": "MGUP chooses its fused kernels itself (backend='auto': Triton on CUDA, Inductor with compile=True on CPU); drop fused=",
}

#: the MGUP settings of a group (kept when a torch optimizer's state dict is loaded)
MGUP_KEYS = ("mode", "mask_ratio", "alpha", "gamma", "tau", "scope", "normalize", "foreach", "compile", "backend",
             "chunk_elems", "convention", "correct_bias", "rule")

#: what a group saved by an older version lacks, filled in on unpickling (``__setstate__``)
GROUP_DEFAULTS = (
    ("mode", "topk"), ("scope", "tensor"), ("normalize", False), ("foreach", None), ("compile", False),
    ("maximize", False), ("capturable", False), ("convention", "torch"), ("correct_bias", True),
    ("backend", "auto"), ("chunk_elems", None),
)


def check_range(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False, where: str = "") -> None:
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


def check_betas(betas, names=("betas[0]", "betas[1]"), where="") -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}{where}")
    for name, b in zip(names, betas):
        check_range(name, b, 0, 1, hi_open=True, where=where)


def check_muon_options(ns_steps, momentum, nesterov, ns_dtype="auto", where="") -> None:
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
        raise ValueError(f"ns_steps must be an integer >= 1, got {ns_steps!r}{where}")
    check_range("momentum", momentum, 0, 1, hi_open=True, where=where)
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov must be True or False, got {nesterov!r}{where}")
    if not (ns_dtype in ("auto", "param") or isinstance(ns_dtype, torch.dtype) and ns_dtype.is_floating_point):
        raise ValueError(f"ns_dtype must be 'auto', 'param' or a floating torch dtype, got {ns_dtype!r}{where}")


def _check_base(group: Dict[str, Any], where: str) -> None:
    """The base rule's values: lr and weight decay, and per rule betas / eps / Muon's."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"lr as a Tensor must be 1-element, got a tensor of shape {tuple(lr.shape)}{where}")
    if isinstance(lr, torch.Tensor) and lr.device.type != "cpu" and not group.get("capturable"):
        raise ValueError(f"lr is a {lr.device.type} tensor: pass capturable=True (CUDA graphs) or a float{where}")
    if not (isinstance(lr, torch.Tensor) and lr.device.type != "cpu"):
        check_range("lr", lr, 0, None, where=where)
    check_range("weight_decay", group["weight_decay"], 0, None, where=where)
    rule = group.get("rule")
    if rule not in R.RULES:
        raise ValueError(f"rule must be one of {tuple(R.RULES)}, got {rule!r}{where}")
    check_betas(group["betas"], where=where)
    if "eps" in group:
        check_range("eps", group["eps"], 0, None, where=where)
    if "ns_steps" in group:
        check_muon_options(group["ns_steps"], group["momentum"], group["nesterov"], group["ns_dtype"], where)


def check_mgup(group: Dict[str, Any], where: str) -> None:
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
        check_range("tau", tau, 0, 1, lo_open=True, where=where)
        group["alpha"], group["gamma"], group["tau"] = 1.0 / tau, float(tau), None
    if group.get("alpha") is None:
        group["alpha"] = DEFAULT_ALPHA
    if group.get("gamma") is None:
        group["gamma"] = DEFAULT_GAMMA
    check_range("mask_ratio", group["mask_ratio"], 0, 1, where=where)
    check_range("alpha", group["alpha"], 0, None, lo_open=True, where=where)
    check_range("gamma", group["gamma"], 0, group["alpha"], where=where)
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
    for key, why in REFUSED.items():
        if group.get(key):
            raise ValueError(f"{key}={group[key]!r} is not supported: {why}{where}")


def check_backend_device(group: Dict[str, Any], local_device, where: str) -> None:
    """backend="triton" runs CUDA kernels: CPU params are refused here rather than by
    Triton at the first launch ('0 active drivers').  ``local_device(p)``: a param's local device."""
    if group.get("backend") != "triton":
        return
    for i, p in enumerate(group["params"]):
        if local_device(p).type == "cpu":
            raise ValueError(
                f"backend='triton' runs CUDA kernels, but parameter {i} is on the CPU{where}; "
                "use backend='auto' or 'cpu' for CPU params"
            )


def check_group(group: Dict[str, Any], where: str, local_device=None, mgup: bool = True) -> None:
    """Everything a group's values must satisfy (``mgup=False``: the base rule's only, as
    torch checks hyperparameters before params); remembers what was validated, so that a
    step re-validates only a group whose values changed since (``revalidate``)."""
    _check_base(group, where)
    if not mgup:
        return
    check_mgup(group, where)
    if local_device is not None:
        check_backend_device(group, local_device, where)
    group["_validated"] = snapshot(group)


def snapshot(group) -> tuple:
    """The group's values as validated.  A one-element CPU tensor lr counts by value too
    (reading it is no device synchronisation), so an lr set to NaN in place is re-checked."""
    def shown(v):
        if not isinstance(v, torch.Tensor):
            return v
        if v.device.type == "cpu" and v.numel() == 1 and not torch.compiler.is_compiling():
            return ("tensor", v.data_ptr(), float(v))
        return ("tensor", v.data_ptr())

    return tuple((k, shown(v)) for k, v in sorted(group.items(), key=lambda kv: kv[0]) if k not in ("params", "_validated"))


def revalidate(param_groups, validate) -> None:
    """Re-check every group whose values changed since they were validated (a scheduler's
    lr, a user's edit): ``validate(group, where)``."""
    if torch.compiler.is_compiling():
        # traced, a python hyperparameter is a guard (a changed value recompiles, and the
        # eager step that follows re-validates); a tensor lr is not read back to the host
        return
    for i, group in enumerate(param_groups):
        if group.get("_validated") != snapshot(group):
            old = dict(group.get("_validated") or ())
            if (group.get("tau") is not None and old.get("tau") is None
                    and (group.get("alpha"), group.get("gamma")) == (old.get("alpha"), old.get("gamma"))):
                group["alpha"] = group["gamma"] = None  # tau set after construction: it gives alpha and gamma
            validate(group, f" (param group {i}, changed after construction)")


def lr_0d(lr):
    """A one-element lr tensor of any shape ((), (1,), (1, 1)) as a 0-d view: the kernels
    broadcast it against flat buffers and read it as a scalar (torch's AdamW accepts all three)."""
    if isinstance(lr, torch.Tensor) and lr.ndim > 0 and lr.numel() == 1:
        return lr.view(())
    return lr


def optional_bool(name: str, value: Optional[bool]) -> None:
    if value not in (None, True, False):
        raise ValueError(f"{name} must be None (auto), True or False, got {value!r}")


def constructor_kwargs(cls, exclude=("self", "params")) -> list:
    """The keyword arguments ``cls``'s constructor takes, following ``**kwargs`` up the MRO
    (``CMGUPAdamW(params, *args, mode="cautious", **kwargs)`` -> ``MGUPAdamW(...)``: the
    union), in order, without ``exclude``."""
    import inspect

    keys: list = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        forwards = False
        for name, p in inspect.signature(init).parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                forwards = True
            elif name not in exclude and name not in keys:
                keys.append(name)
        if not forwards:
            break
    return keys
