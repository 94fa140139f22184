"""``patches/deepspeed-0.19-mgup.patch``: MGUP names natively in DeepSpeed 0.19.x.

1. The patch applies cleanly (``patch --dry-run -p1``, then for real) to a temporary copy of
   the *installed* DeepSpeed package.
2. The patched DeepSpeed builds MGUP-AdamW from ``"type": "MGUPAdamW"`` with no call to
   ``mgup_dist``'s ``register()``: ZeRO accepts it, the layouts are attached, and the
   ZeRO-0 bf16 wrapper's zero-gradient warm-up step does not count as a step.  To keep
   DeepSpeed's compiled CPU extension cached (it is keyed by the package's path), the probe
   imports the installed package and loads only the three patched modules from the copy,
   through a meta-path finder (a test-only shim).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

deepspeed = pytest.importorskip("deepspeed")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PATCH = ROOT / "patches" / "deepspeed-0.19-mgup.patch"
PATCHED_MODULES = ("deepspeed/runtime/config.py", "deepspeed/runtime/engine.py", "deepspeed/runtime/zero/utils.py")

PROBE = textwrap.dedent('''
    import importlib.abc, importlib.util, json, sys
    PATCHED = json.loads(sys.argv[1])

    class PatchedModules(importlib.abc.MetaPathFinder):
        """Load the patched copies of a few deepspeed modules; everything else installed."""
        def find_spec(self, name, path=None, target=None):
            if name in PATCHED:
                return importlib.util.spec_from_file_location(name, PATCHED[name])
            return None

    sys.meta_path.insert(0, PatchedModules())
    import torch, deepspeed
    import deepspeed.runtime.engine as engine_mod
    assert engine_mod.__file__ == PATCHED["deepspeed.runtime.engine"], engine_mod.__file__
    import mgup_dist.integrations.deepspeed as integ

    out = {}
    for name, cfg in (
        ("zero2", {"zero_optimization": {"stage": 2}}),
        ("zero0_bf16", {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}),
    ):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5))
        cfg.update({"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**9,
                    "optimizer": {"type": "MGUPAdamW", "params": {"lr": 1e-2, "mask_ratio": 0.5}}})
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        dtype = next(engine.module.parameters()).dtype
        x, y = torch.randn(4, 13).to(dtype), torch.randn(4, 5).to(dtype)
        losses = []
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(engine(x).float(), y.float())
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        inner = engine.basic_optimizer
        out[name] = dict(wrapper=type(engine.optimizer).__name__, inner=type(inner).__name__,
                         layouts=len(inner._layouts), losses=losses,
                         steps=sorted({float(s["step"]) for s in inner.state.values()}))
    out["registered"] = integ.is_registered()
    print("RESULT " + json.dumps(out))
''')


def _copy_installed(tmp_path) -> pathlib.Path:
    src = pathlib.Path(deepspeed.__file__).parent
    root = tmp_path / "site"
    shutil.copytree(src, root / "deepspeed", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return root


@pytest.mark.timeout(120)
def test_patch_applies_cleanly_to_installed_deepspeed(tmp_path):
    assert deepspeed.__version__.startswith("0.19."), deepspeed.__version__
    root = _copy_installed(tmp_path)
    for args in (["--dry-run"], []):
        res = subprocess.run(["patch", "-p1", "--forward", "--batch", *args, "-i", str(PATCH)],
                             cwd=root, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "FAILED" not in res.stdout and "offset" not in res.stdout.lower() and "fuzz" not in res.stdout.lower(), \
            res.stdout
    text = (root / "deepspeed" / "runtime" / "config.py").read_text()
    assert "MGUP_ADAMW_OPTIMIZER = 'mgupadamw'" in text


@pytest.mark.timeout(300)
def test_patched_deepspeed_builds_mgup_without_register(tmp_path):
    root = _copy_installed(tmp_path)
    res = subprocess.run(["patch", "-p1", "--batch", "-i", str(PATCH)], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    patched = {m[:-3].replace("/", "."): str(root / m) for m in PATCHED_MODULES}
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(__import__("dist_utils").free_port()), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, str(probe), json.dumps(patched)], capture_output=True, text=True,
                          timeout=280, env=env, cwd=str(tmp_path))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["registered"] is False  # only the patch is at work
    z2 = out["zero2"]
    assert (z2["wrapper"], z2["inner"], z2["layouts"]) == ("DeepSpeedZeroOptimizer", "MGUPAdamW", 1)
    assert z2["steps"] == [3.0] and z2["losses"][-1] < z2["losses"][0]
    z0 = out["zero0_bf16"]
    assert (z0["wrapper"], z0["inner"]) == ("FP16_UnfusedOptimizer", "MGUPAdamW")
    assert z0["steps"] == [3.0], z0["steps"]  # the warm-up step was not counted
