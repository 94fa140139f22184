"""MGUP-AdamW inside megatron-core (0.16): ``get_megatron_optimizer`` with an ``mgup`` choice.

How it plugs in
---------------
megatron-core builds its inner optimizer from ``OptimizerConfig.optimizer`` ("adam" or
"sgd") and wraps it (``FP32Optimizer``, ``Float16OptimizerWithFloat16Params`` or the
``DistributedOptimizer``, in a ``ChainedOptimizer``).  The distributed optimizer accepts
only Adam / ``torch.optim.AdamW`` at construction, because its checkpoint formats know
Adam's state names.  MGUP-AdamW keeps exactly those names (``step``, ``exp_avg``,
``exp_avg_sq``), so the clean substitution is:

1. let megatron-core build everything with ``optimizer="adam"`` (all its sharding,
   buffers, param-group logic stay untouched);
2. replace each wrapper's inner Adam (still stateless: ``torch.optim.AdamW``, or apex's /
   Transformer Engine's ``FusedAdam`` where installed, see :func:`_check_replaceable`
   for the options refused by name) by an ``MGUPAdamW`` over the *same* parameters: the shard main params (1-D fp32 ranges) for
   the distributed optimizer, the model / fp32 main params otherwise;
3. give every shard main param its :class:`~mgup_dist.layout.Layout` (which range of
   which tensor it is, and which tensors are split across the data-parallel ranks), so
   ``scope="tensor"`` selects exactly what a single device selects;
4. switch the wrapper's class to a thin subclass that keeps ``step`` through every
   checkpoint path (also when Transformer Engine / Apex are installed, where megatron
   reads ``step`` from param groups) and refuses checkpoint formats that would drop
   optimizer state.

Layout of a shard main param
----------------------------
A ``_ParamAndGradBuffer`` bucket of ``n`` elements (padded to a multiple of the DP size)
is cut into DP-size equal contiguous ranges; rank ``r`` owns
``[offset + r*n/W, offset + (r+1)*n/W)``.  A param occupying ``[start, end)`` of the
buffer (``param_index_map``, identical on every rank) is split when its range crosses a
rank boundary.  So every rank knows, without communication, which tensors are split;
the only thing it does not know locally is which optimizer param group a tensor it
does not hold belongs to, learnt once at setup with one ``all_gather_object``.

The public entry point is :func:`mgup_dist.megatron.get_megatron_optimizer`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Hashable, List, Optional, Tuple

import torch

from ..layout import Layout, Segment, whole_layout

__all__ = [
    "MGUP_OPTIMIZER_NAMES",
    "MGUP_KEYS",
    "get_megatron_optimizer",
    "build_distributed_layouts",
    "KEEPING_FORMATS",
    "DROPPING_FORMATS",
]

# OptimizerConfig.optimizer values this module adds, and the MGUP mode each selects.
MGUP_OPTIMIZER_NAMES = {"mgup_adamw": "topk", "cmgup_adamw": "cautious"}
# Keys accepted in ``mgup=dict(...)`` (forwarded to MGUPAdamW).
MGUP_KEYS = ("mode", "mask_ratio", "alpha", "gamma", "tau", "scope", "normalize", "foreach", "fp32_state")
# OptimizerConfig fields added by patches/megatron-core-0.16-mgup.patch (read when present).
_CONFIG_FIELDS = {"mgup_mask_ratio": "mask_ratio", "mgup_alpha": "alpha", "mgup_gamma": "gamma", "mgup_scope": "scope"}

# DistributedOptimizer checkpoint formats (``metadata["distrib_optim_sharding_type"]``).
# dp_reshardable and fully_sharded_model_space save every state tensor of a param
# generically; the other two gather only these three fixed keys.
KEEPING_FORMATS = ("dp_reshardable", "fully_sharded_model_space")
DROPPING_FORMATS = ("fully_reshardable", "dp_zero_gather_scatter")
_FIXED_KEYS = {"exp_avg", "exp_avg_sq", "step"}
_ADAMW_STATE_KEYS = ("exp_avg", "exp_avg_sq")


# --------------------------------------------------------------------------- options
def _resolve_options(config, mgup: Optional[Dict[str, Any]]) -> Tuple[str, Dict[str, Any]]:
    """Which MGUP class name and which keyword arguments, from ``config.optimizer``, the
    optional ``mgup_*`` config fields and the ``mgup`` dict (the dict wins)."""
    name = getattr(config, "optimizer", "adam")
    if name not in ("adam", *MGUP_OPTIMIZER_NAMES):
        raise ValueError(
            f"config.optimizer: {name!r} cannot run as MGUP; allowed: 'adam' (with mgup=...), "
            + ", ".join(repr(n) for n in MGUP_OPTIMIZER_NAMES)
        )
    if name == "adam" and mgup is None:
        raise ValueError("mgup: pass mgup=dict(...) or set config.optimizer to 'mgup_adamw' / 'cmgup_adamw'")
    opts: Dict[str, Any] = {}
    for field, key in _CONFIG_FIELDS.items():
        value = getattr(config, field, None)
        if value is not None:
            opts[key] = value
    if mgup is not None:
        if not isinstance(mgup, dict):
            raise ValueError(f"mgup: expected a dict of MGUP options, got {type(mgup).__name__}")
        unknown = sorted(set(mgup) - set(MGUP_KEYS))
        if unknown:
            raise ValueError(f"mgup: unknown keys {unknown}; allowed: {', '.join(MGUP_KEYS)}")
        opts.update({k: v for k, v in mgup.items() if v is not None})
    if name in MGUP_OPTIMIZER_NAMES:
        implied = MGUP_OPTIMIZER_NAMES[name]
        if opts.get("mode", implied) != implied:
            raise ValueError(
                f"mgup['mode']={opts['mode']!r} contradicts config.optimizer={name!r} (which means mode={implied!r})"
            )
        opts["mode"] = implied
    opts.setdefault("mode", "topk")
    if opts["mode"] not in ("topk", "cautious"):
        raise ValueError(f"mgup['mode']: {opts['mode']!r}; allowed: 'topk', 'cautious'")
    if not getattr(config, "decoupled_weight_decay", True):
        raise ValueError("config.decoupled_weight_decay: MGUP-AdamW uses decoupled weight decay; set it to True")
    for flag in ("optimizer_cpu_offload", "use_precision_aware_optimizer"):
        if getattr(config, flag, False):
            raise ValueError(
                f"config.{flag}=True is not supported with MGUP (it needs TE FusedAdam / the hybrid CPU "
                "optimizer, which have no per-coordinate scale); set it to False"
            )
    return ("mgup_adamw" if opts["mode"] == "topk" else "cmgup_adamw"), opts


def _mgup_class(mode: str):
    from .. import CMGUPAdamW, MGUPAdamW

    return MGUPAdamW if mode == "topk" else CMGUPAdamW


# --------------------------------------------------------------------- entry point
def get_megatron_optimizer(config, model_chunks, mgup: Optional[Dict[str, Any]] = None, **kwargs):
    """megatron-core's ``get_megatron_optimizer`` with MGUP-AdamW as the inner optimizer.

    ``config`` is a megatron ``OptimizerConfig`` whose ``optimizer`` is ``"mgup_adamw"``,
    ``"cmgup_adamw"``, or ``"adam"`` together with ``mgup=dict(...)``.  ``mgup`` keys:
    ``mode`` ("topk" | "cautious"), ``mask_ratio``, ``alpha``, ``gamma``, ``tau``,
    ``scope`` ("tensor" | "shard" | "global" | "global_approx"), ``normalize``,
    ``foreach``, ``fp32_state`` (MGUPAdamW's meanings and defaults).  lr, betas, eps and
    weight decay come from the config (``lr``, ``adam_beta1/2``, ``adam_eps``,
    ``weight_decay``), as for Adam.  Other keyword arguments (``config_overrides``,
    ``use_gloo_process_groups``, ``pg_collection``, ...) go to megatron-core unchanged.

    Works for the plain (fp32 / bf16 / fp16) and the distributed optimizer
    (``use_distributed_optimizer=True``).  Returns megatron's optimizer object
    (``ChainedOptimizer`` around the usual wrappers) driven exactly as for Adam.
    """
    from megatron.core.optimizer import get_megatron_optimizer as _megatron_get

    name, opts = _resolve_options(config, mgup)
    ddp_config = getattr(model_chunks[0], "ddp_config", None) if model_chunks else None
    if ddp_config is not None and getattr(ddp_config, "use_megatron_fsdp", False):
        raise ValueError(
            "model_chunks: Megatron-FSDP (ddp_config.use_megatron_fsdp=True) is not supported by the MGUP "
            "integration; use DistributedDataParallel with use_distributed_optimizer=True"
        )
    adam_config = dataclasses.replace(config, optimizer="adam") if config.optimizer != "adam" else config
    megatron_opt = _megatron_get(adam_config, model_chunks, **kwargs)
    cls = _mgup_class(opts["mode"])
    for sub in _sub_optimizers(megatron_opt):
        _swap_inner_optimizer(sub, cls, opts, config)
    if hasattr(megatron_opt, "chained_optimizers"):
        megatron_opt.config = config
    megatron_opt.mgup_options = dict(opts, optimizer=name)
    return megatron_opt


def _sub_optimizers(megatron_opt) -> List[Any]:
    return list(getattr(megatron_opt, "chained_optimizers", None) or [megatron_opt])


def _swap_inner_optimizer(sub, cls, opts: Dict[str, Any], config) -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    sub.config = config  # megatron built it from a copy with optimizer="adam"
    old = getattr(sub, "optimizer", None)
    if old is None:  # a stub optimizer (no trainable params on this rank): nothing to run
        return
    _check_replaceable(old)
    # The param groups keep megatron's keys (wd_mult, lr_mult, max_lr, ...) and their lr,
    # betas, eps, weight_decay; the base optimizer's own flags (torch's amsgrad / fused /
    # ..., FusedAdam's bias_correction, checked above) are dropped so MGUPAdamW fills in
    # its defaults.
    torch_only = set(old.defaults) - {"lr", "betas", "eps", "weight_decay"}
    # The distributed optimizer's shard params are views of model params (non-leaf), which
    # torch's add_param_group refuses; megatron itself assigns them to ``param_groups``
    # after construction, and so do we: build with empty lists (groups still validated).
    groups = [{k: v for k, v in g.items() if k not in torch_only} for g in old.param_groups]
    params = [g.pop("params") for g in groups]
    for g in groups:
        g["params"] = []
    mgup_kwargs = {k: v for k, v in opts.items() if k != "mode" or cls.__name__ == "MGUPAdamW"}
    new = cls(
        groups,
        lr=config.lr if config.lr is not None else old.defaults["lr"],
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        **mgup_kwargs,
    )
    for g, ps in zip(new.param_groups, params):
        g["params"] = ps
    # megatron's ranks hold different param groups (a rank without trainable params has a
    # stub and no inner optimizer), so no per-step collective is entered by every rank:
    # the update's hyperparameters are compared when the plan is built (one schedule drives
    # every rank's lr in megatron)
    new.check_agreement = "plan"
    sub.optimizer = new
    if isinstance(sub, DistributedOptimizer):
        for g_old, g_new in zip(old.param_groups, new.param_groups):
            assert len(g_old["params"]) == len(g_new["params"])
        layouts, collective = _distributed_layouts(sub)
        for shard, layout in layouts.items():
            new.set_layout(shard, layout)
        _add_placeholders(sub, collective)
    else:
        # whole tensors (the model's params or megatron's fp32 copies of them), assigned
        # after construction: declared, since an optimizer refuses a tensor it was not
        # built with and knows no layout of
        tid = 0
        for g in new.param_groups:
            for p in g["params"]:
                new.set_layout(p, whole_layout(p, tid))
                tid += 1
    sub.init_state_fn = _init_state_fn
    sub.__class__ = _checkpoint_safe_class(type(sub))


# ------------------------------------------------------------- the inner Adam
# megatron-core 0.16 builds its Adam from whatever imports first: Transformer Engine's
# FusedAdam, else apex's FusedAdam, else torch.optim.AdamW.  MGUPAdamW computes
# torch AdamW's math (bias-corrected m_hat / (sqrt(v_hat) + eps), decoupled weight decay)
# with per-param state (step, exp_avg, exp_avg_sq in fp32 for fp32 main params), so a
# FusedAdam is replaced exactly when it is configured as that same AdamW; anything else
# changes the math or moves state/master weights into the fused optimizer.
_FUSED_ADAM_MODULES = {
    "transformer_engine.pytorch.optimizers": "Transformer Engine",
    "apex.optimizers": "apex",
}


def _fused_adam_origin(opt) -> Optional[str]:
    """'Transformer Engine' / 'apex' if ``opt`` is that package's FusedAdam (the class
    megatron imported, looked up in ``sys.modules``: nothing is imported here)."""
    import sys

    for module, origin in _FUSED_ADAM_MODULES.items():
        cls = getattr(sys.modules.get(module), "FusedAdam", None)
        if isinstance(cls, type) and isinstance(opt, cls):
            return origin
    return None


def _check_replaceable(old) -> None:
    """ValueError (naming the option) unless ``old`` is a fresh AdamW-equivalent optimizer
    that MGUPAdamW can replace with identical hyperparameters."""
    origin = _fused_adam_origin(old)
    if origin is None and not isinstance(old, torch.optim.AdamW):
        raise ValueError(
            f"megatron-core built a {type(old).__module__}.{type(old).__name__} inner optimizer; MGUP replaces only "
            "torch.optim.AdamW, apex's FusedAdam or Transformer Engine's FusedAdam (config.optimizer='adam' with "
            "decoupled_weight_decay=True)"
        )
    if len(old.state) or any("step" in g for g in old.param_groups):
        raise RuntimeError(f"the inner {type(old).__name__} has already stepped: MGUP replaces only a fresh one")
    name = f"{origin} FusedAdam" if origin else "torch.optim.AdamW"
    for i, g in enumerate(old.param_groups):
        if g.get("amsgrad", False):
            raise ValueError(f"{name}: amsgrad=True (param group {i}) is not supported by MGUPAdamW; use amsgrad=False")
        for flag in ("maximize", "differentiable"):
            if g.get(flag, False):
                raise ValueError(f"{name}: {flag}=True (param group {i}) is not supported by MGUPAdamW")
        if origin and not g.get("bias_correction", True):
            raise ValueError(
                f"{name}: bias_correction=False (param group {i}): MGUPAdamW always bias-corrects its moments "
                "(as torch's AdamW); use bias_correction=True"
            )
    if origin is None:
        return
    if not getattr(old, "adam_w_mode", True):
        raise ValueError(
            f"{name}: adam_w_mode=False (L2 penalty added to the gradient) differs from MGUPAdamW's decoupled "
            "weight decay; use adam_w_mode=True (config.decoupled_weight_decay=True)"
        )
    if getattr(old, "capturable", False):
        raise ValueError(
            f"{name}: capturable=True (CUDA-graph capture, lr as a tensor): MGUPAdamW has no capturable "
            "mode; use capturable=False"
        )
    if getattr(old, "set_grad_none", None) is False:
        raise ValueError(
            f"{name}: set_grad_none=False; MGUPAdamW.zero_grad() follows torch (set_to_none=True by default, "
            "which is apex's set_grad_none=True); megatron's wrappers zero grads themselves: leave set_grad_none "
            "at its default, or call zero_grad(set_to_none=False)"
        )
    # Precision-aware mode (TE; apex's master_weights / use_master): the fused optimizer
    # keeps its own master weights or low-precision moments, which MGUP has no copy of.
    precision = {
        "master_weights": bool(getattr(old, "master_weights", False)),
        "use_master": bool(getattr(old, "use_master", False)),
        "use_decoupled_grad": bool(getattr(old, "use_decoupled_grad", False)),
        "store_param_remainders": bool(getattr(old, "store_param_remainders", False)),
        "exp_avg_dtype": getattr(old, "exp_avg_dtype", torch.float32) != torch.float32,
        "exp_avg_sq_dtype": getattr(old, "exp_avg_sq_dtype", torch.float32) != torch.float32,
    }
    bad = [k for k, on in precision.items() if on]
    if bad:
        shown = ", ".join(f"{k}={getattr(old, k)!r}" for k in bad)
        raise ValueError(
            f"{name} in its precision-aware mode ({shown}) keeps master weights / moments MGUP cannot see; "
            "set config.use_precision_aware_optimizer=False (fp32 main params and fp32 exp_avg / exp_avg_sq, "
            "kept by megatron and MGUPAdamW)"
        )


# --------------------------------------------------------------------------- layouts
def _tensor_ids(model_chunks) -> Dict[torch.nn.Parameter, int]:
    """Running index of every parameter over the model chunks: identical on all ranks."""
    ids: Dict[torch.nn.Parameter, int] = {}
    for chunk in model_chunks:
        for p in chunk.parameters():
            if p not in ids:
                ids[p] = len(ids)
    return ids


def _owner_ranks(start: int, end: int, bucket, world: int) -> Tuple[int, int]:
    """First and last data-parallel rank owning a piece of buffer range ``[start, end)``."""
    per = bucket.grad_data.numel() // world
    return (start - bucket.offset) // per, (end - 1 - bucket.offset) // per


def build_distributed_layouts(dopt) -> Dict[torch.Tensor, Layout]:
    return _distributed_layouts(dopt)[0]


def _distributed_layouts(dopt):
    """Layout of every shard main param of a megatron ``DistributedOptimizer``.

    Must run on every rank of ``dopt.data_parallel_group`` (one ``all_gather_object`` at
    setup).  Each layout: one segment (this rank's range of the model param, from
    ``_get_model_param_range_map(p)["param"]``), ``group`` = the data-parallel group of
    this distributed-optimizer instance, ``collective`` = every tensor of the same
    optimizer param group that is split across its ranks (same tuple on every rank).
    """
    group = dopt.data_parallel_group
    world = group.size()
    tids = _tensor_ids(dopt.model_chunks)
    # Split tensors from the global range map (every rank has every buffer's map).
    split: Dict[int, int] = {}
    for buffer in dopt.buffers:
        for p, (start, end, bucket_id) in buffer.param_index_map.items():
            if end <= start:
                continue
            first, last = _owner_ranks(start, end, buffer.buckets[bucket_id], world)
            if first != last:
                split[tids[p]] = p.numel()
    # Param group of each split tensor: the holders know it; one exchange at setup.
    local = {}
    for p, (gi, _) in dopt.model_param_group_index_map.items():
        if tids[p] in split:
            local[tids[p]] = gi
    gathered: List[Optional[Dict[int, int]]] = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(gathered, local, group=group)
    else:
        gathered = [local]
    group_of: Dict[int, int] = {}
    for part in gathered:
        for tid, gi in part.items():
            assert group_of.setdefault(tid, gi) == gi, f"tensor {tid} in two param groups"
    assert set(group_of) == set(split), "a split tensor is held by no rank"
    collective: Dict[int, Tuple[Tuple[Hashable, int], ...]] = {}
    for tid in sorted(split):
        collective.setdefault(group_of[tid], ())
        collective[group_of[tid]] += ((tid, split[tid]),)

    layouts: Dict[torch.Tensor, Layout] = {}
    for p, (gi, go) in dopt.model_param_group_index_map.items():
        shard = dopt.optimizer.param_groups[gi]["params"][go]
        rng = dopt._get_model_param_range_map(p)["param"]
        assert shard.numel() == rng.size, (shard.numel(), rng.size)
        seg = Segment(tids[p], 0, rng.size, rng.start, p.numel(), tuple(p.shape))
        layouts[shard] = Layout(segments=(seg,), numel=rng.size, group=group, collective=collective.get(gi, ()))
    return layouts, collective


def _add_placeholders(dopt, collective) -> None:
    """Every rank must enter the selection all-reduce of every split tensor of a param
    group, and MGUPAdamW enters it through the group's params.  With more than two
    data-parallel ranks a rank can hold no param of a group whose tensors are split among
    the others: give that group an empty placeholder param (0 elements, never a
    gradient, never state) whose layout lists the group's split tensors."""
    device = dopt.buffers[0].grad_data.device if dopt.buffers else None
    for gi, tensors in collective.items():
        group = dopt.optimizer.param_groups[gi]
        if tensors and not group["params"]:
            ph = torch.empty(0, dtype=torch.float32, device=device)
            group["params"].append(ph)
            dopt.optimizer.set_layout(
                ph, Layout(segments=(), numel=0, group=dopt.data_parallel_group, collective=tensors)
            )


