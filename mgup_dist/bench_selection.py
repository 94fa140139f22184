"""Cost of MGUP's selection scopes on sharded parameters (gloo, CPU processes).

    python -m mgup_dist.bench_selection                       # worlds 2 and 4, 130M LLaMA shapes
    python -m mgup_dist.bench_selection --worlds 2 --steps 3 --layers 2   # quick look

Every rank holds the FSDP2 shards of the 130M LLaMA parameters (hidden 768,
intermediate 2048, 12 layers, vocab 32000, untied embeddings: 134M values): DTensors
placed ``Shard(0)`` with ``torch.chunk`` rows per rank, exactly what ``fully_shard``
hands the optimizer (built with ``DTensor.from_local``, without a model, so the
benchmark needs no forward pass).  One MGUPAdamW per scope (its own state: ~1 GB per
rank and scope at 130M on 2 ranks) steps the same parameters; after a warm-up step each,
the scopes take turns, one timed step each per round (the slowest rank, between
barriers); the table gives medians and the ratio to ``scope="shard"`` (no communication).
``cautious`` (mode="cautious": no selection at all) is the floor.  Timings on a shared
machine are noisy: read the medians of the same run.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch

from .device import comm_backend, resolve_device

__all__ = ["llama_shapes", "main"]

SCOPE_ROWS = ("tensor", "shard", "global", "global_approx", "cautious")


def llama_shapes(hidden: int = 768, inter: int = 2048, layers: int = 12, vocab: int = 32000) -> List[Tuple[int, ...]]:
    """Parameter shapes of a LLaMA model, in model order (130M: the defaults)."""
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4  # q, k, v, o
        shapes += [(inter, hidden), (inter, hidden), (hidden, inter)]  # gate, up, down
        shapes += [(hidden,), (hidden,)]  # the two RMSNorms
    shapes += [(hidden,), (vocab, hidden)]  # final norm, lm_head
    return shapes


def _sharded_params(shapes, mesh, rank: int, world: int, seed: int):
    """FSDP2's Shard(0) DTensors of ``shapes`` and matching DTensor gradients."""
    from torch.distributed.tensor import DTensor, Shard

    from .integrations.fsdp import chunk_rows

    g = torch.Generator().manual_seed(seed * 1000 + rank)
    params = []
    for shape in shapes:
        r0, r1 = chunk_rows(shape[0], world, rank)
        local_shape = (r1 - r0,) + tuple(shape[1:])
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))  # contiguous
        mk = lambda: DTensor.from_local(  # noqa: E731
            torch.randn(local_shape, generator=g), mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
            stride=stride)
        p = torch.nn.Parameter(mk())
        p.grad = mk()
        params.append(p)
    return params


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads))
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from .optim import MGUPAdamW

    device = resolve_device("cpu")
    dist.init_process_group(comm_backend(device), rank=rank, world_size=world)
    try:
        mesh = init_device_mesh(device.type, (world,))
        shapes = llama_shapes(args.hidden, args.inter, args.layers, args.vocab)
        params = _sharded_params(shapes, mesh, rank, world, args.seed)
        # one optimizer per row over the same params (each its own state and plan), stepped in
        # turn: every round times each row once, so that a change of the machine's load
        # between rounds moves all rows alike
        opts = {row: MGUPAdamW(params, lr=1e-4, weight_decay=0.1, mode="cautious" if row == "cautious" else "topk",
                               scope="tensor" if row == "cautious" else row) for row in args.scopes}

        def timed(opt) -> float:
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            dist.barrier()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
            return dt.item()

        for opt in opts.values():
            for _ in range(args.warmup):
                timed(opt)
        times = {row: [] for row in args.scopes}
        for _ in range(args.steps):
            for row, opt in opts.items():
                times[row].append(timed(opt))
        n_local = sum(p.to_local().numel() for p in params)
        if rank == 0:
            queue.put((world, sum(int(torch.tensor(s).prod()) for s in shapes), n_local, times))
        dist.barrier()  # no rank tears the group down while another still reads its last message
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> List[tuple]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    rows = []
    for world in args.worlds:
        queue = ctx.SimpleQueue()
        mp.start_processes(_worker, args=(world, _free_port(), args, queue), nprocs=world, join=True,
                           start_method="spawn")
        rows.append(queue.get())
    return rows


def format_table(rows) -> str:
    lines = [
        "| world | scope | median step (s) | min (s) | x shard |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for world, n_total, n_local, times in rows:
        base = statistics.median(times["shard"]) if "shard" in times else None
        for row, samples in times.items():
            med = statistics.median(samples)
            ratio = f"{med / base:.2f}" if base else "-"
            lines.append(f"| {world} | {row} | {med:.3f} | {min(samples):.3f} | {ratio} |")
    n_total = rows[0][1] if rows else 0
    lines.append("")
    lines.append(f"{n_total / 1e6:.1f}M parameters, FSDP2 Shard(0) shards, MGUPAdamW step, slowest rank per step.")
    return "\n".join(lines)


def _parse(argv: Optional[Sequence[str]]):
    ap = argparse.ArgumentParser(prog="mgup-dist bench-selection", description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="2,4", help="comma-separated world sizes (default 2,4)")
    ap.add_argument("--scopes", default="tensor,shard,global,cautious",
                    help=f"comma-separated rows among {','.join(SCOPE_ROWS)} (default tensor,shard,global,cautious)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per scope (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per scope (default 1)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        args.worlds = [int(w) for w in args.worlds.split(",") if w]
    except ValueError:
        ap.error(f"--worlds must be comma-separated integers, got {args.worlds!r}")
    if not args.worlds or any(w < 1 for w in args.worlds):
        ap.error("--worlds: each world size must be >= 1")
    args.scopes = [s for s in args.scopes.split(",") if s]
    bad = [s for s in args.scopes if s not in SCOPE_ROWS]
    if bad:
        ap.error(f"--scopes: unknown {bad}; allowed: {', '.join(SCOPE_ROWS)}")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    rows = run(args)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
