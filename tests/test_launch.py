"""DRY_RUN=1 of every launch script prints the exact command it would run."""
from __future__ import annotations

import os
import pathlib
import shlex
import stat
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def dry(script, *args, env=None, cwd=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ASCEND_", "NPROC", "MASTER_", "HOSTFILE",
                                                                   "DS_CONFIG", "ENGINE", "RDZV", "MAX_RESTARTS"))}
    e.update(env or {}, DRY_RUN="1")
    r = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=e, cwd=cwd,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("#")]
    assert len(lines) == 1, r.stdout
    return shlex.split(lines[0]), r.stdout


@pytest.fixture
def fake_scontrol(tmp_path):
    """Test shim for slurm's `scontrol show hostnames LIST` (slurm is not installed here):
    expands node[1-2]-style lists like scontrol does for these simple cases."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    f = bindir / "scontrol"
    f.write_text(
        "#!/usr/bin/env python3\n"
        "import re, sys\n"
        "assert sys.argv[1:3] == ['show', 'hostnames'], sys.argv\n"
        "m = re.fullmatch(r'(.*)\\[(\\d+)-(\\d+)\\]', sys.argv[3])\n"
        "hosts = [f'{m[1]}{i}' for i in range(int(m[2]), int(m[3]) + 1)] if m else sys.argv[3].split(',')\n"
        "print('\\n'.join(hosts))\n")
    f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return str(bindir) + os.pathsep + os.environ["PATH"]


def test_torchrun_sh():
    cmd, _ = dry("torchrun.sh", "--engine", "fsdp2", "--optimizer", "mgup_adamw")
    assert cmd == ["torchrun", "--standalone", "--nnodes", "1", "--nproc_per_node", "1", "--max-restarts", "0",
                   "-m", "mgup_dist.train", "--engine", "fsdp2", "--optimizer", "mgup_adamw"]
    cmd, _ = dry("torchrun.sh", "--steps", "5", env={"NPROC": "8", "MAX_RESTARTS": "2",
                                                     "RDZV_ENDPOINT": "host1:29400"})
    assert cmd == ["torchrun", "--nnodes", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", "host1:29400",
                   "--nproc_per_node", "8", "--max-restarts", "2", "-m", "mgup_dist.train", "--steps", "5"]


def test_deepspeed_sh():
    cmd, _ = dry("deepspeed.sh", "--model", "130m")
    assert cmd == ["deepspeed", "--num_gpus", "1", "--master_port", "29500", "--no_local_rank", "--module",
                   "mgup_dist.train", "--engine", "deepspeed", "--deepspeed-config", "zero2", "--model", "130m"]
    cmd, _ = dry("deepspeed.sh", "--steps", "3", env={"HOSTFILE": "/shared/hostfile", "DS_CONFIG": "zero3",
                                                     "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert cmd == ["deepspeed", "--hostfile", "/shared/hostfile", "--launcher", "pdsh", "--master_addr", "n1",
                   "--master_port", "1234", "--no_local_rank", "--module", "mgup_dist.train", "--engine", "deepspeed",
                   "--deepspeed-config", "zero3", "--steps", "3"]


def test_npu_sh():
    cmd, _ = dry("npu.sh", "--config", "configs/runs/mgup_c4_llama130m_npu.yaml")
    assert cmd == ["env", "ASCEND_RT_VISIBLE_DEVICES=0", "HCCL_CONNECT_TIMEOUT=1200", "torchrun", "--nnodes", "1",
                   "--nproc_per_node", "1", "--master_port", "29500", "--max-restarts", "0", "-m", "mgup_dist.train",
                   "--engine", "ddp", "--device", "npu", "--config", "configs/runs/mgup_c4_llama130m_npu.yaml"]
    cmd, _ = dry("npu.sh", "--steps", "2", env={"ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3", "ENGINE": "deepspeed",
                                               "DS_CONFIG": "zero1"})
    assert cmd == ["env", "ASCEND_RT_VISIBLE_DEVICES=0,1,2,3", "HCCL_CONNECT_TIMEOUT=1200", "DS_ACCELERATOR=npu",
                   "deepspeed", "--num_gpus", "4", "--master_port", "29500", "--no_local_rank", "--module",
                   "mgup_dist.train", "--engine", "deepspeed", "--deepspeed-config", "zero1", "--device", "npu",
                   "--steps", "2"]
    e = dict(os.environ, DRY_RUN="1", ENGINE="megatron")
    r = subprocess.run(["bash", str(LAUNCH / "npu.sh")], capture_output=True, text=True, env=e, timeout=30)
    assert r.returncode == 2 and "ENGINE must be" in r.stderr


def test_slurm_torchrun(fake_scontrol):
    env = {"PATH": fake_scontrol, "SLURM_JOB_NODELIST": "gpu[3-5]", "SLURM_JOB_NUM_NODES": "3",
           "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "4"}
    cmd, _ = dry("slurm/torchrun.sbatch", "--config", "c.yaml", env=env)
    assert cmd == ["srun", "--nodes", "3", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
                   "torchrun", "--nnodes", "3", "--nproc_per_node", "4", "--rdzv_id", "4242", "--rdzv_backend", "c10d",
                   "--rdzv_endpoint", "gpu3:29500", "--max-restarts", "3", "-m", "mgup_dist.train", "--device", "auto",
                   "--config", "c.yaml"]
    cmd, _ = dry("slurm/torchrun.sbatch", env=dict(env, NPROC_PER_NODE="8", RDZV_PORT="6000", DEVICE="npu"))
    assert cmd[cmd.index("--nproc_per_node") + 1] == "8" and "gpu3:6000" in cmd and cmd[-1] == "npu"
    # Outside an allocation it says what is missing.
    r = subprocess.run(["bash", str(LAUNCH / "slurm/torchrun.sbatch")], capture_output=True, text=True,
                       env={"PATH": fake_scontrol, "DRY_RUN": "1"}, timeout=30)
    assert r.returncode != 0 and "SLURM_JOB_NODELIST" in r.stderr


def test_slurm_deepspeed(fake_scontrol, tmp_path):
    env = {"PATH": fake_scontrol, "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "77", "SLURM_GPUS_ON_NODE": "8"}
    cmd, out = dry("slurm/deepspeed.sbatch", "--model", "130m", env=env, cwd=tmp_path)
    hostfile = str(tmp_path / "hostfile.77")
    assert cmd == ["deepspeed", "--hostfile", hostfile, "--launcher", "slurm", "--master_addr", "n1",
                   "--master_port", "29500", "--no_local_rank", "--module", "mgup_dist.train", "--engine", "deepspeed",
                   "--deepspeed-config", "zero2", "--model", "130m"]
    assert pathlib.Path(hostfile).read_text() == "n1 slots=8\nn2 slots=8\n"
    assert "#   n2 slots=8" in out


def test_scripts_are_executable_and_strict():
    for f in [*LAUNCH.glob("*.sh"), *LAUNCH.glob("slurm/*.sbatch")]:
        text = f.read_text()
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text and "DRY_RUN" in text, f
        assert os.access(f, os.X_OK), f
        assert "cuda" not in text.lower() or f.name != "npu.sh"
