"""DeepSpeed integration: MGUP optimizers by name in a DeepSpeed JSON config, under ZeRO 0/1/2/3.

After :func:`register` (or ``import mgup_dist.deepspeed``), a config such as::

    "optimizer": {"type": "MGUPAdamW", "params": {"lr": 3e-4, "weight_decay": 0.1, "mask_ratio": 0.5}}

builds ``mgup_dist.MGUPAdamW`` inside ``deepspeed.initialize``, ZeRO accepts it without
``zero_allow_untested_optimizer``, and, once the ZeRO (or BF16) optimizer has wrapped it, our
optimizer is told which slice of each flat fp32 partition belongs to which original
parameter (a :class:`~mgup_dist.layout.Layout` per partition).  With those layouts the
default ``scope="tensor"`` selects exactly what a single-process run selects.

How DeepSpeed 0.19 hands partitions to the inner optimizer (read from its sources):

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``): per param group ``i`` the trainable params,
  reordered by ``round_robin_bit16_groups[i]`` (start offsets ``round_robin_bit16_offsets[i]``,
  optional per-param alignment padding), are flattened and padded to a multiple of
  ``2 * dp``; rank ``r`` owns ``[r * ps, (r + 1) * ps)`` with ``ps = partition_size[i]``.  The
  inner optimizer's ``param_groups[i]["params"] == [single_partition_of_fp32_groups[i]]``.
  (``_hp_mapping`` is not used: it is wrong under ``round_robin_gradients``.)
* BF16_Optimizer (ZeRO-1 + bf16 + fp32 gradient accumulation): same, without round robin
  and without per-param padding: ``bf16_groups[i]`` in order, ``fp32_groups_flat_partition[i]``.
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter is partitioned on its own:
  rank ``r`` holds elements ``[r * pn, min((r + 1) * pn, ds_numel))`` of it, ``pn =
  partition_numel()``, followed by padding.  Sub-group ``j`` (``fp16_groups[j]``) concatenates
  its params' pieces at ``grad_position[param_id][1]``; ``step()`` runs once per sub-group with
  ``param_groups[g]["params"] == [fp32_partitioned_groups_flat[j]]``; the layout is keyed by
  that tensor object, which does not change between steps.
* ZeRO-0 with bf16/fp16 (``FP16_UnfusedOptimizer``): whole fp32 copies of each param.

``tensor_id`` is the running index of the parameter over the trainable params of all param
groups (the order the model gave them), identical on every rank, the same id a
single-process MGUP optimizer infers.

Checkpoints need nothing extra: the state uses torch's names (``exp_avg``, ``exp_avg_sq``,
``step``), so ``save_checkpoint`` / ``load_checkpoint`` resume bit-exact, ``zero_to_fp32``
works, and ``python -m deepspeed.checkpoint.ds_to_universal --input_folder CK/TAG
--output_folder CK/TAG_universal --inject_missing_state`` + ``"checkpoint": {"load_universal":
true}`` reloads at another world size (``--inject_missing_state`` because a plain
``nn.Module`` carries no ``universal_checkpoint_info``).

Note: DeepSpeed 0.19's default ``gradient_clipping`` is 1.0, not 0.
"""
from __future__ import annotations

import functools
import logging
import threading
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from mgup_dist.layout import Layout, Segment

__all__ = [
    "register",
    "is_registered",
    "optimizer_names",
    "accepted_params",
    "build_optimizer",
    "zero_layouts",
    "attach_layouts",
    "find_mgup_optimizer",
    "prepare_for_wrapping",
    "finish_wrapping",
]

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
_REGISTERED = False
_ORIGINALS: Dict[str, Any] = {}

# Keys DeepSpeed itself understands in ``optimizer.params`` for its own Adam, meaningless for
# MGUP; named in the error so a config copied from an Adam recipe is easy to fix.
_DEEPSPEED_ADAM_ONLY_KEYS = ("torch_adam", "adam_w_mode", "fp32_optimizer_states", "bias_correction", "amsgrad")


# --------------------------------------------------------------------------------------
# Names and parameters
# --------------------------------------------------------------------------------------
def _optimizers() -> Dict[str, type]:
    from mgup_dist import OPTIMIZERS  # the core's name -> class table

    return dict(OPTIMIZERS)


def optimizer_names() -> Tuple[str, ...]:
    """The ``optimizer.type`` names this integration adds (the core's ``OPTIMIZERS``)."""
    return tuple(_optimizers())


