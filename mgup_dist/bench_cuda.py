"""CUDA step benchmark of the MGUP optimizers: eager steps, CUDA-graph replays, and the kernel
table of one step (``torch.profiler``).

    python -m mgup_dist.bench_cuda --model llama130m
    python -m mgup_dist.bench_cuda --model llama130m --dtype bfloat16 --no-profile

Every row runs in one process on the LLaMA parameter shapes of ``mgup_dist.bench`` with fixed
random gradients; times are medians of CUDA-event intervals after warm-up, and the ratio column
is against ``AdamW(fused=True)`` measured in the same run.  Graph rows capture one
``capturable=True`` step and time its replays.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable, List, Optional, Sequence, Tuple

import torch

__all__ = ["main"]


def _params(model: str, dtype: torch.dtype) -> List[torch.nn.Parameter]:
    from .bench import MODELS, llama_shapes

    gen = torch.Generator(device="cuda").manual_seed(0)
    ps = []
    for _, shape in llama_shapes(MODELS[model]):
        p = torch.nn.Parameter(torch.randn(shape, device="cuda", generator=gen).mul_(0.02).to(dtype))
        p.grad = torch.randn(shape, device="cuda", generator=gen).to(dtype)
        ps.append(p)
    return ps


def _time(fn: Callable[[], None], steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def _graphed(opt: torch.optim.Optimizer) -> Callable[[], None]:
    opt.step()  # state and plan outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def _rows(graphs: bool) -> List[Tuple[str, Callable, bool]]:
    from .optim import CMGUPAdamW, MGUPAdamW, MGUPLion

    rows = [
        ("AdamW(fused=True)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), False),
        ("AdamW(foreach=True)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), False),
        ("MGUPAdamW", lambda ps: MGUPAdamW(ps, lr=1e-3), False),
        ("MGUPAdamW(backend=torch)", lambda ps: MGUPAdamW(ps, lr=1e-3, backend="torch"), False),
        ("CMGUPAdamW", lambda ps: CMGUPAdamW(ps, lr=1e-3), False),
        ("MGUPLion", lambda ps: MGUPLion(ps, lr=1e-4), False),
    ]
    if graphs:
        lr = lambda: torch.tensor(1e-3, device="cuda")  # noqa: E731
        rows += [
            ("AdamW(fused) graph", lambda ps: torch.optim.AdamW(ps, lr=lr(), fused=True, capturable=True), True),
            ("MGUPAdamW graph", lambda ps: MGUPAdamW(ps, lr=lr(), capturable=True), True),
            ("CMGUPAdamW graph", lambda ps: CMGUPAdamW(ps, lr=lr(), capturable=True), True),
        ]
    return rows


def main(argv: Optional[Sequence[str]] = None) -> List[Tuple[str, float]]:
    from .bench import MODELS

    ap = argparse.ArgumentParser(prog="python -m mgup_dist.bench_cuda", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama130m", choices=sorted(MODELS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph rows")
    ap.add_argument("--no-profile", action="store_true", help="skip the kernel table of one MGUPAdamW step")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda needs a CUDA device (torch.cuda.is_available() is False)")
    dtype = getattr(torch, args.dtype)
    n = sum(p.numel() for p in _params(args.model, dtype))
    print(f"{args.model}: {n / 1e6:.1f}M {args.dtype} params; {torch.cuda.get_device_name()}; torch {torch.__version__}")
    out, base = [], None
    for name, make, graph in _rows(not args.no_graphs):
        ps = _params(args.model, dtype)
        try:
            opt = make(ps)
            fn = _graphed(opt) if graph else opt.step
            ms = _time(fn, args.steps, args.warmup)
        except Exception as e:  # a row that cannot run here is reported, the others still run
            print(f"{name:26} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        base = base or ms
        print(f"{name:26} {ms:8.3f} ms  {ms / base:5.2f}x fused AdamW")
        out.append((name, ms))
        del opt, fn, ps
        torch.cuda.empty_cache()
    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        from .optim import MGUPAdamW

        ps = _params(args.model, dtype)
        opt = MGUPAdamW(ps, lr=1e-3)
        opt.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        print("\nkernels of one MGUPAdamW step:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    return out


if __name__ == "__main__":
    main()
