"""``mgup-dist study SPEC``: a grid of ``mgup-dist train`` runs (optimizer x lr x seed, and
optionally tau) and its summary.

A spec file (YAML or JSON, examples in ``configs/studies/``)::

    name: cpu_tiny                 # a label
    out_dir: results/cpu_study     # runs in <out_dir>/runs/<cell>/seed<k>, the summary in <out_dir>
    launcher: null                 # prefix of each run's command (default: <python> -m mgup_dist.train),
                                   # e.g. "torchrun --standalone --nproc-per-node 8 -m mgup_dist.train"
    train: {model: tiny, steps: 100, ...}   # flags of `mgup-dist train` common to every run
    optimizers:                    # name -> its learning rates (and flags of its own)
      adamw: {lrs: [1.0e-3, 3.0e-3]}
      mgup_muon: {lrs: [1.0e-3, 3.0e-3], lr_flags: [lr, muon_lr]}   # the swept lr goes to both flags
    seeds: [0, 1]                  # every (optimizer, lr[, tau]) cell runs these seeds
    best_lr_seeds: [0, 1, 2]       # then: the best lr of each optimizer also runs these seeds
    taus: [0.5]                    # optional: a tau axis for the MGUP optimizers (not the baselines)
    select_by: final_val_loss      # or best_val_loss: what "best lr" means
    keep_checkpoints: false        # delete <run>/checkpoints once a run has finished
    estimate: {seconds_per_step: 0.25, overhead_s: 15, gpus_per_run: 1}   # for --dry-run

A run is finished when its ``summary.json`` records the spec's step count: a rerun of the
study skips it, and an interrupted run continues (``--resume auto``: from its last
checkpoint, or from step 0).  The summary (``summary.json``, ``summary.csv``,
``summary.md`` and PNGs in ``out_dir``) is rewritten after every run.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["load_spec", "plan_runs", "summarize", "main"]

# Optimizers with MGUP's alpha/gamma (a tau axis applies to them); the others are baselines.
MGUP_OPTIMIZERS = ("mgup_adamw", "cmgup_adamw", "mgup_lion", "mgup_muon")
SELECT_BY = ("final_val_loss", "best_val_loss")
# Pairs the summary compares (plain rule first), when both are in the study.
PAIRS = (("adamw", "mgup_adamw"), ("adamw", "cmgup_adamw"), ("adamw", "cautious_adamw"),
         ("mgup_adamw", "cmgup_adamw"), ("cautious_adamw", "cmgup_adamw"), ("lion", "mgup_lion"),
         ("muon", "mgup_muon"))
_SPEC_KEYS = ("name", "out_dir", "launcher", "train", "optimizers", "seeds", "best_lr_seeds", "taus", "select_by",
              "keep_checkpoints", "estimate", "description")
# Flags the study sets itself for each run.
_OWN_FLAGS = ("optimizer", "lr", "seed", "tau", "out_dir", "name", "resume")


def _bad(key: str, msg: str):
    raise ValueError(f"{key}: {msg}")


def _flag(key: str) -> str:
    return "--" + str(key).replace("_", "-")


def _key(flag: str) -> str:
    return str(flag).lstrip("-").replace("-", "_")


def _num_list(spec: Dict, key: str, where: str, *, positive: bool, integer: bool) -> List:
    v = spec.get(key)
    if not isinstance(v, list) or not v:
        _bad(where, f"must be a non-empty list, got {v!r}")
    out = []
    for x in v:
        if isinstance(x, str):
            try:
                x = float(x)
            except ValueError:
                _bad(where, f"{x!r} is not a number")
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            _bad(where, f"{x!r} is not a finite number")
        if integer and (not float(x).is_integer() or x < 0):
            _bad(where, f"{x!r} is not an integer >= 0")
        if positive and x <= 0:
            _bad(where, f"{x!r} must be positive")
        out.append(int(x) if integer else float(x))
    if len(set(out)) != len(out):
        _bad(where, f"repeats a value: {v!r}")
    return out


def load_spec(path: str, out_dir: Optional[str] = None) -> Dict:
    """Read and check a spec file (``out_dir`` overrides its out_dir); ValueError naming
    the key for anything wrong."""
    from .config import OPTIMIZER_NAMES, _load_config_file

    if not os.path.isfile(path):
        _bad("spec", f"file {path!r} does not exist")
    raw = _load_config_file(path)   # YAML or JSON mapping; '-' in keys read as '_'
    unknown = sorted(set(raw) - set(_SPEC_KEYS))
    if unknown:
        _bad("spec", f"unknown keys {unknown} in {path!r}; allowed: {', '.join(_SPEC_KEYS)}")
    spec: Dict = {"path": path, "name": str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])}
    spec["out_dir"] = out_dir or raw.get("out_dir") or os.path.join("studies", spec["name"])
    if not isinstance(spec["out_dir"], str):
        _bad("out_dir", f"must be a path, got {spec['out_dir']!r}")
    launcher = raw.get("launcher")
    if launcher is not None and (not isinstance(launcher, str) or not launcher.strip()):
        _bad("launcher", f"must be a command prefix (a string), got {launcher!r}")
    spec["launcher"] = launcher
    train = raw.get("train") or {}
    if not isinstance(train, dict):
        _bad("train", f"must be a mapping of `mgup-dist train` flags to values, got {train!r}")
    train = {_key(k): v for k, v in train.items()}
    own = sorted(set(train) & set(_OWN_FLAGS))
    if own:
        _bad("train", f"{own} are set by the study for each run (optimizers / lrs / seeds / taus / out_dir)")
    spec["train"] = train
    opts = raw.get("optimizers")
    if not isinstance(opts, dict) or not opts:
        _bad("optimizers", f"must be a mapping of optimizer names to {{lrs: [...]}}, got {opts!r}")
    spec["optimizers"] = {}
    for name, o in opts.items():
        if name not in OPTIMIZER_NAMES:
            _bad("optimizers", f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZER_NAMES)}")
        if not isinstance(o, dict):
            _bad(f"optimizers.{name}", f"must be a mapping with 'lrs', got {o!r}")
        extra = sorted(set(o) - {"lrs", "flags", "lr_flags"})
        if extra:
            _bad(f"optimizers.{name}", f"unknown keys {extra}; allowed: lrs, flags, lr_flags")
        lrs = _num_list(o, "lrs", f"optimizers.{name}.lrs", positive=True, integer=False)
        flags = {_key(k): v for k, v in (o.get("flags") or {}).items()}
        lr_flags = [_key(f) for f in (o.get("lr_flags") or ["lr"])]
        if not lr_flags or any(f not in ("lr", "muon_lr") for f in lr_flags):
            _bad(f"optimizers.{name}.lr_flags", f"a list of 'lr' and/or 'muon_lr', got {o.get('lr_flags')!r}")
        taken = set(flags) & ((set(_OWN_FLAGS) - {"lr"}) | set(lr_flags))
        if taken:
            _bad(f"optimizers.{name}.flags", f"{sorted(taken)} are set by the study (lr_flags: {lr_flags})")
        spec["optimizers"][name] = {"lrs": lrs, "flags": flags, "lr_flags": lr_flags}
    spec["seeds"] = _num_list(raw, "seeds", "seeds", positive=False, integer=True)
    spec["best_lr_seeds"] = (_num_list(raw, "best_lr_seeds", "best_lr_seeds", positive=False, integer=True)
                             if raw.get("best_lr_seeds") is not None else [])
    spec["taus"] = (_num_list(raw, "taus", "taus", positive=True, integer=False)
                    if raw.get("taus") is not None else [None])
    if "tau" in train and spec["taus"] != [None]:
        _bad("taus", "the spec sets both train.tau and a taus axis")
    spec["select_by"] = raw.get("select_by") or "final_val_loss"
    if spec["select_by"] not in SELECT_BY:
        _bad("select_by", f"{spec['select_by']!r}; allowed: {', '.join(SELECT_BY)}")
    kc = raw.get("keep_checkpoints", True)
    if not isinstance(kc, bool):
        _bad("keep_checkpoints", f"must be true or false, got {kc!r}")
    spec["keep_checkpoints"] = kc
    est = raw.get("estimate") or {}
    if not isinstance(est, dict) or sorted(set(est) - {"seconds_per_step", "overhead_s", "gpus_per_run"}):
        _bad("estimate", f"a mapping with seconds_per_step, overhead_s, gpus_per_run; got {est!r}")
    for k in est:
        if isinstance(est[k], bool) or not isinstance(est[k], (int, float)) or est[k] < 0:
            _bad(f"estimate.{k}", f"must be a number >= 0, got {est[k]!r}")
    spec["estimate"] = {"seconds_per_step": float(est.get("seconds_per_step", 0.0)),
                        "overhead_s": float(est.get("overhead_s", 0.0)),
                        "gpus_per_run": float(est.get("gpus_per_run", 0))}
    spec["description"] = raw.get("description")
    spec["steps"] = _train_steps(spec)
    # Every run's flags must parse: bad values are refused here, before any run starts.
    for run in plan_runs(spec):
        _check_run_flags(run)
    return spec


def _train_steps(spec: Dict) -> int:
    """The step count every run is to reach (the recipe's own default or config file's when
    the spec does not set it)."""
    if "steps" in spec["train"]:
        return int(spec["train"]["steps"])
    from .config import _parser, _load_config_file as _load

    steps = _parser().get_default("steps")
    if "config" in spec["train"]:
        steps = int(_load(str(spec["train"]["config"])).get("steps", steps))
    return int(steps)


def _train_args(flags: Dict) -> List[str]:
    out: List[str] = []
    for k, v in flags.items():
        if isinstance(v, bool):
            if v:
                out.append(_flag(k))
            continue
        if v is None:
            continue
        if isinstance(v, dict):
            v = json.dumps(v)
        out += [_flag(k), str(v)]
    return out


def _fmt(x: Optional[float]) -> str:
    return "none" if x is None else f"{x:g}"


def cell_id(opt: str, lr: float, tau: Optional[float]) -> str:
    return f"{opt}" + (f"-tau{_fmt(tau)}" if tau is not None else "") + f"-lr{_fmt(lr)}"


def _run(spec: Dict, opt: str, lr: float, tau: Optional[float], seed: int, phase: str) -> Dict:
    o = spec["optimizers"][opt]
    cid = cell_id(opt, lr, tau)
    out = os.path.join(spec["out_dir"], "runs", cid, f"seed{seed}")
    flags = dict(spec["train"])
    flags.update(o["flags"])
    flags["optimizer"] = opt
    for f in o["lr_flags"]:
        flags[f] = lr
    if tau is not None:
        flags["tau"] = tau
    flags.update(seed=seed, name=f"{spec['name']}-{cid}-seed{seed}", out_dir=out, resume="auto")
    return {"optimizer": opt, "lr": lr, "tau": tau, "seed": seed, "cell": cid, "dir": out, "phase": phase,
            "args": _train_args(flags)}


def plan_runs(spec: Dict, best: Optional[Dict[Tuple[str, Optional[float]], float]] = None) -> List[Dict]:
    """The sweep (every optimizer x its lrs x taus x seeds), then, when ``best`` maps
    (optimizer, tau) to its best lr, the extra ``best_lr_seeds`` runs at that lr."""
    runs = []
    for opt, o in spec["optimizers"].items():
        for tau in (spec["taus"] if opt in MGUP_OPTIMIZERS else [None]):
            for lr in o["lrs"]:
                for seed in spec["seeds"]:
                    runs.append(_run(spec, opt, lr, tau, seed, "sweep"))
    if best:
        have = {(r["cell"], r["seed"]) for r in runs}
        for (opt, tau), lr in best.items():
            for seed in spec["best_lr_seeds"]:
                if (cell_id(opt, lr, tau), seed) not in have:
                    runs.append(_run(spec, opt, lr, tau, seed, "best_lr"))
    return runs


def _check_run_flags(run: Dict) -> None:
    from .config import parse

    try:
        parse(run["args"], world_size=1)
    except ValueError as e:
        raise ValueError(f"spec: the run {run['cell']} seed {run['seed']} would be refused: {e}") from None


def command(spec: Dict, run: Dict, launcher: Optional[str] = None) -> List[str]:
    pre = launcher or spec["launcher"]
    prefix = shlex.split(pre) if pre else [sys.executable, "-m", "mgup_dist.train"]
    return prefix + run["args"]


# ------------------------------------------------------------------------------ results
def _read_json(path: str) -> Optional[Dict]:
    try:
        with open(path, "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def is_finished(spec: Dict, run: Dict) -> bool:
    s = _read_json(os.path.join(run["dir"], "summary.json"))
    return s is not None and s.get("steps") == spec["steps"] and s.get("final_val_loss") is not None


def _load_metrics(run_dir: str) -> List[Dict]:
    """Validation records (step, val_loss, train_s), later records winning (resumed runs)."""
    val: Dict[int, Dict] = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        for ln in f:
            try:
                r = json.loads(ln)
            except ValueError:
                continue
            if isinstance(r, dict) and "val_loss" in r:
                val[r["step"]] = r
    return [val[k] for k in sorted(val)]


def _mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, sd


def collect(spec: Dict, runs: List[Dict]) -> Dict[str, Dict]:
    """Finished runs grouped by cell: per seed the final and best validation loss, the
    validation curve and the wall-clock of training."""
    cells: Dict[str, Dict] = {}
    for r in runs:
        if not is_finished(spec, r):
            continue
        s = _read_json(os.path.join(r["dir"], "summary.json")) or {}
        val = _load_metrics(r["dir"])
        if not val:
            continue
        c = cells.setdefault(r["cell"], {"optimizer": r["optimizer"], "lr": r["lr"], "tau": r["tau"], "seeds": {}})
        c["seeds"][r["seed"]] = {"final_val_loss": float(s["final_val_loss"]),
                                 "best_val_loss": min(float(v["val_loss"]) for v in val),
                                 "final_loss": s.get("final_loss"), "train_seconds": s.get("train_seconds"),
                                 "curve": [(v["step"], v.get("train_s"), v["val_loss"]) for v in val]}
    for c in cells.values():
        for k in ("final_val_loss", "best_val_loss"):
            c[k] = _mean_std([v[k] for v in c["seeds"].values()])
        c["n"] = len(c["seeds"])
    return cells


def best_lrs(spec: Dict, cells: Dict[str, Dict]) -> Dict[Tuple[str, Optional[float]], float]:
    """(optimizer, tau) -> the lr whose mean ``select_by`` loss over the *sweep* seeds is
    lowest; only when every sweep run of that optimizer (and tau) has finished."""
    out = {}
    key = spec["select_by"]
    sweep = set(spec["seeds"])
    for opt, o in spec["optimizers"].items():
        for tau in (spec["taus"] if opt in MGUP_OPTIMIZERS else [None]):
            scores = []
            for lr in o["lrs"]:
                c = cells.get(cell_id(opt, lr, tau))
                if c is None or not sweep <= set(c["seeds"]):
                    break
                scores.append((_mean_std([c["seeds"][s][key] for s in spec["seeds"]])[0], lr))
            else:
                out[(opt, tau)] = min(scores)[1]
    return out


def _pm(ms: Tuple[float, float]) -> str:
    m, s = ms
    return f"{m:.4f} ± {s:.4f}" if math.isfinite(s) else f"{m:.4f}"


def _label(opt: str, tau: Optional[float]) -> str:
    return opt if tau is None else f"{opt} (tau {tau:g})"


def compare(a: Dict, b: Dict, key: str) -> Dict:
    """Difference of means b - a and whether it exceeds twice its standard error
    sqrt(sa^2/na + sb^2/nb) (with under 2 seeds on a side: no verdict)."""
    xa = [v[key] for v in a["seeds"].values()]
    xb = [v[key] for v in b["seeds"].values()]
    ma, sa = _mean_std(xa)
    mb, sb = _mean_std(xb)
    d = mb - ma
    if len(xa) < 2 or len(xb) < 2:
        return {"diff": d, "se": float("nan"), "verdict": "too few seeds to tell"}
    se = math.sqrt(sa ** 2 / len(xa) + sb ** 2 / len(xb))
    verdict = "within the seed spread" if abs(d) <= 2 * se else ("lower" if d < 0 else "higher")
    return {"diff": d, "se": se, "verdict": verdict}


def summarize(spec: Dict, runs: List[Dict], *, plots: bool = True) -> Dict:
    """Write summary.json / summary.csv / summary.md (and the plots) into out_dir."""
    cells = collect(spec, runs)
    best = best_lrs(spec, cells)
    key = spec["select_by"]
    out_dir = spec["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for cid, c in sorted(cells.items(), key=lambda kv: (list(spec["optimizers"]).index(kv[1]["optimizer"]),
                                                       kv[1]["tau"] or 0, kv[1]["lr"])):
        rows.append({"optimizer": c["optimizer"], "tau": c["tau"], "lr": c["lr"], "seeds": sorted(c["seeds"]),
                     "n": c["n"], "final_val_loss_mean": c["final_val_loss"][0],
                     "final_val_loss_std": c["final_val_loss"][1], "best_val_loss_mean": c["best_val_loss"][0],
                     "best_val_loss_std": c["best_val_loss"][1],
                     "best_lr": best.get((c["optimizer"], c["tau"])) == c["lr"]})
    comparisons = []
    for pa, pb in PAIRS:
        for tau in spec["taus"]:
            ta = tau if pa in MGUP_OPTIMIZERS else None
            tb = tau if pb in MGUP_OPTIMIZERS else None
            if (pa, ta) in best and (pb, tb) in best:
                a, b = cells[cell_id(pa, best[(pa, ta)], ta)], cells[cell_id(pb, best[(pb, tb)], tb)]
                comparisons.append({"a": _label(pa, ta), "b": _label(pb, tb), "n_a": a["n"], "n_b": b["n"],
                                    **compare(a, b, key)})
    done = sum(1 for r in runs if is_finished(spec, r))
    result = {"name": spec["name"], "spec": spec["path"], "select_by": key, "runs_finished": done,
              "runs_planned": len(runs), "cells": rows,
              "best_lr": [{"optimizer": o, "tau": t, "lr": lr} for (o, t), lr in best.items()],
              "comparisons": comparisons}
    # unique temporary names: shards of one study (slurm array tasks) may write at once
    tmp = os.path.join(out_dir, f".summary.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "summary.json"))
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "tau", "lr", "n_seeds", "seeds", "final_val_loss_mean", "final_val_loss_std",
                    "best_val_loss_mean", "best_val_loss_std", "best_lr"])
        for r in rows:
            w.writerow([r["optimizer"], "" if r["tau"] is None else r["tau"], r["lr"], r["n"],
                        " ".join(map(str, r["seeds"])), f"{r['final_val_loss_mean']:.6f}",
                        f"{r['final_val_loss_std']:.6f}", f"{r['best_val_loss_mean']:.6f}",
                        f"{r['best_val_loss_std']:.6f}", int(r["best_lr"])])
    os.replace(tmp, os.path.join(out_dir, "summary.csv"))
    with open(tmp, "w") as f:
        f.write(_markdown(spec, rows, best, cells, comparisons, done, len(runs)))
    os.replace(tmp, os.path.join(out_dir, "summary.md"))
    if plots and cells:
        try:
            result["plots"] = plot_study(spec, cells, best)
        except ImportError as e:   # pragma: no cover - matplotlib missing
            print(f"[mgup-dist study] no plots: {e}", file=sys.stderr)
    return result


def _markdown(spec, rows, best, cells, comparisons, done, total) -> str:
    key = spec["select_by"]
    lines = [f"# Study {spec['name']}", "",
             f"{done} of {total} runs finished. Losses: validation loss (mean ± sample std over seeds); "
             f"best lr = lowest mean {key.replace('_', ' ')} over the sweep seeds {spec['seeds']}.", "",
             "## Each optimizer at its best lr", "",
             "| optimizer | best lr | seeds | final val loss | best val loss |", "|---|---:|---:|---:|---:|"]
    for (opt, tau), lr in best.items():
        c = cells[cell_id(opt, lr, tau)]
        lines.append(f"| {_label(opt, tau)} | {lr:g} | {c['n']} | {_pm(c['final_val_loss'])} | "
                     f"{_pm(c['best_val_loss'])} |")
    if comparisons:
        lines += ["", f"## Pairs at their best lr ({key.replace('_', ' ')})", "",
                  "Difference of means b - a; 'within the seed spread' when |difference| <= 2 standard errors "
                  "(sqrt(sa²/na + sb²/nb)).", "",
                  "| a | b | b - a | 2 × s.e. | verdict |", "|---|---|---:|---:|---|"]
        for c in comparisons:
            se2 = f"{2 * c['se']:.4f}" if math.isfinite(c["se"]) else "—"
            verdict = c["verdict"] if c["verdict"] in ("within the seed spread", "too few seeds to tell") else \
                f"b {c['verdict']}"
            lines.append(f"| {c['a']} ({c['n_a']} seeds) | {c['b']} ({c['n_b']} seeds) | {c['diff']:+.4f} | {se2} | "
                         f"{verdict} |")
    lines += ["", "## Every cell", "", "| optimizer | lr | seeds | final val loss | best val loss |",
              "|---|---:|---|---:|---:|"]
    for r in rows:
        mark = " **(best)**" if r["best_lr"] else ""
        lines.append(f"| {_label(r['optimizer'], r['tau'])} | {r['lr']:g}{mark} | {' '.join(map(str, r['seeds']))} | "
                     f"{_pm((r['final_val_loss_mean'], r['final_val_loss_std']))} | "
                     f"{_pm((r['best_val_loss_mean'], r['best_val_loss_std']))} |")
    missing = [f"{_label(o, t)}" for o, oo in spec["optimizers"].items()
               for t in (spec["taus"] if o in MGUP_OPTIMIZERS else [None]) if (o, t) not in best]
    if missing:
        lines += ["", f"Sweep not complete (no best lr yet): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def _band(curves: List[List[Tuple]], xi: int):
    """Mean and std of validation loss at the steps every seed has; x = mean over seeds of
    column ``xi`` (0: step, 1: training seconds)."""
    common = sorted(set.intersection(*[{c[0] for c in cur} for cur in curves]))
    xs, ms, ss = [], [], []
    for st in common:
        pts = [next(p for p in cur if p[0] == st) for cur in curves]
        if xi == 1 and any(p[1] is None for p in pts):
            continue
        xs.append(sum(p[xi] for p in pts) / len(pts))
        m, s = _mean_std([p[2] for p in pts])
        ms.append(m)
        ss.append(s if math.isfinite(s) else 0.0)
    return xs, ms, ss


# one colour per optimizer, dashed for the baselines without MGUP's scale
_COLORS = {"adamw": "tab:blue", "mgup_adamw": "tab:orange", "cmgup_adamw": "tab:green", "cautious_adamw": "tab:red",
           "lion": "tab:purple", "mgup_lion": "tab:brown", "muon": "tab:gray", "mgup_muon": "tab:olive"}


def _style(opt: str) -> Dict:
    st = {"linestyle": "--" if opt in ("adamw", "cautious_adamw", "lion", "muon") else "-"}
    if opt in _COLORS:
        st["color"] = _COLORS[opt]
    return st


def plot_study(spec: Dict, cells: Dict[str, Dict], best) -> List[str]:
    """val_loss_steps.png and val_loss_time.png (each optimizer at its best lr: mean over
    seeds, band = ± one std) and lr_sensitivity.png (loss against lr per optimizer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for fname, xi, xlabel in (("val_loss_steps.png", 0, "optimizer step"),
                              ("val_loss_time.png", 1, "training wall-clock seconds (evaluation excluded)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (opt, tau), lr in best.items():
            c = cells[cell_id(opt, lr, tau)]
            xs, ms, ss = _band([v["curve"] for v in c["seeds"].values()], xi)
            if not xs:
                continue
            line, = ax.plot(xs, ms, label=f"{_label(opt, tau)}, lr {lr:g} ({c['n']} seeds)", **_style(opt))
            ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.set_title(f"{spec['name']}: best lr per optimizer, mean ± std over seeds")
        lo = [cells[cell_id(o, lr, t)]["final_val_loss"][0] for (o, t), lr in best.items()]
        if lo:   # the start of training (loss ~ ln V) would flatten the differences
            ax.set_ylim(min(lo) - 0.15, max(lo) + 0.6)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(spec["out_dir"], fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    # one panel per base rule (their learning rates are not on one scale)
    key = spec["select_by"]
    fams: Dict[str, List[str]] = {}
    for opt in spec["optimizers"]:
        fams.setdefault("Lion" if "lion" in opt else "Muon" if "muon" in opt else "AdamW", []).append(opt)
    fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams) + 0.8, 4.5), squeeze=False, sharey=True)
    for ax, (fam, opts) in zip(axes[0], fams.items()):
        for opt in opts:
            o = spec["optimizers"][opt]
            for tau in (spec["taus"] if opt in MGUP_OPTIMIZERS else [None]):
                pts = [(lr, cells[cell_id(opt, lr, tau)]) for lr in o["lrs"] if cell_id(opt, lr, tau) in cells]
                if not pts:
                    continue
                # the sweep seeds only, so that every point of a curve has the same seeds
                stats = [_mean_std([c["seeds"][s][key] for s in spec["seeds"] if s in c["seeds"]]) for _, c in pts]
                ax.errorbar([lr for lr, _ in pts], [m for m, _ in stats],
                            yerr=[s if math.isfinite(s) else 0.0 for _, s in stats], marker="o", capsize=3,
                            label=_label(opt, tau), **_style(opt))
        ax.set_xscale("log")
        flags = sorted({f for opt in opts for f in spec["optimizers"][opt]["lr_flags"]})
        ax.set_xlabel("peak " + " = ".join("matrix lr (--muon-lr)" if f == "muon_lr" else "lr" for f in flags))
        ax.set_title(fam)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(f"{key.replace('_', ' ')} (mean ± std, sweep seeds)")
    fig.suptitle(f"{spec['name']}: learning-rate sensitivity")
    fig.tight_layout()
    path = os.path.join(spec["out_dir"], "lr_sensitivity.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)
    return out


# ---------------------------------------------------------------------------- execution
def _estimate_s(spec: Dict) -> float:
    e = spec["estimate"]
    return e["overhead_s"] + e["seconds_per_step"] * spec["steps"]


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _selected(runs: List[Dict], shard: Optional[Tuple[int, int]]) -> List[Dict]:
    if shard is None:
        return runs
    i, n = shard
    return [r for k, r in enumerate(runs) if k % n == i]


def _pending_extra(spec: Dict, shard) -> int:
    """Best-lr runs not yet planned: those of the optimizers whose sweep is unfinished."""
    best = best_lrs(spec, collect(spec, plan_runs(spec)))
    n_groups = sum(1 for o in spec["optimizers"] for t in (spec["taus"] if o in MGUP_OPTIMIZERS else [None])
                   if (o, t) not in best)
    n = n_groups * len([s for s in spec["best_lr_seeds"] if s not in spec["seeds"]])
    return n if shard is None else len(_selected(list(range(n)), shard))


def dry_run(spec: Dict, launcher: Optional[str], shard, jobs: int) -> None:
    sweep = _selected(plan_runs(spec, best_lrs(spec, collect(spec, plan_runs(spec)))), shard)
    extra_max = _pending_extra(spec, shard)
    for r in sweep:
        print(("" if not is_finished(spec, r) else "# finished: ") + shlex.join(command(spec, r, launcher)))
    if extra_max:
        print(f"# then {extra_max} more run(s): the seeds of {spec['best_lr_seeds']} not in the sweep, at each "
              f"optimizer's best lr (lowest mean {spec['select_by']}), once its sweep has finished")
    total = len(sweep) + extra_max
    left = sum(1 for r in sweep if not is_finished(spec, r)) + extra_max
    per = _estimate_s(spec)
    msg = f"# {total} runs ({left} to do) x {spec['steps']} steps"
    if per > 0:
        msg += (f"; about {_hms(per)} a run (estimate: {spec['estimate']['overhead_s']:g} s + "
                f"{spec['estimate']['seconds_per_step']:g} s/step), {_hms(left * per / jobs)} with --jobs {jobs}")
        if spec["estimate"]["gpus_per_run"]:
            gh = left * per * spec["estimate"]["gpus_per_run"] / 3600
            msg += f"; {gh:,.0f} GPU-hours ({spec['estimate']['gpus_per_run']:g} GPU(s) a run in the estimate)"
    else:
        msg += "; no time estimate (the spec has no 'estimate')"
    print(msg)


class _Pool:
    """At most ``jobs`` runs at a time, each a subprocess writing to its run's log.txt."""

    def __init__(self, spec, launcher, jobs):
        self.spec, self.launcher, self.jobs = spec, launcher, jobs
        self.live: List[Tuple[subprocess.Popen, Dict, float, object]] = []

    def start(self, run: Dict) -> None:
        os.makedirs(run["dir"], exist_ok=True)
        cmd = command(self.spec, run, self.launcher)
        with open(os.path.join(run["dir"], "command.txt"), "w") as f:
            f.write(shlex.join(cmd) + "\n")
        log = open(os.path.join(run["dir"], "log.txt"), "a")
        log.write(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ} {shlex.join(cmd)}\n")
        log.flush()
        # same process group as the study: a Ctrl-C or a kill of the group stops the runs too
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.live.append((p, run, time.monotonic(), log))

    def wait_one(self) -> Tuple[Dict, int, float]:
        while True:
            for k, (p, run, t0, log) in enumerate(self.live):
                rc = p.poll()
                if rc is not None:
                    log.close()
                    del self.live[k]
                    return run, rc, time.monotonic() - t0
            time.sleep(0.2)

    def stop(self) -> None:
        for p, _, _, _ in self.live:
            if p.poll() is None:
                p.terminate()
        for p, _, _, log in self.live:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.close()
        self.live = []


def _run_inline(spec: Dict, run: Dict) -> Tuple[int, float]:
    """One run inside this process (``--in-process``): the trainer's own entry point with
    its output appended to the run's log.txt; (exit code, seconds)."""
    import contextlib
    import traceback

    from .cli import main as train_main

    os.makedirs(run["dir"], exist_ok=True)
    cmd = command(spec, run)
    with open(os.path.join(run["dir"], "command.txt"), "w") as f:
        f.write(shlex.join(cmd) + "\n")
    t0 = time.monotonic()
    with open(os.path.join(run["dir"], "log.txt"), "a") as log:
        log.write(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ} {shlex.join(cmd)} "
                  "(in-process)\n")
        log.flush()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                rc = train_main(run["args"])
            except Exception:   # a failed run is reported; the study goes on with the next
                traceback.print_exc()
                rc = 1
    return rc, time.monotonic() - t0


def _record_invocation(spec: Dict, argv: Sequence[str], started: float, finished: float, n_done: int,
                    failed: List[str]) -> None:
    """study.json: what ran where and when, one entry per invocation (a resumed study has several)."""
    import torch

    path = os.path.join(spec["out_dir"], "study.json")
    data = _read_json(path) or {"invocations": []}
    try:
        load = os.getloadavg()
    except OSError:   # pragma: no cover
        load = None
    data["spec"] = spec["path"]
    data["invocations"].append({
        "command": shlex.join(["mgup-dist", "study", *argv]),
        "started_utc": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "finished_utc": datetime.datetime.fromtimestamp(finished, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": round(finished - started, 1), "runs_completed": n_done, "runs_failed": failed,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
        "load_avg_at_end": load, "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform()})
    with open(f"{path}.{os.getpid()}.tmp", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(f"{path}.{os.getpid()}.tmp", path)


def execute(spec: Dict, *, jobs: int = 1, launcher: Optional[str] = None, shard=None, argv: Sequence[str] = (),
            plots: bool = True, in_process: bool = False) -> int:
    """Run every unfinished run (sweep first, then the best-lr seeds as each optimizer's
    sweep completes); 0 when all finished, 1 when a run failed.  ``in_process``: one run
    after another inside this process (no interpreter start-up per run)."""
    started = time.time()
    attempted, failed, durations = set(), [], []

    def on_term(signum, frame):   # `kill PID`: stop the live runs as Ctrl-C does
        raise KeyboardInterrupt

    try:
        old_term = signal.signal(signal.SIGTERM, on_term)
    except ValueError:   # not the main thread: the caller handles signals
        old_term = None
    n_done = 0
    pool = _Pool(spec, launcher, jobs)
    log = lambda msg: print(f"[mgup-dist study] {msg}", flush=True)  # noqa: E731
    try:
        while True:
            runs = _selected(plan_runs(spec, best_lrs(spec, collect(spec, plan_runs(spec)))), shard)
            if not spec["keep_checkpoints"]:   # also those of runs finished by an interrupted study
                for r in runs:
                    if is_finished(spec, r) and os.path.isdir(os.path.join(r["dir"], "checkpoints")):
                        shutil.rmtree(os.path.join(r["dir"], "checkpoints"), ignore_errors=True)
            todo = [r for r in runs if not is_finished(spec, r) and (r["cell"], r["seed"]) not in attempted
                    and all(r["dir"] != lr["dir"] for _, lr, _, _ in pool.live)]
            finished = sum(1 for r in runs if is_finished(spec, r))
            if not todo and not pool.live:
                break
            if in_process:
                run = todo.pop(0)
                attempted.add((run["cell"], run["seed"]))
                log(f"start {run['cell']} seed {run['seed']} -> {run['dir']}")
                rc, dt = _run_inline(spec, run)
            else:
                while todo and len(pool.live) < jobs:
                    r = todo.pop(0)
                    attempted.add((r["cell"], r["seed"]))
                    pool.start(r)
                    log(f"start {r['cell']} seed {r['seed']} -> {r['dir']}")
                run, rc, dt = pool.wait_one()
            if rc == 0 and is_finished(spec, run):
                n_done += 1
                durations.append(dt)
            else:
                where = os.path.join(run["dir"], "log.txt")
                failed.append(f"{run['cell']} seed {run['seed']} (exit {rc}; see {where})")
                log(f"FAILED {failed[-1]}")
            runs = _selected(plan_runs(spec, best_lrs(spec, collect(spec, plan_runs(spec)))), shard)
            finished = sum(1 for r in runs if is_finished(spec, r))
            total = len(runs) + _pending_extra(spec, shard)
            left = total - finished - len(failed)
            per = sum(durations) / len(durations) if durations else _estimate_s(spec)
            log(f"{finished}/{total} runs done ({run['cell']} seed {run['seed']}: {dt:.0f} s); "
                f"about {_hms(max(0, left) * per / jobs)} left")
            # tables after every run; the plots once at the end
            summarize(spec, plan_runs(spec, best_lrs(spec, collect(spec, plan_runs(spec)))), plots=False)
    except KeyboardInterrupt:
        log("interrupted: stopping the live runs; rerun the same command to continue")
        pool.stop()
        _record_invocation(spec, argv, started, time.time(), n_done, failed + ["interrupted"])
        return 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    all_runs = plan_runs(spec, best_lrs(spec, collect(spec, plan_runs(spec))))
    res = summarize(spec, all_runs, plots=plots)
    _record_invocation(spec, argv, started, time.time(), n_done, failed)
    log(f"{res['runs_finished']}/{res['runs_planned']} runs finished in all; summary in "
        f"{os.path.join(spec['out_dir'], 'summary.md')}")
    if failed:
        log(f"{len(failed)} run(s) failed: " + "; ".join(failed))
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mgup-dist study",
                                description="Run a grid of `mgup-dist train` runs (optimizer x lr x seed [x tau]) "
                                            "from a spec file and summarise it: mean ± std over seeds, best lr per "
                                            "optimizer, plots. Resumable: finished runs are skipped.")
    p.add_argument("spec", help="YAML or JSON spec file (see configs/studies/)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default: 1)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and the time estimate; run nothing")
    p.add_argument("--out-dir", default=None, help="override the spec's out_dir")
    p.add_argument("--launcher", default=None,
                   help="override the spec's launcher: the command prefix before the trainer's flags, e.g. "
                        "'torchrun --standalone --nproc-per-node 8 -m mgup_dist.train'")
    p.add_argument("--shard", default=None,
                   help="I/N: run only every N-th run starting at I (0-based), e.g. one slurm array task each")
    p.add_argument("--in-process", action="store_true",
                   help="run the trainings inside this process, one after another: no interpreter start-up per run "
                        "(short CPU runs); not with --jobs > 1 or --launcher")
    p.add_argument("--summary-only", action="store_true", help="rewrite the summary and plots from finished runs")
    p.add_argument("--no-plots", action="store_true", help="write no PNGs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.jobs < 1:
        _bad("jobs", f"must be >= 1, got {args.jobs}")
    shard = None
    if args.shard is not None:
        try:
            i, n = (int(x) for x in args.shard.split("/"))
        except ValueError:
            _bad("shard", f"I/N with integers 0 <= I < N, got {args.shard!r}")
        if not 0 <= i < n:
            _bad("shard", f"I/N with integers 0 <= I < N, got {args.shard!r}")
        shard = (i, n)
    spec = load_spec(args.spec, args.out_dir)
    if args.dry_run:
        dry_run(spec, args.launcher, shard, args.jobs)
        return 0
    if args.summary_only:
        res = summarize(spec, plan_runs(spec, best_lrs(spec, collect(spec, plan_runs(spec)))), plots=not args.no_plots)
        print(f"[mgup-dist study] {res['runs_finished']}/{res['runs_planned']} runs finished; summary in "
              f"{os.path.join(spec['out_dir'], 'summary.md')}")
        return 0
    if args.in_process and (args.jobs > 1 or args.launcher or spec["launcher"]):
        _bad("in_process", "runs one training at a time in this process: not with --jobs > 1 or a launcher")
    return execute(spec, jobs=args.jobs, launcher=args.launcher, shard=shard, argv=argv, plots=not args.no_plots,
                   in_process=args.in_process)


if __name__ == "__main__":
    sys.exit(main())
