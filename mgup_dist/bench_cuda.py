"""CUDA step benchmark of the MGUP optimizers: eager steps, CUDA-graph replays, the selection
checked against the generic select on the GPU's own scores, and the kernel table of one step
(``torch.profiler``).

    python -m mgup_dist.bench_cuda --model llama130m
    python -m mgup_dist.bench_cuda --model llama130m --dtype bfloat16 --no-profile --json out.json

Every row runs in one process on the LLaMA parameter shapes of ``mgup_dist.bench`` with fixed
random gradients; times are medians of CUDA-event intervals after warm-up, and the ratio column
is against ``AdamW(fused=True)`` measured in the same run.  Graph rows capture one
``capturable=True`` step and time its replays.  ``MGUPMuon`` keeps the embedding and lm_head in
its AdamW group (Moonlight's practice, as ``mgup_dist.bench``); ``Muon+AdamW(torch)`` is
``torch.optim.Muon`` on the same matrices plus ``AdamW(fused=True)`` on the rest.

The select check: one ``MGUPAdamW`` step records, for every top-K chunk, the order keys its
score phase wrote on the GPU and the thresholds its select returned; the generic radix select
(``selection.threshold`` over the torch-ops backend, on the same GPU) is run on copies of those
keys, and thresholds and resolved keys must be equal bit for bit.
"""
from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable, List, Optional, Sequence, Tuple

import torch

__all__ = ["main"]


def _params(model: str, dtype: torch.dtype, device: str = "cuda") -> List[torch.nn.Parameter]:
    from .bench import MODELS, llama_shapes

    gen = torch.Generator(device=device).manual_seed(0)
    ps = []
    for _, shape in llama_shapes(MODELS[model]):
        p = torch.nn.Parameter(torch.randn(shape, device=device, generator=gen).mul_(0.02).to(dtype))
        p.grad = torch.randn(shape, device=device, generator=gen).to(dtype)
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


