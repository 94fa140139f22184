"""Optimizer state in torch's names and dtypes (``exp_avg``, ``exp_avg_sq``, ``step``,
``momentum_buffer``): its creation, and the checks a loaded state dict passes before it
replaces the live one (another rule's state, a wrong shape or dtype are refused by name).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from . import rules as R
from .layout import local_of

__all__ = ["RULE_CLASS", "state_dtype", "init_state", "check_loaded", "fp32_to_keep", "numeric_steps_to_tensors"]

RULE_CLASS = {"adamw": "MGUPAdamW", "lion": "MGUPLion", "muon": "MGUPMuon"}


def state_dtype(local: torch.Tensor, fp32_state: Optional[bool]) -> torch.dtype:
    """fp32 state on request, and by default for fp16 params: Adam's (1-b2)*g^2 and eps
    = 1e-8 lie below fp16's smallest subnormal, so fp16 moments turn m / (sqrt(v)+eps)
    into m / 0.  bf16 has fp32's exponent range and keeps the param dtype by default."""
    if local.dtype in (torch.float16, torch.bfloat16):
        if fp32_state or (fp32_state is None and local.dtype == torch.float16):
            return torch.float32
    return local.dtype


def init_state(state: Dict[str, Any], p: torch.Tensor, rule: R.Rule, capturable: bool,
               fp32_state: Optional[bool]) -> Dict[str, Any]:
    """``p``'s state as the first step makes it: zeros like p (a DTensor when p is one,
    contiguous, in the state dtype) and a float32 0-d ``step`` counter, on the device only
    with ``capturable`` (as torch's optimizers)."""
    if len(state) == 0:
        if rule.step:
            dev = local_of(p).device if capturable else torch.device("cpu")
            state["step"] = torch.zeros((), dtype=torch.float32, device=dev)  # a fill: no host copy
        dtype = state_dtype(local_of(p), fp32_state)
        for name in rule.state:
            state[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
    return state


def check_loaded(state_dict, param_groups, cls_name: str) -> list:
    """Everything a loaded state dict must satisfy before torch's ``load_state_dict`` takes
    it; returns the indices of groups saved by a non-MGUP optimizer (no ``rule`` key)."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} param groups, this optimizer {len(param_groups)}"
        )
    foreign = []
    for i, (saved, mine) in enumerate(zip(saved_groups, param_groups)):
        rule = saved.get("rule")
        want = mine["rule"]
        if rule is not None and rule != want:
            raise ValueError(
                f"load_state_dict: param group {i} holds {rule!r} state ({RULE_CLASS.get(rule, rule)}); "
                f"this {cls_name} group runs {want!r}: load it into {RULE_CLASS.get(rule, rule)} instead"
            )
        if rule is None:
            foreign.append(i)
    _check_names(state_dict, param_groups)
    _check_tensors(state_dict, param_groups)
    return foreign


def _check_names(state_dict, param_groups) -> None:
    """The saved state of each param must be this rule's (a subset of its names)."""
    saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
    rules_of = [g["rule"] for g in param_groups for _ in g["params"]]
    known = {"step", "max_exp_avg_sq"} | {n for r in R.RULES.values() for n in r.state}
    for pid, rule in zip(saved_ids, rules_of):
        st = state_dict["state"].get(pid)
        if not st:
            continue
        allowed = set(R.RULES[rule].state) | ({"step"} if R.RULES[rule].step else set())
        extra = sorted((set(st) & known) - allowed)  # another rule's names (keys nobody knows pass, as in torch)
        if extra:
            raise ValueError(
                f"load_state_dict: a parameter's saved state has {sorted(st)}, which is not {rule!r} state "
                f"(expected {sorted(allowed)}); it comes from another optimizer: load it into that one"
            )


def _check_tensors(state_dict, param_groups) -> None:
    """Each saved state must fit its param: every name of the rule present, each state
    tensor floating (complex for a complex param) with the param's local shape (a flat
    state of the same size also fits: the step reads it flat).  Otherwise a ValueError
    naming the param and the key now, not a wrong step later (torch would cast and
    load a 4x5 moment into a 3x3 param, and a step would read its first 9 values)."""
    saved = state_dict["param_groups"]
    if any(len(s["params"]) != len(m["params"]) for s, m in zip(saved, param_groups)):
        return  # torch's load_state_dict refuses this with its own message
    for gi, (sg, group) in enumerate(zip(saved, param_groups)):
        rule = R.RULES[group["rule"]]
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
            local = local_of(p)
            for k in rule.state:
                v = st[k]
                if not torch.is_tensor(v):
                    raise ValueError(f"load_state_dict: {k!r} of {where} must be a tensor, got {type(v).__name__}")
                lv = local_of(v)
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


def fp32_to_keep(state_dict, params, fp32_state: Optional[bool]) -> Dict[int, Dict[str, torch.Tensor]]:
    """torch casts loaded floating state to the param dtype: the saved fp32 state of
    half-precision params, to be put back after torch's load (the saved values, not rounded ones)."""
    keep = {}
    saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
    for pid, p in zip(saved_ids, params):
        st = state_dict["state"].get(pid, {})
        if state_dtype(local_of(p), fp32_state) == torch.float32 and p.dtype != torch.float32:
            keep[id(p)] = {k: v for k, v in st.items() if torch.is_tensor(v) and k != "step" and v.dtype == torch.float32}
    return keep


def numeric_steps_to_tensors(state, group) -> None:
    """A numeric ``step`` (older checkpoints, hand-built state) becomes the float32 0-d
    counter the step increments in place, on the device only with capturable (as torch)."""
    for p in group["params"]:
        st = state.get(p)
        if st and "step" in st and not torch.is_tensor(st["step"]):
            dev = local_of(p).device if group["capturable"] else torch.device("cpu")
            st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32, device=dev)
