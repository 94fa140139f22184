"""The zero-code-change runner: ``torchrun -m mgup_dist.run train.py --deepspeed ds.json``.

The user script below imports nothing from mgup_dist: it is the usual DeepSpeed loop that
takes ``--deepspeed CONFIG``.  Under the runner it must get MGUP-AdamW from the config
alone, with the ZeRO-2 layouts attached, on 2 real processes launched by torchrun.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed")

from dist_utils import free_port  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

USER_SCRIPT = textwrap.dedent('''
    import argparse, json, os, sys
    import torch, deepspeed

    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)  # the deepspeed launcher passes it
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5))
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config=args.deepspeed)
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, 13, generator=g), torch.randn(4, 5, generator=g)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    inner = engine.optimizer.optimizer
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(argv0=sys.argv[0], name=__name__, wrapper=type(engine.optimizer).__name__,
                       inner=type(inner).__name__, module=type(inner).__module__,
                       layouts=len(getattr(inner, "_layouts", {})), losses=losses), f)
''')


@pytest.mark.timeout(300)
def test_torchrun_runner_gets_mgup_from_the_config(tmp_path):
    assert "mgup" not in USER_SCRIPT.lower()  # an unmodified DeepSpeed script
    script = tmp_path / "train.py"
    script.write_text(USER_SCRIPT)
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "optimizer": {"type": "MGUPAdamW", "params": {"lr": 1e-2, "mask_ratio": 0.5}},
        "zero_optimization": {"stage": 2},
    }
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "mgup_dist.run", str(script), "--deepspeed", str(tmp_path / "ds.json"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert res["name"] == "__main__" and res["argv0"] == str(script)
        assert res["wrapper"] == "DeepSpeedZeroOptimizer"
        assert res["inner"] == "MGUPAdamW" and res["module"] == "mgup_dist.optim"
        assert res["layouts"] == 1  # the fp32 partition's layout, attached without a user call
        assert res["losses"][-1] < res["losses"][0]


def test_runner_usage_and_missing_script(capsys):
    from mgup_dist import run

    with pytest.raises(SystemExit) as exc:
        run.main([])
    assert exc.value.code == 2
    assert "usage" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no such script"):
        run.main(["/nonexistent/train.py"])


def test_runner_runs_a_module_with_its_argv(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "entry.py").write_text(
        "import sys, json\n"
        "import deepspeed.runtime.engine as e\n"
        "json.dump(dict(argv=sys.argv, patched=getattr(e.DeepSpeedEngine._configure_basic_optimizer, "
        "'_mgup_patched', False)), open(sys.argv[-1], 'w'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    target = tmp_path / "o.json"
    from mgup_dist import run

    # the DeepSpeed launcher puts --local_rank before the script: it must reach the script
    run.main(["--local_rank=1", "-m", "userpkg.entry", "--flag", str(target)])
    res = json.loads(target.read_text())
    assert res["argv"][1:] == ["--local_rank=1", "--flag", str(target)]
    assert res["patched"] is True
