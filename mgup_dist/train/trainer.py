"""The training loop of ``mgup-dist train``: setup, steps, evaluation, checkpoints, logs."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from mgup_dist import device as dev

from . import checkpoint as ckpt
from .config import fingerprint, parse, to_jsonable
from .data import build_datasets

__all__ = ["train", "run"]

FAULT_ENV = "MGUP_DIST_TEST_FAULT"   # test-only: "RANK:STEP:MARKER" -> that rank SIGKILLs itself once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _elastic_store(world: int):
    """Under torchrun the workers share the agent's TCPStore, which outlives a restart
    (torch 2.13's env:// handler assumes a fresh store per attempt and adds no prefix).
    Its keys from the failed attempt then remain: on CPU, gloo's rank 1 read rank 0's old
    address and the restarted group failed to connect.  A per-attempt prefix fixes it."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout

    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                         timeout=default_pg_timeout)
    return dist.PrefixStore(f"mgup_dist/attempt_{attempt}", base)


def _init_distributed(cfg):
    """Rank, world size and device; a process group when several ranks run or the engine
    needs one (FSDP2 and DeepSpeed also run single-process, on a group of one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = dev.resolve_device(cfg.device, local_rank=local_rank)
    dev.set_device_for_local_rank(device)
    created = False
    if (world > 1 or cfg.engine in ("fsdp2", "deepspeed")) and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        backend = dev.comm_backend(device)
        store = _elastic_store(world)
        if store is not None:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
        created = True
    return rank, world, device, created


def _broadcast_obj(obj):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


class _Metrics:
    """Rank 0: JSONL (one object per record) and TensorBoard scalars."""

    def __init__(self, out_dir: str, enabled: bool, resume_step: int, tensorboard: bool):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        # On resume keep only what happened up to the checkpoint: the steps after it are
        # redone and logged again, so the log holds every step exactly once.
        kept = []
        if resume_step > 0 and os.path.isfile(self.path):
            with open(self.path) as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        self.f = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step > 0 else None)
            except ImportError:  # pragma: no cover - tensorboard is optional
                self.tb = None

    def log(self, record: Dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def _evaluate(engine, val: torch.Tensor, micro: int, device) -> float:
    engine.train(False)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, val.shape[0], micro):
        s, c = engine.eval_sums(val[i: i + micro])
        total += s.double()
        count += c.double()
    if dist.is_initialized():
        both = torch.stack([total, count])
        dist.all_reduce(both)
        total, count = both[0], both[1]
    engine.train(True)
    return (total / count.clamp_min(1)).item()


class _OptimizerTimer:
    """Wall-clock of ``optimizer.step()`` alone (no clipping, no scheduler), through
    torch's step pre/post hooks, the device synchronised on both sides so that
    asynchronous kernels are counted in the step that launched them.  Engines whose
    optimizer is not a ``torch.optim.Optimizer`` (DeepSpeed's ZeRO wrappers) are not
    timed: ``optimizer_ms`` is then absent from the metrics."""

    def __init__(self, engine, device):
        opt = getattr(engine, "optimizer", None)
        self.enabled = isinstance(opt, torch.optim.Optimizer)
        self.device = device
        self._t0 = 0.0
        self._sum, self._n = 0.0, 0          # since the last log record
        self._all_sum, self._all_n = 0.0, 0  # whole run
        if self.enabled:
            opt.register_step_pre_hook(self._pre)
            opt.register_step_post_hook(self._post)

    def _pre(self, *_):
        dev.synchronize(self.device)
        self._t0 = time.perf_counter()

    def _post(self, *_):
        dev.synchronize(self.device)
        dt = time.perf_counter() - self._t0
        self._sum, self._n = self._sum + dt, self._n + 1
        self._all_sum, self._all_n = self._all_sum + dt, self._all_n + 1

    def take_mean_ms(self) -> Optional[float]:
        if not self._n:
            return None
        out = 1e3 * self._sum / self._n
        self._sum, self._n = 0.0, 0
        return out

    def overall_mean_ms(self) -> Optional[float]:
        return 1e3 * self._all_sum / self._all_n if self._all_n else None


def _resolve_resume(cfg, ckpt_root: str, rank: int) -> Optional[str]:
    path = None
    if cfg.resume == "never":
        if rank == 0 and os.path.isdir(ckpt_root):
            shutil.rmtree(ckpt_root)
    elif cfg.resume in ("auto", "latest"):
        path = ckpt.latest_checkpoint(ckpt_root)
        if path is None and cfg.resume == "latest":
            raise ValueError(f"resume: no checkpoint in {ckpt_root!r}")
    else:
        path = cfg.resume
        if not os.path.isfile(os.path.join(path, "trainer_state.pt")):
            raise ValueError(f"resume: {path!r} is not a complete checkpoint (no trainer_state.pt)")
    return path


def train(cfg) -> Dict:
    """Run a validated config (see :func:`mgup_dist.train.config.parse`).  Returns the run
    summary (rank 0's view; other ranks return theirs)."""
    rank, world, device, created_pg = _init_distributed(cfg)
    try:
        return _train(cfg, rank, world, device)
    finally:
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, rank: int, world: int, device: torch.device) -> Dict:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    is_main = rank == 0
    out_dir = cfg.out_dir
    ckpt_root = os.path.join(out_dir, "checkpoints")
    if cfg.precision == "bf16" and not dev.supports_bf16(device):
        raise ValueError(f"precision: bf16 is not supported on {device}")
    cfg.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.supports_bf16(device))

    # ---- resume decision (rank 0 decides, everyone follows)
    resume_path = _resolve_resume(cfg, ckpt_root, rank) if is_main else None
    resume_path = _broadcast_obj(resume_path)
    ckpt.barrier()
    resume_state = None
    if resume_path is not None:
        resume_state = torch.load(os.path.join(resume_path, "trainer_state.pt"), weights_only=False)
        mismatch = {k: (v, resume_state["fingerprint"].get(k)) for k, v in fingerprint(cfg).items()
                    if resume_state["fingerprint"].get(k) != v}
        if mismatch:
            raise ValueError(
                f"resume: {resume_path!r} was written by a different run configuration "
                f"(now vs checkpoint: {mismatch}); pass --resume never to start over, or choose another --name"
            )
        if resume_state["world_size"] != world and cfg.dataset == "c4":
            raise ValueError(f"resume: checkpoint world size {resume_state['world_size']} != {world} (C4 stream)")
        if resume_state["world_size"] != world and cfg.engine == "deepspeed":
            raise ValueError(f"resume: DeepSpeed checkpoint of world size {resume_state['world_size']} != {world}")

    # ---- data (before the model: bad paths / tokenizers fail before any heavy work)
    data = build_datasets(cfg, rank, world)
    model_cfg = dict(cfg.model_config)
    if cfg.vocab_size == "auto":
        model_cfg["vocab_size"] = len(data.tokenizer)
    elif cfg.vocab_size is not None:
        model_cfg["vocab_size"] = int(cfg.vocab_size)
    vocab = model_cfg["vocab_size"]
    if int(data.val.max()) >= vocab:
        raise ValueError(f"vocab_size: the tokenizer {cfg.tokenizer!r} produces id {int(data.val.max())} but the model's "
                         f"vocabulary has {vocab} entries; pass --vocab-size auto or a larger model config")

    # ---- model, engine
    torch.manual_seed(cfg.seed)
    model_cfg.pop("architectures", None)
    model_cfg.pop("transformers_version", None)
    model = LlamaForCausalLM(LlamaConfig(**model_cfg))
    n_params = sum(p.numel() for p in model.parameters())
    from .engines import build_engine

    engine = build_engine(cfg, model, device, data.tokenizer.pad_token_id)

    start_step = 0
    if resume_state is not None:
        engine.load(resume_path)
        start_step = int(resume_state["step"])
        data.train.load_state_dict(resume_state["per_rank"][rank]["data"])
        ckpt.set_rng_state(resume_state["per_rank"][rank]["rng"], device)

    if start_step >= cfg.steps:   # a finished run: nothing to do (a rerun, or a restart after the end)
        summary_path = os.path.join(out_dir, "summary.json")
        summary = {}
        if os.path.isfile(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
        summary.update(steps=start_step, start_step=start_step)
        if is_main:
            print(f"[mgup-dist train] {cfg.name} is already complete ({start_step} steps) in {out_dir}", flush=True)
        ckpt.barrier()
        return summary

    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(dict(to_jsonable(cfg), n_params=n_params, device=str(device), bf16=cfg.bf16), f, indent=2)
    metrics = _Metrics(out_dir, is_main, start_step, not cfg.no_tensorboard)
    tokens_per_step = cfg.global_batch * cfg.seq_len
    if is_main:
        print(f"[mgup-dist train] {cfg.name}: {n_params / 1e6:.2f}M params, optimizer {cfg.optimizer}, engine "
              f"{cfg.engine}, device {device} x {world}, {'bf16' if cfg.bf16 else 'fp32'}, global batch "
              f"{cfg.global_batch} = {cfg.micro_batch} x {world} x {cfg.grad_accum} accum, seq {cfg.seq_len}; "
              f"{data.description}" + (f"; resumed at step {start_step}" if start_step else ""), flush=True)

    fault = os.environ.get(FAULT_ENV)
    fault_rank = fault_step = fault_marker = None
    if fault:
        r, s, fault_marker = fault.split(":", 2)
        fault_rank, fault_step = int(r), int(s)

    pbar = None
    if is_main and not cfg.no_progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.name, unit="step", dynamic_ncols=True)

    step = start_step
    if start_step == 0:   # the starting point of the validation curve
        vl0 = _evaluate(engine, data.val, cfg.eval_micro_batch, device)
        metrics.log({"step": 0, "val_loss": vl0, "val_ppl": math.exp(min(vl0, 50.0)), "train_s": 0.0})
    loss_acc = torch.zeros((), device=device)
    n_acc = 0
    t_mark = time.perf_counter()
    steps_since = 0
    train_time = 0.0
    last = {"loss": float("nan"), "val_loss": float("nan"), "tokens_per_s": float("nan")}
    tps_hist: List[float] = []
    opt_timer = _OptimizerTimer(engine, device)
    engine.train(True)
    while step < cfg.steps:
        lr = engine.lr
        for micro in range(cfg.grad_accum):
            ids = data.train.next_micro()
            if int(ids.max()) >= vocab:
                raise ValueError(f"vocab_size: token id {int(ids.max())} >= model vocab {vocab}; pass --vocab-size auto")
            loss_acc += engine.forward_backward(ids, last=micro == cfg.grad_accum - 1)
            n_acc += 1
        gnorm = engine.step()
        step += 1
        steps_since += 1

        if step % cfg.log_every == 0 or step == cfg.steps:
            stats = torch.stack([loss_acc / max(1, n_acc), gnorm.to(device=device, dtype=loss_acc.dtype)])
            if dist.is_initialized():
                dist.all_reduce(stats)
                stats /= dist.get_world_size()
            dev.synchronize(device)
            dt = time.perf_counter() - t_mark
            train_time += dt
            tps = steps_since * tokens_per_step / dt
            tps_hist.append(tps)
            loss_v, gn_v = stats.tolist()
            rec = {"step": step, "loss": loss_v, "lr": lr, "grad_norm": gn_v, "tokens": step * tokens_per_step,
                   "tokens_per_s": tps, "epoch": data.train.epoch, "train_s": train_time}
            opt_ms = opt_timer.take_mean_ms()
            if opt_ms is not None:
                rec["optimizer_ms"] = opt_ms
            metrics.log(rec)
            last.update(loss=loss_v, tokens_per_s=tps)
            if pbar is not None:
                pbar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            elif is_main:
                print(f"step {step}/{cfg.steps} loss {loss_v:.4f} lr {lr:.3e} grad_norm {gn_v:.3f} "
                      f"tokens/s {tps:,.0f}", flush=True)
            loss_acc.zero_()
            n_acc, steps_since = 0, 0
            t_mark = time.perf_counter()
        if pbar is not None:
            pbar.update(1)

        if step % cfg.eval_every == 0 or step == cfg.steps:
            vl = _evaluate(engine, data.val, cfg.eval_micro_batch, device)
            rec = {"step": step, "val_loss": vl, "val_ppl": math.exp(min(vl, 50.0)), "train_s": train_time}
            metrics.log(rec)
            last["val_loss"] = vl
            if pbar is not None:
                pbar.write(f"step {step}: val loss {vl:.4f}, ppl {rec['val_ppl']:.2f}")
            elif is_main:
                print(f"step {step}: val loss {vl:.4f} ppl {rec['val_ppl']:.2f}", flush=True)
            t_mark = time.perf_counter()

        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            state = {"step": step, "fingerprint": fingerprint(cfg), "world_size": world, "name": cfg.name,
                     "per_rank": {"data": data.train.state_dict(), "rng": ckpt.rng_state(device)}}
            ckpt.save_checkpoint(ckpt_root, step, engine, state, rank, cfg.keep_checkpoints)
            t_mark = time.perf_counter()

        if fault_rank == rank and step == fault_step and not os.path.exists(fault_marker):
            with open(fault_marker, "w") as f:
                f.write(f"rank {rank} killed itself after step {step}\n")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    if pbar is not None:
        pbar.close()
    metrics.close()
    summary = {"name": cfg.name, "optimizer": cfg.optimizer, "engine": cfg.engine, "steps": step,
               "start_step": start_step, "final_loss": last["loss"], "final_val_loss": last["val_loss"],
               "final_val_ppl": math.exp(min(last["val_loss"], 50.0)) if last["val_loss"] == last["val_loss"] else None,
               "tokens_per_s": (sum(tps_hist) / len(tps_hist)) if tps_hist else None,
               "train_seconds": train_time, "optimizer_ms": opt_timer.overall_mean_ms(), "world_size": world, "device": str(device), "n_params": n_params,
               "out_dir": out_dir}
    if is_main:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if not cfg.no_plots:
            from .plot import plot_runs

            try:
                plot_runs([out_dir], out_dir)
            except ImportError as e:  # pragma: no cover - matplotlib missing
                print(f"[mgup-dist train] no plots: {e}", file=sys.stderr)
        print(f"[mgup-dist train] done: step {step}, train loss {summary['final_loss']:.4f}, val loss "
              f"{summary['final_val_loss']:.4f}, mean {summary['tokens_per_s'] or float('nan'):,.0f} tokens/s; "
              f"outputs in {out_dir}", flush=True)
    ckpt.barrier()
    return summary


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    """Parse ``argv`` (ValueError on bad input, before any work) and train."""
    cfg = parse(argv)
    return train(cfg)
