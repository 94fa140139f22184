"""The three ways the recipe runs a model: DDP, FSDP2 (``fully_shard``), DeepSpeed.

One small interface so that the training loop does not know which it drives:
``forward_backward(ids, last)``, ``step() -> grad norm``, ``eval_sums(ids)``,
``save(dir)`` / ``load(dir)`` (each rank writes / reads its part of a checkpoint
directory; the caller makes it atomic), ``lr``.

Device handling goes through :mod:`mgup_dist.device` only: the same code runs on CPU
(gloo), CUDA (nccl) and Ascend NPU (hccl, ``torch_npu`` imported lazily there).
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .data import IGNORE_INDEX
from .optim import CosineWithWarmup, build_optimizer, build_scheduler, optimizer_spec, param_groups, schedule_steps

__all__ = ["build_engine", "Engine", "load_optimizer_state"]


def _load_file(file: str, **kw):
    """``torch.load(weights_only=True)``; a failure names the file (resume falls back on it)."""
    try:
        return torch.load(file, weights_only=True, **kw)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise RuntimeError(f"{os.path.basename(file)} does not load ({type(e).__name__}: {first})") from e


def _labels(ids: torch.Tensor, pad_id: Optional[int]) -> torch.Tensor:
    labels = ids.clone()
    if pad_id is not None:
        labels[labels == pad_id] = IGNORE_INDEX
    return labels


class Engine:
    name = "base"

    def __init__(self, cfg, model: torch.nn.Module, device: torch.device, pad_id: Optional[int]):
        self.cfg, self.device, self.pad_id = cfg, device, pad_id
        self.bf16 = cfg.bf16
        self.raw_model = model
        self.skipped = False       # did the last step() skip the update (non-finite gradient norm)?

    # -- helpers shared by ddp / fsdp2
    def _autocast(self):
        if not self.bf16 or self.name == "fsdp2":   # FSDP2 casts through its MixedPrecisionPolicy
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _loss(self, module, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean next-token cross-entropy and the number of predicted tokens."""
        ids = ids.to(self.device, non_blocking=True)
        labels = _labels(ids, self.pad_id)
        # No attention mask: padding only ever trails a sequence (pad mode), so under the
        # causal mask no real token attends to a pad, and padded targets are ignored.
        with self._autocast():
            out = module(input_ids=ids, labels=labels)
        count = (labels[:, 1:] != IGNORE_INDEX).sum()
        return out.loss.float(), count

    def _step_if_finite(self, norm: torch.Tensor) -> torch.Tensor:
        """Skip the update when the global gradient norm is inf/NaN (as Megatron and
        DeepSpeed do): no optimizer step, scheduler not advanced (DeepSpeed's rule),
        gradients dropped.  ``norm`` is global (all-reduced grads / a full DTensor norm),
        so every rank takes the same branch."""
        self.skipped = not bool(torch.isfinite(norm).item())
        if not self.skipped:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    @torch.no_grad()
    def eval_sums(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        loss, count = self._loss(self.model, ids)
        return loss * count, count

    def train(self, mode: bool = True):
        self.model.train(mode)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class DDPEngine(Engine):
    """torch DistributedDataParallel (plain module when single-process)."""

    name = "ddp"

    def __init__(self, cfg, model, device, pad_id):
        super().__init__(cfg, model, device, pad_id)
        model.to(device)
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(model, device_ids=None if device.type == "cpu" else [device])
        else:
            self.model = model
        self.optimizer = build_optimizer(model, cfg)
        if self.distributed and hasattr(self.optimizer, "replicated"):
            # DDP replicas: the MGUP optimizers check that every rank steps with the same
            # hyperparameters (a ValueError naming the setting, not drifting replicas).
            self.optimizer.replicated()
        self.scheduler = build_scheduler(self.optimizer, cfg)

    def forward_backward(self, ids, last: bool):
        ctx = self.model.no_sync() if (self.distributed and not last) else contextlib.nullcontext()
        with ctx:
            loss, _ = self._loss(self.model, ids)
            (loss / self.cfg.grad_accum).backward()
        return loss.detach()

    def step(self) -> torch.Tensor:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        return self._step_if_finite(norm)

    def save(self, path: str, rank: int) -> None:
        # DDP keeps model and optimizer replicated: rank 0 writes them once.
        if rank == 0:
            torch.save(self.raw_model.state_dict(), os.path.join(path, "model.pt"))
            torch.save(self.optimizer.state_dict(), os.path.join(path, "optimizer.pt"))
            torch.save(self.scheduler.state_dict(), os.path.join(path, "scheduler.pt"))

    def load(self, path: str) -> None:
        self.raw_model.load_state_dict(_load_file(os.path.join(path, "model.pt"), map_location=self.device))
        load_optimizer_state(self.optimizer, os.path.join(path, "optimizer.pt"))
        self.scheduler.load_state_dict(_load_file(os.path.join(path, "scheduler.pt")))


class FSDP2Engine(Engine):
    """``torch.distributed.fsdp.fully_shard`` per decoder layer and on the root: params are
    DTensors sharded on dim 0; the MGUP optimizers run on them directly (their layout comes
    from ``mgup_dist.integrations.fsdp``).  Checkpoints use torch.distributed.checkpoint."""

    name = "fsdp2"

    def __init__(self, cfg, model, device, pad_id):
        super().__init__(cfg, model, device, pad_id)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        assert dist.is_initialized(), "fsdp2 needs a process group"
        model.to(device)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else \
            MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        self.model = model
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)

    def forward_backward(self, ids, last: bool):
        # Reduce-scatter gradients only on the last micro-batch of the accumulation.
        self.model.set_requires_gradient_sync(last)
        loss, _ = self._loss(self.model, ids)
        (loss / self.cfg.grad_accum).backward()
        return loss.detach()

    def step(self) -> torch.Tensor:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return self._step_if_finite(norm)

    def _dcp_state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def save(self, path: str, rank: int) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state(), checkpoint_id=os.path.join(path, "dcp"))
        if rank == 0:
            torch.save(self.scheduler.state_dict(), os.path.join(path, "scheduler.pt"))

    def load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._dcp_state()   # allocates optimizer state (a zero-lr step) so DCP has targets
        with _quiet_dcp_fallback_warnings():
            dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(_load_file(os.path.join(path, "scheduler.pt")))


