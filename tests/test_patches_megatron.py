"""patches/: the megatron-core 0.16 patch applies cleanly to the installed megatron-core,
and the patched ``get_megatron_optimizer`` really runs MGUP-AdamW for
``OptimizerConfig(optimizer="mgup_adamw", mgup_*=...)``; the Megatron-LM patch is a
well-formed patch touching the files it names."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

megatron_core = pytest.importorskip("megatron.core")

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE_PATCH = ROOT / "patches" / "megatron-core-0.16-mgup.patch"
LM_PATCH = ROOT / "patches" / "megatron-lm-mgup.patch"
INSTALLED = pathlib.Path(megatron_core.__file__).resolve().parents[1]  # .../site-packages/megatron


@pytest.fixture(scope="module")
def patched_copy(tmp_path_factory):
    """A temp copy of the installed megatron package (17 MB), patched."""
    root = tmp_path_factory.mktemp("mcore")
    shutil.copytree(INSTALLED, root / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
    dry = subprocess.run(["patch", "--dry-run", "-p1", "-i", str(CORE_PATCH)], cwd=root, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "offset" not in dry.stdout and "fuzz" not in dry.stdout, dry.stdout  # applies exactly
    if shutil.which("git"):
        chk = subprocess.run(["git", "apply", "--check", str(CORE_PATCH)], cwd=root, capture_output=True, text=True)
        assert chk.returncode == 0, chk.stderr
    done = subprocess.run(["patch", "-p1", "-i", str(CORE_PATCH)], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def test_core_patch_applies_to_installed_version(patched_copy):
    text = (patched_copy / "megatron" / "core" / "optimizer" / "optimizer_config.py").read_text()
    assert "mgup_mask_ratio: Optional[float] = None" in text
    # and it reverses cleanly (nothing else was touched)
    rev = subprocess.run(["patch", "--dry-run", "-R", "-p1", "-i", str(CORE_PATCH)], cwd=patched_copy,
                         capture_output=True, text=True)
    assert rev.returncode == 0, rev.stdout + rev.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("standin", ["none", "apex"])
def test_patched_core_runs_mgup(patched_copy, tmp_path, standin):
    """One gloo rank, the patched megatron first on sys.path: the stock entry point with
    optimizer='cmgup_adamw' and mgup_* fields returns megatron's optimizer around MGUP.
    ``apex``: apex's FusedAdam stand-in (tests/fused_adam_standins.py) is installed under
    ``apex.optimizers`` before megatron is imported, so megatron's Adam is apex's."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, warnings
        warnings.filterwarnings("ignore")
        import torch, torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo", rank=0, world_size=1)
        if {standin!r} == "apex":
            import fused_adam_standins
            fused_adam_standins.install("apex")
        import megatron.core.optimizer as mco
        assert mco.__file__.startswith({str(patched_copy)!r}), mco.__file__
        print("ADAM", mco.Adam.__module__)
        import _megatron_workers as W
        W.setup_megatron()
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        cfg = OptimizerConfig(optimizer="cmgup_adamw", lr=1e-2, use_distributed_optimizer=True,
                              mgup_alpha=1.5, mgup_gamma=0.75, mgup_mask_ratio=0.3, mgup_scope="shard")
        model = W.wrap_ddp(W.make_module(False), False, True)
        opt = get_megatron_optimizer(cfg, [model])
        inner = opt.chained_optimizers[0].optimizer
        g = inner.param_groups[0]
        print("RESULT", type(inner).__name__, g["mode"], g["alpha"], g["gamma"], g["mask_ratio"], g["scope"],
              opt.config.optimizer)
        W.train_step(model, opt, *W.batch(0))
        print("STEP", float(next(iter(inner.state.values()))["step"]))
        dist.destroy_process_group()
    """))
    from dist_utils import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(patched_copy), str(ROOT), str(ROOT / "tests")]))
    out = subprocess.run([sys.executable, str(script), str(free_port())], env=env, capture_output=True, text=True,
                         timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = {ln.split()[0]: ln.split()[1:] for ln in out.stdout.splitlines() if ln.startswith(("RESULT", "STEP", "ADAM"))}
    assert lines["RESULT"] == ["CMGUPAdamW", "cautious", "1.5", "0.75", "0.3", "shard", "cmgup_adamw"], lines
    assert lines["STEP"] == ["1.0"]
    assert lines["ADAM"] == [{"none": "torch.optim.adamw", "apex": "apex.optimizers.fused_adam"}[standin]]


def test_megatron_lm_patch_is_well_formed():
    text = LM_PATCH.read_text()
    files = [ln[len("+++ b/"):] for ln in text.splitlines() if ln.startswith("+++ b/")]
    assert files == ["megatron/training/arguments.py", "megatron/core/optimizer/__init__.py",
                     "megatron/core/optimizer/optimizer_config.py"]
    for arg in ("'--mgup-mask-ratio'", "'--mgup-alpha'", "'--mgup-gamma'", "'--mgup-scope'", "'mgup_adamw'"):
        assert arg in text
    # names of the new arguments == names of the new config fields (training.py copies
    # every args attribute that names an OptimizerConfig field)
    for field in ("mgup_mask_ratio", "mgup_alpha", "mgup_gamma", "mgup_scope"):
        assert f"+    {field}: Optional" in text
    # hunk headers agree with their bodies (patch would reject a malformed hunk)
    for header, body in _hunks(text):
        old = sum(1 for ln in body if ln[:1] in (" ", "-"))
        new = sum(1 for ln in body if ln[:1] in (" ", "+"))
        assert (old, new) == (header[1], header[3]), (header, old, new)


def _hunks(text):
    import re

    lines = text.splitlines()
    out = []
    for i, ln in enumerate(lines):
        m = re.match(r"@@ -(\d+),(\d+) \+(\d+),(\d+) @@", ln)
        if m:
            body = []
            for nxt in lines[i + 1:]:
                if nxt.startswith(("@@", "--- ", "+++ ")):
                    break
                body.append(nxt)
            out.append(([int(x) for x in m.groups()], body))
    return out
