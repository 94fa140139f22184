"""Step-time benchmark of the MGUP optimizers on LLaMA-shaped parameters.

    python -m mgup_dist.bench --model llama130m --mask-ratio 0.5
    mgup-dist bench --model tiny --steps 2

For the chosen model shapes it builds the parameters once (random, fixed gradients) and
times ``optimizer.step()`` of every optimizer in one process, one after the other, so the
ratios compare like with like:

* ``torch.optim.AdamW(fused=True)`` and ``AdamW(foreach=True)``: the baselines;
* ``naive topk+scatter``: a straightforward MGUP-AdamW as in the authors' repository (per
  tensor ``torch.topk`` of the scores, then a scatter into a mask);
* ``MGUPAdamW`` (top-K), ``CMGUPAdamW`` (cautious), ``MGUPLion``, ``MGUPMuon`` with
  ``foreach=True``, eager and (rows ``+compile``) with ``compile=True``: fused
  ``torch.compile`` kernels and a threshold select (Muon: its AdamW-fallback params);
* ``Muon+AdamW(torch)``, with any Muon row: ``torch.optim.Muon`` on the same matrices
  (Moonlight's lr adjustment, Newton-Schulz in bfloat16) and ``torch.optim.AdamW(foreach=True)``
  on the embedding, lm_head and norms, as ``MGUPMuon`` splits them; the Muon rows' ``x torch
  Muon`` column divides by it.  The Muon rows and this baseline are timed interleaved (one step
  of each in turn), so that a change of the machine's load hits all of them alike.  ``MGUPMuon`` runs Newton-Schulz in bfloat16 too by default
  (``ns_dtype="auto"``): the ratio compares like with like;
* with ``--deepspeed-cpu-adam``: ``deepspeed.ops.adam.DeepSpeedCPUAdam``, the optimizer
  ZeRO-Offload runs on the CPU (built by DeepSpeed at first use, minutes; the row is
  skipped with the reason printed where its op cannot be built).

The optimizers of every row but the naive and the Muon ones are built first and then stepped
in turn, one step each per round (interleaved), as are the Muon rows with their baseline: a
burst of load from other processes hits every row of a group alike.  On the CPU the eager
``MGUPAdamW``, ``CMGUPAdamW`` and ``MGUPLion`` rows are the default step, the C++ kernels of
``mgup_dist.kernels.cpu_ext``.

The table reports the median step time after warm-up (compilation, state allocation and
first-touch of memory happen in the warm-up steps) and its ratio to the fused and the
foreach AdamW, plus the speed-up over the naive top-K implementation at the same mask ratio.
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ["MODELS", "llama_shapes", "NaiveTopkMGUPAdamW", "run_bench", "format_table", "main"]


# --------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class LlamaConfig:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    lm_head: bool = True  # False: tied embeddings (no separate output matrix)


#: LLaMA configs of the GaLore / MGUP pre-training recipes (plus a tiny one for smoke tests).
MODELS: Dict[str, LlamaConfig] = {
    "llama130m": LlamaConfig(hidden=768, intermediate=2048, layers=12, heads=12, vocab=32000),
    "llama60m": LlamaConfig(hidden=512, intermediate=1376, layers=8, heads=8, vocab=32000),
    # 27.4M parameters in 56 tensors: 1 x 32000x512 (59.8 % of the model), 42 x 512x512 (24
    # attention, 18 MLP matrices), 13 x 512 norms: many mid-sized tensors beside one large one
    "set27m": LlamaConfig(hidden=512, intermediate=512, layers=6, heads=8, vocab=32000, lm_head=False),
    # the trainer's tiny model (configs/models/llama_tiny.json; tests/test_cli.py keeps them equal)
    "tiny": LlamaConfig(hidden=128, intermediate=352, layers=4, heads=4, vocab=259),
}


def llama_shapes(cfg: LlamaConfig) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of every parameter of a LLaMA decoder with untied embeddings."""
    h, f = cfg.hidden, cfg.intermediate
    shapes: List[Tuple[str, Tuple[int, ...]]] = [("embed_tokens.weight", (cfg.vocab, h))]
    for i in range(cfg.layers):
        pre = f"layers.{i}."
        shapes += [(pre + f"self_attn.{n}_proj.weight", (h, h)) for n in ("q", "k", "v", "o")]
        shapes += [(pre + "mlp.gate_proj.weight", (f, h)), (pre + "mlp.up_proj.weight", (f, h)),
                   (pre + "mlp.down_proj.weight", (h, f))]
        shapes += [(pre + "input_layernorm.weight", (h,)), (pre + "post_attention_layernorm.weight", (h,))]
    shapes += [("norm.weight", (h,))]
    if cfg.lm_head:
        shapes += [("lm_head.weight", (cfg.vocab, h))]
    return shapes


