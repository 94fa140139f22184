"""DRY_RUN=1 of every launch script prints the exact command it would run."""
from __future__ import annotations

import inspect
import json
import os
import pathlib
import re
import shlex
import stat
import subprocess

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def dry(script, *args, env=None, cwd=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ASCEND_", "NPROC", "MASTER_", "HOSTFILE",
                                                                   "DS_CONFIG", "ENGINE", "RDZV", "MAX_RESTARTS",
                                                                   "CUDA_VISIBLE_DEVICES", "NUM_GPUS", "DS_LAUNCHER",
                                                                   "GPUS_PER_NODE", "NNODES"))}
    e.update(env or {}, DRY_RUN="1")
    r = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=e, cwd=cwd,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("#")]
    assert len(lines) == 1, r.stdout
    return shlex.split(lines[0]), r.stdout


STANDIN = r"""#!/usr/bin/env python3
# Stand-in for a cluster tool (not installed here): records its argv and a few
# environment variables as one JSON line in $STANDIN_LOG, answers what scripts ask.
import json, os, re, sys
name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
with open(os.environ["STANDIN_LOG"], "a") as f:
    f.write(json.dumps({"tool": name, "argv": args,
                        "env": {k: os.environ.get(k) for k in ("SRUN_CPUS_PER_TASK", "CUDA_VISIBLE_DEVICES",
                                                               "ASCEND_RT_VISIBLE_DEVICES", "CANN_MARKER")}}) + "\n")
if name == "scontrol":
    assert args[:2] == ["show", "hostnames"], args
    m = re.fullmatch(r"(.*)\[(\d+)-(\d+)\]", args[2])
    print("\n".join([f"{m[1]}{i}" for i in range(int(m[2]), int(m[3]) + 1)] if m else args[2].split(",")))
elif name == "srun" and args[-2:] == ["hostname", "--ip-address"]:
    host = args[args.index("-w") + 1]
    print(f"10.0.0.{int(re.sub(r'[^0-9]', '', host) or 0)} fe80::1")
"""


class Standins:
    def __init__(self, tmp_path):
        self.bin = tmp_path / "standin_bin"
        self.bin.mkdir()
        self.log = tmp_path / "standin.log"
        for tool in ("scontrol", "srun", "deepspeed", "torchrun"):
            f = self.bin / tool
            f.write_text(STANDIN)
            f.chmod(f.stat().st_mode | stat.S_IEXEC)
        self.path = str(self.bin) + os.pathsep + os.environ["PATH"]

    def env(self, **kw):
        return dict(kw, PATH=self.path, STANDIN_LOG=str(self.log))

    def calls(self, tool=None):
        if not self.log.exists():
            return []
        out = [json.loads(ln) for ln in self.log.read_text().splitlines()]
        return [c for c in out if tool is None or c["tool"] == tool]


@pytest.fixture
def standins(tmp_path):
    return Standins(tmp_path)


def test_torchrun_sh():
    cmd, _ = dry("torchrun.sh", "--engine", "fsdp2", "--optimizer", "mgup_adamw")
    assert cmd == ["torchrun", "--standalone", "--nnodes", "1", "--nproc_per_node", "1", "--max-restarts", "0",
                   "-m", "mgup_dist.train", "--engine", "fsdp2", "--optimizer", "mgup_adamw"]
    cmd, _ = dry("torchrun.sh", "--steps", "5", env={"NPROC": "8", "MAX_RESTARTS": "2",
                                                     "RDZV_ENDPOINT": "host1:29400"})
    assert cmd == ["torchrun", "--nnodes", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", "host1:29400",
                   "--nproc_per_node", "8", "--max-restarts", "2", "-m", "mgup_dist.train", "--steps", "5"]