def _resolve_name(name: Optional[str]) -> Optional[str]:
    """The canonical MGUP name for a config ``type`` (case-insensitive), or None."""
    if not isinstance(name, str):
        return None
    table = {n.lower(): n for n in _optimizers()}
    return table.get(name.lower())


def accepted_params(name: str) -> Tuple[str, ...]:
    """The keys ``optimizer.params`` may carry for optimizer ``name``: the keyword
    arguments of its constructor (everything but the parameters themselves)."""
    from ..options import constructor_kwargs

    cls = _optimizers()[_resolve_name(name) or name]
    # adamw_params takes tensors, which JSON cannot name (MGUPMuon's default rule, use_muon =
    # 2-D, applies under a config)
    keys = constructor_kwargs(cls, exclude=("self", "params", "adamw_params"))
    return tuple(keys)


def _normalise_value(key: str, value: Any) -> Any:
    # JSON has no tuples: betas arrive as lists.
    if key == "betas" and isinstance(value, list):
        return tuple(value)
    return value


def build_optimizer(name: str, model_parameters: Iterable, params: Optional[Dict[str, Any]] = None):
    """Construct the MGUP optimizer a DeepSpeed config names.

    ``name`` is ``optimizer.type`` (case-insensitive), ``params`` is ``optimizer.params``.
    Unknown keys raise ``ValueError`` listing the accepted ones; invalid values raise the
    optimizer's own ``ValueError``, prefixed with where the value came from.
    """
    canonical = _resolve_name(name)
    if canonical is None:
        raise ValueError(
            f"optimizer.type: unknown MGUP optimizer {name!r}; allowed: {', '.join(optimizer_names())}"
        )
    cls = _optimizers()[canonical]
    params = dict(params or {})
    allowed = accepted_params(canonical)
    unknown = sorted(k for k in params if k not in allowed)
    if unknown:
        hint = ""
        adam_only = [k for k in unknown if k in _DEEPSPEED_ADAM_ONLY_KEYS]
        if adam_only:
            hint = f" ({', '.join(adam_only)} only apply to DeepSpeed's own Adam)"
        if "max_grad_norm" in unknown:
            hint += " (use the top-level 'gradient_clipping' for max_grad_norm)"
        raise ValueError(
            f"optimizer.params for {canonical}: unknown key(s) {unknown}{hint}; accepted: {list(allowed)}"
        )
    kwargs = {k: _normalise_value(k, v) for k, v in params.items()}
    try:
        return cls(model_parameters, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"DeepSpeed config optimizer {canonical} (optimizer.params={params}): {exc}") from exc


# --------------------------------------------------------------------------------------
# Layouts from the ZeRO / BF16 wrapper
# --------------------------------------------------------------------------------------
def _segments_of_flat_partition(
    entries: Sequence[Tuple[int, int, int, Tuple[int, ...]]],
    partition_size: int,
    world_size: int,
    rank: int,
) -> Tuple[Tuple[Segment, ...], Tuple[Tuple[int, int], ...]]:
    """Segments of rank ``rank``'s slice of a flat buffer split into ``world_size`` equal
    partitions of ``partition_size``, and the tensors split across partitions.

    ``entries``: ``(tensor_id, flat_offset, numel, shape)`` per tensor, in flat order.
    Elements outside every entry (alignment padding) are left uncovered.
    """
    lo, hi = rank * partition_size, (rank + 1) * partition_size
    segments: List[Segment] = []
    collective: List[Tuple[int, int]] = []
    for tid, off, n, shape in entries:
        if n == 0:
            continue
        # owners: the partitions holding the first and the last element of this tensor
        first, last = off // partition_size, (off + n - 1) // partition_size
        assert last < world_size, "tensor runs past the padded flat buffer"
        if first != last:
            collective.append((tid, n))
        a, b = max(off, lo), min(off + n, hi)
        if a < b:
            segments.append(Segment(tid, a - lo, b - a, a - off, n, tuple(shape)))
    collective.sort(key=lambda x: x[0])
    return tuple(segments), tuple(collective)


def _dist():
    import torch.distributed as dist

    return dist


