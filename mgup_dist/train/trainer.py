"""The training loop of ``mgup-dist train``: setup, steps, evaluation, checkpoints, logs."""
from __future__ import annotations

import datetime
import json
import math
import os
import socket
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from mgup_dist import device as dev

from . import checkpoint as ckpt
from .config import fingerprint, parse, to_jsonable
from .data import build_datasets

__all__ = ["train", "run", "CollectiveTimeout"]


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than ``--timeout`` for another rank."""


# What this rank is doing, for the message of a collective that times out.
_PHASE = ["setup"]
_PHASE_CHANGED = threading.Event()


def _set_phase(text: str) -> None:
    _PHASE[0] = text
    _PHASE_CHANGED.set()   # the heartbeat thread publishes it (off the training thread)


class _Heartbeat:
    """Names the rank that stopped when a collective times out.  Each rank's daemon
    thread adds 1 to ``alive/<rank>`` in the process group's store every ``interval``
    seconds, and publishes the rank's phase (``phase/<rank>``) when it changes (at most
    50 store operations a second, none on the training thread); a frozen (SIGSTOP,
    swapped out) or dead process adds nothing.  The rank whose collective timed out reads
    every counter twice, ``3 * interval`` apart: a counter that did not move is a stopped
    rank."""

    PREFIX = "mgup_dist/heartbeat/"

    def __init__(self, rank: int, world: int, interval: float = 1.0):
        self.rank, self.world, self.interval = rank, world, interval
        self.store = dist.distributed_c10d._get_default_store()
        self._stop = threading.Event()
        self._phase = None
        self._thread = threading.Thread(target=self._run, name="mgup-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_beat = float("-inf")
        while not self._stop.is_set():
            try:
                _PHASE_CHANGED.clear()
                if _PHASE[0] != self._phase:
                    self._phase = _PHASE[0]
                    self.store.set(f"{self.PREFIX}phase/{self.rank}", self._phase)
                if time.monotonic() - last_beat >= self.interval:
                    self.store.add(f"{self.PREFIX}alive/{self.rank}", 1)
                    last_beat = time.monotonic()
            except Exception:   # the store is gone (shutdown, host lost): nothing left to report to
                return
            _PHASE_CHANGED.wait(max(0.0, self.interval - (time.monotonic() - last_beat)))
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()

    def diagnose(self) -> str:
        """'rank R stopped responding (...)' or the other ranks' phases; '' when the store
        does not answer within a few seconds."""
        box: List[str] = []

        def read():
            keys = [f"{self.PREFIX}alive/{r}" for r in range(self.world)]
            before = [self.store.add(k, 0) for k in keys]
            time.sleep(3 * self.interval)
            after = [self.store.add(k, 0) for k in keys]
            phases = {}
            for r in range(self.world):
                k = f"{self.PREFIX}phase/{r}"
                phases[r] = self.store.get(k).decode("utf-8", "replace") if self.store.check([k]) else "setup"
            stopped = [r for r in range(self.world) if r != self.rank and after[r] == before[r]]
            if stopped:
                box.append("; ".join(f"rank {r} stopped responding (no heartbeat for {3 * self.interval:g} s; its "
                                     f"last reported phase: {phases[r]})" for r in stopped))
            else:
                other = [f"rank {r}: {phases[r]}" for r in range(self.world) if phases[r] != phases[self.rank]]
                box.append("every rank is still running" + (f" ({', '.join(other)})" if other else "")
                           + ": one is far slower, or stuck outside a collective")

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(6 * self.interval + 5)
        return box[0] if box else ""


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("timed out" in text or "timeout" in text)



def _load_error(e: BaseException) -> str:
    """One line for a checkpoint that does not load.  DCP's CheckpointException wraps each
    rank's exception; its own first line names only the ranks, so the first wrapped one is
    reported."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))   # (exception, its traceback summary)
        inner = inner[0] if isinstance(inner, tuple) and inner else inner
        if isinstance(inner, BaseException):
            e = inner
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


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
    dev.check_local_processes(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    dev.set_device_for_local_rank(device)
    created = False
    if (world > 1 or cfg.engine in ("fsdp2", "deepspeed")) and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        backend = dev.comm_backend(device)
        store = _elastic_store(world)
        # A rank that stops answering (frozen, swapped out, stuck in I/O) fails every
        # collective after --timeout seconds instead of torch's 30-minute default.
        timeout = datetime.timedelta(seconds=cfg.timeout)
        if store is not None:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
        created = True
    return rank, world, device, created


def _gather_obj(obj) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [None] * dist.get_world_size()
        dist.all_gather_object(box, obj)
        return box
    return [obj]


def _broadcast_obj(obj):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


# Per-process bookkeeping, not settings: they may differ from rank to rank (the config
# file's path too: its values are what is compared).
_PER_RANK = ("local_rank", "config")


def _flag(key: str) -> str:
    return {"model_config": "--model (the model file's contents)",
            "deepspeed_dict": "--deepspeed-config (the file's contents)"}.get(key, "--" + key.replace("_", "-"))


def _check_ranks_agree(cfg) -> None:
    """Every rank must run the same configuration (a flag given to one rank only, a
    config file that differs between nodes): one all_gather_object of the settings at
    start, and a ValueError on every rank naming each differing flag with every rank's
    value, instead of ranks that clip, seed or schedule differently."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    mine = {k: v for k, v in to_jsonable(cfg).items() if k not in _PER_RANK}   # model_config included
    if getattr(cfg, "deepspeed_dict", None) is not None:   # left out of to_jsonable (config.json)
        mine["deepspeed_dict"] = cfg.deepspeed_dict
    every = _gather_obj(mine)
    keys = sorted(set().union(*every))
    diff = [k for k in keys if any(e.get(k, "<unset>") != every[0].get(k, "<unset>") for e in every)]
    if diff:
        raise ValueError("ranks disagree on their settings: " + "; ".join(
            f"{_flag(k)}: " + ", ".join(f"rank {r}: {e.get(k, '<unset>')!r}"[:200] for r, e in enumerate(every))
            for k in diff) + " (every rank must get the same flags and files)")


def _prepare_metrics_log(path: str, resume_step: int, out_dir: str) -> None:
    """Make ``metrics.jsonl`` hold every step up to ``resume_step`` exactly once, losing
    nothing: records of steps that will be redone (after the checkpoint; everything on a
    fresh start) and unparsable lines (a torn last line from a kill mid-write) move to
    ``metrics.discarded.jsonl``, which is only ever appended to.  The new log is written
    beside and renamed over the old one (atomic)."""
    if not os.path.isfile(path):
        return
    kept, dropped = [], []
    with open(path, "rb") as f:
        # bytes that are not UTF-8 (a foreign or damaged file) make their line unparsable, not the run
        lines = f.read().decode("utf-8", errors="replace").split("\n")
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            ok = isinstance(rec, dict) and "\ufffd" not in ln
            # a record's step orders the history: it must be an integer when present
            ok = ok and (not isinstance(rec.get("step", 0), bool) and isinstance(rec.get("step", 0), int))
        except ValueError:
            ok = False
        if not ok:
            where = "last line" if i >= len(lines) - 2 else f"line {i + 1}"
            _event(out_dir, f"metrics: dropping the unparsable {where} of {path!r} (torn write?): {ln[:80]!r}; "
                            "kept in metrics.discarded.jsonl")
            dropped.append(json.dumps({"discarded_raw_line": ln}) + "\n")
        elif resume_step > 0 and rec.get("step", 0) <= resume_step:
            kept.append(json.dumps(rec) + "\n")
        else:
            dropped.append(json.dumps(rec) + "\n")
    if dropped:
        with open(os.path.join(out_dir, "metrics.discarded.jsonl"), "a") as f:
            f.writelines(dropped)
        if resume_step == 0:
            _event(out_dir, f"metrics: starting from step 0; the {len(dropped)} old record(s) of {path!r} were moved "
                            "to metrics.discarded.jsonl")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class _Metrics:
    """Rank 0: JSONL (one object per record) and TensorBoard scalars."""

    def __init__(self, out_dir: str, enabled: bool, resume_step: int, tensorboard: bool):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        _prepare_metrics_log(self.path, resume_step, out_dir)
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
    """Mean token loss over the validation set of all ranks.  Local sums accumulate in
    float64; the all-reduce carries only dtypes hccl accepts (no float64 on NPU): the sum
    as two fp32 parts hi + lo (hi = fp32(sum), lo = fp32(sum - hi), so ~48 bits survive
    the reduction) and the token count as int64 (exact)."""
    engine.train(False)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, val.shape[0], micro):
        s, c = engine.eval_sums(val[i: i + micro])
        total += s.double()
        count += c.long()
    if dist.is_initialized():
        hi = total.float()
        parts = torch.stack([hi, (total - hi.double()).float()])
        dist.all_reduce(parts)
        dist.all_reduce(count)
        total = parts[0].double() + parts[1].double()
    engine.train(True)
    return (total / count.clamp_min(1).double()).item()


def _event(out_dir: Optional[str], msg: str) -> None:
    """A reliability event (skipped checkpoint or step, dropped log line): stderr and
    ``<out>/events.log`` (appended, never rewritten)."""
    line = f"[mgup-dist train] WARNING: {msg}"
    print(line, file=sys.stderr, flush=True)
    if out_dir is not None:
        try:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "events.log"), "a") as f:
                f.write(time.strftime("%Y-%m-%dT%H:%M:%S ") + line + "\n")
        except OSError:   # the message went to stderr; a read-only dir is reported elsewhere
            pass


# What a run writes in its output directory: files, and the directories below.
_OUT_FILES = ("metrics.jsonl", "metrics.discarded.jsonl", "events.log", "config.json", "summary.json", "lr.png",
              "train_loss.png", "val_loss.png", "val_loss_time.png")
_OUT_DIRS = ("checkpoints", "tensorboard")


def _probe_out_dir(out_dir: str, rank: int) -> None:
    """Create ``out_dir`` and write/remove a probe file (also in ``checkpoints/`` when it
    exists), before data and model exist: a read-only mount, a path under a file, a log
    path that is a directory fail here with one line, not at the first log record or
    checkpoint."""
    def probe(d):
        f = os.path.join(d, f".write_probe.rank{rank}")
        with open(f, "w") as fh:
            fh.write("ok\n")
        os.remove(f)

    try:
        os.makedirs(out_dir, exist_ok=True)
        probe(out_dir)
    except OSError as e:
        raise ValueError(f"out_dir: {out_dir!r} is not a writable directory ({e})") from e
    for name in _OUT_FILES:
        path = os.path.join(out_dir, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise ValueError(f"out_dir: {path!r} exists and is not a regular file (a directory or a dangling "
                             "link?); the run writes it: move it away")
        if os.path.isfile(path) and not os.access(path, os.W_OK):
            raise ValueError(f"out_dir: {path!r} is not writable; the run appends to it: fix its permissions")
    for name in _OUT_DIRS:
        path = os.path.join(out_dir, name)
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ValueError(f"out_dir: {path!r} exists and is not a directory; the run writes there: move it away")
    ck = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(ck):
        try:
            probe(ck)
        except OSError as e:
            raise ValueError(f"out_dir: the checkpoints directory {ck!r} is not writable ({e}); checkpoints are "
                             "written and rotated there: fix its permissions or pass another --out-dir") from e


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


def _resume_candidates(cfg, ckpt_root: str) -> List[str]:
    """Checkpoints to try, newest first (rank 0): every ``step_N`` for auto/latest, the
    given directory for ``--resume DIR``, none for ``never`` (which deletes them)."""
    if cfg.resume == "never":
        # A link to another disk stays a link: its checkpoints are removed, not the link.
        for old in ckpt.candidate_checkpoints(ckpt_root) if os.path.islink(ckpt_root) else (
                [ckpt_root] if os.path.isdir(ckpt_root) else []):
            try:
                ckpt.remove_path(old)
            except OSError as e:
                raise ValueError(f"resume: --resume never cannot remove the old checkpoint {old!r} ({type(e).__name__}: "
                                 f"{e}); remove it yourself or pass another --out-dir") from e
        return []
    if cfg.resume in ("auto", "latest"):
        return list(reversed(ckpt.candidate_checkpoints(ckpt_root)))
    return [cfg.resume]


def _pick_checkpoint(cfg, cands: List[str], start: int, reasons: List[str], ckpt_root: str,
                     key: Optional[bytes] = None) -> Optional[int]:
    """Index of the first of ``cands[start:]`` that verifies against its manifest (and
    its signature, with a signing ``key``) and whose trainer state loads (rank 0).  auto/latest skip the others with a warning
    naming the reason; checkpoints present but none usable: ValueError, never a silent
    fresh start.  ``reasons`` collects why each skipped one was unusable."""
    explicit = cfg.resume not in ("auto", "latest")
    for i in range(start, len(cands)):
        why = ckpt.verify_checkpoint(cands[i], key)
        if why is None:
            try:
                ckpt.load_trainer_state(cands[i])
            except ckpt.UnusableCheckpoint as e:
                why = str(e)
        if why is None:
            if reasons:
                _event(cfg.out_dir, f"resume: falling back to {cands[i]!r}")
            return i
        if explicit:
            raise ValueError(f"resume: {cands[i]!r} is not a usable checkpoint: {why}")
        reasons.append(f"{os.path.basename(cands[i])}: {why}")
        _event(cfg.out_dir, f"resume: skipping checkpoint {cands[i]!r}: {why}")
    if cands:
        raise ValueError(f"resume: {len(cands)} checkpoint(s) in {ckpt_root!r} but none is usable ("
                         + "; ".join(reasons) + "); pass --resume never to start over (deletes them) or "
                         "--resume DIR with a checkpoint from elsewhere")
    if cfg.resume == "latest":
        raise ValueError(f"resume: no checkpoint in {ckpt_root!r}")
    return None


def _decide(fn):
    """Run ``fn`` on rank 0 and hand its result, or its ValueError, to every rank (so that
    no rank waits in a collective for one that raised: all raise together)."""
    decision = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            decision = (fn(), None)
        except ValueError as e:
            decision = (None, str(e))
    result, error = _broadcast_obj(decision)
    if error is not None:
        raise ValueError(error)
    return result


def _check_resume_state(cfg, state: Dict, path: str, world: int) -> Dict:
    """Refusals (ValueError, before any work) of a checkpoint written by another run
    configuration; returns the applied setting changes."""
    _continue_schedule(cfg, state, path)
    now_fp, old_fp = fingerprint(cfg), dict(state["fingerprint"])
    old_fp.setdefault("schedule_steps", old_fp.get("steps"))   # written before runs could be continued
    applied = _SELECTION_SETTINGS if cfg.optimizer not in ("adamw", "muon") else ()
    mismatch = {k: (v, old_fp.get(k)) for k, v in now_fp.items()
                if k != "steps" and old_fp.get(k) != v and k not in applied}
    if mismatch:
        raise ValueError(
            f"resume: {path!r} was written by a different run configuration "
            f"(now vs checkpoint: {mismatch}); pass --resume never to start over, or choose another --name"
        )
    if len(state["per_rank"]) != world:
        # each rank's data position and RNG state are saved per rank: no mapping to another world size
        raise ValueError(
            f"resume: {path!r} was written by {len(state['per_rank'])} process(es), this run has "
            f"{world}; a checkpoint resumes only at the world size that wrote it (every engine): pass --name "
            f"for a new run, or --resume never to start this one over")
    changed = _check_resume_settings(cfg, state.get("settings"), path)
    changed.update({k: (old_fp.get(k), now_fp[k]) for k in applied if old_fp.get(k) != now_fp[k]})
    return changed


# MGUP's selection settings (as resolved: --tau gives alpha and gamma) may change on
# resume: the optimizer state (moments) does not depend on them.  The checkpoint's
# param groups carry the old values and every engine's load restores them, so the
# current ones are put back after the load (:func:`_apply_selection_settings`).
_SELECTION_SETTINGS = ("mask_ratio", "alpha", "gamma", "scope")


def _apply_selection_settings(optimizer, cfg) -> None:
    fp = fingerprint(cfg)
    for group in optimizer.param_groups:
        if "mask_ratio" in group:   # every group of an MGUP optimizer
            group.update({k: fp[k] for k in _SELECTION_SETTINGS}, tau=None)


def _continue_schedule(cfg, state: Dict, path: str) -> None:
    """``--steps`` may differ from the checkpoint's run: a finished run trains on, an
    unfinished one ends elsewhere.  The lr schedule is the checkpoint's (its warmup, and its
    cosine reaching ``lr * min_lr_ratio`` at the step count it was started with); past that
    step the lr stays at the minimum.  So the steps already taken keep the lr they had, and
    a run continued from N to M steps equals one started with M steps whose schedule ends at N.
    Refused: ``--steps`` below the checkpoint's step, and another ``--warmup-steps``."""
    fp = state["fingerprint"]
    done = int(state["step"])
    if cfg.steps < done:
        raise ValueError(f"steps: {path!r} is at step {done}, past --steps {cfg.steps}; pass --steps {done} or more "
                         "to continue it, or start a new run (--resume never or another --name)")
    cfg.schedule_steps = int(fp.get("schedule_steps") or fp["steps"])
    saved_warmup = fp.get("warmup_steps")
    if not getattr(cfg, "warmup_given", True) and saved_warmup is not None:
        cfg.warmup_steps = int(saved_warmup)   # the default (10% of --steps) follows the schedule already run
    if cfg.steps != fp["steps"] and (not dist.is_initialized() or dist.get_rank() == 0):
        tail = (f"then holds lr x min_lr_ratio = {cfg.lr * cfg.min_lr_ratio:.3g} for steps "
                f"{cfg.schedule_steps + 1}-{cfg.steps}" if cfg.steps > cfg.schedule_steps
                else f"and stops at step {cfg.steps}")
        print(f"[mgup-dist train] continuing {cfg.name} from step {done} to {cfg.steps} (was {fp['steps']}): the lr "
              f"schedule keeps its {cfg.warmup_steps} warmup step{'s' if cfg.warmup_steps != 1 else ''} and its cosine "
              f"to step {cfg.schedule_steps}, "
              f"{tail}", flush=True)


