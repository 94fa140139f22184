"""Run a function on N real torch.distributed processes (gloo, CPU).

No mock: each rank is a separate OS process with its own process group.  Results come
back through a queue; an exception on any rank fails the caller with that rank's
traceback, and a rank that hangs past ``timeout`` fails it too (no silent deadlock).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import traceback
from typing import Any, Callable, List


def hang_guard(seconds: float) -> float:
    """A timeout as a hang guard, not a speed check: ``seconds`` (what an idle 2-core machine
    needs, with room) times ``MGUP_TEST_TIMEOUT_SCALE`` (default 4), so that a machine busy
    with other work passes and only a hung test fails."""
    return seconds * float(os.environ.get("MGUP_TEST_TIMEOUT_SCALE", "4"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, queue, args, kwargs, env):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args, **kwargs)
        # Plain pickle copies tensors by value; torch's queue reductions would share memory
        # that must outlive this process, and can hang when it exits first.
        queue.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 180.0, env=None, **kwargs) -> List[Any]:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks and
    return the per-rank results, ordered by rank.  ``fn`` must be a module-level
    function (processes are spawned)."""
    timeout = hang_guard(timeout)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        # not daemonic: frameworks under test may start children of their own (checkpoint writers)
        ctx.Process(target=_worker, args=(fn, r, world_size, port, queue, args, kwargs, dict(env or {})), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except queue_mod.Empty:
                raise TimeoutError(
                    f"distributed test timed out after {timeout}s; ranks that reported: {sorted(results)}"
                ) from None
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