@contextlib.contextmanager
def _deepspeed_calls():
    """Around the recipe's calls into DeepSpeed only: DeepSpeed 0.19 gathers ZeRO partitions
    and reduces gradients with ``torch.distributed.all_gather_into_tensor`` /
    ``reduce_scatter_tensor``, which torch 2.13 deprecates with a FutureWarning on every
    rank; those warnings (and only they) are not the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                                "is deprecated", category=FutureWarning)
        yield


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` with the optimizer named in the DeepSpeed config
    (``{"type": "MGUPAdamW", "params": {...}}``, resolvable after
    ``mgup_dist.integrations.deepspeed.register()``), our cosine schedule as the client
    LR scheduler, batch sizes / clipping / bf16 filled in from the recipe's flags."""

    name = "deepspeed"

    def __init__(self, cfg, model, device, pad_id):
        super().__init__(cfg, model, device, pad_id)
        try:
            import deepspeed
        except ImportError as e:
            raise ValueError("engine: 'deepspeed' needs `pip install deepspeed`") from e
        class_name, kw = optimizer_spec(cfg)
        kw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}
        ds = copy.deepcopy(cfg.deepspeed_dict)
        if class_name != "AdamW":
            from mgup_dist.integrations.deepspeed import register

            register()
        else:
            offload = (ds.get("zero_optimization", {}).get("offload_optimizer", {}) or {}).get("device", "none")
            if offload in (None, "none"):
                kw["torch_adam"] = True      # torch's AdamW, not DeepSpeed's fused CUDA kernel
            kw["adam_w_mode"] = True
        groups = param_groups(model, cfg, kw)
        kw.pop("adamw_lr", None)   # mgup_muon: already the lr of its AdamW-fallback groups
        ds["optimizer"] = {"type": class_name, "params": kw}
        ds.pop("scheduler", None)
        ds["train_batch_size"] = cfg.global_batch
        ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        ds["gradient_clipping"] = cfg.grad_clip
        ds["bf16"] = {"enabled": bool(self.bf16)}
        ds["fp16"] = {"enabled": False}
        ds.setdefault("steps_per_print", 10 ** 9)
        ds.setdefault("wall_clock_breakdown", False)
        self.ds_config = ds
        with _deepspeed_calls():
            self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, model_parameters=groups, config=ds,
                lr_scheduler=lambda opt: CosineWithWarmup(opt, warmup=cfg.warmup_steps, total=schedule_steps(cfg),
                                                          min_ratio=cfg.min_lr_ratio),
            )
        _apply_timeout(cfg.timeout)

    def load(self, path: str) -> None:
        load_path, _ = self.model.load_checkpoint(path, tag="ds", load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {path!r}")
        _apply_timeout(self.cfg.timeout)   # groups made while loading

    def _autocast(self):
        return contextlib.nullcontext()   # DeepSpeed keeps bf16 weights itself

    def forward_backward(self, ids, last: bool):
        loss, _ = self._loss(self.model, ids)
        with _deepspeed_calls():
            self.model.backward(loss)   # divides by gradient_accumulation_steps itself
            self.model.step()           # steps optimizer + scheduler at the accumulation boundary only
        return loss.detach()

    def step(self) -> torch.Tensor:
        # forward_backward already stepped at the boundary (DeepSpeed clips by
        # gradient_clipping itself); report the norm it measured.
        # A non-finite norm: ZeRO-1/2 (bf16 and fp32) detect it themselves, skip the update,
        # drop the gradients and do not advance the LR scheduler (was_step_applied() False).
        norm = self.model.get_global_grad_norm()
        norm = torch.as_tensor(float(norm) if norm is not None else float("nan"))
        self.skipped = not self.model.was_step_applied()
        if not self.skipped and not bool(torch.isfinite(norm)) and self.model.get_global_grad_norm() is not None:
            raise RuntimeError(f"deepspeed: the engine applied a step with a non-finite gradient norm ({float(norm)}) "
                               "(this ZeRO stage / precision does not check for overflow); parameters are now "
                               "non-finite: resume from the last checkpoint with --deepspeed-config zero1/zero2 "
                               "or a lower lr")
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: str, rank: int) -> None:
        self.model.save_checkpoint(path, tag="ds", save_latest=False)



