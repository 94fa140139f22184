"""The training recipe's reliability: checkpoint integrity and fallback, metrics history,
resume with changed settings, non-finite gradient steps, and the CLI's bad inputs: each
case must end in a fallback, a skip or a clear error, never a crash, a quiet load of a
corrupt file, lost history or an ignored setting (docs/reliability.md)."""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import subprocess

import pytest
import torch

from mgup_dist.train import config as tcfg
from mgup_dist.train import run
from mgup_dist.train.checkpoint import MANIFEST, verify_checkpoint
import fault_entry
from fault_entry import NAN_ENV

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = ["--steps", "6", "--save-every", "3", "--eval-every", "6", "--log-every", "1", "--global-batch", "4",
        "--seq-len", "32", "--eval-tokens", "512", "--no-progress", "--no-plots", "--no-tensorboard"]


def _ck(out, step):
    return out / "checkpoints" / f"step_{step:08d}"


def _flip_bit(path: pathlib.Path, offset_frac: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * offset_frac)
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _records(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _subprocess_train(tmp_path, args, env_extra=None, ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
    entry = [str(ROOT / "tests" / "fault_entry.py")] if env_extra else ["-m", "mgup_dist.train"]
    r = subprocess.run(["python", *entry, *args], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=200)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


# ------------------------------------------------------------------ checkpoints (DDP, in-process)

@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("fname", ["model.pt", "optimizer.pt"])
def test_damaged_newest_checkpoint_falls_back_to_older_one(tmp_path, capsys, damage, fname):
    out = tmp_path / "r"
    args = BASE + ["--out-dir", str(out)]
    run(args + ["--resume", "never"])
    ref = torch.load(_ck(out, 6) / "model.pt")
    assert verify_checkpoint(str(_ck(out, 6))) is None and (_ck(out, 6) / MANIFEST).is_file()
    (_truncate if damage == "truncate" else _flip_bit)(_ck(out, 6) / fname)
    assert fname in verify_checkpoint(str(_ck(out, 6)))
    capsys.readouterr()
    again = run(args)    # --resume auto: step 6 is damaged, step 3 is used and steps 4-6 are redone
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_00000006" in err and fname in err
    assert again["start_step"] == 3 and again["steps"] == 6
    got = torch.load(_ck(out, 6) / "model.pt")
    assert all(torch.equal(ref[k], got[k]) for k in ref)      # bit-exact with the undamaged run
    assert "skipping checkpoint" in (out / "events.log").read_text()
    assert [r["step"] for r in _records(out) if "loss" in r] == list(range(1, 7))


@pytest.mark.timeout(120)
def test_no_usable_checkpoint_refuses_and_keeps_history(tmp_path):
    out = tmp_path / "r"
    args = BASE + ["--out-dir", str(out)]
    run(args + ["--resume", "never"])
    _flip_bit(_ck(out, 3) / "model.pt")
    _truncate(_ck(out, 6) / "optimizer.pt")
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"resume: 2 checkpoint\(s\) .* none is usable.*step_00000006.*"
                                         r"optimizer.pt.*step_00000003.*model.pt"):
        run(args)
    assert (out / "metrics.jsonl").read_text() == before
    with pytest.raises(ValueError, match="not a usable checkpoint.*model.pt"):
        run(args + ["--resume", str(_ck(out, 3))])


@pytest.mark.timeout(120)
def test_torn_metrics_line_is_dropped_and_history_kept(tmp_path, capsys):
    out = tmp_path / "r"
    args = BASE + ["--out-dir", str(out)]
    run(args + ["--resume", "never"])
    import shutil

    shutil.rmtree(_ck(out, 6))                      # killed after logging step 6, before its checkpoint
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.2')           # torn write
    capsys.readouterr()
    again = run(args)
    assert again["start_step"] == 3
    assert "unparsable last line" in capsys.readouterr().err
    recs = _records(out)
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 7))
    discarded = [json.loads(ln) for ln in (out / "metrics.discarded.jsonl").read_text().splitlines()]
    assert {"discarded_raw_line": '{"step": 7, "loss": 1.2'} in discarded
    assert [r["step"] for r in discarded if "loss" in r] == [4, 5, 6]   # the redone steps' first records


