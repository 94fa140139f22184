"""launch/gpu_checks.sh, the acceptance run of a new GPU node.  DRY_RUN lists its commands and
its time budget and writes nothing; a run with a stand-in interpreter (no GPU here) exercises
its plumbing: output folder, at most 8 small files, failures recorded, the summary table first.
The select check of ``mgup_dist.bench_cuda`` runs here on the CPU backend."""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "gpu_checks.sh"
BASH = shutil.which("bash")
sys.path.insert(0, str(ROOT / "launch"))
import gpu_summary  # noqa: E402


def _dry(tmp_path, **env_extra):
    env = dict(os.environ, DRY_RUN="1", **env_extra)
    r = subprocess.run([BASH, str(SCRIPT)], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_dry_run_lists_timed_commands_within_the_budget_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_out"
    text = _dry(tmp_path, OUT=str(out))
    cmds = [line for line in text.splitlines() if line.startswith("+ ")]
    assert len(cmds) >= 6, text
    secs = [int(re.match(r"\+ timeout (\d+) ", c).group(1)) for c in cmds]
    budget = int(re.search(r"time budget (\d+) s", text).group(1))
    assert budget == sum(secs) <= 480, (secs, budget)
    assert not out.exists(), "DRY_RUN wrote files"
    for path in re.findall(r"(?:tests|launch)/\S+\.py", text):
        assert (ROOT / path).is_file(), path
    for mod in re.findall(r"-m (mgup_dist\.\w+)", text):
        base = ROOT / mod.replace(".", "/")
        assert base.with_suffix(".py").is_file() or (base / "__main__.py").is_file(), mod
    # the GPU tests alone, first, in a process of their own: no CPU-only or interpreter tests
    assert re.findall(r"tests/\S+\.py", text) == ["tests/test_cuda.py"]
    assert "tests/test_cuda.py" in cmds[0] and "TRITON_INTERPRET" not in text
    train = [c for c in cmds if "mgup_dist.train" in c]
    assert len(train) == 3 and all("--no-save" in c and str(out) not in re.search(r"--out-dir (\S+)", c).group(1) for c in train)
    assert all("--optimizer " + o in " ".join(train) for o in ("adamw", "mgup_adamw", "cmgup_adamw"))


def test_dry_run_uses_python3_where_there_is_no_python(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable)
    text = _dry(tmp_path, OUT=str(tmp_path / "o"), PATH=str(bindir))
    cmds = [line for line in text.splitlines() if line.startswith("+ ")]
    assert all(f"{bindir}/python3 " in c for c in cmds), cmds


FAKE = r"""#!/usr/bin/env bash
# stands in for python on a GPU node: canned output by command; the summary runs for real
case "$*" in
  *"-m pytest"*) echo "F.."; echo "1 failed, 9 passed, 1 skipped in 30.0s"; exit 1 ;;
  *"gpu_summary.py --env"*) echo "torch 2.11.0+cu130 cuda 13.0"; echo "triton 3.6.0"; echo "device NVIDIA H100 80GB HBM3" ;;
  *launch/gpu_summary.py*) exec "$REAL_PY" "$@" ;;
  *mgup_dist.bench_cuda*)
    json=${@: -1}
    printf '%s' '{"model": "llama130m", "rows": {"AdamW(fused=True)": 1.0, "MGUPAdamW": 1.9, "CMGUPAdamW": 1.05,
      "MGUPLion": 1.8, "MGUPMuon": 9.0, "Muon+AdamW(torch)": 8.5, "AdamW(fused) graph": 0.9, "MGUPAdamW graph": 1.7,
      "CMGUPAdamW graph": 0.95, "MGUPLion graph": 1.6}, "failed": {"MGUPMuon graph": "RuntimeError: capture"},
      "select": {"ok": true, "chunks": 1, "units": 111, "keys": 134105856}}' > "$json"
    echo "kernels of one MGUPAdamW step:"; echo "_score_kernel 0.4ms" ;;
  *cmgup_adamw*) echo "step 10/20 tokens/s 150,000"; echo "step 20/20 loss 9.1 tokens/s 200,000" ;;
  *mgup_adamw*) sleep 3 ;;
  *mgup_dist.train*) echo "step 20/20 loss 9.0 tokens/s 210,000"; head -c 1200000 /dev/zero | tr '\0' x ;;
esac
"""


def test_run_with_a_stand_in_python_leaves_a_summary_and_few_small_files(tmp_path):
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PYTHON=str(fake), REAL_PY=sys.executable, TMPDIR=str(tmp_path))
    env.pop("OUT", None)
    r = subprocess.run([BASH, str(SCRIPT)], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    out = Path(re.search(r"output folder (\S+)", r.stdout).group(1))
    assert out.parent == tmp_path and out.is_dir()
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() and (out / f).stat().st_size <= 1_000_000 for f in files), files
    assert len(files) <= 8 and "summary.md" in files, files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gpu_checks_runs.")], "scratch folder left behind"
    summary = (out / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("|")]
    assert summary.index("| check | result |") < summary.index("## ")  # the table first
    row = dict([x.strip() for x in c.strip().strip("|").split("|")][:2] for c in table[2:])
    assert row["CUDA tests (tests/test_cuda.py)"] == "9 passed, 1 failed, 1 skipped"
    assert row["step ms, MGUPAdamW"].startswith("eager 1.900 ms (1.90x fused AdamW), CUDA graph 1.700 ms (1.89x")
    assert "failed: RuntimeError: capture" in row["step ms, MGUPMuon"]
    assert row["tokens/s, 130M model, adamw"] == "210,000 (1.00x adamw)"
    assert row["tokens/s, 130M model, cmgup_adamw"] == "200,000 (0.95x adamw)"
    assert row["tokens/s, 130M model, mgup_adamw"].startswith("not run")
    assert row["select on the GPU's own scores vs the generic select (llama130m)"].startswith("equal, bit for bit")
    assert row["commands that failed (124: timed out)"] == "1"  # pytest's exit 1
    assert "_score_kernel" in summary
    assert "[... cut to 1 MB ...]" in (out / "train.txt").read_text()


def test_summary_of_an_empty_folder_says_not_run(tmp_path):
    text = "\n".join(gpu_summary.table(str(tmp_path)))
    assert "| CUDA tests (tests/test_cuda.py) | not run |" in text
    assert "| step ms, MGUPMuon | not run |" in text


def test_select_check_passes_on_agreeing_selects_and_fails_on_a_wrong_one(monkeypatch):
    from mgup_dist import selection
    from mgup_dist.bench_cuda import check_select

    # on the CPU the generic radix select of float64 scores stands in for Triton's (the default
    # CPU step's C++ kernels select without writing keys, the torch-ops select returns its own form)
    res = check_select("tiny", torch.float64, device="cpu", backend="torch")
    assert res["ok"] and res["units"] == 39 and res["keys"] > 0, res
    orig = selection.select
    monkeypatch.setattr(selection, "select", lambda *a: orig(*a) - 1)  # a select that is off by one key
    bad = check_select("tiny", torch.float64, device="cpu", backend="torch")
    assert not bad["ok"] and not bad["thresholds_equal"], bad
    json.dumps(bad)
