"""How many device operations one optimizer step issues, counted without the device.

    python -m mgup_dist.opcount --model llama130m
    python -m mgup_dist.opcount --model llama130m --split 3     # same size, 3x the tensors

On an accelerator the host dispatches every op (tens of microseconds each on an NPU) and
every kernel launch serialises the chain, so the count of a step decides much of its cost.
The params live on PyTorch's ``meta`` device (shapes only, no memory, no arithmetic): every
non-view ATen op that touches a meta tensor is counted under a ``TorchDispatchMode``, and
Triton launches are counted by stubbing ``JITFunction.run`` (the kernels never run).
Allocations (``empty*``) launch nothing and are not counted; ops on host-side CPU tensors
(torch's step counter when ``capturable=False``) are not device ops.  A step that reads a
device value back to the host fails here (a meta tensor has no value): the count is also a
check that the step is free of host synchronisation.

The ``host ms`` column is the step's own host work: the median thread CPU time of one step
(time the process spends in Python and in dispatching, not waiting) with the model's tensors
— as many, of the same ranks — cut to at most 64 x 64 elements on the CPU, Triton launches
stubbed (the Triton row runs the Triton backend's host code over CPU tensors).  An eager step
on an accelerator waits on the host when this exceeds the kernels' time (~2 ms for a 130M
model on an H100).

Rows: ``backend="torch"`` (the NPU path and every device without Triton) and
``backend="triton"`` (the CUDA path), after one warm-up step (state allocation, cached
tables), for ``MGUPAdamW``, ``CMGUPAdamW``, ``MGUPLion``, ``MGUPMuon``, ``CMGUPMuon`` (embedding
and lm_head in Muon's AdamW group) and ``torch.optim.AdamW(foreach=True)``.
"""
from __future__ import annotations

import argparse
import contextlib
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["OpCounter", "count_step", "model_params", "muon_adamw_params", "host_ms", "main"]

_FREE = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh")


class OpCounter(TorchDispatchMode):
    """Counts non-view ATen ops that touch a tensor on ``device_type``."""

    def __init__(self, device_type: str = "meta"):
        super().__init__()
        self.device_type = device_type
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _FREE:
            flat, _ = tree_flatten((args, kwargs, out))
            if any(isinstance(t, torch.Tensor) and t.device.type == self.device_type for t in flat):
                self.ops[str(func.overloadpacket)] += 1
        return out


