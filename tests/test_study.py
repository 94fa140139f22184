"""`mgup-dist study`: a 2-run grid that is killed after its first run and continued (the
finished run is not rerun), the spec checks, the dry run of the 130M spec; and the plain
baselines the study compares against (lion, muon)."""
from __future__ import annotations

import copy
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from mgup_dist.train import config as tcfg
from mgup_dist.train import study
from mgup_dist.train.optim import MuonWithAdamW, build_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = {"steps": 3, "warmup_steps": 1, "global_batch": 2, "seq_len": 32, "eval_every": 3, "eval_tokens": 512,
        "log_every": 1, "save_every": 0, "device": "cpu", "no_progress": True, "no_plots": True,
        "no_tensorboard": True}


def _spec(tmp_path, **over):
    spec = {"name": "smoke", "out_dir": str(tmp_path / "study"), "train": dict(TINY),
            "optimizers": {"adamw": {"lrs": [1e-3]}, "muon": {"lrs": [3e-3], "lr_flags": ["lr", "muon_lr"]}},
            "seeds": [0], "keep_checkpoints": False, "estimate": {"seconds_per_step": 1.0, "overhead_s": 10}}
    spec.update(over)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@pytest.mark.timeout(240)
def test_study_killed_after_one_run_continues_without_rerunning_it(tmp_path):
    path = _spec(tmp_path)
    out = tmp_path / "study"
    first = out / "runs" / "adamw-lr0.001" / "seed0"
    second = out / "runs" / "muon-lr0.003" / "seed0"
    # A real kill: the study and its runs (one process group) get SIGKILL as soon as the
    # first run has written its summary.
    p = subprocess.Popen([sys.executable, "-m", "mgup_dist.cli", "study", path], cwd=str(tmp_path), env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while not (first / "summary.json").is_file():
        assert p.poll() is None, p.stdout.read().decode()
        assert time.monotonic() < deadline, "the first run did not finish"
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (second / "summary.json").is_file()   # the second run was cut off (or never started)
    done_first = (first / "summary.json").read_bytes()
    log_first = (first / "log.txt").read_text()

    # continued in this process (the subprocess path ran above)
    assert study.main([path, "--in-process"]) == 0
    # The finished run was not started again: same summary, one command line in its log.
    assert (first / "summary.json").read_bytes() == done_first
    assert (first / "log.txt").read_text() == log_first
    assert log_first.count("# 20") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs_finished"] == summary["runs_planned"] == 2
    cells = {c["optimizer"]: c for c in summary["cells"]}
    assert set(cells) == {"adamw", "muon"} and all(c["n"] == 1 and c["best_lr"] for c in cells.values())
    assert {b["optimizer"]: b["lr"] for b in summary["best_lr"]} == {"adamw": 1e-3, "muon": 3e-3}
    for run in (first, second):
        s = json.loads((run / "summary.json").read_text())
        assert s["steps"] == 3 and s["final_val_loss"] < 5.56   # ln(259): below the uniform guess
        assert not (run / "checkpoints").exists()            # keep_checkpoints: false
        assert json.loads((run / "config.json").read_text())["seed"] == 0
    assert json.loads((second / "config.json").read_text())["muon_lr"] == 3e-3
    for png in ("val_loss_steps.png", "val_loss_time.png", "lr_sensitivity.png"):
        assert (out / png).stat().st_size > 0
    md = (out / "summary.md").read_text()
    assert "| adamw | 0.001 | 1 |" in md and "too few seeds to tell" not in md   # no pair of these two
    invocations = json.loads((out / "study.json").read_text())["invocations"]
    assert invocations[-1]["runs_completed"] == 1 and invocations[-1]["torch"] == torch.__version__


def _summarize_fake(tmp_path, losses):
    """Summary of hand-written finished runs: {(optimizer, lr, seed): final val loss}."""
    opts = {}
    for (o, lr, _), _ in losses.items():
        opts.setdefault(o, {"lrs": []})
        if lr not in opts[o]["lrs"]:
            opts[o]["lrs"].append(lr)
    spec = study.load_spec(_spec(tmp_path, optimizers=opts, seeds=[0, 1], best_lr_seeds=[0, 1, 2]))
    for key in losses:
        run = study._run(spec, key[0], key[1], None, key[2], "sweep")
        os.makedirs(run["dir"])
        with open(os.path.join(run["dir"], "summary.json"), "w") as f:
            json.dump({"steps": 3, "final_val_loss": losses[key]}, f)
        with open(os.path.join(run["dir"], "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 0, "val_loss": 5.5, "train_s": 0.0}) + "\n")
            f.write(json.dumps({"step": 3, "val_loss": losses[key], "train_s": 1.0}) + "\n")
    return spec, study.summarize(spec, study.plan_runs(spec, study.best_lrs(spec, study.collect(
        spec, study.plan_runs(spec)))), plots=False)


def test_summary_best_lr_mean_std_and_seed_spread(tmp_path):
    losses = {("adamw", 1e-3, 0): 2.0, ("adamw", 1e-3, 1): 2.2, ("adamw", 1e-2, 0): 1.9, ("adamw", 1e-2, 1): 2.1,
              ("adamw", 1e-2, 2): 2.0,
              ("mgup_adamw", 1e-3, 0): 1.50, ("mgup_adamw", 1e-3, 1): 1.52, ("mgup_adamw", 1e-3, 2): 1.51,
              ("mgup_adamw", 1e-2, 0): 1.90, ("mgup_adamw", 1e-2, 1): 1.91}
    spec, res = _summarize_fake(tmp_path, losses)
    best = {b["optimizer"]: b["lr"] for b in res["best_lr"]}
    assert best == {"adamw": 1e-2, "mgup_adamw": 1e-3}   # lowest mean over the sweep seeds 0, 1
    cell = next(c for c in res["cells"] if c["optimizer"] == "adamw" and c["lr"] == 1e-2)
    assert cell["n"] == 3 and cell["final_val_loss_mean"] == pytest.approx(2.0)
    assert cell["final_val_loss_std"] == pytest.approx(0.1)   # sample std of 1.9, 2.1, 2.0
    (cmp,) = res["comparisons"]
    assert cmp["a"] == "adamw" and cmp["b"] == "mgup_adamw" and cmp["diff"] == pytest.approx(-0.49)
    assert cmp["verdict"] == "lower"
    # Means 0.01 apart with std 0.1: within the seed spread.
    losses2 = dict(losses)
    losses2.update({("mgup_adamw", 1e-3, 0): 1.91, ("mgup_adamw", 1e-3, 1): 2.11, ("mgup_adamw", 1e-3, 2): 2.01})
    import shutil

    shutil.rmtree(tmp_path / "study")
    _, res2 = _summarize_fake(tmp_path, losses2)
    assert res2["comparisons"][0]["verdict"] == "within the seed spread"
    assert "within the seed spread" in (tmp_path / "study" / "summary.md").read_text()


@pytest.mark.parametrize("over, msg", [
    ({"optimizers": {"sgd": {"lrs": [1e-3]}}}, "optimizers: unknown optimizer 'sgd'"),
    ({"optimizers": {"adamw": {"lrs": []}}}, "optimizers.adamw.lrs: must be a non-empty list"),
    ({"optimizers": {"adamw": {"lrs": [-1.0]}}}, "must be positive"),
    ({"seeds": [0, 0]}, "seeds: repeats a value"),
    ({"train": {"lr": 1e-3}}, "train: ['lr'] are set by the study"),
    ({"train": {"steps": 0}}, "would be refused: steps: must be positive"),
    ({"select_by": "median"}, "select_by: 'median'"),
    ({"oops": 1}, "spec: unknown keys ['oops']"),
])
def test_bad_spec_is_refused_by_name(tmp_path, over, msg):
    with pytest.raises(ValueError) as e:
        study.load_spec(_spec(tmp_path, **over))
    assert msg in str(e.value)
    assert not (tmp_path / "study").exists()


def test_dry_run_of_the_130m_spec_prints_commands_and_gpu_hours(capsys):
    spec_path = str(ROOT / "configs" / "studies" / "c4_llama130m.yaml")
    assert study.main([spec_path, "--dry-run", "--launcher", "torchrun --nproc-per-node 8 -m mgup_dist.train"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    cmds = [ln for ln in out if ln.startswith("torchrun")]
    spec = study.load_spec(spec_path)
    assert len(cmds) == len(study.plan_runs(spec)) and len(spec["seeds"]) >= 3
    assert {c.split("--optimizer ")[1].split()[0] for c in cmds} == {"adamw", "mgup_adamw", "cmgup_adamw"}
    assert all("--config configs/runs/galore_c4_llama130m_gpu.yaml" in c for c in cmds)
    assert "GPU-hours" in out[-1]


# ---------------------------------------------------------------------- plain baselines
def test_lion_is_reference_lion():
    """`lion` = MGUPLion with phi = 1: p -= lr * (sign(b1*m + (1-b1)*g) + wd*p), m = b2*m + (1-b2)*g."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, tcfg.parse(["--optimizer", "lion", "--lr", "1e-2", "--weight-decay", "0.1"],
                                            world_size=1))
    m = {p: torch.zeros_like(p) for p in ref.parameters()}
    for _ in range(4):
        x = torch.randn(4, 6)
        for net in (model, ref):
            net.zero_grad()
            net(x).pow(2).sum().backward()
        opt.step()
        with torch.no_grad():
            for p in ref.parameters():
                p.mul_(1 - 1e-2 * (0.1 if p.ndim >= 2 else 0.0))
                p.add_(torch.sign(0.9 * m[p] + 0.1 * p.grad), alpha=-1e-2)
                m[p].mul_(0.99).add_(p.grad, alpha=0.01)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_muon_is_torch_muon_plus_adamw_and_checkpoints():
    class Net(torch.nn.Module):   # the recipe keeps embed_tokens (a matrix) on AdamW, by name
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(10, 8)
            self.proj = torch.nn.Linear(8, 12)
            self.norm = torch.nn.LayerNorm(12)

        def forward(self, x):
            return self.norm(self.proj(self.embed_tokens(x)))

    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    cfg = tcfg.parse(["--optimizer", "muon", "--lr", "1e-2", "--muon-lr", "2e-2", "--weight-decay", "0.1"],
                     world_size=1)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, MuonWithAdamW)
    rp = list(ref.parameters())   # embedding, linear weight, linear bias, norm weight, norm bias
    muon = torch.optim.Muon([rp[1]], lr=2e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [rp[0]], "weight_decay": 0.1},
                               {"params": rp[2:], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95))
    x = torch.randint(0, 10, (16,))
    for i in range(3):
        if i == 2:   # a state-dict round trip on the way: a fresh optimizer continues the same
            sd = opt.state_dict()
            opt = build_optimizer(model, cfg)
            opt.load_state_dict(sd)
        for net in (model, ref):
            net.zero_grad()
            net(x).pow(2).sum().backward()
        opt.step()
        muon.step()
        adamw.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    names = {k for s in opt.state_dict()["state"].values() for k in s}
    assert names == {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"}


def test_baselines_refuse_what_does_not_apply_to_them():
    with pytest.raises(ValueError, match="'muon' .* engine 'ddp' only"):
        tcfg.parse(["--optimizer", "muon", "--engine", "fsdp2"], world_size=1)
    with pytest.raises(ValueError, match="tau: 'lion' fixes alpha=1.0, gamma=1.0"):
        build_optimizer(torch.nn.Linear(2, 2), tcfg.parse(["--optimizer", "lion", "--tau", "0.5"], world_size=1))
    with pytest.raises(ValueError, match="tau: only applies to the MGUP optimizers, not to 'muon'"):
        build_optimizer(torch.nn.Linear(2, 2), tcfg.parse(["--optimizer", "muon", "--tau", "0.5"], world_size=1))
