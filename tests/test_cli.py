"""Every `mgup-dist` entry point, run as a user runs it (a subprocess), checked by its exit
code; `--help` texts; the DeepSpeed-file checks of `mgup-dist train` (before any work)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def cli(*args, cwd=None, timeout=240):
    # `python -m mgup_dist.cli` is what the `mgup-dist` console script calls (setup.cfg)
    return subprocess.run([sys.executable, "-m", "mgup_dist.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd or ROOT, timeout=timeout)


def test_top_level_help_and_version():
    from mgup_dist import __version__

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mgup-dist {__version__}", r.stderr
    r = cli("--help")
    assert r.returncode == 0 and "counterexample" in r.stdout and "--version" in r.stdout
    r = cli("no-such-command")
    assert r.returncode == 2 and "unknown command" in r.stderr


@pytest.mark.parametrize("command", ["train", "plot", "bench", "bench-selection", "counterexample"])
def test_every_subcommand_help_exits_0_and_names_itself(command):
    r = cli(command, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"usage: mgup-dist {command}"), r.stdout[:200]


def test_train_help_every_flag_documented_default_once():
    from mgup_dist.train.config import _parser

    undocumented = [a.option_strings for a in _parser()._actions
                    if a.option_strings and a.help is None]
    assert undocumented == []
    r = cli("train", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    # every flag's help block says "default" at most once
    blocks = text.split(" --")
    assert [b for b in blocks if b.lower().count("default") > 1] == []
    assert "(default: 0.003)" in text   # --lr


def test_counterexample_exits_0(tmp_path):
    r = cli("counterexample", "--steps", "200", "--out", "", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "final x" in r.stdout
    r = cli("counterexample", "--tau", "2", cwd=tmp_path)
    assert r.returncode == 2 and "tau" in r.stderr and "Traceback" not in r.stderr


def test_bench_exits_0(tmp_path):
    r = cli("bench", "--model", "tiny", "--steps", "1", "--warmup", "0", "--naive-steps", "1", "--muon-steps", "1",
            "--compile", "off", "--optimizers", "MGUPAdamW", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "MGUPAdamW" in r.stdout


def test_plot_exits_0_and_bad_run_exits_nonzero(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "lr": 1e-3, "loss": 3.0 - 0.1 * step}) + "\n")
        f.write(json.dumps({"step": 5, "val_loss": 2.6}) + "\n")
    r = cli("plot", str(run), "--out", str(tmp_path / "p"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "p" / "train_loss.png").is_file()
    r = cli("plot", str(tmp_path / "missing"), "--out", str(tmp_path / "q"), cwd=tmp_path)
    assert r.returncode != 0


def test_bench_tiny_is_the_trainers_tiny():
    from mgup_dist.bench import MODELS

    cfg = json.loads((ROOT / "configs" / "models" / "llama_tiny.json").read_text())
    t = MODELS["tiny"]
    assert (t.hidden, t.intermediate, t.layers, t.heads, t.vocab) == (
        cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
        cfg["vocab_size"])


# ------------------------------------------------------------------ --deepspeed-config FILE

BASE = ["--engine", "deepspeed", "--steps", "2", "--no-progress", "--no-plots", "--no-tensorboard"]


def _ds_file(tmp_path, **blocks):
    cfg = {"zero_optimization": {"stage": 2}, **blocks}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("params, words", [
    ({"mask_ration": 0.5}, ["mask_ration", "accepted", "ds.json"]),
    ({"mask_ratio": 1.5}, ["mask_ratio", "1.5", "ds.json"]),
    ({"lr": 1e-3}, ["optimizer.params.lr", "--lr"]),
])
def test_train_refuses_bad_or_conflicting_optimizer_block_before_work(tmp_path, params, words):
    path = _ds_file(tmp_path, optimizer={"type": "MGUPAdamW", "params": params})
    r = cli("train", *BASE, "--deepspeed-config", path, "--out-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    for w in words:
        assert w in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()   # refused before any work


@pytest.mark.parametrize("blocks, words", [
    ({"optimizer": {"type": "Lion", "params": {}}}, ["optimizer.type", "--optimizer"]),
    ({"train_micro_batch_size_per_gpu": 3}, ["train_micro_batch_size_per_gpu", "--micro-batch"]),
    ({"gradient_clipping": 0.5}, ["gradient_clipping", "--grad-clip"]),
    ({"scheduler": {"type": "WarmupLR"}}, ["scheduler"]),
])
def test_train_refuses_other_settings_it_would_drop(blocks, words, tmp_path):
    from mgup_dist.train.config import parse

    with pytest.raises(ValueError) as e:
        parse([*BASE, "--deepspeed-config", _ds_file(tmp_path, **blocks)], world_size=1)
    for w in words:
        assert w in str(e.value)


def test_train_honours_what_the_flags_leave_out(tmp_path):
    from mgup_dist.train.config import parse
    from mgup_dist.train.optim import optimizer_spec

    path = _ds_file(tmp_path, optimizer={"type": "MGUPAdamW", "params": {"mask_ratio": 0.25, "lr": "auto",
                                                                         "scope": "shard"}},
                    bf16={"enabled": False}, train_micro_batch_size_per_gpu="auto", gradient_clipping=1.0)
    cfg = parse([*BASE, "--deepspeed-config", path], world_size=1)
    _, kw = optimizer_spec(cfg)
    assert kw["mask_ratio"] == 0.25 and kw["scope"] == "shard" and kw["lr"] == cfg.lr
    assert cfg.precision == "fp32"
    # an explicit flag that agrees with the file is no conflict
    cfg = parse([*BASE, "--deepspeed-config", path, "--precision", "fp32"], world_size=1)
    assert cfg.precision == "fp32"
    with pytest.raises(ValueError, match="bf16.enabled"):
        parse([*BASE, "--deepspeed-config", path, "--precision", "bf16"], world_size=1)


def test_train_exits_0_and_states_the_checkpoint_size(tmp_path):
    r = cli("train", "--steps", "2", "--global-batch", "2", "--seq-len", "16", "--eval-every", "2",
            "--eval-tokens", "64", "--log-every", "1", "--no-progress", "--no-plots", "--no-tensorboard", "--optimizer", "adamw",
            "--out-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    n_params = json.loads((tmp_path / "run" / "summary.json").read_text())["n_params"]
    # fp32 weights + AdamW's two moments, announced before the first step
    assert f"checkpoints: about {n_params * 12 / 1e9:.3g} GB each" in r.stdout, r.stdout[-2000:]
    assert r.stdout.index("checkpoints: about") < r.stdout.index("step 1/")


@pytest.mark.timeout(300)
def test_two_process_run_after_single_process_run_of_same_name_is_refused_clearly(tmp_path):
    from dist_utils import free_port

    args = ["--steps", "2", "--global-batch", "4", "--seq-len", "16", "--eval-every", "2", "--eval-tokens", "64",
            "--no-progress", "--no-plots", "--no-tensorboard"]
    assert cli("train", *args, cwd=tmp_path).returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port()), "-m", "mgup_dist.train", *args],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=280)
    assert r.returncode != 0
    # the reason, one line (rank 0's), comes before torchrun's own traceback and summary
    at = r.stderr.find("mgup-dist train: error: resume:")
    assert 0 <= at < r.stderr.find("Traceback"), r.stderr[-3000:]
    assert "--name" in r.stderr[at:].splitlines()[0]
    assert r.stderr.count("mgup-dist train: error") == 1, r.stderr[-3000:]
    assert "IndexError" not in r.stderr
