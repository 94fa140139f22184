"""PNG plots of one or several runs: LR schedule, training loss, validation loss against
optimizer steps, and validation loss against training wall-clock seconds (``train_s`` of
the metrics: time in training steps, evaluation and checkpoints excluded).

``mgup-dist plot runs/a runs/b ... --out DIR`` overlays runs, one curve per run,
labelled by optimizer (plus the run name when two runs share an optimizer).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, List, Optional, Sequence

__all__ = ["load_run", "lr_schedule", "plot_runs", "summary_table", "main"]


def load_run(run_dir: str) -> Dict:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"runs: {run_dir!r} has no metrics.jsonl (is it a `mgup-dist train` output directory?)")
    train, val = {}, {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            (val if "val_loss" in r else train)[r["step"]] = r   # later records win (resumed runs)
    cfg, summary = {}, {}
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    return {"dir": run_dir, "config": cfg, "name": cfg.get("name", summary.get("name", os.path.basename(os.path.normpath(run_dir)))),
            "optimizer": cfg.get("optimizer", summary.get("optimizer", "?")), "train": [train[k] for k in sorted(train)],
            "val": [val[k] for k in sorted(val)], "summary": summary}


def _labels(runs: List[Dict]) -> List[str]:
    opts = [r["optimizer"] for r in runs]
    return [r["optimizer"] if opts.count(r["optimizer"]) == 1 else f"{r['optimizer']} ({r['name']})" for r in runs]


def lr_schedule(cfg: Dict) -> List[tuple]:
    """(step, lr) for every optimizer step 1..steps of a run, from its config.json (the
    trainer's schedule, ``mgup_dist.train.optim.lr_lambda``); [] when the config lacks a
    schedule field.  The metrics hold the lr only every --log-every steps, so a curve drawn
    from them alone would start at step log_every, well after the first warmup step."""
    try:
        lr, steps = float(cfg["lr"]), int(cfg["steps"])
        warmup, min_ratio = int(cfg["warmup_steps"]), float(cfg["min_lr_ratio"])
        total = int(cfg.get("schedule_steps") or steps)  # a continued run keeps its first schedule
    except (KeyError, TypeError, ValueError):
        return []
    from .optim import lr_lambda

    return [(s, lr * lr_lambda(s - 1, warmup=warmup, total=total, min_ratio=min_ratio)) for s in range(1, steps + 1)]


def plot_runs(run_dirs: Sequence[str], out_dir: str, title: Optional[str] = None) -> List[str]:
    """Write lr.png, train_loss.png, val_loss.png (against steps) and, when the metrics
    carry ``train_s``, val_loss_time.png (against training seconds) into ``out_dir``;
    returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    labels = _labels(runs)
    os.makedirs(out_dir, exist_ok=True)
    # (file, y label, records, y key, x key, x label)
    figs = [("lr.png", "learning rate", "train", "lr", "step", "optimizer step"),
            ("train_loss.png", "training loss", "train", "loss", "step", "optimizer step"),
            ("val_loss.png", "validation loss", "val", "val_loss", "step", "optimizer step")]
    if any("train_s" in r for run in runs for r in run["val"]):
        figs.append(("val_loss_time.png", "validation loss", "val", "val_loss", "train_s",
                     "training wall-clock seconds (evaluation excluded)"))
    written = []
    for fname, ylabel, kind, key, xkey, xlabel in figs:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for run, label in zip(runs, labels):
            pts = [(r[xkey], r[key]) for r in run[kind] if key in r and xkey in r]
            if key == "lr":
                pts = lr_schedule(run["config"]) or pts
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=label, marker="o" if kind == "val" and len(xs) < 30 else None, markersize=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title or len(runs) == 1:
            ax.set_title(title or runs[0]["name"])
        ax.grid(True, alpha=0.3)
        if len(runs) > 1 or kind != "train" or key != "lr":
            ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mgup-dist plot", description="Overlay the curves of several training runs.")
    p.add_argument("runs", nargs="+", help="run directories written by `mgup-dist train`")
    p.add_argument("--out", default="plots", help="directory for lr.png, train_loss.png, val_loss.png, val_loss_time.png")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        paths = plot_runs(args.runs, args.out, args.title)
    except ValueError as e:
        p.exit(2, f"mgup-dist plot: error: {e}\n")
    for path in paths:
        print(path)
    runs = [load_run(d) for d in args.runs]
    for r, label in zip(runs, _labels(runs)):
        tl = r["train"][-1]["loss"] if r["train"] else float("nan")
        vl = r["val"][-1]["val_loss"] if r["val"] else float("nan")
        print(f"{label:32s} final train loss {tl:.4f}  final val loss {vl:.4f}")
    print(summary_table(runs))
    return 0


def summary_table(runs: List[Dict]) -> str:
    """A Markdown table of the final figures: train loss (last log record), val loss and
    perplexity (last evaluation), mean tokens/s and mean optimizer ms per step (summary.json,
    falling back to the mean over the log records).  Runs whose optimizer step was not
    timed (DeepSpeed's ZeRO wrappers) show "n/a" there."""
    rows = ["| optimizer | final train loss | final val loss (ppl) | tokens/s | optimizer ms/step |",
            "|---|---:|---:|---:|---:|"]
    for r, label in zip(runs, _labels(runs)):
        tl = r["train"][-1]["loss"] if r["train"] else float("nan")
        vl = r["val"][-1]["val_loss"] if r["val"] else float("nan")
        ppl = math.exp(min(vl, 50.0)) if vl == vl else float("nan")
        tps = r["summary"].get("tokens_per_s")
        if tps is None:
            xs = [x["tokens_per_s"] for x in r["train"] if "tokens_per_s" in x]
            tps = sum(xs) / len(xs) if xs else float("nan")
        oms = r["summary"].get("optimizer_ms")
        if oms is None:
            xs = [x["optimizer_ms"] for x in r["train"] if "optimizer_ms" in x]
            oms = sum(xs) / len(xs) if xs else None
        oms_s = "n/a" if oms is None or oms != oms else f"{oms:.1f}"
        rows.append(f"| {label} | {tl:.4f} | {vl:.4f} ({ppl:.2f}) | {tps:,.0f} | {oms_s} |")
    return "\n".join(rows)
