"""Faults: a worker SIGKILLed mid-run under `torchrun --max-restarts=1` restarts from the
last checkpoint, and the run ends in exactly the state of an uninterrupted run: same
step count, same parameters and optimizer state (bit for bit), every step logged once."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest
import torch

from mgup_dist.train import run
from fault_entry import SIGNAL_ENV

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--steps", "10", "--save-every", "4", "--eval-every", "5", "--log-every", "1", "--global-batch", "8",
        "--seq-len", "32", "--eval-tokens", "1024", "--no-progress", "--no-plots", "--no-tensorboard", "--device", "cpu"]


def _torchrun(out, extra_env=None):
    env = dict(os.environ, NPROC="2", MAX_RESTARTS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(extra_env or {}))
    # the faulty run: the same torchrun command with the test's fault-injecting entry point
    launch = ["bash", str(ROOT / "launch" / "torchrun.sh")] if not extra_env else [
        "python", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
        "--max-restarts", "1", str(ROOT / "tests" / "fault_entry.py")]
    r = subprocess.run([*launch, *ARGS, "--out-dir", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r.stdout


def _final(out):
    ck = out / "checkpoints" / "step_00000010"
    model = torch.load(ck / "model.pt")
    opt = torch.load(ck / "optimizer.pt")
    recs = [json.loads(line) for line in open(out / "metrics.jsonl") if line.strip()]
    return model, opt, recs


@pytest.mark.timeout(300)
def test_sigkill_under_torchrun_resumes_without_losing_or_repeating_steps(tmp_path):
    _torchrun(tmp_path / "clean")
    marker = tmp_path / "killed.marker"
    stdout = _torchrun(tmp_path / "faulty", {SIGNAL_ENV: f"1:6:{marker}"})
    assert marker.is_file(), "rank 1 never killed itself"
    assert "resumed at step 4" in stdout          # restarted from the checkpoint before the kill

    m_ref, o_ref, r_ref = _final(tmp_path / "clean")
    m, o, r = _final(tmp_path / "faulty")
    assert m_ref.keys() == m.keys()
    for k in m_ref:
        assert torch.equal(m_ref[k], m[k]), k
    # Optimizer: every state tensor equal, and its step counter says 10 steps, not 12.
    assert o_ref["state"].keys() == o["state"].keys()
    for pid, st in o_ref["state"].items():
        for name, v in st.items():
            assert torch.equal(v, o["state"][pid][name]), (pid, name)
            if name == "step":
                assert float(v) == 10.0
    # The log holds every step once, with the same losses.
    steps = [x["step"] for x in r if "loss" in x]
    assert steps == list(range(1, 11))
    assert [x["loss"] for x in r if "loss" in x] == [x["loss"] for x in r_ref if "loss" in x]
    assert not list((tmp_path / "faulty" / "checkpoints").glob("*.tmp"))


@pytest.mark.timeout(120)
def test_resume_flag_and_mismatched_config(tmp_path):
    out = str(tmp_path / "r")
    base = ["--steps", "6", "--save-every", "3", "--eval-every", "6", "--log-every", "1", "--global-batch", "4",
            "--seq-len", "32", "--eval-tokens", "512", "--no-progress", "--no-plots", "--no-tensorboard",
            "--out-dir", out]
    full = run(base + ["--resume", "never"])
    with pytest.raises(ValueError, match="resume: no checkpoint"):
        run(base + ["--resume", "latest", "--out-dir", str(tmp_path / "empty")])
    # Continue from the step-3 checkpoint explicitly: the same end state as the full run.
    ck3 = os.path.join(out, "checkpoints", "step_00000003")
    assert os.path.isdir(ck3)
    ref = torch.load(os.path.join(out, "checkpoints", "step_00000006", "model.pt"))
    again = run(base + ["--resume", ck3])
    assert again["start_step"] == 3 and again["steps"] == 6
    got = torch.load(os.path.join(out, "checkpoints", "step_00000006", "model.pt"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert again["final_loss"] == full["final_loss"]
    # An automatic resume refuses a checkpoint written with other hyperparameters.
    with pytest.raises(ValueError, match="resume: .*different run configuration.*lr"):
        run(base + ["--lr", "1e-4"])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_engine_checkpoints_resume_exactly(tmp_path, engine):
    """FSDP2 (torch.distributed.checkpoint) and DeepSpeed (save_checkpoint) checkpoints: a
    run continued from step 3 ends with the same losses as the uninterrupted run (one
    process each; fresh processes, as after a restart)."""
    out = tmp_path / engine
    base = ["--engine", engine, "--steps", "6", "--save-every", "3", "--eval-every", "6", "--log-every", "1",
            "--global-batch", "4", "--seq-len", "32", "--eval-tokens", "512", "--no-progress", "--no-plots",
            "--no-tensorboard", "--out-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))

    def train(*extra):
        r = subprocess.run(["python", "-m", "mgup_dist.train", *base, *extra], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        return json.loads((out / "summary.json").read_text()), r.stdout

    full, _ = train("--resume", "never")
    again, stdout = train("--resume", str(out / "checkpoints" / "step_00000003"))
    assert "resumed at step 3" in stdout and again["start_step"] == 3 and again["steps"] == 6
    assert again["final_loss"] == full["final_loss"]
    assert again["final_val_loss"] == full["final_val_loss"]


@pytest.mark.timeout(600)
def test_more_steps_continue_a_finished_run(tmp_path, capsys):
    """--steps 6 on a finished 4-step run trains steps 5-6 from its checkpoint: the lr of
    steps 1-4 is the 4-step schedule's, then lr * min_lr_ratio (one printed line says so);
    continuing again to 7 works; --steps below the checkpoint's step is refused."""
    out = str(tmp_path / "c")
    base = ["--save-every", "2", "--eval-every", "100", "--log-every", "1", "--global-batch", "4", "--seq-len", "32",
            "--eval-tokens", "512", "--no-progress", "--no-plots", "--no-tensorboard", "--out-dir", out,
            "--lr", "1e-3", "--min-lr-ratio", "0.25"]
    first = run(base + ["--steps", "4"])
    assert first["steps"] == 4
    capsys.readouterr()
    more = run(base + ["--steps", "6"])
    printed = capsys.readouterr().out
    assert more["start_step"] == 4 and more["steps"] == 6
    assert "continuing" in printed and "cosine to step 4" in printed and "steps 5-6" in printed, printed
    lrs = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        rec = json.loads(line)
        if "lr" in rec:
            lrs[rec["step"]] = rec["lr"]
    from mgup_dist.train.optim import lr_lambda

    for s in range(1, 7):
        want = 1e-3 * lr_lambda(s - 1, warmup=1, total=4, min_ratio=0.25)
        assert lrs[s] == pytest.approx(want, rel=1e-6), (s, lrs)
    assert lrs[5] == lrs[6] == pytest.approx(2.5e-4)
    assert run(base + ["--steps", "7"])["steps"] == 7   # a continued run continues again
    with pytest.raises(ValueError, match="steps: .* is at step 7, past --steps 5"):
        run(base + ["--steps", "5"])