@contextlib.contextmanager
def _count_triton(counter: Counter):
    """Stub Triton's launchers: a launch is counted by kernel name and does not run.  Both the
    compiled launcher and the interpreter's are stubbed: which one a kernel has was fixed when
    its module was imported (``TRITON_INTERPRET``), and the count must not depend on it."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:  # no Triton: nothing to count
        yield
        return
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # a Triton without an interpreter
        pass
    origs = [(c, c.run) for c in classes]

    def run(self, *args, **kwargs):
        counter["triton." + self.fn.__name__] += 1

    for c in classes:
        c.run = run
    try:
        yield
    finally:
        for c, orig in origs:
            c.run = orig


def model_params(model: str = "llama130m", split: int = 1, device: str = "meta",
                 dtype: torch.dtype = torch.float32) -> List[torch.nn.Parameter]:
    """The LLaMA parameter set of ``mgup_dist.bench`` with gradients, each tensor cut into
    ``split`` tensors along dim 0 (same total size, ``split`` times as many tensors)."""
    from .bench import MODELS, llama_shapes

    params = []
    for _, shape in llama_shapes(MODELS[model]):
        rows = shape[0]
        cuts = [rows // split + (1 if i < rows % split else 0) for i in range(split)] if split > 1 else [rows]
        for r in cuts:
            if r == 0:
                continue
            p = torch.nn.Parameter(torch.empty((r,) + tuple(shape[1:]), device=device, dtype=dtype))
            p.grad = torch.empty_like(p)
            params.append(p)
    return params


def count_step(make: Callable[[List[torch.nn.Parameter]], torch.optim.Optimizer], params: List[torch.nn.Parameter],
               warmup: int = 1) -> Dict[str, object]:
    """Ops of one ``step()`` after ``warmup`` steps: {'aten': n, 'triton': m, 'total': n + m, 'ops': Counter}."""
    opt = make(params)
    launches: Counter = Counter()
    with _count_triton(launches):
        for _ in range(warmup):
            opt.step()
        launches.clear()
        mode = OpCounter("meta")
        with mode:
            opt.step()
    ops = launches + mode.ops
    aten = sum(v for k, v in ops.items() if not k.startswith("triton."))
    tri = sum(v for k, v in ops.items() if k.startswith("triton."))
    return {"aten": aten, "triton": tri, "total": aten + tri, "ops": ops}


def muon_adamw_params(params: List[torch.nn.Parameter], split: int = 1) -> List[torch.nn.Parameter]:
    """The embedding and lm_head pieces of ``model_params(model, split)`` (its first and last
    ``split`` tensors): AdamW inside MGUPMuon (Moonlight's practice, as ``mgup_dist.bench``)."""
    return params[:split] + params[-split:]


def host_ms(make: Callable[[List[torch.nn.Parameter]], torch.optim.Optimizer], model: str = "llama130m",
            split: int = 1, backend: str = "triton", steps: int = 20, warmup: int = 3) -> float:
    """Median thread CPU time (ms) of one step's host work (see the module doc)."""
    import statistics
    import time
    from unittest import mock

    from . import pipeline

    params = []
    for p in model_params(model, split):
        q = torch.nn.Parameter(torch.zeros(tuple(min(d, 64) for d in p.shape)))
        q.grad = torch.full_like(q, 1e-3)
        params.append(q)
    opt = make(params)
    stub = contextlib.nullcontext()
    if backend == "triton":
        from .kernels.triton_cuda import TritonCUDA

        stub = mock.patch.object(pipeline, "get_backend", lambda *a, **k: TritonCUDA())
    times = []
    with _count_triton(Counter()), stub:
        for i in range(warmup + steps):
            t = time.thread_time()
            opt.step()
            if i >= warmup:
                times.append(time.thread_time() - t)
    return 1e3 * statistics.median(times)


def _rows(capturable: bool, split: int = 1, backends=("torch", "triton")) -> List[Tuple[str, str, Callable]]:
    from .optim import CMGUPAdamW, CMGUPMuon, MGUPAdamW, MGUPLion, MGUPMuon

    rows = []
    for backend in backends:
        kw = dict(backend=backend, capturable=capturable)
        rows += [
            (backend, "MGUPAdamW", lambda ps, kw=kw: MGUPAdamW(ps, lr=1e-3, **kw)),
            (backend, "CMGUPAdamW", lambda ps, kw=kw: CMGUPAdamW(ps, lr=1e-3, **kw)),
            (backend, "MGUPLion", lambda ps, kw=kw: MGUPLion(ps, lr=1e-4, **kw)),
        ]
        if not capturable:  # MGUPMuon has no capturable option
            rows += [(backend, cls.__name__, lambda ps, cls=cls, b=backend: cls(ps, adamw_params=muon_adamw_params(ps, split), backend=b))
                     for cls in (MGUPMuon, CMGUPMuon)]
    rows.append(("torch", "AdamW(foreach=True)",
                 lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True, capturable=capturable)))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> List[Tuple[str, str, Dict]]:
    from .bench import MODELS

    ap = argparse.ArgumentParser(prog="python -m mgup_dist.opcount", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama130m", choices=sorted(MODELS))
    ap.add_argument("--split", type=int, default=1, help="cut every tensor into this many along dim 0")
    ap.add_argument("--capturable", action="store_true", help="step counters on the device (CUDA graphs)")
    ap.add_argument("--top", type=int, default=0, help="also list the N most frequent ops of each row")
    args = ap.parse_args(argv)
    if args.split < 1:
        raise SystemExit(f"--split must be >= 1, got {args.split}")
    out = []
    ps = model_params(args.model, args.split)
    skip = {id(p) for p in muon_adamw_params(ps, args.split)}
    n_shapes = len({tuple(p.shape) for p in ps if p.ndim == 2 and id(p) not in skip})
    print(f"{args.model}: {len(ps)} tensors, split {args.split}, capturable={args.capturable}; ops of one step on 'meta'"
          f" (Muon: {n_shapes} distinct matrix shapes; embedding and lm_head in its AdamW group)")
    print(f"{'backend':8} {'optimizer':22} {'aten':>6} {'triton':>7} {'total':>6} {'host ms':>8}")
    for backend, name, make in _rows(args.capturable, args.split):
        if backend == "triton":
            try:
                from .kernels import triton_cuda  # noqa: F401
            except ImportError:
                print(f"{backend:8} {name:22} {'(Triton not importable)':>21}")
                continue
        try:
            res = count_step(make, model_params(args.model, args.split))
        except (AssertionError, RuntimeError, ValueError) as e:  # e.g. torch's capturable AdamW refuses 'meta'
            print(f"{backend:8} {name:22} n/a: {str(e).splitlines()[0][:80]}")
            continue
        host = _host_or_none(args, backend, name)
        res["host_ms"] = host
        shown = f"{host:8.2f}" if host is not None else f"{'n/a':>8}"
        print(f"{backend:8} {name:22} {res['aten']:6d} {res['triton']:7d} {res['total']:6d} {shown}")
        if args.top:
            for op, n in res["ops"].most_common(args.top):
                print(f"{'':31} {n:6d}  {op}")
        out.append((backend, name, res))
    return out


def _host_or_none(args, backend, name):
    """The row's host time, its optimizer made again for CPU params (the Triton row with
    backend='torch', whose phases ``host_ms`` replaces by the Triton backend's)."""
    if name.startswith("AdamW") and args.capturable:
        return None  # torch's capturable AdamW wants its params on an accelerator
    make = {n: m for b, n, m in _rows(args.capturable, args.split, backends=("torch",))}[name]
    return host_ms(make, args.model, args.split, backend)


if __name__ == "__main__":
    main()