def test_deepspeed_sh_passes_visible_devices_as_include():
    tail = ["--master_port", "29500", "--no_local_rank", "--module", "mgup_dist.train", "--engine", "deepspeed",
            "--deepspeed-config", "zero2", "--model", "130m"]
    cmd, _ = dry("deepspeed.sh", "--model", "130m")
    assert cmd == ["deepspeed", "--include", "localhost:0", *tail]
    cmd, _ = dry("deepspeed.sh", "--model", "130m", env={"NUM_GPUS": "4"})
    assert cmd == ["deepspeed", "--include", "localhost:0,1,2,3", *tail]
    # --num_gpus would make the launcher drop CUDA_VISIBLE_DEVICES and run on 0..N-1.
    cmd, _ = dry("deepspeed.sh", "--model", "130m", env={"CUDA_VISIBLE_DEVICES": "4,5"})
    assert cmd == ["deepspeed", "--include", "localhost:4,5", *tail] and "--num_gpus" not in cmd
    e = dict(os.environ, DRY_RUN="1", CUDA_VISIBLE_DEVICES="4,5", NUM_GPUS="3")
    r = subprocess.run(["bash", str(LAUNCH / "deepspeed.sh")], capture_output=True, text=True, env=e, timeout=30)
    assert r.returncode == 2 and "NUM_GPUS=3" in r.stderr and "4,5" in r.stderr
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
    cmd, _ = dry("npu.sh", "--steps", "2", env={"ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7", "ENGINE": "deepspeed",
                                               "DS_CONFIG": "zero1"})
    assert cmd == ["env", "ASCEND_RT_VISIBLE_DEVICES=4,5,6,7", "HCCL_CONNECT_TIMEOUT=1200", "DS_ACCELERATOR=npu",
                   "deepspeed", "--include", "localhost:4,5,6,7", "--master_port", "29500", "--no_local_rank",
                   "--module", "mgup_dist.train", "--engine", "deepspeed", "--deepspeed-config", "zero1", "--device",
                   "npu", "--steps", "2"]
    assert "--num_gpus" not in cmd
    e = dict(os.environ, DRY_RUN="1", ENGINE="megatron")
    r = subprocess.run(["bash", str(LAUNCH / "npu.sh")], capture_output=True, text=True, env=e, timeout=30)
    assert r.returncode == 2 and "ENGINE must be" in r.stderr


