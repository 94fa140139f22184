"""PNG plots of one or several runs: LR schedule, training loss, validation loss.

``mgup-dist plot runs/a runs/b ... --out DIR`` overlays runs, one curve per run,
labelled by optimizer (plus the run name when two runs share an optimizer).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence

__all__ = ["load_run", "plot_runs", "main"]


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
    cfg = {}
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
    return {"dir": run_dir, "name": cfg.get("name", os.path.basename(os.path.normpath(run_dir))),
            "optimizer": cfg.get("optimizer", "?"), "train": [train[k] for k in sorted(train)],
            "val": [val[k] for k in sorted(val)]}


def _labels(runs: List[Dict]) -> List[str]:
    opts = [r["optimizer"] for r in runs]
    return [r["optimizer"] if opts.count(r["optimizer"]) == 1 else f"{r['optimizer']} ({r['name']})" for r in runs]


def plot_runs(run_dirs: Sequence[str], out_dir: str, title: Optional[str] = None) -> List[str]:
    """Write lr.png, train_loss.png, val_loss.png into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    labels = _labels(runs)
    os.makedirs(out_dir, exist_ok=True)
    figs = [("lr.png", "learning rate", "train", "lr", False),
            ("train_loss.png", "training loss", "train", "loss", False),
            ("val_loss.png", "validation loss", "val", "val_loss", False)]
    written = []
    for fname, ylabel, kind, key, logy in figs:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for run, label in zip(runs, labels):
            pts = [(r["step"], r[key]) for r in run[kind] if key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=label, marker="o" if kind == "val" and len(xs) < 30 else None, markersize=3)
        ax.set_xlabel("optimizer step")
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
    p.add_argument("--out", default="plots", help="directory for lr.png, train_loss.png, val_loss.png")
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
    return 0