# Settings outside the fingerprint that a resume cannot change: the checkpoint's optimizer
# state was built with them (param groups carry betas/eps/extra kwargs, which
# load_state_dict would silently restore), or they change the numerics of the weights
# (precision) or the model itself (the model file's contents) or the DeepSpeed layout.
_REFUSED_ON_RESUME = ("bf16", "beta1", "beta2", "eps", "opt_kwargs", "muon_lr", "deepspeed_config", "model_config")
# Bookkeeping, not settings of the run.
_IGNORED_ON_RESUME = ("resume", "local_rank", "config", "device_obj", "deepspeed_dict", "name", "warmup_given")


def _report_resume(out_dir: str, path: str, step: int, changed: Dict) -> None:
    """Say whether a resumed run changes: one line per changed setting (what the
    checkpoint had, what now applies), or one line saying that none changed (flags given
    again with the checkpoint's values, e.g. ``--tau 0.5`` when tau was 0.5, are none)."""
    where = f"{os.path.basename(os.path.normpath(path))} (step {step})"
    if not changed:
        print(f"[mgup-dist train] resume: from {where} with the checkpoint's settings (no setting changed)",
              flush=True)
        return
    for k, (old, new) in sorted(changed.items()):
        _event(out_dir, f"resume: from {where}: changed setting applied: {k}: checkpoint {old!r}, now {new!r}")


