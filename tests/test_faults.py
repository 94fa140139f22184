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
import re
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
    # the defaults passed explicitly are no change of settings, and the resume says so
    again = run(args + ["--tau", "0.5", "--mask-ratio", "0.5", "--vocab-size", "auto"])
    assert again["start_step"] == 2
    said = capsys.readouterr()
    assert "resume: from step_00000002 (step 2) with the checkpoint's settings (no setting changed)" in said.out
    assert "changed setting" not in said.err
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert "not utf-8" in (out / "metrics.discarded.jsonl").read_text(errors="replace")


@pytest.mark.timeout(180)
def test_resume_applies_changed_mgup_settings_and_refuses_a_new_vocabulary(tmp_path, capsys):
    """--tau and --mask-ratio may change on resume (the moments do not depend on them):
    one line each, and the optimizer runs with them although the checkpoint's param
    groups held the old ones.  A vocabulary that changes the model's shape is refused."""
    out = tmp_path / "r"
    args = BASE + ["--out-dir", str(out)]
    run(args + ["--resume", "never"])
    import shutil

    shutil.rmtree(_ck(out, 4))
    with pytest.raises(ValueError, match=r"^resume: .* vocabulary of 259 entries, this run's is 300"):
        run(args + ["--vocab-size", "300"])
    capsys.readouterr()
    again = run(args + ["--tau", "0.4", "--mask-ratio", "0.3"])
    assert again["start_step"] == 2
    lines = [ln.split("changed setting applied: ")[1] for ln in capsys.readouterr().err.splitlines()
             if "changed setting applied" in ln]
    assert lines == ["alpha: checkpoint 2.0, now 2.5", "gamma: checkpoint 0.5, now 0.4",
                     "mask_ratio: checkpoint 0.5, now 0.3"], lines
    groups = torch.load(_ck(out, 4) / "optimizer.pt", weights_only=True)["param_groups"]
    assert {(g["mask_ratio"], g["alpha"], g["gamma"]) for g in groups} == {(0.3, 2.5, 0.4)}
    assert json.loads((out / "config.json").read_text())["changed_on_resume"]["mask_ratio"] == [0.5, 0.3]


# ------------------------------------------------------------------ 7, 8, 11, 12: several ranks

@pytest.mark.timeout(420)
def test_refusals_exit_2_on_every_rank_and_fsdp2_world_size_change_is_refused(tmp_path):
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


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_frozen_rank_fails_the_run_after_timeout_naming_it(tmp_path, engine):
    """Rank 1 stops (SIGSTOP) after step 1: rank 0's collective fails after --timeout
    (DeepSpeed's own groups included) with one line naming rank 1 and its last phase."""
    marker = tmp_path / "stopped"
    r = _torchrun(tmp_path, BASE + ["--timeout", "15", "--out-dir", str(tmp_path / "r"), "--resume", "never",
                                    "--engine", engine],
                  entry=[str(ROOT / "tests" / "fault_entry.py")],
                  env_extra={fault_entry.SIGNAL_ENV: f"1:1:{marker}:STOP"}, timeout=580)
    assert marker.is_file()
    assert r.returncode != 0
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("mgup-dist train: error: rank 0 of 2")), "")
    assert "timed out" in line and "--timeout 15" in line, r.stderr[-3000:]
    assert re.search(r"rank 1 stopped responding \(no heartbeat for 3 s; its last reported phase: "
                     r"(step [12] |logging of step 1|checkpoint of step 1)", line), line