class _TorchMuon:
    """torch.optim.Muon on the matrices, AdamW(fused=True) on the rest, stepped together."""

    def __init__(self, ps):
        mats = ps[1:-1]
        mats, rest = [p for p in mats if p.ndim == 2], [ps[0], ps[-1]] + [p for p in mats if p.ndim != 2]
        self.opts = [torch.optim.Muon(mats, lr=2e-2, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
                     torch.optim.AdamW(rest, lr=2e-2, betas=(0.9, 0.95), weight_decay=0.0, fused=True)]

    def step(self):
        for o in self.opts:
            o.step()


def _rows(graphs: bool, muon: bool = True) -> List[Tuple[str, Callable, bool]]:
    from .optim import CMGUPAdamW, MGUPAdamW, MGUPLion, MGUPMuon

    def muon_opt(ps, **kw):  # embedding and lm_head (first and last) in Muon's AdamW group
        return MGUPMuon(ps, adamw_params=[ps[0], ps[-1]], **kw)

    rows = [
        ("AdamW(fused=True)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), False),
        ("AdamW(foreach=True)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), False),
        ("MGUPAdamW", lambda ps: MGUPAdamW(ps, lr=1e-3), False),
        ("MGUPAdamW(backend=torch)", lambda ps: MGUPAdamW(ps, lr=1e-3, backend="torch"), False),
        ("CMGUPAdamW", lambda ps: CMGUPAdamW(ps, lr=1e-3), False),
        ("MGUPLion", lambda ps: MGUPLion(ps, lr=1e-4), False),
    ]
    if muon:
        rows += [
            ("Muon+AdamW(torch)", _TorchMuon, False),
            ("MGUPMuon", lambda ps: muon_opt(ps, lr=2e-2), False),
        ]
    if graphs:
        lr = lambda v=1e-3: torch.tensor(v, device="cuda")  # noqa: E731
        rows += [
            ("AdamW(fused) graph", lambda ps: torch.optim.AdamW(ps, lr=lr(), fused=True, capturable=True), True),
            ("MGUPAdamW graph", lambda ps: MGUPAdamW(ps, lr=lr(), capturable=True), True),
            ("CMGUPAdamW graph", lambda ps: CMGUPAdamW(ps, lr=lr(), capturable=True), True),
            ("MGUPLion graph", lambda ps: MGUPLion(ps, lr=lr(1e-4), capturable=True), True),
        ]
        if muon:
            rows.append(("MGUPMuon graph", lambda ps: muon_opt(ps, lr=lr(2e-2), capturable=True), True))
    return rows


def check_select(model: str, dtype: torch.dtype, device: str = "cuda", backend: str = "auto") -> dict:
    """The Triton select against the generic select on the keys of a real step (module doc).
    ``backend``: the optimizer's (a backend that writes the keys: on the CPU, ``"torch"``)."""
    from . import selection
    from .kernels.torch_ops import TorchOps
    from .optim import MGUPAdamW

    seen = []
    orig = selection.select

    def spy(backend, chunk, keys, hist0, reduce):
        before = keys.clone()
        t = orig(backend, chunk, keys, hist0, reduce)
        seen.append((chunk, before, t.clone(), keys.clone(), type(backend).__name__))
        return t

    ps = _params(model, dtype, device)
    opt = MGUPAdamW(ps, lr=1e-3, backend=backend)
    opt.step()  # the second step's scores: moments of two gradients
    selection.select = spy
    try:
        opt.step()
    finally:
        selection.select = orig
    res = {"chunks": len(seen), "units": 0, "keys": 0, "backend": sorted({s[4] for s in seen}),
           "thresholds_equal": True, "resolved_keys_equal": True}
    for chunk, before, t, after, _ in seen:
        t_ref = selection.threshold(TorchOps(), chunk, before)
        res["units"] += chunk.n_units
        res["keys"] += chunk.numel
        res["thresholds_equal"] &= bool(torch.equal(t_ref.to(torch.int64), t.to(torch.int64)))
        res["resolved_keys_equal"] &= bool(torch.equal(before[: chunk.numel], after[: chunk.numel]))
    res["ok"] = bool(seen) and res["thresholds_equal"] and res["resolved_keys_equal"]
    return res


def main(argv: Optional[Sequence[str]] = None) -> List[Tuple[str, float]]:
    from .bench import MODELS

    ap = argparse.ArgumentParser(prog="python -m mgup_dist.bench_cuda", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama130m", choices=sorted(MODELS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph rows")
    ap.add_argument("--no-profile", action="store_true", help="skip the kernel table of one MGUPAdamW step")
    ap.add_argument("--no-muon", action="store_true", help="skip the Muon rows")
    ap.add_argument("--no-check-select", action="store_true",
                    help="skip the select check against the generic select on the GPU's own scores")
    ap.add_argument("--json", default=None, help="also write the rows and the select check to this JSON file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda needs a CUDA device (torch.cuda.is_available() is False)")
    dtype = getattr(torch, args.dtype)
    n = sum(p.numel() for p in _params(args.model, dtype))
    print(f"{args.model}: {n / 1e6:.1f}M {args.dtype} params; {torch.cuda.get_device_name()}; torch {torch.__version__}")
    out, base, failed = [], None, {}
    for name, make, graph in _rows(not args.no_graphs, not args.no_muon):
        ps = _params(args.model, dtype)
        try:
            opt = make(ps)
            fn = _graphed(opt) if graph else opt.step
            ms = _time(fn, args.steps, args.warmup)
        except Exception as e:  # a row that cannot run here is reported, the others still run
            failed[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
            print(f"{name:26} failed: {failed[name]}")
            continue
        base = base or ms
        print(f"{name:26} {ms:8.3f} ms  {ms / base:5.2f}x fused AdamW")
        out.append((name, ms))
        del opt, fn, ps
        torch.cuda.empty_cache()
    sel = None
    if not args.no_check_select:
        try:
            sel = check_select(args.model, dtype)
        except Exception as e:  # reported, like a failed row
            sel = {"ok": False, "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"}
        print(f"select check ({args.model}, the GPU's own scores vs the generic select): {json.dumps(sel)}")
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "rows": dict(out), "failed": failed, "select": sel}, f, indent=1)
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