def _resume_settings(cfg) -> Dict:
    return dict(to_jsonable(cfg), bf16=cfg.bf16)


def _check_resume_settings(cfg, saved: Optional[Dict], path: str) -> Dict:
    """Compare the checkpoint's settings with this run's.  Refused changes raise a
    ValueError naming every such setting with its old and new value (before any work);
    the others (grad_clip, micro_batch at the same global batch, log/eval/save cadence,
    world size where the engine reshards, ...) are applied and returned for the log."""
    if saved is None:   # a checkpoint of an older version: nothing recorded to compare
        return {}
    now = _resume_settings(cfg)
    # The fingerprint's settings were compared as the optimizer resolves them (tau 0.5 =
    # alpha 2, gamma 0.5), the vocabulary is compared once the tokenizer exists: an
    # explicit default is no change.
    resolved = set(fingerprint(cfg)) | {"vocab_size"}
    changed = {k: (saved.get(k), v) for k, v in now.items()
               if k not in _IGNORED_ON_RESUME and k not in resolved and k in saved and saved.get(k) != v}
    refused = {k: ov for k, ov in changed.items() if k in _REFUSED_ON_RESUME}
    if refused:
        what = ", ".join(f"{'precision (bf16)' if k == 'bf16' else k}: checkpoint {o!r}, now {n!r}"
                         for k, (o, n) in sorted(refused.items()))
        raise ValueError(f"resume: {path!r} cannot continue with changed settings ({what}); pass the checkpoint's "
                         "values, or start a new run (--resume never or another --name)")
    return changed


