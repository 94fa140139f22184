"""The recipe under faults and hostile or malformed input: checkpoints that would run
code, run names that are paths, ranks that disagree on hyperparameters, frozen ranks,
manifests and files that verify but do not load, a full disk, mistyped config values,
resume with explicit defaults, ZeRO Muon.  Every case here failed (ran code, crashed,
hung, or went on silently) before the checks it exercises."""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys

import pytest
import torch

import fault_entry
from mgup_dist.train import config as tcfg
from mgup_dist.train import run
from mgup_dist.train.checkpoint import verify_checkpoint, write_manifest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = ["--steps", "4", "--save-every", "2", "--eval-every", "4", "--log-every", "1", "--global-batch", "4",
        "--seq-len", "32", "--eval-tokens", "512", "--no-progress", "--no-plots", "--no-tensorboard", "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _ck(out, step):
    return out / "checkpoints" / f"step_{step:08d}"


def _torchrun(tmp_path, args, nproc=2, entry=None, env_extra=None, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
           str(nproc), *(entry or ["-m", "mgup_dist.train"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(ENV, **(env_extra or {})), cwd=tmp_path,
                          timeout=timeout)


# ------------------------------------------------------------------ 1. checkpoints run no code

class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):   # unpickling this creates the marker file: code from the checkpoint
        return (open, (self.marker, "w"))


@pytest.mark.timeout(180)
def test_planted_pickle_in_trainer_state_never_runs(tmp_path, capsys):
    out = tmp_path / "r"
    args = BASE + ["--out-dir", str(out)]
    run(args + ["--resume", "never"])
    ref = torch.load(_ck(out, 4) / "model.pt", weights_only=True)
    marker = tmp_path / "pwned"
    state = torch.load(_ck(out, 4) / "trainer_state.pt", weights_only=True)
    state["evil"] = _Planted(str(marker))
    torch.save(state, _ck(out, 4) / "trainer_state.pt")
    write_manifest(str(_ck(out, 4)))          # the attacker regenerates the manifest too
    assert verify_checkpoint(str(_ck(out, 4))) is None
    with pytest.raises(ValueError, match=r"not a usable checkpoint: trainer_state.pt does not load .*weights_only"):
        run(args + ["--resume", str(_ck(out, 4))])
    assert not marker.exists()
    capsys.readouterr()
    again = run(args)                           # auto: skips it, resumes from step 2, ends bit-exact
    assert not marker.exists()
    assert again["start_step"] == 2 and "skipping checkpoint" in capsys.readouterr().err
    got = torch.load(_ck(out, 4) / "model.pt", weights_only=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


# ------------------------------------------------------------------ 2. a run name is a name

@pytest.mark.parametrize("name", ["/tmp/abs_run", "../../x", "a/b", "..", "", "  "])
def test_run_name_with_path_parts_is_refused(tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^name: .* is not a run name"):
        tcfg.parse(["--name", name])
    assert not (tmp_path / "runs").exists()
    assert tcfg.parse(["--name", "ok-run_1.2"]).out_dir == os.path.join("runs", "ok-run_1.2")


# ------------------------------------------------------------------ 3. no test hooks in the product

def test_no_fault_hooks_in_production_code():
    for f in (ROOT / "mgup_dist").rglob("*.py"):
        text = f.read_text()
        assert "MGUP_DIST_TEST" not in text and "inject_nan" not in text, f


# ------------------------------------------------------------------ 4. ranks that disagree

@pytest.mark.timeout(300)
def test_ranks_disagreeing_on_hyperparameters_raise():
    from dist_utils import run_distributed

    import _fault_workers as W

    S, P = "step", "plan"
    cases = [("ddp", ("lr", 2e-2), False, S), ("ddp", ("eps", 1e-6), False, S), ("ddp", ("weight_decay", 0.1), False, S),
             ("ddp", None, True, S), ("fsdp2", ("betas", (0.9, 0.99)), False, S), ("fsdp2", ("maximize", True), False, S),
             ("fsdp2", None, True, S), ("ddp", ("lr", 2e-2), False, P), ("fsdp2", ("eps", 1e-6), False, P),
             ("ddp", None, False, S), ("fsdp2", None, False, S),
             ("ddp", None, True, P)]   # "plan" checks when the plan is built: a scheduler's later change is not seen
    res = run_distributed(W.agreement_cases, 2, cases, timeout=280)
    for (engine, setting, sched, mode), got0, got1 in zip(cases, res[0], res[1]):
        assert got0 == got1, (engine, setting)   # every rank raises the same error at the same step
        if setting is None and (not sched or mode == P):
            assert got0 is None
            continue
        name = setting[0] if setting else "lr"
        assert got0 is not None and f"disagree on {name}" in got0, (engine, setting, got0)
        assert "rank 0:" in got0 and "rank 1:" in got0
    assert res[0][-1] is None and res[1][-1] is None


@pytest.mark.timeout(300)
def test_zero2_ranks_disagreeing_on_lr_raise():
    from dist_utils import run_distributed

    import _fault_workers as W

    got = run_distributed(W.agreement_zero2, 2, timeout=280)
    assert got[0] == got[1] and got[0] is not None and "disagree on lr" in got[0], got


# ------------------------------------------------------------------ 6. one source of truth, typed input

@pytest.mark.parametrize("kwargs, flag", [('{"lr": 0.5}', "--lr"), ('{"betas": [0.9, 0.9]}', "--beta1"),
                                          ('{"weight_decay": 0.1}', "--weight-decay")])
def test_opt_kwargs_cannot_override_a_flag(tmp_path, kwargs, flag):
    with pytest.raises(ValueError, match=f"^opt_kwargs: .*{flag}"):
        tcfg.parse(["--opt-kwargs", kwargs, "--out-dir", str(tmp_path / "x")])
    # an MGUP setting whose flag is unset may ride in opt_kwargs, never both
    cfg = tcfg.parse(["--opt-kwargs", '{"gamma": 0.1}', "--out-dir", str(tmp_path / "x")])
    assert tcfg.fingerprint(cfg)["gamma"] == 0.1
    with pytest.raises(ValueError, match="^opt_kwargs: 'gamma' .*--gamma"):
        tcfg.parse(["--opt-kwargs", '{"gamma": 0.1}', "--gamma", "0.2", "--out-dir", str(tmp_path / "x")])


@pytest.mark.parametrize("values, words", [
    ({"steps": True}, ["'steps'", "integer"]),
    ({"steps": 2.5}, ["'steps'", "integer"]),
    ({"steps": None}, ["'steps'", "null"]),
    ({"lr": [1, 2]}, ["'lr'", "single value"]),
    ({"no_progress": "false"}, ["'no_progress'", "true or false"]),
    ({"dataset": "imagenet"}, ["'dataset'", "embedded"]),
    ({"lr": "fast"}, ["'lr'", "number"]),
])
def test_config_file_values_are_type_checked(tmp_path, values, words):
    p = tmp_path / "run.json"
    p.write_text(json.dumps(values))
    with pytest.raises(ValueError) as e:
        tcfg.parse(["--config", str(p), "--out-dir", str(tmp_path / "x")])
    for w in words + [str(p)]:
        assert w in str(e.value), str(e.value)
    p.write_text(json.dumps({"steps": 7, "lr": 1, "no_progress": True, "vocab_size": "auto"}))
    cfg = tcfg.parse(["--config", str(p), "--out-dir", str(tmp_path / "x")])
    assert cfg.steps == 7 and cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.no_progress is True


@pytest.mark.parametrize("change, words", [
    ({"num_hidden_layer": 2}, ["num_hidden_layer", "does not know"]),
    ({"hidden_size": -8}, ["hidden_size", "positive integer"]),
    ({"vocab_size": None}, ["vocab_size"]),
    ({"num_attention_heads": 3}, ["divisible"]),
])
def test_model_json_typos_and_bad_sizes_are_refused(tmp_path, change, words):
    d = dict(tcfg.BUILTIN_MODELS["tiny"])
    d.update(change)
    if d.get("vocab_size") is None:
        d.pop("vocab_size")
    p = tmp_path / "m.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="^model: ") as e:
        tcfg.parse(["--model", str(p), "--out-dir", str(tmp_path / "x")])
    for w in words:
        assert w in str(e.value)


def _ds(tmp_path, cfg_or_text):
    p = tmp_path / "ds.json"
    p.write_text(cfg_or_text if isinstance(cfg_or_text, str) else json.dumps(cfg_or_text))
    return str(p)


@pytest.mark.parametrize("ds, words", [
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"amsgrad": True}}},
     ["amsgrad", "would not be used"]),
    ({"zero_optimization": {"stage": 2}, "bf16": True}, ["'bf16' must be a JSON object"]),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "MGUPAdamW", "params": "lr=1"}},
     ["optimizer.params must be a JSON object"]),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "MGUPAdamW", "params": [1]}},
     ["optimizer.params must be a JSON object"]),
    ([{"zero_optimization": {"stage": 2}}], ["must hold a JSON object"]),
    ('{"zero_optimization": {"stage": 2},}', ["is not valid JSON", "ds.json"]),
    ({"zero_optimization": "two"}, ["'zero_optimization' must be a JSON object"]),
    ({"zero_optimization": {"stage": "two"}}, ["zero_optimization.stage"]),
])
def test_deepspeed_file_shapes_are_refused_by_name(tmp_path, ds, words):
    opt = "adamw" if "AdamW" in json.dumps(ds) and "MGUP" not in json.dumps(ds) else "mgup_adamw"
    with pytest.raises(ValueError, match="^deepspeed_config[ :]") as e:
        tcfg.parse(["--engine", "deepspeed", "--optimizer", opt, "--deepspeed-config", _ds(tmp_path, ds),
                    "--out-dir", str(tmp_path / "x")], world_size=1)
    for w in words:
        assert w in str(e.value), str(e.value)


