"""``mgup-dist train --engine deepspeed --deepspeed-config FILE``: what the file may set.

The DeepSpeed engine builds its config from the recipe's flags (optimizer, lr schedule,
batch sizes, clipping, precision) plus the file's ZeRO settings.  A user's file that sets
one of those to a *different* value would otherwise be overwritten without a word, so
before any work every such key is checked here:

* ``optimizer``: ``type`` must name the optimizer ``--optimizer`` resolves to; ``params``
  are validated as DeepSpeed would construct them (unknown key or bad value: error);
  a key the flags leave out (``mask_ratio``, ``scope``, ...) is honoured; a key the flags
  set differently is refused, naming the flag to pass.
* batch sizes, ``gradient_clipping``, ``bf16``/``fp16``, ``scheduler``: equal to the run's
  value or ``"auto"``; ``bf16.enabled`` is honoured when ``--precision`` is ``auto``.

The shipped names (``zero1``, ``zero2``, ...) are templates for users' own scripts: the
recipe takes only their ZeRO settings and its flags decide the rest (documented).
"""
from __future__ import annotations

import os
from typing import Any, Dict

__all__ = ["check_deepspeed_file"]

# file key of optimizer.params -> the flag that sets it in the recipe
_PARAM_FLAGS = {"lr": "--lr", "betas": "--beta1/--beta2", "eps": "--eps", "weight_decay": "--weight-decay",
                "mask_ratio": "--mask-ratio", "alpha": "--alpha", "gamma": "--gamma", "tau": "--tau",
                "scope": "--scope"}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def check_deepspeed_file(cfg) -> None:
    """Raise ValueError naming the first setting of a user's DeepSpeed file that the run
    would not use; fold the file's extra optimizer params into ``cfg.opt_kwargs``."""
    spec = cfg.deepspeed_config
    if not os.path.isfile(spec):
        return  # a shipped name: ZeRO settings only (see the module docstring)
    ds: Dict = cfg.deepspeed_dict
    where = f"deepspeed_config {spec!r}"

    def conflict(key, file_value, run_value, flag):
        raise ValueError(f"{where}: {key}={file_value!r} but this run uses {run_value!r} ({flag}); "
                         f"pass {flag} to match the file, or remove {key!r} from the file")

    from .optim import optimizer_spec

    # Shapes first: DeepSpeed would fail on them deep inside initialize (or ignore them).
    for key in ("bf16", "fp16", "zero_optimization", "optimizer"):
        if key in ds and not isinstance(ds[key], dict):
            raise ValueError(f"{where}: {key!r} must be a JSON object (e.g. {{\"enabled\": true}} for bf16, "
                             f"{{\"stage\": 2}} for zero_optimization), got {ds[key]!r}")
    for key in ("bf16", "fp16"):
        if key in ds and ds[key].get("enabled", "auto") not in (True, False, "auto"):
            raise ValueError(f"{where}: {key}.enabled must be true, false or \"auto\", got {ds[key]['enabled']!r}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    class_name, kw = optimizer_spec(cfg)
    kw = {k: v for k, v in kw.items() if k != "adamw_lr"}   # mgup_muon: a param group's lr, not a keyword
    block = ds.get("optimizer")
    if block is not None:
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise ValueError(f"{where}: 'optimizer' must be an object with a string 'type'")
        if not isinstance(block.get("params") or {}, dict):
            raise ValueError(f"{where}: optimizer.params must be a JSON object of keyword arguments, got "
                             f"{block.get('params')!r}")
        ftype, fparams = block["type"], dict(block.get("params") or {})
        if class_name == "AdamW":
            if ftype.lower() not in ("adamw", "adam"):
                conflict("optimizer.type", ftype, cfg.optimizer, "--optimizer")
            dropped = sorted(k for k in fparams if k not in kw)
            if dropped:
                raise ValueError(f"{where}: optimizer.params {dropped} would not be used: the adamw baseline takes "
                                 f"only {sorted(kw)} (from the flags); remove them")
        else:
            import torch

            from mgup_dist.integrations.deepspeed import _resolve_name, build_optimizer

            if _resolve_name(ftype) != class_name:
                conflict("optimizer.type", ftype, f"{cfg.optimizer} ({class_name})", "--optimizer")
            given = {k: v for k, v in fparams.items() if v != "auto"}
            # Validate exactly as DeepSpeed will construct it: unknown keys and bad values raise here.
            try:
                build_optimizer(class_name, [torch.zeros(2, requires_grad=True)], {**kw, **given})
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
        extra = dict(cfg.opt_kwargs or {})
        for key, value in fparams.items():
            if value == "auto":
                continue
            if key in kw:
                if not _same(value, kw[key]):
                    conflict(f"optimizer.params.{key}", value, kw[key], _PARAM_FLAGS.get(key, "--opt-kwargs"))
            elif class_name != "AdamW":
                extra[key] = value   # not set by any flag: honour the file
        cfg.opt_kwargs = extra or cfg.opt_kwargs
    if "scheduler" in ds:
        raise ValueError(f"{where}: a 'scheduler' block would be replaced by the recipe's cosine schedule "
                         "(--lr, --warmup-steps, --min-lr-ratio); remove it")
    for key, run_value, flag in (("train_batch_size", cfg.global_batch, "--global-batch"),
                                 ("train_micro_batch_size_per_gpu", cfg.micro_batch, "--micro-batch"),
                                 ("gradient_accumulation_steps", cfg.grad_accum, "--global-batch/--micro-batch"),
                                 ("gradient_clipping", cfg.grad_clip, "--grad-clip")):
        if key in ds and ds[key] != "auto" and not _same(ds[key], run_value):
            conflict(key, ds[key], run_value, flag)
    if (ds.get("fp16") or {}).get("enabled") is True:
        raise ValueError(f"{where}: fp16.enabled=true is not supported by the recipe; use bf16 or fp32 (--precision)")
    bf16 = (ds.get("bf16") or {}).get("enabled", "auto")
    if bf16 != "auto":
        wanted = "bf16" if bf16 else "fp32"
        if cfg.precision == "auto":
            cfg.precision = wanted   # honour the file
        elif cfg.precision != wanted:
            conflict("bf16.enabled", bf16, cfg.precision, "--precision")