# ------------------------------------------------------------------ naive baseline
class NaiveTopkMGUPAdamW(torch.optim.Optimizer):
    """MGUP-AdamW written the straightforward way (as the authors' repository does):
    per tensor, ``torch.topk`` of the scores ``u * g`` and a scatter of alpha into a
    gamma-filled mask.  A baseline for the benchmark only: ``topk`` breaks ties in no
    documented order, so it is not the reference semantics."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 mask_ratio=0.5, alpha=2.0, gamma=0.5):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      mask_ratio=mask_ratio, alpha=alpha, gamma=gamma))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                u = m / (v.sqrt().add_(group["eps"]))
                scores = (u * g).flatten()
                k = int(group["mask_ratio"] * scores.numel())
                _, idx = torch.topk(scores, k)
                mask = torch.full_like(scores, group["gamma"])
                mask[idx] = group["alpha"]
                p.add_(u * mask.view_as(u), alpha=-step_size)
        return loss


# ------------------------------------------------------------------------ timing
@dataclass
class Row:
    name: str
    mask_ratio: Optional[float]
    median_ms: float
    times_ms: List[float]
    vs_fused: float = float("nan")
    vs_foreach: float = float("nan")
    vs_muon: float = float("nan")  # Muon rows: x torch.optim.Muon (+ AdamW for the rest)
    vs_ds: float = float("nan")  # x DeepSpeedCPUAdam
    naive_speedup: float = float("nan")
    state_bpp: float = float("nan")  # optimizer state, bytes per parameter
    held_bpp: float = float("nan")  # state + buffers kept between steps (CPU scratch), bytes per parameter
    peak_mb: float = float("nan")  # extra memory at the peak of one step, MB


#: ``--clock``: wall time, or the process's CPU time (on a CPU shared with other jobs, the work
#: of a one-thread step without the time it waited for a core)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def deepspeed_cpu_adam(params, lr: float):
    """``DeepSpeedCPUAdam(params)`` (AdamW mode), or the reason it cannot be had here."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, adamw_mode=True, weight_decay=1e-2), None
    except Exception as e:  # not installed, no compiler, a failed build: the row is skipped
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return None, f"{type(e).__name__}: {first}"


def _time_steps(opt: torch.optim.Optimizer, steps: int, warmup: int, device: torch.device,
                clock: Callable[[], float] = time.perf_counter) -> List[float]:
    from mgup_dist.device import synchronize

    for _ in range(warmup):
        opt.step()
    synchronize(device)
    out = []
    for _ in range(steps):
        t0 = clock()
        opt.step()
        synchronize(device)
        out.append((clock() - t0) * 1e3)
    return out


def _factories(names: Sequence[str], adamw_only: Sequence[torch.Tensor]) -> Dict[str, Callable]:
    """name -> (params, mask_ratio, compile) -> optimizer, every one with foreach=True."""
    import mgup_dist

    def split(params):
        matrices = [p for p in params if p.ndim == 2 and not any(p is q for q in adamw_only)]
        rest = [p for p in params if not any(p is q for q in matrices)]
        return [dict(params=matrices, use_muon=True), dict(params=rest, use_muon=False)]

    def make(cls, lr, muon=False):
        def build(params, r, compile_):
            groups = split(params) if muon else params
            return cls(groups, lr=lr, mask_ratio=r, foreach=True, compile=compile_)

        return build

    table = {
        "MGUPAdamW": make(mgup_dist.MGUPAdamW, 1e-3),
        "CMGUPAdamW": make(mgup_dist.CMGUPAdamW, 1e-3),
        "MGUPLion": make(mgup_dist.MGUPLion, 1e-4),
        "CMGUPLion": make(mgup_dist.CMGUPLion, 1e-4),
        "MGUPMuon": make(mgup_dist.MGUPMuon, 2e-2, muon=True),
        "CMGUPMuon": make(mgup_dist.CMGUPMuon, 2e-2, muon=True),
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"optimizers: unknown {unknown}; allowed: {', '.join(table)}")
    return {n: table[n] for n in names}


#: cautious rules do not depend on mask_ratio: measured once.
_RATIO_FREE = ("CMGUPAdamW", "CMGUPLion", "CMGUPMuon")
DEFAULT_OPTIMIZERS = ("MGUPAdamW", "CMGUPAdamW", "MGUPLion", "MGUPMuon")


