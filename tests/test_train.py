"""`mgup-dist train`: the offline default on CPU, every optimizer name, the schedule,
plots, bad input, and the 2-process engines (ddp, fsdp2, deepspeed) through
launch/torchrun.sh."""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from mgup_dist.train import config as tcfg
from mgup_dist.train import run
from mgup_dist.train.cli import main as cli_main
from mgup_dist.train.optim import lr_lambda
from mgup_dist.train.plot import main as plot_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUIET = ["--no-progress", "--resume", "never"]


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.timeout(240)
def test_default_run_loss_falls_and_leaves_outputs(tmp_path):
    """The default recipe (tiny LLaMA, byte-level pydoc text, MGUP-AdamW), shortened."""
    out = tmp_path / "default"
    s = run(["--steps", "40", "--eval-every", "20", "--log-every", "10", "--global-batch", "8", "--seq-len", "64",
             "--eval-tokens", "8192", "--out-dir", str(out)] + QUIET)
    recs = _records(out)
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    assert [st for st, _ in val] == [0, 20, 40]
    # Starts near ln(259) = 5.56 (uniform over the byte vocabulary) and must fall well below.
    assert val[0][1] > 5.0
    assert val[1][1] < val[0][1] - 1.0 and val[2][1] < val[1][1]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert train[-1]["loss"] < train[0]["loss"]
    assert s["steps"] == 40 and math.isfinite(s["tokens_per_s"]) and s["tokens_per_s"] > 0
    for f in ("lr.png", "train_loss.png", "val_loss.png", "summary.json", "config.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    assert (out / "checkpoints" / "step_00000040" / "trainer_state.pt").is_file()
    # A rerun of the finished run resumes at its end and does no step.
    s2 = run(["--steps", "40", "--eval-every", "20", "--log-every", "10", "--global-batch", "8", "--seq-len", "64",
              "--eval-tokens", "8192", "--out-dir", str(out), "--no-progress", "--no-plots"])
    assert s2["start_step"] == 40 and s2["steps"] == 40


@pytest.mark.timeout(120)
@pytest.mark.parametrize("opt", tcfg.OPTIMIZER_NAMES)
def test_every_optimizer_trains(tmp_path, opt):
    extra = ["--lr", "3e-4"] if opt == "mgup_lion" else []
    s = run(["--optimizer", opt, "--steps", "8", "--eval-every", "8", "--log-every", "8", "--global-batch", "4",
             "--seq-len", "32", "--eval-tokens", "2048", "--out-dir", str(tmp_path / opt), "--no-plots",
             "--no-tensorboard"] + QUIET + extra)
    assert math.isfinite(s["final_loss"]) and s["final_val_loss"] < 5.0   # ln(259) = 5.56 at init


def test_optimizer_mapping():
    from mgup_dist import OPTIMIZERS
    from mgup_dist.train.optim import build_optimizer, optimizer_spec

    cfg = tcfg.parse(["--optimizer", "cautious_adamw"], world_size=1)
    name, kw = optimizer_spec(cfg)
    assert name == "CMGUPAdamW" and kw["alpha"] == 1.0 and kw["gamma"] == 0.0 and kw["normalize"] is True
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, OPTIMIZERS["CMGUPAdamW"])
    # Decoupled weight decay only on matrices.
    cfg = tcfg.parse(["--optimizer", "mgup_adamw", "--weight-decay", "0.1", "--tau", "0.7"], world_size=1)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, OPTIMIZERS["MGUPAdamW"])
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    assert sum(len(g["params"]) for g in opt.param_groups) == 4
    cfg = tcfg.parse(["--optimizer", "adamw"], world_size=1)
    assert isinstance(build_optimizer(model, cfg), torch.optim.AdamW)
    with pytest.raises(ValueError, match="tau"):
        optimizer_spec(tcfg.parse(["--optimizer", "adamw", "--tau", "0.5"], world_size=1))
    with pytest.raises(ValueError, match="gamma"):
        optimizer_spec(tcfg.parse(["--optimizer", "cautious_adamw", "--gamma", "0.5"], world_size=1))


