"""launch/gpu_checks.sh, the prepared GPU run: DRY_RUN lists its commands and writes nothing;
every command runs under a timeout and every test file or module it names exists."""
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_lists_timed_commands_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_out"
    env = dict(os.environ, DRY_RUN="1", OUT=str(out))
    r = subprocess.run(["bash", str(ROOT / "launch" / "gpu_checks.sh")], env=env, capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    cmds = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert len(cmds) >= 8, r.stdout
    assert all(re.match(r"\+ timeout \d+ ", c) for c in cmds), cmds
    assert not out.exists(), "DRY_RUN wrote files"
    for path in re.findall(r"tests/\S+\.py", r.stdout):
        assert (ROOT / path).is_file(), path
    for mod in re.findall(r"-m (mgup_dist\.\w+)", r.stdout):
        base = ROOT / mod.replace(".", "/")
        assert base.with_suffix(".py").is_file() or (base / "__main__.py").is_file(), mod
    # the CUDA tests run in a process of their own, before anything imports triton in another mode
    assert "tests/test_cuda.py" in cmds[0] and "test_triton_interpret" not in cmds[0]
