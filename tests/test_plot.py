"""`mgup-dist plot`: the learning-rate curve from the run's schedule, and runs whose optimizer
step is not timed (DeepSpeed's ZeRO wrappers) shown as "n/a" rather than nan."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from mgup_dist.train.optim import lr_lambda  # noqa: E402
from mgup_dist.train.plot import load_run, lr_schedule, main, summary_table  # noqa: E402


def _run(d, optimizer, timed):
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"name": d.name, "optimizer": optimizer, "lr": 3e-3, "steps": 60,
                                               "warmup_steps": 6, "min_lr_ratio": 0.1}))
    with open(d / "metrics.jsonl", "w") as f:
        for step in (10, 20, 30, 40, 50, 60):
            rec = {"step": step, "loss": 3.0 - step / 100, "lr": 3e-3 * lr_lambda(step - 1, warmup=6, total=60,
                                                                                    min_ratio=0.1), "train_s": step}
            if timed:
                rec["optimizer_ms"] = 2.0
            f.write(json.dumps(rec) + "\n")
        f.write(json.dumps({"step": 60, "val_loss": 2.5, "val_ppl": 12.18, "train_s": 60}) + "\n")
    (d / "summary.json").write_text(json.dumps({"tokens_per_s": 1000.0, "optimizer_ms": 2.0 if timed else None}))
    return d


def test_lr_curve_starts_at_the_first_warmup_step(tmp_path):
    run = load_run(str(_run(tmp_path / "a", "mgup_adamw", True)))
    pts = lr_schedule(run["config"])
    assert [s for s, _ in pts] == list(range(1, 61))
    assert pts[0][1] == pytest.approx(3e-3 / 6) and pts[5][1] == pytest.approx(3e-3)   # warmup: step t at lr*t/w
    assert pts[-1][1] == pytest.approx(3e-4, rel=0.01)                                  # cosine down to lr * 0.1
    logged = {r["step"]: r["lr"] for r in run["train"]}
    assert all(dict(pts)[s] == pytest.approx(v) for s, v in logged.items())            # the logged values agree
    assert lr_schedule({"optimizer": "adamw"}) == []                                    # no schedule: logged points


def test_untimed_optimizer_shows_na(tmp_path, capsys):
    a = _run(tmp_path / "ddp", "adamw", True)
    b = _run(tmp_path / "ds", "mgup_adamw", False)
    table = summary_table([load_run(str(a)), load_run(str(b))])
    rows = table.splitlines()
    assert rows[2].endswith("| 2.0 |") and rows[3].endswith("| n/a |") and "nan" not in table
    assert main([str(a), str(b), "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "n/a" in out and "nan" not in out
    assert {p.name for p in (tmp_path / "p").glob("*.png")} == {"lr.png", "train_loss.png", "val_loss.png",
                                                                 "val_loss_time.png"}
