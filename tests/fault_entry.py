"""Faults injected from the tests, never from the product: ``python tests/fault_entry.py
ARGS`` runs ``mgup-dist train ARGS`` with the engine wrapped as the environment says
(also under torchrun, one process per rank):

* ``MGUP_TEST_SIGNAL="RANK:STEP:MARKER[:SIG]"``: after STEP optimizer steps are done
  (logged, evaluated, checkpointed), rank RANK sends itself SIG (default KILL) once: only
  while the file MARKER does not exist, which it creates first.
* ``MGUP_TEST_NAN="RANK:STEP[,STEP...]"``: rank RANK's training losses are NaN at those
  optimizer steps (1-based).
* ``MGUP_TEST_RANK_ARGS="RANK:ARG ARG..."``: rank RANK gets these extra command-line
  arguments (split on spaces), appended to the common ones.

In-process tests call :func:`install` with a pytest ``monkeypatch`` instead.
"""
from __future__ import annotations

import os
import signal
import sys

SIGNAL_ENV = "MGUP_TEST_SIGNAL"
NAN_ENV = "MGUP_TEST_NAN"
RANK_ARGS_ENV = "MGUP_TEST_RANK_ARGS"


def _wrap(engine, cfg, kill, nan):
    import torch
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    done = {"start": 0, "micro": 0}
    load, fb, loss = engine.load, engine.forward_backward, engine._loss

    def wrapped_load(path):
        load(path)
        done["start"] = int(torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)["step"])

    def wrapped_fb(ids, last):
        steps_done = done["start"] + done["micro"] // cfg.grad_accum
        done["micro"] += 1
        if kill is not None and kill[0] == rank and kill[1] == steps_done and not os.path.exists(kill[2]):
            with open(kill[2], "w") as f:
                f.write(f"rank {rank}: signal {kill[3]} after step {steps_done}\n")
            sys.stdout.flush()
            if kill[3] == signal.SIGSTOP:
                _continue_when_terminated(os.getpid())
            os.kill(os.getpid(), kill[3])
        if nan is not None and nan[0] == rank and steps_done + 1 in nan[1]:
            engine._loss = lambda module, x: (lambda lc: (lc[0] * float("nan") if module.training else lc[0], lc[1]))(
                loss(module, x))
            try:
                return fb(ids, last)
            finally:
                engine._loss = loss
        return fb(ids, last)

    engine.load, engine.forward_backward = wrapped_load, wrapped_fb
    return engine


_WATCH = """
import os, signal, sys, time
pid = int(sys.argv[1])
while True:
    try:
        with open(f"/proc/{pid}/status") as f:
            pending = dict(ln.split(":", 1) for ln in f if ":" in ln)
    except OSError:
        sys.exit(0)
    if any(int(pending.get(k, "0"), 16) >> (signal.SIGTERM - 1) & 1 for k in ("SigPnd", "ShdPnd")):
        os.kill(pid, signal.SIGCONT)
        sys.exit(0)
    time.sleep(0.2)
"""


def _continue_when_terminated(pid):
    """A stopped process holds a SIGTERM pending until it is continued, so torchrun's agent,
    which tears down the surviving ranks with SIGTERM, waits its full 30 s before SIGKILL.  A
    watcher continues the stopped rank once a SIGTERM is pending for it: it then dies of that
    SIGTERM at once.  Nothing changes before the launcher's teardown (the fault under test)."""
    import subprocess

    subprocess.Popen([sys.executable, "-c", _WATCH, str(pid)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def parse_signal(text):
    parts = text.split(":")
    sig = getattr(signal, f"SIG{parts[3]}") if len(parts) > 3 else signal.SIGKILL
    return int(parts[0]), int(parts[1]), parts[2], sig


def parse_nan(text):
    r, steps = text.split(":", 1)
    return int(r), {int(x) for x in steps.split(",")}


def install(monkeypatch=None, kill=None, nan=None):
    """Wrap the engines the trainer builds (``kill``/``nan`` as parsed above)."""
    from mgup_dist.train import engines

    orig = engines.build_engine

    def build(cfg, model, device, pad_id):
        return _wrap(orig(cfg, model, device, pad_id), cfg, kill, nan)

    if monkeypatch is not None:
        monkeypatch.setattr(engines, "build_engine", build)
    else:
        engines.build_engine = build


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    install(kill=parse_signal(os.environ[SIGNAL_ENV]) if os.environ.get(SIGNAL_ENV) else None,
            nan=parse_nan(os.environ[NAN_ENV]) if os.environ.get(NAN_ENV) else None)
    from mgup_dist.train.cli import main

    argv = sys.argv[1:]
    if os.environ.get(RANK_ARGS_ENV):
        who, extra = os.environ[RANK_ARGS_ENV].split(":", 1)
        if os.environ.get("RANK", "0") == who:
            argv += extra.split()
    sys.exit(main(argv))