@pytest.mark.timeout(420)
def test_deepspeed_muon_two_ranks(tmp_path):
    out = tmp_path / "ds"
    r = _torchrun(tmp_path, BASE + ["--engine", "deepspeed", "--optimizer", "mgup_muon", "--steps", "2",
                                    "--out-dir", str(out), "--resume", "never"], timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "terminate called" not in r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 2 and s["world_size"] == 2 and s["final_loss"] == s["final_loss"]


@pytest.mark.timeout(400)
def test_ranks_whose_optimizers_differ_in_structure_raise_by_name():
    """The per-step check is one fixed-size all-reduce whatever each rank holds: another rule
    or an extra param group on one rank, a per-rank backend, differing 0-d tensor lrs and a
    mask_ratio changed on one rank mid-run end in the same ValueError on both ranks, at the
    same step, naming what differs (not a gloo abort or a hang in mismatched collectives)."""
    from dist_utils import run_distributed

    import _fault_workers as W

    cases = ["rule", "extra_group", "backend", "tensor_lr", "mid_run_mask_ratio"]
    names = {"rule": "rule", "extra_group": "param group 1", "backend": "backend", "tensor_lr": "lr",
             "mid_run_mask_ratio": "mask_ratio"}
    res = run_distributed(W.structural_disagreements, 2, cases, timeout=380)
    for case, got0, got1 in zip(cases, res[0], res[1]):
        # the same text after each rank's own class name (rank 1 may run another optimizer)
        assert (got0[0].split(": ", 1)[1], got0[1]) == (got1[0].split(": ", 1)[1], got1[1]), (case, got0, got1)
        msg, step = got0
        assert msg is not None and names[case] in msg and "rank 0" in msg and "rank 1" in msg, (case, msg)
        assert step == (2 if case == "mid_run_mask_ratio" else 0), (case, step)


def test_an_lr_tensor_set_to_nan_in_place_is_refused_at_the_next_step():
    from mgup_dist import MGUPAdamW

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    lr = torch.tensor(1e-3)
    opt = MGUPAdamW([p], lr=lr)
    opt.step()
    lr.fill_(float("nan"))
    before = p.detach().clone()
    with pytest.raises(ValueError, match="lr must be a finite real number"):
        opt.step()
    assert torch.equal(p.detach(), before)


# ------------------------------------------------------------------ 13. signed checkpoints: no code from a checkpoint

KEY = "test-checkpoint-key-0123456789abcdef"
SIGNED = ["--save-every", "1", "--eval-every", "100", "--log-every", "1", "--global-batch", "4", "--seq-len", "32",
          "--eval-tokens", "512", "--no-progress", "--no-plots", "--no-tensorboard", "--device", "cpu"]


class _Payload:
    """Unpickling it creates ``marker`` and then fails (as a payload that is found out
    afterwards would): code from the checkpoint, visible as a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()\nraise RuntimeError('planted payload ran')",))


def _plant_torch_file(path, marker):
    torch.save({"module": _Payload(marker)}, path)


def _plant_dcp_metadata(dcp_dir, marker):
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))


def _plant_dcp_bytes_item(dcp_dir, marker):
    """Append a pickled payload to a ``.distcp`` data file and point one of DCP's BYTES
    items (a param group's lr) at it; the metadata itself stays plain data."""
    import io

    meta = pickle.loads((dcp_dir / ".metadata").read_bytes())
    idx = next(i for i in meta.storage_data if i.fqn.endswith("param_groups.0.lr"))
    info = meta.storage_data[idx]
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    data = dcp_dir / info.relative_path
    offset = data.stat().st_size
    with open(data, "ab") as f:
        f.write(buf.getvalue())
    info.offset, info.length = offset, len(buf.getvalue())
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(meta))


@pytest.mark.timeout(600)
def test_signed_fsdp2_checkpoints_refuse_planted_pickles_and_unsigned_ones_fall_back(tmp_path):
    """FSDP2 + DCP, MGUP_CHECKPOINT_KEY set: a payload planted in ``dcp/.metadata`` and
    in a ``.distcp`` data file, and a truncated ``.distcp``, each with a regenerated
    manifest.  Signed: every one is refused by its signature before DCP reads a byte,
    the payloads never run, the run resumes from the intact checkpoint bit-exact.  The
    same directory without the key (the manifests verify): DCP runs both payloads, and
    every checkpoint that fails inside DCP (its CheckpointException) falls back too."""
    out = tmp_path / "fs"
    args = SIGNED + ["--engine", "fsdp2", "--steps", "4", "--keep-checkpoints", "4", "--out-dir", str(out)]
    r = _torchrun(tmp_path, args + ["--resume", "never"], nproc=1, env_extra={"MGUP_CHECKPOINT_KEY": KEY})
    assert r.returncode == 0, r.stderr[-3000:]
    full = json.loads((out / "summary.json").read_text())
    assert all((_ck(out, s) / "manifest.sig").is_file() for s in (1, 2, 3, 4))
    d4 = _ck(out, 4) / "dcp" / "__0_0.distcp"
    d4.write_bytes(d4.read_bytes()[: d4.stat().st_size // 2])
    m_meta, m_bytes = tmp_path / "ran_from_metadata", tmp_path / "ran_from_distcp"
    _plant_dcp_metadata(_ck(out, 3) / "dcp", m_meta)
    _plant_dcp_bytes_item(_ck(out, 2) / "dcp", m_bytes)
    for s in (2, 3, 4):
        write_manifest(str(_ck(out, s)))   # whoever planted them regenerated the manifests
    import shutil

    shutil.copytree(out, tmp_path / "unsigned")
    r = _torchrun(tmp_path, args, nproc=1, env_extra={"MGUP_CHECKPOINT_KEY": KEY})
    assert r.returncode == 0, r.stderr[-3000:]
    for s in (2, 3, 4):
        assert f"skipping checkpoint '{_ck(out, s)}': manifest.json does not match its signature" in r.stderr, \
            r.stderr[-3000:]
    assert not m_meta.exists() and not m_bytes.exists()
    again = json.loads((out / "summary.json").read_text())
    assert again["start_step"] == 1 and again["final_loss"] == full["final_loss"]
    # Without the key: what an unsigned checkpoint can do.
    out = tmp_path / "unsigned"
    r = _torchrun(tmp_path, args[:-1] + [str(out)], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert m_meta.exists() and m_bytes.exists()
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for s in (2, 3, 4):   # one line each, naming the wrapped error (not DCP's "CheckpointException ranks:")
        line = next(ln for ln in r.stderr.splitlines() if f"skipping checkpoint '{_ck(out, s)}'" in ln)
        assert "verifies against its manifest but does not load (rank 0: " in line, line
        assert "CheckpointException ranks" not in line, line
    assert json.loads((out / "summary.json").read_text())["start_step"] == 1


@pytest.mark.timeout(900)
def test_signed_deepspeed_checkpoints_refuse_planted_shards(tmp_path):
    out = tmp_path / "ds"
    args = SIGNED + ["--engine", "deepspeed", "--steps", "2", "--keep-checkpoints", "2", "--out-dir", str(out)]
    env = {"MGUP_CHECKPOINT_KEY": KEY}
    r = _torchrun(tmp_path, args + ["--resume", "never"], nproc=1, env_extra=env, timeout=800)
    assert r.returncode == 0, r.stderr[-3000:]
    full = json.loads((out / "summary.json").read_text())
    import shutil

    marker = tmp_path / "ran_from_shard"
    shards = sorted((_ck(out, 2) / "ds").glob("*model_states.pt")) + sorted((_ck(out, 2) / "ds").glob("*optim_states.pt"))
    assert len(shards) == 2, sorted(p.name for p in (_ck(out, 2) / "ds").iterdir())
    for shard in shards:   # each place on its own: refused by the signature, not by a hash
        copy = tmp_path / f"copy_{shard.name}"
        shutil.copytree(_ck(out, 2), copy)
        _plant_torch_file(copy / "ds" / shard.name, marker)
        write_manifest(str(copy))
        assert verify_checkpoint(str(copy)) is None
        why = verify_checkpoint(str(copy), KEY.encode())
        assert why is not None and why.startswith("manifest.json does not match its signature"), why
    for shard in shards:
        _plant_torch_file(shard, marker)
    write_manifest(str(_ck(out, 2)))
    r = _torchrun(tmp_path, args, nproc=1, env_extra=env, timeout=800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "manifest.json does not match its signature" in r.stderr and not marker.exists()
    again = json.loads((out / "summary.json").read_text())
    assert again["start_step"] == 1 and again["final_loss"] == full["final_loss"]


@pytest.mark.timeout(240)
def test_signing_refuses_unsigned_and_tampered_checkpoints_by_name(tmp_path, capsys, monkeypatch):
    from mgup_dist.train import checkpoint as ck

    out = tmp_path / "r"
    args = BASE + ["--out-dir", str(out)]
    run(args + ["--resume", "never"])               # no key: unsigned
    ref = torch.load(_ck(out, 4) / "model.pt", weights_only=True)
    monkeypatch.setenv(ck.KEY_ENV, KEY)
    with pytest.raises(ValueError, match=r"none is usable \(step_00000004: unsigned: no manifest.sig while "
                                         r"MGUP_CHECKPOINT_KEY is set.*step_00000002: unsigned"):
        run(args)
    # the owner signs the checkpoints they trust; a flipped byte is then refused by file name
    assert ck._main(["sign", str(_ck(out, 2)), str(_ck(out, 4))]) == 0
    assert ck._main(["verify", str(_ck(out, 2)), str(_ck(out, 4))]) == 0
    data = bytearray((_ck(out, 4) / "model.pt").read_bytes())
    data[len(data) // 2] ^= 1
    (_ck(out, 4) / "model.pt").write_bytes(bytes(data))
    capsys.readouterr()
    again = run(args)
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "model.pt fails its sha256 check" in err, err
    assert again["start_step"] == 2 and (_ck(out, 4) / "manifest.sig").is_file()
    got = torch.load(_ck(out, 4) / "model.pt", weights_only=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    monkeypatch.setenv(ck.KEY_ENV, "short")
    with pytest.raises(ValueError, match=r"^MGUP_CHECKPOINT_KEY: .* 5 bytes, at least 16"):
        run(args)


# ------------------------------------------------------------------ 14. output paths that cannot be written

@pytest.mark.timeout(240)
def test_output_paths_that_are_not_files_fail_at_start_and_symlinked_checkpoints_work(tmp_path, capsys):
    out = tmp_path / "r"
    args = BASE + ["--out-dir", str(out)]
    for name in ("metrics.jsonl", "metrics.discarded.jsonl", "summary.json"):
        (out / name).mkdir(parents=True)
        with pytest.raises(ValueError, match=f"^out_dir: .*{name}' exists and is not a regular file"):
            run(args + ["--resume", "never"])
        (out / name).rmdir()
    (out / "tensorboard").write_text("x")
    with pytest.raises(ValueError, match="^out_dir: .*tensorboard' exists and is not a directory"):
        run(args)
    (out / "tensorboard").unlink()
    # checkpoints on another disk through a link: written, rotated, resumed, and
    # --resume never empties the link's target without removing the link
    elsewhere = tmp_path / "disk2"
    elsewhere.mkdir()
    (out / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    run(args + ["--steps", "2", "--warmup-steps", "1"])
    assert (elsewhere / "step_00000002").is_dir()
    run(args + ["--resume", "never"])
    assert (out / "checkpoints").is_symlink() and sorted(p.name for p in elsewhere.iterdir()) == \
        ["step_00000002", "step_00000004"]
    # a step directory that is itself a link (here: to a damaged copy) is skipped, then
    # replaced by unlinking it; the link's target is left alone
    (elsewhere / "step_00000004").rename(tmp_path / "moved4")
    (elsewhere / "step_00000004").symlink_to(tmp_path / "moved4", target_is_directory=True)
    with open(tmp_path / "moved4" / "model.pt", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    capsys.readouterr()
    s = run(args + ["--save-every", "1"])
    assert s["start_step"] == 2
    assert sorted(p.name for p in elsewhere.iterdir()) == ["step_00000003", "step_00000004"]
    assert not (elsewhere / "step_00000004").is_symlink() and (tmp_path / "moved4" / "model.pt").is_file()
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^name: 4000 bytes long .* at most 200 bytes"):
        tcfg.parse(["--name", "n" * 4000])


@pytest.mark.timeout(120)
def test_checkpoint_that_cannot_be_put_in_place_is_one_line(tmp_path, capsys, monkeypatch):
    from mgup_dist.train import checkpoint as ck
    from mgup_dist.train.cli import main

    out = tmp_path / "r"
    real = os.replace

    def refuse(src, dst, *a, **k):   # as a read-only mount or a foreign owner would
        if str(dst).endswith("step_00000004"):
            raise PermissionError(13, "Permission denied", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(ck.os, "replace", refuse)
    assert main(BASE + ["--out-dir", str(out), "--resume", "never"]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("mgup-dist train: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("mgup-dist train: error: checkpoint: cannot replace "), err
    assert "step_00000004" in lines[0] and "Permission denied" in lines[0]
    assert verify_checkpoint(str(_ck(out, 2))) is None


# ------------------------------------------------------------------ 15. ranks started with different flags

@pytest.mark.timeout(300)
def test_ranks_started_with_different_flags_are_refused_by_name(tmp_path):
    r = _torchrun(tmp_path, BASE + ["--out-dir", str(tmp_path / "r"), "--resume", "never"],
                  entry=[str(ROOT / "tests" / "fault_entry.py")],
                  env_extra={fault_entry.RANK_ARGS_ENV: "1:--grad-clip 0.5 --seed 3"})
    assert r.returncode != 0, r.stderr[-3000:]
    ours = r.stderr.split("Traceback")[0]        # what the ranks print, before torchrun's own failure report
    lines = [ln for ln in ours.splitlines() if "ranks disagree on their settings" in ln]
    assert len(lines) == 1, r.stderr[-3000:]     # once, by rank 0 (the other rank's line is the same)
    assert "--grad-clip: rank 0: 1.0, rank 1: 0.5" in lines[0] and "--seed: rank 0: 0, rank 1: 3" in lines[0]
    assert not (tmp_path / "r" / "checkpoints").exists()