@pytest.mark.timeout(120)
def test_fresh_start_does_not_wipe_old_metrics(tmp_path):
    out = tmp_path / "r"
    args = BASE + ["--out-dir", str(out)]
    run(args + ["--resume", "never"])
    old = _records(out)
    import shutil

    shutil.rmtree(out / "checkpoints")
    run(args)           # no checkpoints at all: starts at step 0 (as before) ...
    discarded = [json.loads(ln) for ln in (out / "metrics.discarded.jsonl").read_text().splitlines()]
    assert discarded == old     # ... but the old history is kept, not overwritten
    assert [r["step"] for r in _records(out) if "loss" in r] == list(range(1, 7))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine, pattern", [("fsdp2", "dcp/*.distcp"), ("deepspeed", "ds/*optim_states.pt")])
def test_damaged_sharded_checkpoint_falls_back(tmp_path, engine, pattern):
    out = tmp_path / engine
    args = BASE + ["--engine", engine, "--out-dir", str(out)]
    _subprocess_train(tmp_path, args + ["--resume", "never"])
    full = json.loads((out / "summary.json").read_text())
    files = sorted(_ck(out, 6).glob(pattern))
    assert files, sorted(p.name for p in _ck(out, 6).rglob("*"))
    _flip_bit(files[0], 0.9)
    r = _subprocess_train(tmp_path, args)
    assert "skipping checkpoint" in r.stderr and files[0].name in r.stderr
    again = json.loads((out / "summary.json").read_text())
    assert again["start_step"] == 3 and again["final_loss"] == full["final_loss"]


# ------------------------------------------------------------------ resume with changed settings

@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra, name, old, new", [
    (["--beta2", "0.95"], "beta2", "None", "0.95"),
    (["--eps", "1e-6"], "eps", "1e-08", "1e-06"),
    (["--opt-kwargs", '{"foreach": false}'], "opt_kwargs", "None", r"\{'foreach': False\}"),
    (["--precision", "bf16"], r"precision \(bf16\)", "False", "True"),
])
def test_resume_refuses_changed_optimizer_and_precision_settings(tmp_path, extra, name, old, new):
    from mgup_dist import device as dev

    if "bf16" in extra and not dev.supports_bf16(torch.device("cpu")):
        pytest.skip("this CPU build has no bf16")
    out = tmp_path / "r"
    args = BASE + ["--out-dir", str(out), "--precision", "fp32"]
    run(args + ["--resume", "never"])
    import shutil

    shutil.rmtree(_ck(out, 6))
    with pytest.raises(ValueError, match=f"resume: .*{name}: checkpoint {old}, now {new}"):
        run(args + extra)
    assert not _ck(out, 6).exists()     # refused before any work


@pytest.mark.timeout(120)
def test_resume_applies_and_logs_grad_clip_and_micro_batch(tmp_path, capsys):
    out = tmp_path / "r"
    args = BASE + ["--out-dir", str(out)]
    run(args + ["--resume", "never"])
    import shutil

    shutil.rmtree(_ck(out, 6))
    capsys.readouterr()
    again = run(args + ["--grad-clip", "0.5", "--micro-batch", "2"])
    assert again["start_step"] == 3
    err = capsys.readouterr().err
    # one line per changed setting: what the checkpoint had, what now applies
    lines = [ln for ln in err.splitlines() if "changed setting applied" in ln]
    assert any(ln.endswith("grad_clip: checkpoint 1.0, now 0.5") for ln in lines), err
    assert any(ln.endswith("micro_batch: checkpoint 4, now 2") for ln in lines), err
    assert all(ln.count("checkpoint") == 1 for ln in lines), lines
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["grad_clip"] == 0.5 and cfg["micro_batch"] == 2 and cfg["grad_accum"] == 2
    assert cfg["changed_on_resume"]["grad_clip"] == [1.0, 0.5]
    assert cfg["resumed_at_step"] == 3


# ------------------------------------------------------------------ non-finite gradients

@pytest.mark.timeout(120)
def test_nan_step_is_skipped_and_counted_ddp(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    clean = run(BASE + ["--out-dir", str(tmp_path / "clean"), "--resume", "never"])
    fault_entry.install(monkeypatch, nan=(0, {2}))
    res = run(BASE + ["--out-dir", str(out), "--resume", "never"])
    assert res["skipped_steps"] == 1 and clean["skipped_steps"] == 0
    assert "step 2: global gradient norm nan is not finite; update skipped" in capsys.readouterr().err
    recs = [r for r in _records(out) if "loss" in r]
    assert [r["skipped_steps"] for r in recs] == [0, 1, 1, 1, 1, 1]
    # The scheduler did not advance on the skipped step: step 3 ran at step 2's lr.
    assert recs[2]["lr"] == recs[1]["lr"]
    model = torch.load(_ck(out, 6) / "model.pt")
    assert all(torch.isfinite(v).all() for v in model.values())
    opt = torch.load(_ck(out, 6) / "optimizer.pt")
    assert {float(s["step"]) for s in opt["state"].values()} == {5.0}   # 6 steps, one skipped


@pytest.mark.timeout(120)
def test_consecutive_nan_steps_stop_the_run(tmp_path, monkeypatch):
    fault_entry.install(monkeypatch, nan=(0, {2, 3, 4}))
    with pytest.raises(RuntimeError, match=r"3 consecutive steps \(up to step 4\).*--max-skipped-steps 3"):
        run(BASE + ["--out-dir", str(tmp_path / "r"), "--resume", "never", "--max-skipped-steps", "3"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_nan_step_is_skipped_sharded_engines(tmp_path, engine):
    out = tmp_path / engine
    r = _subprocess_train(tmp_path, BASE + ["--engine", engine, "--out-dir", str(out), "--resume", "never"],
                          {NAN_ENV: "0:2"})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 1, r.stderr[-3000:]
    assert "update skipped" in r.stderr
    import math

    assert math.isfinite(summary["final_loss"]) and math.isfinite(summary["final_val_loss"])


# ------------------------------------------------------------------ CLI inputs

def _c4_dir(tmp_path, train_bytes=None, train_lines=None):
    d = tmp_path / "c4"
    d.mkdir()
    good = "\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(20)) + "\n"
    with gzip.open(d / "c4-validation.00000-of-00001.json.gz", "wt") as f:
        f.write(good)
    path = d / "c4-train.00000-of-00001.json.gz"
    if train_bytes is not None:
        path.write_bytes(train_bytes)
    else:
        with gzip.open(path, "wt") as f:
            f.write(train_lines if train_lines is not None else good)
    return d


def test_corrupt_gzip_shard_and_record_without_text(tmp_path):
    (tmp_path / "a").mkdir()
    d = _c4_dir(tmp_path / "a", train_bytes=b"this is not gzip at all\n" * 10)
    with pytest.raises(ValueError, match=r"^data: shard .*c4-train.*damaged.*BadGzipFile"):
        tcfg.parse(["--data-path", str(d), "--out-dir", str(tmp_path / "x")])
    (tmp_path / "b").mkdir()
    d = _c4_dir(tmp_path / "b", train_lines=json.dumps({"content": "no text field"}) + "\n")
    with pytest.raises(ValueError, match=r"^data: a record has no string 'text' field.*first record of .*c4-train"):
        tcfg.parse(["--data-path", str(d), "--out-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_record_without_text_later_in_a_shard(tmp_path):
    from mgup_dist.train.data import _iter_local_docs, _json_text

    (tmp_path / "a").mkdir()
    lines = json.dumps({"text": "fine"}) + "\n" + json.dumps({"txt": "bad"}) + "\n"
    d = _c4_dir(tmp_path / "a", train_lines=lines)
    docs = _iter_local_docs([str(d / "c4-train.00000-of-00001.json.gz")])
    assert _json_text(next(docs)) == "fine"
    with pytest.raises(ValueError, match="no string 'text' field"):
        _json_text(next(docs))
    # A shard cut short in the middle of its deflate stream: a ValueError naming it.
    good = gzip.compress(("\n".join(json.dumps({"text": "x" * 200 + str(i)}) for i in range(200))).encode())
    p = tmp_path / "cut.json.gz"
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"shard .*cut.json.gz.* is damaged"):
        list(_iter_local_docs([str(p)]))


@pytest.mark.parametrize("argv, param", [
    (["--eval-micro-batch", "0"], "eval_micro_batch"),
    (["--eval-micro-batch", "-2"], "eval_micro_batch"),
    (["--grad-clip", "-1"], "grad_clip"),
    (["--grad-clip", "nan"], "grad_clip"),
    (["--lr", "inf"], "lr"),
    (["--lr", "nan"], "lr"),
    (["--max-skipped-steps", "0"], "max_skipped_steps"),
])
def test_bad_values_fail_before_any_work(tmp_path, argv, param):
    with pytest.raises(ValueError, match=f"^{param}:"):
        tcfg.parse(argv + ["--out-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_bad_json_model_and_config_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hidden_size": 128,,}')
    with pytest.raises(ValueError, match=f"^model: '{bad}' is not valid JSON"):
        tcfg.parse(["--model", str(bad), "--out-dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match=f"^config: '{bad}' is not valid JSON"):
        tcfg.parse(["--config", str(bad), "--out-dir", str(tmp_path / "x")])


def test_out_dir_that_is_a_file_fails_before_data_and_model(tmp_path, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ValueError, match="^out_dir: .* is not a directory"):
        tcfg.parse(["--out-dir", str(f)])
    with pytest.raises(ValueError, match="^out_dir: .* cannot be created: .* is a file"):
        tcfg.parse(["--out-dir", str(f / "sub")])
    # The trainer's write probe runs before data and model: a directory that cannot be
    # written (made so here by replacing it with a file after parsing) fails there.
    import mgup_dist.train.trainer as tr

    def no_data(*a, **k):
        raise AssertionError("data was built before the out_dir check")

    monkeypatch.setattr(tr, "build_datasets", no_data)
    cfg = tcfg.parse(BASE + ["--out-dir", str(tmp_path / "later"), "--resume", "never"])
    (tmp_path / "later").write_text("now a file")
    with pytest.raises(ValueError, match="^out_dir: .* is not a writable directory"):
        tr.train(cfg)


# ------------------------------------------------------------------ two ranks (torchrun, gloo)

@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_ranks_nan_on_one_rank_and_damaged_shard_of_the_other(tmp_path, engine):
    """A NaN loss on rank 1 only: the gradient reduction carries it to rank 0, both ranks
    skip the same step (no divergence, no hang).  Then rank 1's part of the newest
    checkpoint is damaged: both ranks fall back to the older checkpoint together."""
    out = tmp_path / engine
    args = BASE + ["--engine", engine, "--out-dir", str(out)]

    def torchrun(extra_env=None):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(extra_env or {}))
        r = subprocess.run(["python", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                            "--nproc_per_node", "2", str(ROOT / "tests" / "fault_entry.py"), *args],
                           capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        return r

    torchrun({NAN_ENV: "1:2"})
    first = json.loads((out / "summary.json").read_text())
    assert first["skipped_steps"] == 1
    import math

    assert math.isfinite(first["final_loss"])
    if engine == "ddp":
        victim = _ck(out, 6) / "optimizer.pt"
    else:
        victim = next(iter(sorted(_ck(out, 6).glob("dcp/*1_0.distcp")) or sorted(_ck(out, 6).glob("dcp/*.distcp"))))
    _flip_bit(victim, 0.8)
    r = torchrun()
    assert "skipping checkpoint" in r.stderr and victim.name in r.stderr
    again = json.loads((out / "summary.json").read_text())
    assert again["start_step"] == 3 and again["final_loss"] == first["final_loss"]
    assert again["skipped_steps"] == 1      # the count survives the resume (from the step-3 checkpoint)