# ------------------------------------------------------------------ 9. manifests, loads, disk

@pytest.mark.parametrize("files", [["model.pt"], {"trainer_state.pt": {"sha256": "0" * 64}},
                                   {"trainer_state.pt": {"size": "1", "sha256": "x"}}, {"../x": {"size": 1, "sha256": "x"}}])
def test_malformed_manifest_is_a_reason_not_a_crash(tmp_path, files):
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "files": files}))
    why = verify_checkpoint(str(tmp_path))
    assert why is not None and "malformed manifest.json" in why


@pytest.mark.timeout(240)
def test_file_that_verifies_but_does_not_load_falls_back_and_full_disk_keeps_state(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    args = BASE + ["--out-dir", str(out)]
    full = run(args + ["--resume", "never"])
    ref = torch.load(_ck(out, 4) / "model.pt", weights_only=True)
    (_ck(out, 4) / "optimizer.pt").write_bytes(b"PK\x03\x04 not really a zip")
    write_manifest(str(_ck(out, 4)))
    capsys.readouterr()
    again = run(args)
    err = capsys.readouterr().err
    assert "verifies against its manifest but does not load" in err and "optimizer" in err
    assert again["start_step"] == 2 and again["final_loss"] == full["final_loss"]
    # A full disk while writing step 4: a clear error, the older checkpoint intact, no
    # partial directory; after "freeing space" the rerun resumes and ends bit-exact.
    import mgup_dist.train.engines as E

    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "step_00000004" in str(f):
            with open(f, "wb") as fh:
                fh.write(b"PK partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 0")
        return real_save(obj, f, *a, **k)

    import shutil

    shutil.rmtree(_ck(out, 4))
    monkeypatch.setattr(E.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"no space left on .*checkpoints.*step_00000002.* intact"):
        run(args)
    monkeypatch.setattr(E.torch, "save", real_save)
    assert _ck(out, 2).is_dir() and not _ck(out, 4).exists() and not list((out / "checkpoints").glob("*.tmp"))
    again = run(args)
    assert again["start_step"] == 2
    got = torch.load(_ck(out, 4) / "model.pt", weights_only=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_checkpoints_path_that_is_a_file_is_refused_before_work(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")
    with pytest.raises(ValueError, match=r"^out_dir: .*checkpoints.* is not a directory"):
        tcfg.parse(BASE + ["--out-dir", str(out)])


# ------------------------------------------------------------------ 10. damaged logs; 11. defaults on resume

@pytest.mark.timeout(180)
def test_damaged_metrics_and_summary_and_explicit_defaults_on_resume(tmp_path, capsys):
    out = tmp_path / "r"
    args = BASE + ["--out-dir", str(out)]
    run(args + ["--resume", "never"])
    (out / "summary.json").write_bytes(b"\xff\xfe garbage")
    s = run(args)                         # rerun of a finished run with a garbage summary.json
    assert s["start_step"] == 4
    import shutil

    shutil.rmtree(_ck(out, 4))
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": "three", "loss": 1.0}\n\xff\xfe\x00 not utf-8\n')
    capsys.readouterr()
    # the defaults passed explicitly are no change of settings
    again = run(args + ["--tau", "0.5", "--mask-ratio", "0.5", "--vocab-size", "auto"])
    assert again["start_step"] == 2
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert "not utf-8" in (out / "metrics.discarded.jsonl").read_text(errors="replace")


# ------------------------------------------------------------------ 7, 8, 11, 12: several ranks

@pytest.mark.timeout(420)
def test_refusals_exit_2_on_every_rank_and_fsdp2_world_size_change_is_refused(tmp_path):
    for _ in range(3):   # the abort at teardown was intermittent
        r = _torchrun(tmp_path, BASE + ["--resume", "latest", "--out-dir", str(tmp_path / "none")])
        assert r.returncode != 0 and "terminate called" not in r.stderr, r.stderr[-3000:]
        # every rank refuses; the line is printed once, by rank 0
        assert r.stderr.count("mgup-dist train: error: resume: no checkpoint") == 1, r.stderr[-3000:]
        assert "error (rank" not in r.stderr, r.stderr[-3000:]
        assert "exitcode  : 2" in r.stderr or "exitcode: 2" in r.stderr.replace(" ", ""), r.stderr[-3000:]
    out = tmp_path / "f"
    r = _torchrun(tmp_path, BASE + ["--engine", "fsdp2", "--steps", "2", "--out-dir", str(out)], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun(tmp_path, BASE + ["--engine", "fsdp2", "--steps", "2", "--out-dir", str(out)])
    assert r.returncode != 0 and "terminate called" not in r.stderr
    assert r.stderr.count("resumes only at the world size that wrote it") == 1, r.stderr[-3000:]


@pytest.mark.timeout(300)
def test_frozen_rank_fails_the_run_after_timeout(tmp_path):
    marker = tmp_path / "stopped"
    r = _torchrun(tmp_path, BASE + ["--timeout", "15", "--out-dir", str(tmp_path / "r"), "--resume", "never"],
                  entry=[str(ROOT / "tests" / "fault_entry.py")],
                  env_extra={fault_entry.SIGNAL_ENV: f"1:1:{marker}:STOP"}, timeout=280)
    assert marker.is_file()
    assert r.returncode != 0
    assert "timed out" in r.stderr and "--timeout 15" in r.stderr, r.stderr[-3000:]


@pytest.mark.timeout(420)
def test_deepspeed_muon_two_ranks(tmp_path):
    out = tmp_path / "ds"
    r = _torchrun(tmp_path, BASE + ["--engine", "deepspeed", "--optimizer", "mgup_muon", "--steps", "2",
                                    "--out-dir", str(out), "--resume", "never"], timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "terminate called" not in r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 2 and s["world_size"] == 2 and s["final_loss"] == s["final_loss"]