@contextlib.contextmanager
def _quiet_dcp_fallback_warnings():
    """DCP logs a traceback on the root logger when a ``.metadata`` does not load, before
    it raises; the trainer reports that failure in one line and falls back to an older
    checkpoint, so these records are dropped while a checkpoint loads (others pass)."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return "torch/distributed/checkpoint/" not in record.pathname.replace(os.sep, "/")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _apply_timeout(seconds: float) -> None:
    """DeepSpeed makes its data-parallel (and other) groups with ``new_group(ranks)``,
    which takes torch's default timeout (30 minutes off NCCL), not the one of the world
    group the trainer made with ``--timeout``: a stopped rank then held the others for
    30 minutes.  Give every group this process belongs to the run's timeout (gloo and
    NCCL; torch warns and keeps the default on other backends)."""
    import datetime

    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=seconds)
    for pg in list(c10d._world.pg_map):
        if pg is not None and not c10d._rank_not_in_group(pg):
            c10d._set_pg_timeout(timeout, pg)


def load_optimizer_state(optimizer: torch.optim.Optimizer, file: str) -> None:
    """Load ``optimizer.pt`` so every state tensor lands where a fresh optimizer keeps it.
    torch's ``Optimizer.load_state_dict`` moves moments to their parameter's device and
    dtype, but hands ``step`` over as loaded unless the group is capturable/fused.  Loaded
    with ``map_location=device`` the counter would sit on the accelerator and each
    non-capturable step (torch's and MGUP's, which read it with ``.item()``) would wait on
    the device.  So load on the CPU and let torch's per-parameter policy place the rest:
    ``step`` stays a CPU 0-d tensor where a fresh one is, and goes to the device exactly
    where capturable/fused optimizers want it.  A counter saved elsewhere (an older
    checkpoint written from the device, or in float64) is put back to the fresh layout:
    a CPU float32 0-d tensor for non-capturable, non-fused groups."""
    optimizer.load_state_dict(_load_file(file, map_location="cpu"))
    for group in optimizer.param_groups:
        if group.get("capturable") or group.get("fused"):
            continue   # torch's policy already put 'step' on the parameter's device, fp32
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(device="cpu", dtype=torch.float32)


_ENGINES = {"ddp": DDPEngine, "fsdp2": FSDP2Engine, "deepspeed": DeepSpeedEngine}


def build_engine(cfg, model, device, pad_id) -> Engine:
    return _ENGINES[cfg.engine](cfg, model, device, pad_id)