def _stage12_layouts(zopt) -> List[Tuple[int, torch.Tensor, Layout]]:
    dist = _dist()
    out = []
    base = 0  # running tensor_id over all groups' trainable params
    for i, params in enumerate(zopt.bit16_groups):
        group = zopt.real_dp_process_group[i]
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        index_of = {id(p): k for k, p in enumerate(params)}  # original order -> tensor_id
        metas = zopt.round_robin_bit16_meta[i]
        entries = []
        for p, off, meta in zip(zopt.round_robin_bit16_groups[i], zopt.round_robin_bit16_offsets[i], metas):
            entries.append((base + index_of[id(p)], int(off), int(meta.numel()), tuple(meta.shape)))
        ps = int(zopt.partition_size[i])
        flat = zopt.single_partition_of_fp32_groups[i]
        assert flat.numel() == ps, (flat.numel(), ps)
        segs, coll = _segments_of_flat_partition(entries, ps, world, rank)
        out.append((i, flat, Layout(segments=segs, numel=ps, group=group, collective=coll)))
        base += len(params)
    return out


def _bf16_layouts(bopt) -> List[Tuple[int, torch.Tensor, Layout]]:
    dist = _dist()
    out = []
    base = 0
    for i, params in enumerate(bopt.bf16_groups):
        group = bopt.real_dp_process_group[i]
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        entries, off = [], 0
        for k, p in enumerate(params):  # flattened in order, no per-param padding
            entries.append((base + k, off, p.numel(), tuple(p.shape)))
            off += p.numel()
        ps = bopt.bf16_groups_flat[i].numel() // world
        flat = bopt.fp32_groups_flat_partition[i]
        assert flat.numel() == ps, (flat.numel(), ps)
        segs, coll = _segments_of_flat_partition(entries, ps, world, rank)
        out.append((i, flat, Layout(segments=segs, numel=ps, group=group, collective=coll)))
        base += len(params)
    return out


def _stage3_layouts(zopt) -> List[Tuple[int, torch.Tensor, Layout]]:
    dist = _dist()
    out = []
    tid = 0
    for j, sub_group in enumerate(zopt.fp16_groups):
        group = zopt._get_sub_group_process_group(j)
        rank = dist.get_rank(group=group)
        flat = zopt.fp32_partitioned_groups_flat[j]
        numel = int(zopt.fp16_partitioned_groups_flat_numel[j])
        segments, collective = [], []
        for p in sub_group:
            n, pn = int(p.ds_numel), int(p.partition_numel())
            sub_id, local_off, local_n = zopt.grad_position[zopt.get_param_id(p)]
            assert sub_id == j and local_n == pn
            # rank r holds [r*pn, min((r+1)*pn, n)); split when more than one rank holds a piece
            if n > pn:
                collective.append((tid, n))
            start = rank * pn
            length = max(0, min(pn, n - start))
            if length > 0:
                segments.append(Segment(tid, int(local_off), length, start, n, tuple(p.ds_shape)))
            tid += 1
        out.append((zopt.sub_group_to_group_id[j], flat, Layout(
            segments=tuple(segments), numel=numel, group=group, collective=tuple(collective))))
    return out


def _unfused_layouts(fopt) -> List[Tuple[int, torch.Tensor, Layout]]:
    out = []
    tid = 0
    for i, group in enumerate(fopt.fp32_groups):
        for p in group:
            n = p.numel()
            segs = (Segment(tid, 0, n, 0, n, tuple(p.shape)),) if n else ()
            out.append((i, p, Layout(segments=segs, numel=n)))
            tid += 1
    return out


def zero_layouts(wrapper) -> List[Tuple[int, torch.Tensor, Layout]]:
    """``(param_group_index, tensor, layout)`` for every buffer the inner optimizer of
    DeepSpeed's ``wrapper`` steps on.  Empty for an unwrapped optimizer (ZeRO-0 fp32), whose
    params are whole and need no explicit layout."""
    name = type(wrapper).__name__
    if hasattr(wrapper, "fp32_partitioned_groups_flat") and hasattr(wrapper, "grad_position"):
        return _stage3_layouts(wrapper)
    if hasattr(wrapper, "round_robin_bit16_groups") and hasattr(wrapper, "single_partition_of_fp32_groups"):
        return _stage12_layouts(wrapper)
    if hasattr(wrapper, "fp32_groups_flat_partition") and hasattr(wrapper, "bf16_groups"):
        return _bf16_layouts(wrapper)
    if hasattr(wrapper, "fp32_groups") and name == "FP16_UnfusedOptimizer":
        return _unfused_layouts(wrapper)
    return []