def test_npu_sh_sources_cann_env_before_strict_mode(tmp_path, standins):
    # Like CANN's set_env.sh: reads an unset variable and runs a failing command.
    set_env = tmp_path / "set_env.sh"
    set_env.write_text('export PYTHONPATH=/cann/python:$PYTHONPATH\nfalse\nexport CANN_MARKER=sourced\n')
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DRY_RUN")}
    e.update(standins.env(ASCEND_SET_ENV=str(set_env), ASCEND_RT_VISIBLE_DEVICES="2,3"))
    r = subprocess.run(["bash", str(LAUNCH / "npu.sh"), "--steps", "1"], capture_output=True, text=True, env=e,
                       cwd=tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    (call,) = standins.calls("torchrun")
    assert call["env"]["CANN_MARKER"] == "sourced" and call["env"]["ASCEND_RT_VISIBLE_DEVICES"] == "2,3"
    assert call["argv"][call["argv"].index("--nproc_per_node") + 1] == "2"


SLURM = {"SLURM_JOB_NODELIST": "gpu[3-5]", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_ID": "4242",
         "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32"}


def _files(d):
    return sorted(p.relative_to(d) for p in d.rglob("*"))


def test_slurm_torchrun(tmp_path, standins):
    work = tmp_path / "work"
    work.mkdir()
    cmd, out = dry("slurm/torchrun.sbatch", "--config", "c.yaml", env=standins.env(**SLURM), cwd=work)
    assert cmd == ["srun", "--nodes", "3", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
                   "torchrun", "--nnodes", "3", "--nproc-per-node", "4", "--rdzv-id", "4242", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", "10.0.0.3:29500", "--max-restarts", "3", "-m", "mgup_dist.train",
                   "--device", "auto", "--config", "c.yaml"]
    assert "# SRUN_CPUS_PER_TASK=32" in out and _files(work) == []
    (ip,) = [c for c in standins.calls("srun")]   # the address of the head node, asked once
    assert ip["argv"] == ["--nodes", "1", "--ntasks", "1", "-w", "gpu3", "hostname", "--ip-address"]
    cmd, _ = dry("slurm/torchrun.sbatch", env=standins.env(**SLURM, NPROC_PER_NODE="8", RDZV_PORT="6000",
                                                           DEVICE="npu", RDZV_HOST="10.9.9.9"))
    assert cmd[cmd.index("--nproc-per-node") + 1] == "8" and "10.9.9.9:6000" in cmd and cmd[-1] == "npu"
    # The real path: srun gets SRUN_CPUS_PER_TASK, CUDA_VISIBLE_DEVICES is not set by the script.
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE", "DRY_RUN"))}
    e.update(standins.env(**SLURM))
    r = subprocess.run(["bash", str(LAUNCH / "slurm/torchrun.sbatch")], capture_output=True, text=True, env=e,
                       cwd=work, timeout=30)
    assert r.returncode == 0, r.stderr
    run = standins.calls("srun")[-1]
    assert run["argv"][5] == "torchrun" and run["env"]["SRUN_CPUS_PER_TASK"] == "32"
    assert run["env"]["CUDA_VISIBLE_DEVICES"] is None and _files(work) == []
    # Outside an allocation it says what is missing.
    r = subprocess.run(["bash", str(LAUNCH / "slurm/torchrun.sbatch")], capture_output=True, text=True,
                       env=standins.env(DRY_RUN="1"), timeout=30)
    assert r.returncode != 0 and "SLURM_JOB_NODELIST" in r.stderr


def test_slurm_deepspeed_torchrun_per_node(tmp_path, standins):
    work = tmp_path / "work"
    work.mkdir()
    cmd, out = dry("slurm/deepspeed.sbatch", "--model", "130m", env=standins.env(**SLURM), cwd=work)
    assert cmd == ["srun", "--nodes", "3", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
                   "torchrun", "--nnodes", "3", "--nproc-per-node", "4", "--rdzv-id", "4242", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", "10.0.0.3:29500", "--max-restarts", "0", "-m", "mgup_dist.train",
                   "--engine", "deepspeed", "--deepspeed-config", "zero2", "--model", "130m"]
    assert "# SRUN_CPUS_PER_TASK=32" in out
    assert _files(work) == []           # DRY_RUN writes nothing (no hostfile)
    assert standins.calls("deepspeed") == []


def test_slurm_deepspeed_refuses_its_slurm_launcher(standins):
    e = dict(os.environ, **standins.env(**SLURM, DS_LAUNCHER="slurm", DRY_RUN="1"))
    r = subprocess.run(["bash", str(LAUNCH / "slurm/deepspeed.sbatch")], capture_output=True, text=True, env=e,
                       timeout=30)
    assert r.returncode == 2 and "DS_LAUNCHER=slurm" in r.stderr and "RANK" in r.stderr


def test_slurm_deepspeed_pdsh_hostfile(tmp_path, standins):
    work = tmp_path / "work"
    work.mkdir()
    env = standins.env(**dict(SLURM, DS_LAUNCHER="pdsh", SLURM_GPUS_ON_NODE="8"))
    cmd, out = dry("slurm/deepspeed.sbatch", "--model", "130m", env=env, cwd=work)
    hostfile = str(work / "hostfile.4242")
    assert cmd == ["deepspeed", "--hostfile", hostfile, "--launcher", "pdsh", "--master_addr", "10.0.0.3",
                   "--master_port", "29500", "--no_local_rank", "--module", "mgup_dist.train", "--engine", "deepspeed",
                   "--deepspeed-config", "zero2", "--model", "130m"]
    assert "#   gpu5 slots=8" in out and _files(work) == []     # printed, not written
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN", "HOSTFILE"))}
    e.update(env)
    r = subprocess.run(["bash", str(LAUNCH / "slurm/deepspeed.sbatch"), "--model", "130m"], capture_output=True,
                       text=True, env=e, cwd=work, timeout=30)
    assert r.returncode == 0, r.stderr
    assert standins.calls("deepspeed")[-1]["argv"] == cmd[1:]
    assert _files(work) == [pathlib.Path("hostfile.4242")]      # atomically written, no temp left
    assert (work / "hostfile.4242").read_text() == "gpu3 slots=8\ngpu4 slots=8\ngpu5 slots=8\n"


def test_deepspeed_sh_checks_the_device_count_before_starting(standins):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DRY_RUN", "NUM_GPUS", "CUDA_VISIBLE_DEVICES",
                                                                       "HOSTFILE", "DEVICE_COUNT"))}
    # More GPUs asked for than the node has: exit 2 with the numbers and what to run instead; deepspeed never starts.
    e = dict(base, **standins.env(NUM_GPUS="2", DEVICE_COUNT="1"))
    r = subprocess.run(["bash", str(LAUNCH / "deepspeed.sh"), "--steps", "1"], capture_output=True, text=True, env=e,
                       timeout=60)
    assert r.returncode == 2 and "2 device(s) asked for" in r.stderr and "finds 1" in r.stderr
    assert "NPROC=2 launch/torchrun.sh --engine deepspeed" in r.stderr and "Traceback" not in r.stderr
    assert standins.calls("deepspeed") == []
    e = dict(base, **standins.env(CUDA_VISIBLE_DEVICES="0,1,2", DEVICE_COUNT="2"))
    r = subprocess.run(["bash", str(LAUNCH / "deepspeed.sh")], capture_output=True, text=True, env=e, timeout=60)
    assert r.returncode == 2 and "CUDA_VISIBLE_DEVICES=0,1,2" in r.stderr
    # Enough devices: the launcher starts with the command DRY_RUN prints.
    e = dict(base, **standins.env(NUM_GPUS="2", DEVICE_COUNT="2"))
    r = subprocess.run(["bash", str(LAUNCH / "deepspeed.sh"), "--steps", "1"], capture_output=True, text=True, env=e,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    cmd, _ = dry("deepspeed.sh", "--steps", "1", env={"NUM_GPUS": "2"})
    assert standins.calls("deepspeed")[-1]["argv"] == cmd[1:]
    # Without DEVICE_COUNT the count is DeepSpeed's own: this machine's count is smaller than 64.
    e = dict(base, **standins.env(NUM_GPUS="64"))
    r = subprocess.run(["bash", str(LAUNCH / "deepspeed.sh")], capture_output=True, text=True, env=e, timeout=120)
    assert r.returncode == 2 and "64 device(s) asked for" in r.stderr, r.stderr


@pytest.mark.parametrize("script", ["torchrun.sbatch", "deepspeed.sbatch"])
def test_slurm_scripts_refuse_to_run_outside_an_allocation(script, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN"))}
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    # No allocation at all.
    r = subprocess.run(["bash", str(LAUNCH / "slurm" / script)], capture_output=True, text=True, env=base, timeout=30)
    assert r.returncode == 2 and "not inside a slurm allocation" in r.stderr and "sbatch --nodes" in r.stderr
    # The variables set but no slurm tools on PATH: the same message, no 'command not found' / 'unbound variable'.
    e = dict(base, SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_ID="7", PATH=f"{empty_bin}{os.pathsep}/usr/bin{os.pathsep}/bin")
    r = subprocess.run(["/bin/bash", str(LAUNCH / "slurm" / script)], capture_output=True, text=True, env=e, timeout=30)
    assert r.returncode == 2 and "scontrol not found" in r.stderr
    assert "unbound variable" not in r.stderr and "command not found" not in r.stderr


def test_scripts_are_executable_and_strict():
    for f in [*LAUNCH.glob("*.sh"), *LAUNCH.glob("slurm/*.sbatch")]:
        text = f.read_text()
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text and "DRY_RUN" in text, f
        assert os.access(f, os.X_OK), f
        assert "cuda" not in text.lower() or f.name != "npu.sh"


# --------------------------------------------------------------------------- run configs


def _header_commands(cfg_file):
    """The launch commands quoted in a run config's header: '#   [ENV=V ...] launch/... | sbatch ...'."""
    out = []
    for line in cfg_file.read_text().splitlines():
        if not re.match(r"#   ([A-Z_][A-Z0-9_]*=\S* )*(launch/|sbatch )", line):
            continue
        words = shlex.split(line[4:])
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        if words and (words[0].startswith("launch/") or words[0] == "sbatch"):
            out.append((env, words))
    return out


@pytest.mark.parametrize("cfg_name", sorted(p.name for p in (ROOT / "configs" / "runs").glob("*.yaml")))
def test_run_config_header_commands(cfg_name, standins):
    from mgup_dist.train import config as tcfg
    from mgup_dist.train.optim import optimizer_class, optimizer_spec

    cfg_file = ROOT / "configs" / "runs" / cfg_name
    cmds = _header_commands(cfg_file)
    assert len(cmds) >= 2, cmds
    for env, words in cmds:
        world = int(env.get("NPROC", len(env.get("ASCEND_RT_VISIBLE_DEVICES", "0").split(","))))
        if words[0] == "sbatch":   # sbatch [--opt V ...] SCRIPT args: run SCRIPT in a dry run under stand-ins
            i = next(j for j, w in enumerate(words) if w.startswith("launch/"))
            nodes = words[words.index("--nodes") + 1] if "--nodes" in words else "1"
            env = dict(env, SLURM_JOB_NODELIST=f"n[1-{nodes}]", SLURM_JOB_NUM_NODES=nodes, SLURM_JOB_ID="1",
                       SLURM_GPUS_ON_NODE="8")
            words, world = words[i:], int(nodes) * 8
        cmd, _ = dry(words[0][len("launch/"):], *words[1:], env=standins.env(**env), cwd=ROOT)
        assert cmd[cmd.index("--config") + 1] == f"configs/runs/{cfg_name}", cmd
        train_args = cmd[cmd.index("mgup_dist.train") + 1:]
        # The trainer accepts them (parse checks every value before any work) ...
        cfg = tcfg.parse([*train_args, "--device", "cpu"], world_size=world)
        assert cfg.dataset == "c4" and cfg.eval_tokens == 10_000_000 and cfg.packing == "pad"
        # One run name per command: the file's `name:` would be shared by every optimizer run from it.
        assert "--name" in train_args, words
        # ... and so does the optimizer class (the core's coming `convention` keyword aside).
        cls_name, kw = optimizer_spec(cfg)
        kw.pop("adamw_lr", None)
        sig = inspect.signature(optimizer_class(cls_name))
        sig.bind(None, **{k: v for k, v in kw.items() if k != "convention"})


def test_npu_config_is_the_authors_setting():
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "runs" / "mgup_c4_llama130m_npu.yaml").read_text())
    assert cfg["opt_kwargs"] == {"convention": "authors", "gamma": 0.1} and cfg["eps"] == 1e-6
    header = (ROOT / "configs" / "runs" / "mgup_c4_llama130m_npu.yaml").read_text()
    assert "3.20-3.22" in header and "gamma 0.1" in header and "0.5" in header