def run_bench(
    model: str = "llama130m",
    mask_ratios: Sequence[float] = (0.5,),
    steps: int = 3,
    warmup: int = 1,
    naive_steps: Optional[int] = 2,
    muon_steps: Optional[int] = 1,
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
    compile_modes: Sequence[bool] = (False, True),
    device: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    log: Callable[[str], None] = lambda s: None,
    clock: str = "wall",
    deepspeed_cpu_adam_row: bool = False,
) -> List[Row]:
    """Time every optimizer on the model's shapes; returns the rows of the table."""
    from mgup_dist.device import fused_adamw_available, resolve_device

    if model not in MODELS:
        raise ValueError(f"model: unknown {model!r}; allowed: {', '.join(MODELS)}")
    if clock not in CLOCKS:
        raise ValueError(f"clock: unknown {clock!r}; allowed: {', '.join(CLOCKS)}")
    tick = CLOCKS[clock]
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    for r in mask_ratios:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"mask_ratio: must be in [0, 1], got {r}")
    facts = _factories(optimizers, [])  # validates the names before anything is timed
    dev = resolve_device(device)
    naive_steps = steps if naive_steps is None else naive_steps
    muon_steps = steps if muon_steps is None else muon_steps
    if naive_steps < 1 or muon_steps < 1:
        raise ValueError(f"naive_steps and muon_steps must be >= 1, got {naive_steps}, {muon_steps}")

    gen = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(MODELS[model])
    params = []
    for _, shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(dev, dtype))
        p.grad = torch.randn(shape, generator=gen).to(dev, dtype)
        params.append(p)
    adamw_only = [params[0], params[-1]]  # embedding and lm_head: AdamW inside Muon (Moonlight practice)
    n_params = sum(p.numel() for p in params)
    log(f"{model}: {len(params)} tensors, {n_params / 1e6:.1f}M params, {dtype}, device {dev}, "
        f"threads {torch.get_num_threads()}, clock {clock}")

    def measure(name, ratio, make, n_steps, n_warmup=warmup, compiled=False):
        return measure_together([(name, ratio, make, compiled)], n_steps, n_warmup)[0]

    def measure_together(entries, n_steps, n_warmup=warmup):
        """Time the optimizers of ``entries`` (name, ratio, make, compiled) step by step in
        turn, so that a change of the machine's load hits all of them alike; then one more
        untimed step each for the memory peak."""
        from mgup_dist.memory import held_bytes, state_bytes, step_peak_bytes

        opts = [make() for _, _, make, _ in entries]
        times = [[] for _ in opts]
        for opt in opts:
            _time_steps(opt, 0, n_warmup, dev)  # warm-up only
        for _ in range(n_steps):
            for opt, ts in zip(opts, times):
                ts += _time_steps(opt, 1, 0, dev, tick)
        out = []
        for (name, ratio, _, compiled), opt, ts in zip(entries, opts, times):
            peak = step_peak_bytes(opt.step, dev, compiled)  # one more step, untimed
            row = Row(name, ratio, statistics.median(ts), ts, state_bpp=state_bytes(opt) / n_params,
                      held_bpp=held_bytes(opt) / n_params, peak_mb=peak / 2**20)
            log(f"  {name:<24} mask_ratio={'-' if ratio is None else ratio}: {row.median_ms:9.1f} ms, "
                f"state {row.state_bpp:.2f} B/param, held {row.held_bpp:.2f} B/param, step peak +{row.peak_mb:.1f} MB")
            out.append(row)
        del opts
        gc.collect()
        return out

    # (name, mask_ratio, make, compiled) of the interleaved rows, in table order
    together: List[Tuple[str, Optional[float], Callable, bool]] = []
    if fused_adamw_available(dev):
        together.append(("AdamW(fused)", None, lambda: torch.optim.AdamW(params, lr=1e-3, fused=True), False))
    together.append(("AdamW(foreach)", None, lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True), False))
    if deepspeed_cpu_adam_row:
        if dev.type != "cpu":
            log(f"  DeepSpeedCPUAdam: skipped (it steps CPU tensors; the params are on {dev})")
        else:
            ds, why = deepspeed_cpu_adam(params, 1e-3)
            if ds is None:
                log(f"  DeepSpeedCPUAdam: skipped ({why})")
            else:
                together.append(("DeepSpeedCPUAdam", None, lambda: ds, False))
    n_base = len(together)
    facts = _factories(optimizers, adamw_only)
    muon_rows = []
    for name, make in facts.items():
        ratios = [None] if name in _RATIO_FREE else list(mask_ratios)
        muon = "Muon" in name
        if muon and not muon_rows:  # the baseline first: torch.optim.Muon + AdamW on the same split
            matrices = [p for p in params if p.ndim == 2 and not any(p is q for q in adamw_only)]
            rest = [p for p in params if not any(p is q for q in matrices)]
            # the recipe's plain Muon: torch.optim.Muon on the matrices, AdamW(foreach) on the rest
            from mgup_dist.train.optim import MuonWithAdamW

            groups = [{"params": matrices, "use_muon": True}] + ([{"params": rest, "use_muon": False}] if rest else [])
            muon_rows.append(("Muon+AdamW(torch)", None, lambda: MuonWithAdamW(groups), False))
        # Muon's matrices have no compiled path (compile=True only fuses its AdamW-fallback
        # params): one eager row unless compile rows alone were asked for.
        modes = [c for c in compile_modes if not (muon and c and False in compile_modes)]
        for c in modes:
            for r in ratios:
                label = name + ("+compile" if c else "")
                build = lambda r=r, c=c, make=make: make(params, 0.5 if r is None else r, c)  # noqa: E731
                (muon_rows if muon else together).append((label, r, build, c))

    rows: List[Row] = measure_together(together, steps)
    naive: Dict[float, float] = {}
    for i, r in enumerate(mask_ratios):
        row = measure("naive topk+scatter", r, lambda: NaiveTopkMGUPAdamW(params, lr=1e-3, mask_ratio=r), naive_steps,
                      min(warmup, 1))  # no compilation: one step allocates its state
        naive[r] = row.median_ms
        rows.insert(n_base + i, row)
    if muon_rows:  # the Muon rows and their baseline interleaved, step by step: one ratio, one run
        rows += measure_together(muon_rows, muon_steps)

    base = {row.name: row.median_ms for row in rows if row.mask_ratio is None}
    for row in rows:
        if "Muon" in row.name and "Muon+AdamW(torch)" in base:
            row.vs_muon = row.median_ms / base["Muon+AdamW(torch)"]
        if "AdamW(fused)" in base:
            row.vs_fused = row.median_ms / base["AdamW(fused)"]
        row.vs_foreach = row.median_ms / base["AdamW(foreach)"]
        if "DeepSpeedCPUAdam" in base:
            row.vs_ds = row.median_ms / base["DeepSpeedCPUAdam"]
        ref = naive.get(row.mask_ratio) if row.mask_ratio is not None else naive.get(0.5, next(iter(naive.values())))
        row.naive_speedup = ref / row.median_ms
    return rows