def _is_engine(obj) -> bool:
    return hasattr(obj, "module") and hasattr(obj, "basic_optimizer")


def find_mgup_optimizer(obj):
    """The MGUP optimizer inside a DeepSpeed engine or optimizer wrapper, or None."""
    classes = tuple(_optimizers().values())
    seen = set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        if isinstance(obj, classes):
            return obj
        nxt = obj.basic_optimizer if _is_engine(obj) else None
        obj = nxt if nxt is not None else getattr(obj, "optimizer", None)
    return None


def _set_layout(opt, group_index: int, tensor: torch.Tensor, layout: Layout) -> None:
    """``opt.set_layout(tensor, layout)``.  Under ZeRO-3 the partition is placed in
    ``param_groups[g]["params"]`` only while its sub-group steps, so it is put there for
    the call and taken out again."""
    params = opt.param_groups[group_index]["params"]
    if any(p is tensor for p in params):
        opt.set_layout(tensor, layout)
        return
    saved = list(params)
    opt.param_groups[group_index]["params"] = [tensor]
    try:
        opt.set_layout(tensor, layout)
    finally:
        opt.param_groups[group_index]["params"] = saved


def attach_layouts(engine_or_wrapper, optimizer=None) -> int:
    """Tell the MGUP optimizer inside ``engine_or_wrapper`` (a DeepSpeedEngine or a ZeRO /
    BF16 optimizer) the layout of every partition it steps on.  Called automatically by
    the registered engine hook; returns how many layouts were set (0 when there is no MGUP
    optimizer or nothing is partitioned).  Must run on every rank."""
    wrapper = getattr(engine_or_wrapper, "optimizer", None) if _is_engine(engine_or_wrapper) else engine_or_wrapper
    opt = optimizer if optimizer is not None else find_mgup_optimizer(engine_or_wrapper)
    if opt is None or wrapper is None or wrapper is opt:
        return 0
    inner = getattr(wrapper, "optimizer", None)
    if inner is not opt:
        return 0
    layouts = zero_layouts(wrapper)
    for group_index, tensor, layout in layouts:
        _set_layout(opt, group_index, tensor, layout)
    return len(layouts)


# --------------------------------------------------------------------------------------
# Hooks into DeepSpeedEngine
# --------------------------------------------------------------------------------------
def _config_optimizer_name(engine) -> Optional[str]:
    return getattr(engine._config, "optimizer_name", None)


def _patched_configure_basic_optimizer(self, model_parameters):
    name = _resolve_name(self.optimizer_name())
    if name is None:
        _check_known_type(self.optimizer_name())
        return _ORIGINALS["_configure_basic_optimizer"](self, model_parameters)
    params = dict(self.optimizer_params() or {})
    if "max_grad_norm" in params:
        raise ValueError(
            "'max_grad_norm' is not supported as an optimizer parameter, use the DeepSpeed parameter "
            "'gradient_clipping'"
        )
    opt = build_optimizer(name, model_parameters, params)
    _suppress_steps(opt)  # until _configure_optimizer returns (see _suppress_steps)
    logger.info("mgup_dist: built %s from the DeepSpeed config", name)
    return opt


def _noop_step(closure=None):
    return None


def _suppress_steps(opt) -> None:
    """Make ``opt.step`` a no-op while DeepSpeed wraps it.

    DeepSpeed's FP16_UnfusedOptimizer (ZeRO-0 with bf16/fp16) calls ``optimizer.step()`` on
    all-zero gradients in its constructor to create the state eagerly.  For MGUP that step
    is not free: it counts a step (bias correction) and applies weight decay.  Our state is
    created at the first real step, so the warm-up step is skipped."""
    opt.__dict__["step"] = _noop_step


def _restore_steps(opt) -> None:
    opt.__dict__.pop("step", None)


def prepare_for_wrapping(opt) -> None:
    """Call before DeepSpeed wraps an MGUP optimizer (used by the native DeepSpeed patch in
    ``patches/``; :func:`register` does it itself): DeepSpeed's zero-gradient warm-up step
    becomes a no-op."""
    _suppress_steps(opt)


def finish_wrapping(wrapper, opt) -> int:
    """Call after DeepSpeed wrapped an MGUP optimizer: restores ``step`` and attaches the
    partition layouts.  Returns how many layouts were set."""
    _restore_steps(opt)
    return attach_layouts(wrapper, opt) if wrapper is not opt else 0