def train(cfg) -> Dict:
    """Run a validated config (see :func:`mgup_dist.train.config.parse`).  Returns the run
    summary (rank 0's view; other ranks return theirs)."""
    rank, world, device, created_pg = _init_distributed(cfg)
    clean = False
    _set_phase("setup")
    heartbeat = None
    if world > 1 and dist.is_initialized():
        try:
            heartbeat = _Heartbeat(rank, world)
        except Exception:   # no store (an externally made group): timeouts then name no rank
            heartbeat = None
    try:
        out = _train(cfg, rank, world, device)
        clean = True
        return out
    except ValueError:
        # refusals are decided on rank 0 and raised by every rank at the same point
        clean = True
        raise
    except Exception as e:
        if world > 1 and _is_timeout(e):
            who = heartbeat.diagnose() if heartbeat is not None else ""
            raise CollectiveTimeout(
                f"rank {rank} of {world}: a collective timed out (--timeout {cfg.timeout:g} s) during {_PHASE[0]}: "
                + (f"{who}; " if who else "another rank stopped responding (frozen, killed, out of memory, or far "
                                         "slower); ") + "the newest "
                f"checkpoint in {os.path.join(cfg.out_dir, 'checkpoints')!r} resumes the run; raise --timeout if a "
                "rank is merely slow (large checkpoints on slow disks)") from e
        raise
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        # After a failure other ranks may be stuck or gone: tearing down could wait on them.
        if created_pg and dist.is_initialized() and clean:
            _leave_together(cfg.timeout)
            dist.destroy_process_group()


