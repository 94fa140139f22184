"""What would break on Ascend NPUs / accelerators, checked on the CPU.

* every collective on the recipe path carries a dtype hccl accepts (a real 2-process gloo
  training run with torch.distributed's collectives wrapped to refuse any other dtype);
* supports_bf16 asks torch_npu; more local processes than visible devices is refused
  before any work, naming both numbers;
* after a resume the optimizer's ``step`` stays a CPU 0-d tensor and training continues
  bit for bit.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch

from mgup_dist import device as D
from mgup_dist.optim import MGUPAdamW
from mgup_dist.train.engines import load_optimizer_state

ROOT = pathlib.Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- collectives

# Wrapped in the worker: torch_npu's ProcessGroupHCCL maps these dtypes only (no float64,
# no bool).  uint8 is the payload of torch's object collectives (pickles); hccl has
# HCCL_DATA_TYPE_UINT8 for moving bytes, so it is allowed for gathers/broadcasts only.
WORKER = r'''
import json, os, sys
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

HCCL_REDUCE = {torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32, torch.bfloat16}
HCCL_MOVE = HCCL_REDUCE | {torch.uint8}
seen = []

def _tensors(x):
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    return []

def _owner():
    # The code that asked for the collective: the first frame outside this wrapper and
    # torch.distributed (all_gather_object's inner all_gather belongs to its caller).
    f = sys._getframe(2)
    while f is not None and ("/torch/distributed/" in f.f_code.co_filename
                             or f.f_code.co_filename == __file__):
        f = f.f_back
    return "deepspeed" if f is not None and "/deepspeed/" in f.f_code.co_filename else "recipe"

def wrap(name, allowed):
    orig = getattr(c10d, name)
    def f(*args, **kwargs):
        owner = _owner()
        for t in _tensors(list(args) + list(kwargs.values())):
            # DeepSpeed's own collectives are DeepSpeed's business (recorded, not refused).
            if t.dtype not in allowed and owner == "recipe":
                raise TypeError(f"hccl refuses {name} on {t.dtype}")
            seen.append((name if owner == "recipe" else f"deepspeed:{name}", str(t.dtype)))
        return orig(*args, **kwargs)
    setattr(c10d, name, f)
    setattr(dist, name, f)

for n in ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor"):
    wrap(n, HCCL_REDUCE)
for n in ("broadcast", "all_gather", "all_gather_into_tensor", "gather", "scatter", "all_to_all_single"):
    wrap(n, HCCL_MOVE)

from mgup_dist.train import run
run(sys.argv[1:])
with open(os.path.join(os.environ["SEEN_DIR"], f"seen{os.environ['RANK']}.json"), "w") as fh:
    json.dump(sorted(set(map(tuple, seen))), fh)
'''


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "deepspeed"])
def test_recipe_collectives_use_hccl_dtypes(tmp_path, engine):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), SEEN_DIR=str(tmp_path), DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           "--engine", engine, "--device", "cpu", "--optimizer", "mgup_adamw", "--steps", "4", "--eval-every", "2",
           "--log-every", "2", "--save-every", "2", "--global-batch", "4", "--micro-batch", "2", "--seq-len", "32",
           "--eval-tokens", "1024", "--out-dir", str(out), "--no-plots", "--no-progress", "--no-tensorboard",
           "--resume", "never"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    for rank in (0, 1):
        seen = {tuple(x) for x in json.loads((tmp_path / f"seen{rank}.json").read_text())}
        if engine == "deepspeed":   # ZeRO's overflow flag: DeepSpeed all-reduces a uint8 with MAX
            assert ("deepspeed:all_reduce", "torch.uint8") in seen, seen
        # The wrapper saw the recipe's collectives: evaluation (fp32 parts, int64 count),
        # logging (fp32) and the checkpoint's object gather (uint8 payload, int64 sizes).
        assert ("all_reduce", "torch.int64") in seen and ("all_reduce", "torch.float32") in seen, seen
        assert ("all_gather", "torch.uint8") in seen, seen


def test_evaluation_reduction_keeps_float64_accuracy():
    # hi + lo fp32 parts of a float64 sum: the reduction of 2 ranks loses < 1e-12 relative,
    # where a plain fp32 sum of 1e7 token losses would lose ~1e-7.
    total = torch.tensor(31_234_567.891234, dtype=torch.float64)
    hi = total.float()
    lo = (total - hi.double()).float()
    assert abs((hi.double() + lo.double()) - total) / total < 1e-12
    assert abs(hi.double() - total) / total > 1e-10


# --------------------------------------------------------------------------- device.py


def test_supports_bf16_asks_torch_npu(monkeypatch):
    # Without torch_npu torch cannot parse "npu:0": stand in for it and for torch.npu.
    monkeypatch.setattr(D, "device_kind", lambda d: "npu")
    for answer in (False, True):
        fake = types.SimpleNamespace(is_bf16_supported=lambda a=answer: a)
        monkeypatch.setattr(torch, "npu", fake, raising=False)
        assert D.supports_bf16("npu:0") is answer


def test_more_local_processes_than_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    D.check_local_processes(torch.device("cuda", 0), 1)
    for idx, n in ((1, 2), (0, 2), (3, 1)):
        with pytest.raises(ValueError) as info:
            D.check_local_processes(torch.device("cuda", idx), n)
        msg = str(info.value)
        assert f"{n} local processes" in msg and "only 1 visible cuda" in msg
    D.check_local_processes(torch.device("cpu"), 64)   # CPU ranks share the host
    with pytest.raises(ValueError, match="kind"):
        D.device_count("cpu")


# --------------------------------------------------------------------------- resume


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 8, generator=g)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("make", [lambda p: MGUPAdamW(p, lr=1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2)],
                         ids=["mgup_adamw", "torch_adamw"])
def test_resume_keeps_step_on_cpu_and_continues_bit_identically(tmp_path, make):
    dev = D.resolve_device("auto")
    a = _model().to(dev)
    opt_a = make(a.parameters())
    for s in range(3):
        _step(a, opt_a, s)
    # A checkpoint written with the counters on the device (as map_location=device leaves
    # them; on this CPU-only machine the float64 stands in for the wrong place) must load
    # back into a fresh optimizer's layout.
    sd = opt_a.state_dict()
    for st in sd["state"].values():
        st["step"] = st["step"].to(dev, torch.float64)
    torch.save(sd, tmp_path / "optimizer.pt")
    b = _model().to(dev)
    b.load_state_dict(a.state_dict())
    opt_b = make(b.parameters())
    load_optimizer_state(opt_b, str(tmp_path / "optimizer.pt"))
    for st in opt_b.state.values():
        assert st["step"].device.type == "cpu" and st["step"].dim() == 0 and st["step"].dtype == torch.float32
    for s in range(3, 6):
        _step(a, opt_a, s)
        _step(b, opt_b, s)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
        assert float(sa["step"]) == float(sb["step"]) == 6.0


def test_trainer_refuses_surplus_ranks_before_any_work(monkeypatch):
    # What NPROC=2 on a 1-GPU machine looks like to rank 1 (torch.cuda stood in for: no
    # GPU here); the error comes from the device resolution, before set_device / init.
    from mgup_dist.train import trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device reached"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="2 local processes .* only 1 visible cuda"):
        trainer._init_distributed(types.SimpleNamespace(device="cuda", engine="ddp"))