def _check_known_type(name) -> None:
    """DeepSpeed resolves unknown ``optimizer.type`` names with ``getattr(torch.optim, name)``
    and fails with a bare AttributeError; say what is allowed instead."""
    if not isinstance(name, str):
        return
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    if name.lower() in DEEPSPEED_OPTIMIZERS or hasattr(torch.optim, name):
        return
    raise ValueError(
        f"optimizer.type: unknown optimizer {name!r}; allowed: MGUP {list(optimizer_names())}, "
        f"DeepSpeed {list(DEEPSPEED_OPTIMIZERS)}, or a torch.optim class name"
    )


def _patched_is_supported_optimizer(self, optimizer_name):
    # Called by DeepSpeedEngine._do_sanity_check on the config's optimizer.type.
    if _resolve_name(optimizer_name) is not None:
        return True
    _check_known_type(optimizer_name)
    return _ORIGINALS["_is_supported_optimizer"](self, optimizer_name)


def _patched_configure_optimizer(self, client_optimizer, model_parameters):
    mgup_classes = tuple(_optimizers().values())
    config_name = _resolve_name(_config_optimizer_name(self))
    restore_force = None
    if client_optimizer is not None:
        if config_name is not None:
            msg = (
                f"mgup_dist: the DeepSpeed config names optimizer {config_name!r}, but a client optimizer "
                f"({type(client_optimizer).__name__}) was passed to deepspeed.initialize; DeepSpeed uses the "
                "client optimizer and ignores the config's 'optimizer' section. Pass optimizer=None to use "
                f"{config_name} from the config."
            )
            warnings.warn(msg, UserWarning, stacklevel=3)
            logger.warning(msg)
        if isinstance(client_optimizer, mgup_classes) and self.zero_use_cpu_optimizer():
            # MGUP is meant to be ZeRO-Offload's CPU optimizer: it steps on the fp32 partitions
            # wherever they live, so DeepSpeed's "use DeepSpeedCPUAdam" guard does not apply.
            restore_force = self._config.zero_force_ds_cpu_optimizer
            self._config.zero_force_ds_cpu_optimizer = False
    if isinstance(client_optimizer, mgup_classes):
        _suppress_steps(client_optimizer)
    try:
        result = _ORIGINALS["_configure_optimizer"](self, client_optimizer, model_parameters)
    finally:
        if restore_force is not None:
            self._config.zero_force_ds_cpu_optimizer = restore_force
        for o in (client_optimizer, getattr(self, "basic_optimizer", None)):
            if isinstance(o, mgup_classes):
                _restore_steps(o)
    opt = getattr(self, "basic_optimizer", None)
    if isinstance(opt, mgup_classes):
        n = attach_layouts(self.optimizer, opt)
        logger.info("mgup_dist: %s learned %d partition layout(s) from %s", type(opt).__name__, n,
                    type(self.optimizer).__name__)
    return result


def is_registered() -> bool:
    return _REGISTERED


def register() -> None:
    """Make the MGUP optimizers available to DeepSpeed (idempotent, cheap after the first call).

    * ``optimizer.type`` accepts every name of ``mgup_dist.OPTIMIZERS`` (case-insensitive),
      with the constructor's keyword arguments in ``optimizer.params``;
    * ZeRO accepts them without ``zero_allow_untested_optimizer``
      (``deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS``);
    * after ZeRO / BF16 wraps the optimizer, the partition layouts are attached;
    * a client optimizer passed while the config names an MGUP optimizer warns.
    """
    global _REGISTERED
    with _LOCK:
        if _REGISTERED:
            return
        from deepspeed.runtime import engine as ds_engine
        from deepspeed.runtime.zero import utils as zero_utils

        for cls in _optimizers().values():
            if cls not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
                zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)

        Engine = ds_engine.DeepSpeedEngine
        for attr, repl in (
            ("_is_supported_optimizer", _patched_is_supported_optimizer),
            ("_configure_basic_optimizer", _patched_configure_basic_optimizer),
            ("_configure_optimizer", _patched_configure_optimizer),
        ):
            original = getattr(Engine, attr)
            if getattr(original, "_mgup_patched", False):  # patched by an earlier import of this module
                _ORIGINALS[attr] = original.__wrapped__
                continue
            _ORIGINALS[attr] = original
            wrapped = functools.wraps(original)(repl)
            wrapped._mgup_patched = True
            setattr(Engine, attr, wrapped)
        _REGISTERED = True