def _leave_together(timeout_s: float) -> None:
    """Wait until every rank is done with every collective before the group is torn down.

    Arriving here means a rank finished all its collectives, so a count of arrivals in the
    store is the safe point; rank 0 (which may host the store) leaves last.  The waits sleep,
    giving up the GIL: a gloo worker thread still releasing the tensors of a finished
    collective needs it, and one left waiting for it when the interpreter finalizes aborts the
    process (``terminate called without an active exception``; with a barrier and no wait,
    about one run in six; see ``mgup_dist.collectives``)."""
    store = None
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:   # no store (an externally made group): the barrier is what there is
        pass
    if store is None or dist.get_world_size() == 1:
        dist.barrier()
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    deadline = time.monotonic() + timeout_s
    arrived = store.add("mgup_dist/exit/arrived", 1)
    while arrived < world:
        if time.monotonic() > deadline:
            raise RuntimeError(f"exit: only {arrived} of {world} ranks finished within --timeout {timeout_s:g} s")
        time.sleep(0.01)
        arrived = store.add("mgup_dist/exit/arrived", 0)
    left = store.add("mgup_dist/exit/left", 1 if rank else 0)
    while rank == 0 and left < world - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
        left = store.add("mgup_dist/exit/left", 0)


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

    _check_ranks_agree(cfg)
    _probe_out_dir(out_dir, rank)

    # ---- resume decision (rank 0 decides, everyone follows; also its refusal, so that
    # no rank waits in a collective for one that raised)
    if os.path.exists(ckpt_root) and not os.path.isdir(ckpt_root):
        raise ValueError(f"out_dir: {ckpt_root!r} exists and is not a directory; move it away (checkpoints are "
                         "written there)")
    reasons: List[str] = []

    def pick(start, cands_box=[]):
        if start == 0:
            cands_box[:] = _resume_candidates(cfg, ckpt_root)
        idx = _pick_checkpoint(cfg, cands_box, start, reasons, ckpt_root, ckpt.signing_key())
        return (list(cands_box), idx)

    cands, idx = _decide(lambda: pick(0))
    sign_key = ckpt.signing_key() if is_main else None   # rank 0 signs (it verified the key in pick)
    ckpt.barrier()
    resume_path = cands[idx] if idx is not None else None
    resume_state = None
    changed_on_resume: Dict = {}
    if resume_path is not None:
        resume_state = ckpt.load_trainer_state(resume_path)   # weights_only: no code from a checkpoint runs
        changed_on_resume = _check_resume_state(cfg, resume_state, resume_path, world)

    # ---- data (before the model: bad paths / tokenizers fail before any heavy work)
    data = build_datasets(cfg, rank, world)
    model_cfg = dict(cfg.model_config)
    if cfg.vocab_size == "auto":
        model_cfg["vocab_size"] = len(data.tokenizer)
    elif cfg.vocab_size is not None:
        model_cfg["vocab_size"] = int(cfg.vocab_size)
    vocab = model_cfg["vocab_size"]
    if resume_state is not None and resume_state.get("vocab_size", vocab) != vocab:
        raise ValueError(f"resume: {resume_path!r} was written with a vocabulary of {resume_state['vocab_size']} "
                         f"entries, this run's is {vocab} (--vocab-size / --model / --tokenizer)")
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
    while resume_state is not None:
        # A checkpoint can match its manifest (regenerated by hand, or written by a
        # faulty disk before hashing) and still not load: fall back to the next one.
        err = None
        try:
            engine.load(resume_path)
            data.train.load_state_dict(resume_state["per_rank"][rank]["data"])
            ckpt.set_rng_state(resume_state["per_rank"][rank]["rng"], device)
        except BaseException as e:   # also DCP's CheckpointException, which is not an Exception
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            err = f"rank {rank}: {_load_error(e)}"
        errors = _gather_obj(err)
        errors = [e for e in errors if e is not None]
        if not errors:
            start_step = int(resume_state["step"])
            if any(k in _SELECTION_SETTINGS for k in changed_on_resume):
                _apply_selection_settings(engine.optimizer, cfg)
            if is_main:
                _report_resume(out_dir, resume_path, start_step, changed_on_resume)
            break
        why = "verifies against its manifest but does not load (" + "; ".join(errors) + ")"
        if cfg.resume not in ("auto", "latest"):
            raise ValueError(f"resume: {resume_path!r} is not a usable checkpoint: {why}")
        if is_main:
            reasons.append(f"{os.path.basename(resume_path)}: {why}")
            _event(out_dir, f"resume: skipping checkpoint {resume_path!r}: {why}")
        cands, idx = _decide(lambda: pick(idx + 1))
        resume_path = cands[idx] if idx is not None else None
        resume_state = None
        if resume_path is not None:
            resume_state = ckpt.load_trainer_state(resume_path)
            changed_on_resume = _check_resume_state(cfg, resume_state, resume_path, world)

    if start_step >= cfg.steps:   # a finished run: nothing to do (a rerun, or a restart after the end)
        summary_path = os.path.join(out_dir, "summary.json")
        summary = {}
        if os.path.isfile(summary_path):
            try:
                with open(summary_path, "rb") as f:
                    summary = json.loads(f.read().decode("utf-8"))
                if not isinstance(summary, dict):
                    raise ValueError(f"a JSON {type(summary).__name__}, not an object")
            except ValueError as e:   # a damaged or foreign file: the checkpoint is what counts
                if is_main:
                    _event(out_dir, f"summary: {summary_path!r} is not a JSON object ({e}); ignored, the run is "
                                    f"complete per its step-{start_step} checkpoint")
                summary = {}
        summary.update(steps=start_step, start_step=start_step)
        if is_main:
            print(f"[mgup-dist train] {cfg.name} is already complete ({start_step} steps) in {out_dir}", flush=True)
        ckpt.barrier()
        return summary

    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json.tmp"), "w") as f:
            json.dump(dict(to_jsonable(cfg), n_params=n_params, device=str(device), bf16=cfg.bf16,
                           resumed_from=resume_path, resumed_at_step=start_step,
                           changed_on_resume={k: list(v) for k, v in changed_on_resume.items()}), f, indent=2)
        os.replace(os.path.join(out_dir, "config.json.tmp"), os.path.join(out_dir, "config.json"))
    metrics = _Metrics(out_dir, is_main, start_step, not cfg.no_tensorboard)
    tokens_per_step = cfg.global_batch * cfg.seq_len
    if is_main:
        print(f"[mgup-dist train] {cfg.name}: {n_params / 1e6:.2f}M params, optimizer {cfg.optimizer}, engine "
              f"{cfg.engine}, device {device} x {world}, {'bf16' if cfg.bf16 else 'fp32'}, global batch "
              f"{cfg.global_batch} = {cfg.micro_batch} x {world} x {cfg.grad_accum} accum, seq {cfg.seq_len}; "
              f"{data.description}" + (f"; resumed at step {start_step}" if start_step else ""), flush=True)
        # A checkpoint holds fp32 weights plus the optimizer state: 2 moments (AdamW family) or 1
        # (Lion; Muon's matrices) -> about 4 * (1 + moments) bytes a parameter (130M: ~1.6 GB).
        moments = 1 if cfg.optimizer in ("lion", "mgup_lion", "muon", "mgup_muon") else 2
        size_gb = n_params * 4 * (1 + moments) / 1e9
        if getattr(cfg, "no_save", False):
            print("[mgup-dist train] checkpoints: none (--no-save)", flush=True)
        else:
            print(f"[mgup-dist train] checkpoints: about {size_gb:.3g} GB each in {ckpt_root}, every "
                  f"{cfg.save_every or cfg.steps} steps, newest {cfg.keep_checkpoints} kept "
                  f"(--save-every, --keep-checkpoints)", flush=True)

    pbar = None
    if is_main and not cfg.no_progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.name, unit="step", dynamic_ncols=True)

    skipped_total = int(resume_state.get("skipped_steps", 0)) if resume_state is not None else 0
    skipped_run = 0   # consecutive

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
        _set_phase(f"step {step + 1} (forward, backward, gradient reduction)")
        for micro in range(cfg.grad_accum):
            ids = data.train.next_micro()
            if int(ids.max()) >= vocab:
                raise ValueError(f"vocab_size: token id {int(ids.max())} >= model vocab {vocab}; pass --vocab-size auto")
            loss_acc += engine.forward_backward(ids, last=micro == cfg.grad_accum - 1)
            n_acc += 1
        _set_phase(f"step {step + 1} (clipping and optimizer step)")
        gnorm = engine.step()
        step += 1
        _set_phase(f"logging of step {step}")
        steps_since += 1
        if engine.skipped:
            skipped_total, skipped_run = skipped_total + 1, skipped_run + 1
            if is_main:
                _event(out_dir, f"step {step}: global gradient norm {float(gnorm)} is not finite; update skipped "
                                f"({skipped_run} in a row, {skipped_total} in this run)")
            if skipped_run >= cfg.max_skipped_steps:
                raise RuntimeError(f"training diverged: {skipped_run} consecutive steps (up to step {step}) had a "
                                   f"non-finite gradient norm (--max-skipped-steps {cfg.max_skipped_steps}); resume "
                                   f"from the last checkpoint in {ckpt_root!r} with a lower --lr or --grad-clip")
        else:
            skipped_run = 0

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
                   "tokens_per_s": tps, "epoch": data.train.epoch, "skipped_steps": skipped_total, "train_s": train_time}
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
            _set_phase(f"evaluation at step {step}")
            vl = _evaluate(engine, data.val, cfg.eval_micro_batch, device)
            rec = {"step": step, "val_loss": vl, "val_ppl": math.exp(min(vl, 50.0)), "train_s": train_time}
            metrics.log(rec)
            last["val_loss"] = vl
            if pbar is not None:
                pbar.write(f"step {step}: val loss {vl:.4f}, ppl {rec['val_ppl']:.2f}")
            elif is_main:
                print(f"step {step}: val loss {vl:.4f} ppl {rec['val_ppl']:.2f}", flush=True)
            t_mark = time.perf_counter()

        if not getattr(cfg, "no_save", False) and ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps):
            state = {"step": step, "fingerprint": fingerprint(cfg), "world_size": world, "name": cfg.name,
                     "settings": _resume_settings(cfg), "skipped_steps": skipped_total, "vocab_size": vocab,
                     "per_rank": {"data": data.train.state_dict(), "rng": ckpt.rng_state(device)}}
            _set_phase(f"checkpoint of step {step}")
            ckpt.save_checkpoint(ckpt_root, step, engine, state, rank, cfg.keep_checkpoints, key=sign_key)
            t_mark = time.perf_counter()

    if pbar is not None:
        pbar.close()
    metrics.close()
    summary = {"name": cfg.name, "optimizer": cfg.optimizer, "engine": cfg.engine, "steps": step,
               "start_step": start_step, "final_loss": last["loss"], "final_val_loss": last["val_loss"],
               "final_val_ppl": math.exp(min(last["val_loss"], 50.0)) if last["val_loss"] == last["val_loss"] else None,
               "tokens_per_s": (sum(tps_hist) / len(tps_hist)) if tps_hist else None,
               "train_seconds": train_time, "skipped_steps": skipped_total, "optimizer_ms": opt_timer.overall_mean_ms(),
               "world_size": world, "device": str(device), "n_params": n_params,
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