HEADER = ("optimizer", "mask_ratio", "median ms", "x fused AdamW", "x foreach AdamW", "x DeepSpeedCPUAdam", "x torch Muon",
          "speed-up vs naive",
          "state B/param", "held B/param", "step peak MB")


def format_table(rows: Iterable[Row]) -> str:
    def f(x, fmt):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for r in rows:
        cells = (r.name, f(r.mask_ratio, "g"), f(r.median_ms, ".1f"), f(r.vs_fused, ".2f") + "x",
                 f(r.vs_foreach, ".2f") + "x", f(r.vs_ds, ".2f") + "x", f(r.vs_muon, ".2f") + "x", f(r.naive_speedup, ".1f") + "x", f(r.state_bpp, ".2f"),
                 f(r.held_bpp, ".2f"), f(r.peak_mb, ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Row]:
    ap = argparse.ArgumentParser(prog="mgup-dist bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama130m", choices=sorted(MODELS))
    ap.add_argument("--mask-ratio", type=float, nargs="+", default=[0.5], help="one or more mask ratios")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per optimizer (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile, state allocation)")
    ap.add_argument("--naive-steps", type=int, default=2,
                    help="timed steps of the slow topk+scatter baseline (default %(default)s; ~16 s a step "
                         "for llama130m on 2 CPU cores)")
    ap.add_argument("--muon-steps", type=int, default=1,
                    help="timed steps of the Muon rows (default %(default)s: Newton-Schulz on every matrix is "
                         "~1.7 TFLOP a step for llama130m, tens of seconds on 2 CPU cores)")
    ap.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS),
                    help="any of MGUPAdamW CMGUPAdamW MGUPLion CMGUPLion MGUPMuon CMGUPMuon")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="both",
                    help="MGUP optimizers eager (foreach), with compile=True (fused torch.compile kernels), "
                         "or both (default)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--deepspeed-cpu-adam", action="store_true",
                    help="add DeepSpeedCPUAdam (ZeRO-Offload's CPU optimizer) and its ratio column; DeepSpeed builds "
                         "its op at first use (minutes, cached in TORCH_EXTENSIONS_DIR)")
    ap.add_argument("--device", default=None, help="cpu | cuda | npu | auto (default: auto)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time (default), or the process's CPU time: on a CPU shared with other jobs, the "
                         "work of a step without its waits for a core (meaningful with --threads 1)")
    ap.add_argument("--quiet", action="store_true", help="print only the table")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    rows = run_bench(
        model=args.model, mask_ratios=args.mask_ratio, steps=args.steps, warmup=args.warmup,
        naive_steps=args.naive_steps, muon_steps=args.muon_steps, optimizers=args.optimizers, device=args.device,
        compile_modes={"off": (False,), "on": (True,), "both": (False, True)}[args.compile],
        dtype=getattr(torch, args.dtype), seed=args.seed, log=log, clock=args.clock,
        deepspeed_cpu_adam_row=args.deepspeed_cpu_adam,
    )
    print(format_table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