def test_lr_schedule():
    kw = dict(warmup=10, total=100, min_ratio=0.1)
    assert lr_lambda(0, **kw) == pytest.approx(0.1)          # no step at lr 0
    assert lr_lambda(9, **kw) == pytest.approx(1.0)
    assert lr_lambda(10, **kw) == pytest.approx(1.0)
    assert lr_lambda(55, **kw) == pytest.approx(0.55)        # half way down the cosine: (1 + 0.1) / 2
    assert lr_lambda(100, **kw) == pytest.approx(0.1)
    assert lr_lambda(150, **kw) == pytest.approx(0.1)
    vals = [lr_lambda(t, **kw) for t in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_model_configs_match_builtin_and_galore_130m():
    for name, d in tcfg.BUILTIN_MODELS.items():
        with open(ROOT / "configs" / "models" / f"llama_{name}.json") as f:
            assert json.load(f) == d
    from transformers import LlamaConfig, LlamaForCausalLM

    d = dict(tcfg.BUILTIN_MODELS["130m"])
    d.pop("architectures")
    with torch.device("meta"):
        m = LlamaForCausalLM(LlamaConfig(**d))
    n = sum(p.numel() for p in m.parameters())
    # GaLore's "130M": 2 x 32000 x 768 embeddings + 12 x (4 x 768^2 + 3 x 768 x 2048) + norms
    assert n == 2 * 32000 * 768 + 12 * (4 * 768 ** 2 + 3 * 768 * 2048 + 2 * 768) + 768


@pytest.mark.parametrize("argv, param", [
    (["--optimizer", "sgd"], "optimizer"),
    (["--engine", "megatron"], "engine"),
    (["--model", "llama_7b_nonexistent"], "model"),
    (["--data-path", "/nonexistent/c4"], "data_path"),
    (["--global-batch", "10", "--micro-batch", "4"], "global_batch"),
    (["--global-batch", "7"], "global_batch"),          # world size 2 below
    (["--device", "tpu"], "device"),
    (["--seq-len", "100000"], "seq_len"),
    (["--warmup-steps", "1000", "--steps", "10"], "warmup_steps"),
    (["--name", "../escape"], "name"),
    (["--opt-kwargs", "[1]"], "opt_kwargs"),
    (["--lr", "-3e-4"], "lr"),          # a negative exponent form reaches validation, not argparse
    (["--lr", "3e4"], "lr"),
    (["--muon-lr", "-1e-2"], "muon_lr"),
])
def test_bad_input_fails_before_any_work(tmp_path, argv, param):
    with pytest.raises(ValueError, match=f"^{param}:"):
        tcfg.parse(argv + ["--out-dir", str(tmp_path / "x")], world_size=2)
    assert not (tmp_path / "x").exists()


def test_optimizer_class_names_and_lr_and_opt_kwargs_errors(tmp_path):
    out = ["--out-dir", str(tmp_path / "x")]
    for name, want in (("MGUPAdamW", "mgup_adamw"), ("mgupadamw", "mgup_adamw"), ("CMGUPAdamW", "cmgup_adamw"),
                       ("MGUPLion", "mgup_lion"), ("MGUPMuon", "mgup_muon"), ("AdamW", "adamw"),
                       ("mgup_adamw", "mgup_adamw")):
        assert tcfg.parse(["--optimizer", name] + out, world_size=1).optimizer == want
    with pytest.raises(ValueError, match=r"^lr: must be positive and finite, got -0.0003$"):
        tcfg.parse(["--lr", "-3e-4"] + out, world_size=1)
    with pytest.raises(ValueError, match=r"^lr: 30000 is above 10: .*first step"):
        tcfg.parse(["--lr", "3e4"] + out, world_size=1)
    with pytest.raises(ValueError) as e:
        tcfg.parse(["--opt-kwargs", '{"mask_ration": 0.3, "normalize": true}'] + out, world_size=1)
    msg = str(e.value)
    assert msg.startswith("opt_kwargs: MGUPAdamW takes no keyword 'mask_ration' (did you mean 'mask_ratio'?);")
    assert "'normalize'" not in msg.split(";")[0]
    assert not (tmp_path / "x").exists()


def test_cli_reports_errors(tmp_path, capsys):
    rc = cli_main(["--optimizer", "nope", "--out-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "optimizer: unknown optimizer 'nope'" in err and "mgup_adamw" in err
    assert not (tmp_path / "x").exists()
    (tmp_path / "empty").mkdir()
    rc = cli_main(["--data-path", str(tmp_path / "empty")])
    assert rc == 2 and "no train shards" in capsys.readouterr().err


def test_config_file_and_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("# comment\nsteps: 50\nglobal-batch: 32\noptimizer: adamw\n")
    cfg = tcfg.parse(["--config", str(p), "--steps", "7"], world_size=2)
    assert cfg.steps == 7 and cfg.global_batch == 32 and cfg.optimizer == "adamw" and cfg.micro_batch == 16
    p.write_text('{"stepz": 5}')
    with pytest.raises(ValueError, match="config: unknown keys"):
        tcfg.parse(["--config", str(p)], world_size=1)
    for f in sorted((ROOT / "configs" / "runs").glob("*.yaml")):
        head = f.read_text().splitlines()[:12]
        assert any("launch/" in line for line in head), f"{f.name} must start with its launch command"
        cfg = tcfg.parse(["--config", str(f), "--device", "cpu"], world_size=1)
        assert cfg.model == "130m" and cfg.global_batch == 512 and cfg.seq_len == 256
        assert cfg.steps in (10000, 20000)


def test_plot_overlays_runs(tmp_path, capsys):
    for opt, losses in (("adamw", [3.0, 2.5]), ("mgup_adamw", [2.9, 2.3])):
        d = tmp_path / opt
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"optimizer": opt, "name": opt}))
        with open(d / "metrics.jsonl", "w") as f:
            for i, l in enumerate(losses):
                f.write(json.dumps({"step": 10 * (i + 1), "loss": l, "lr": 1e-3}) + "\n")
                f.write(json.dumps({"step": 10 * (i + 1), "val_loss": l + 0.1, "val_ppl": math.exp(l + 0.1)}) + "\n")
    assert plot_main([str(tmp_path / "adamw"), str(tmp_path / "mgup_adamw"), "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "mgup_adamw" in out and "final val loss 2.4000" in out
    for f in ("lr.png", "train_loss.png", "val_loss.png"):
        assert (tmp_path / "p" / f).stat().st_size > 1000


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "mgup_dist.train", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "--optimizer" in r.stdout and "--engine" in r.stdout


# ----------------------------------------------------------------------------- 2 processes


def _torchrun(tmp_path, engine, extra=()):
    out = tmp_path / engine
    env = dict(os.environ, NPROC="2", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), "--engine", engine, "--steps", "12", "--eval-every", "6",
           "--log-every", "6", "--global-batch", "8", "--micro-batch", "2", "--seq-len", "64", "--eval-tokens", "4096",
           "--save-every", "6", "--out-dir", str(out), "--no-plots", "--device", "cpu", *QUIET, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    val = [rec["val_loss"] for rec in _records(out) if "val_loss" in rec]
    return summary, val, r.stdout


@pytest.mark.timeout(420)
@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "deepspeed"])
def test_torchrun_two_processes(tmp_path, engine):
    summary, val, stdout = _torchrun(tmp_path, engine)
    assert summary["world_size"] == 2 and summary["steps"] == 12 and summary["engine"] == engine
    assert "2 x 2 accum" in stdout          # 8 = micro 2 x world 2 x accumulation 2
    assert len(val) == 3 and val[-1] < val[0] - 1.0
    ck = tmp_path / engine / "checkpoints" / "step_00000012"
    assert (ck / "trainer_state.pt").is_file()
    if engine == "fsdp2":
        assert (ck / "dcp" / ".metadata").is_file()
    if engine == "deepspeed":
        assert (ck / "ds").is_dir()


@pytest.mark.timeout(120)
def test_no_save_writes_no_checkpoint(tmp_path):
    """--no-save: not even the final checkpoint (--save-every 0 still saves at the end)."""
    out = tmp_path / "nosave"
    s = run(["--steps", "3", "--eval-every", "3", "--log-every", "3", "--global-batch", "4", "--seq-len", "32",
             "--eval-tokens", "2048", "--out-dir", str(out), "--no-plots", "--no-tensorboard", "--save-every", "0",
             "--no-save"] + QUIET)
    assert s["steps"] == 3 and math.isfinite(s["tokens_per_s"])
    assert (out / "summary.json").is_file()
    ckpts = out / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir()), list(ckpts.iterdir())