# -------------------------------------------------------------------- checkpoints
def _init_state_fn(opt, config=None) -> None:
    """Allocate MGUP-AdamW state for params that have none, without stepping: what
    megatron's ``init_state_fn`` does for Adam, plus ``step`` (0), which MGUP keeps per
    param like torch's AdamW (MGUPAdamW's own initialiser, so names and dtypes match).
    Loading a checkpoint into a fresh optimizer needs the state to exist (megatron
    copies into it); a state at step 0 is exactly a fresh one."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.numel() == 0:  # placeholder params (see _add_placeholders) never hold state
                continue
            opt.init_state(p)


def _extra_state_keys(opt) -> List[str]:
    keys = set()
    for st in opt.state.values():
        keys.update(st)
    return sorted(keys - _FIXED_KEYS)


# Overrides on megatron's optimizer wrappers when their inner optimizer is MGUP.  They
# live in a generated direct subclass of the wrapper's class (a mixin base would change
# the object layout and forbid switching ``__class__`` of the existing object); each
# calls the megatron implementation through ``_mgup_base``.
def _ckpt_state_dict(self, *args, **kwargs):
    inner = self.optimizer
    _init_state_fn(inner)  # megatron asserts one common step: also before the first step
    sd = self._mgup_base.state_dict(self, *args, **kwargs)
    if _is_distributed(self):
        # Keep ``step`` in the param groups whatever megatron's Adam flavour (torch / TE /
        # Apex) decided: the distributed formats restore it from there.
        steps = {float(st["step"]) for st in inner.state.values() if "step" in st}
        assert len(steps) <= 1, f"MGUP step differs across params: {steps}"
        if steps:
            step = next(iter(steps))
            for g in sd["optimizer"]["param_groups"]:
                g["step"] = step
    return sd


def _ckpt_load_state_dict(self, state_dict):
    _init_state_fn(self.optimizer)
    step = None
    if _is_distributed(self):
        steps = {g["step"] for g in state_dict["optimizer"]["param_groups"] if "step" in g}
        assert len(steps) <= 1, f"checkpoint holds several steps: {steps}"
        step = next(iter(steps)) if steps else None
    # no_grad: with fp32 params the shard main params are views of model params that
    # require grad, and megatron's dp_reshardable loader copies into them in place
    # (megatron-core 0.16 raises there for Adam too; bf16 main params are plain clones).
    with torch.no_grad():
        self._mgup_base.load_state_dict(self, state_dict)
    if _is_distributed(self):
        # megatron's torch-Adam path puts one shared tensor into every param's state; MGUP
        # increments ``step`` in place, so each param needs its own.
        for st in self.optimizer.state.values():
            if step is not None:
                st["step"] = torch.tensor(float(step), dtype=torch.float32)
            elif "step" in st:
                st["step"] = st["step"].detach().clone()


def _ckpt_sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
    if _is_distributed(self):
        fmt = kwargs.get("sharding_type") or (kwargs.get("metadata") or {}).get(
            "distrib_optim_sharding_type", "fully_sharded_model_space"
        )
        if is_loading:
            _init_state_fn(self.optimizer)
        _check_format(self, fmt)
    return self._mgup_base.sharded_state_dict(self, model_sharded_state_dict, is_loading, **kwargs)


def _ckpt_get_parameter_state_dp_zero(self, *args, **kwargs):
    _check_format(self, "dp_zero_gather_scatter")
    return self._mgup_base.get_parameter_state_dp_zero(self, *args, **kwargs)


def _check_format(dopt, fmt: str) -> None:
    """ValueError for a DistributedOptimizer checkpoint format that would lose state."""
    if fmt in KEEPING_FORMATS:
        return
    extra = _extra_state_keys(dopt.optimizer)
    if fmt in DROPPING_FORMATS and not extra:
        return  # only Adam's keys: nothing is dropped
    raise ValueError(
        f"distrib_optim_sharding_type={fmt!r} would drop MGUP optimizer state"
        + (f" {extra} (it saves only param, exp_avg, exp_avg_sq)" if extra else " (format not supported)")
        + f"; use one of {KEEPING_FORMATS} ('dp_reshardable' also reloads at another data-parallel size)"
    )


def _is_distributed(opt) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(opt, DistributedOptimizer)


@functools.lru_cache(maxsize=None)
def _checkpoint_safe_class(base: type) -> type:
    if getattr(base, "_mgup_base", None) is not None:
        return base
    ns = {
        "__module__": __name__,
        "__doc__": f"megatron's {base.__name__} around MGUP-AdamW (checkpoint-safe step, format guard).",
        "_mgup_base": base,
        "state_dict": _ckpt_state_dict,
        "load_state_dict": _ckpt_load_state_dict,
        "sharded_state_dict": _ckpt_sharded_state_dict,
    }
    if hasattr(base, "get_parameter_state_dp_zero"):
        ns["get_parameter_state_dp_zero"] = _ckpt_get_parameter_state_dp_zero
    return type(f"MGUP{base.__name__}", (base,), ns)