def test_npu_config_optimizer_builds():
    from mgup_dist.train import config as tcfg
    from mgup_dist.train.optim import build_optimizer

    cfg = tcfg.parse(["--config", str(ROOT / "configs/runs/mgup_c4_llama130m_npu.yaml"), "--device", "cpu",
                      "--model", "tiny"], world_size=1)
    opt = build_optimizer(torch.nn.Linear(4, 4), cfg)
    assert opt.param_groups[0]["eps"] == 1e-6
    assert opt.param_groups[0]["convention"] == "authors" and opt.param_groups[0]["gamma"] == 0.1


# --------------------------------------------------------------------------- launch commands in the docs


def fenced_blocks(text):
    """(language, content) of every fenced code block of a Markdown text."""
    out, lang, buf = [], None, []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("```"):
            if lang is None:
                lang, buf = s[3:].strip(), []
            else:
                out.append((lang, "\n".join(buf) + "\n"))
                lang = None
        elif lang is not None:
            buf.append(line)
    return out


def _doc_launch_commands():
    """Launch commands in the code blocks of README.md, launch/README.md and docs/*.md:
    '[ENV=V ...] [bash] launch/...' or 'sbatch ... launch/...'."""
    out = []
    for f in [ROOT / "README.md", LAUNCH / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for lang, block in fenced_blocks(f.read_text()):
            if lang not in ("", "bash"):
                continue
            for line in block.splitlines():
                if "launch/" not in line:
                    continue
                words = shlex.split(line, comments=True)
                env = {}
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                    k, v = words.pop(0).split("=", 1)
                    env[k] = v
                if words and words[0] == "bash":
                    words = words[1:]
                if words and (words[0].startswith("launch/") or words[0] == "sbatch"):
                    out.append((f"{f.relative_to(ROOT)}: {line.strip()}", env, words))
    return out


DOC_COMMANDS = _doc_launch_commands()


def test_docs_quote_launch_commands():
    assert len(DOC_COMMANDS) >= 10
    files = {c[0].split(":")[0] for c in DOC_COMMANDS}
    assert {"README.md", "launch/README.md", "docs/training.md", "docs/npu.md"} <= files


@pytest.mark.parametrize("where,env,words", DOC_COMMANDS, ids=[c[0] for c in DOC_COMMANDS])
def test_doc_launch_command_dry_run(where, env, words, standins):
    from mgup_dist.train import config as tcfg

    env = dict(env)
    env.pop("DRY_RUN", None)
    world = int(env.get("NPROC", env.get("NUM_GPUS", len(env.get("ASCEND_RT_VISIBLE_DEVICES", "0").split(",")))))
    if words[0] == "sbatch":
        i = next(j for j, w in enumerate(words) if w.startswith("launch/"))
        nodes = words[words.index("--nodes") + 1] if "--nodes" in words else "1"
        env = dict(env, SLURM_JOB_NODELIST=f"n[1-{nodes}]", SLURM_JOB_NUM_NODES=nodes, SLURM_JOB_ID="1",
                   SLURM_GPUS_ON_NODE="8")
        words, world = words[i:], int(nodes) * 8
    elif "SLURM_JOB_NODELIST" in env:
        nodes = env.get("SLURM_JOB_NUM_NODES", "1")
        env.setdefault("SLURM_GPUS_ON_NODE", "8")
        world = int(nodes) * int(env["SLURM_GPUS_ON_NODE"])
    cmd, _ = dry(words[0][len("launch/"):], *words[1:], env=standins.env(**env), cwd=ROOT)
    train_args = cmd[cmd.index("mgup_dist.train") + 1:]
    if "--engine" not in train_args and "--engine" in cmd:       # deepspeed.sh / npu.sh put it before
        train_args = cmd[cmd.index("--engine"):]
    cfg = tcfg.parse([*train_args, "--device", "cpu"], world_size=world)
    # A command that trains from a config under a name of its own, so two optimizers never share a run.
    if "--config" in train_args:
        assert cfg.name and "--name" in train_args, where
