"""mgup_dist.device: the one place that resolves device kinds and comm backends."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from mgup_dist import device as D

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
HAS_NPU = D.npu_available()


def test_cpu_resolves_to_cpu():
    for spec in ("cpu", "CPU", " cpu ", "cpu:0", torch.device("cpu")):
        assert D.resolve_device(spec) == torch.device("cpu")


@pytest.mark.skipif(HAS_CUDA or HAS_NPU, reason="an accelerator is present: auto picks it")
def test_auto_and_none_pick_cpu_without_accelerators():
    assert D.resolve_device("auto") == torch.device("cpu")
    assert D.resolve_device(None) == torch.device("cpu")
    assert D.resolve_device() == torch.device("cpu")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_auto_picks_cuda_with_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert D.resolve_device("auto") == torch.device("cuda", 0)
    assert D.resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert D.comm_backend("cuda") == "nccl"


@pytest.mark.parametrize("spec", ["tpu", "gpu", "mps", "", "cuda0"])
def test_unknown_kind_is_a_value_error_listing_the_allowed(spec):
    with pytest.raises(ValueError) as info:
        D.resolve_device(spec)
    msg = str(info.value)
    assert "device" in msg
    for kind in ("cpu", "cuda", "npu"):
        assert kind in msg


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_cuda_unavailable_is_a_value_error():
    with pytest.raises(ValueError, match="cuda"):
        D.resolve_device("cuda")
    with pytest.raises(ValueError, match="cuda"):
        D.resolve_device("cuda:1")


@pytest.mark.skipif(HAS_NPU, reason="an NPU is available here")
def test_npu_unavailable_is_a_value_error():
    with pytest.raises(ValueError, match="npu"):
        D.resolve_device("npu")


def test_comm_backends():
    assert D.comm_backend("cpu") == "gloo"
    assert D.comm_backend(torch.device("cpu")) == "gloo"
    # the mapping for a given device object does not need the device to exist here
    assert D.comm_backend(torch.device("cuda", 0)) == "nccl"
    if not HAS_CUDA and not HAS_NPU:
        assert D.comm_backend() == "gloo"
        assert D.comm_backend("auto") == "gloo"


def test_capability_helpers_on_cpu():
    assert D.device_kind(torch.zeros(1)) == "cpu"
    assert D.device_kind("cpu") == "cpu"
    assert D.supports_bf16("cpu") is True
    assert D.fused_adamw_available("cpu") is True
    D.synchronize("cpu")  # a no-op, must not raise
    D.set_device_for_local_rank(torch.device("cpu"))


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.timeout(180)
def test_importing_mgup_dist_does_not_import_torch_npu():
    """torch_npu patches torch globally when imported: only an explicit NPU request (or
    probe) may import it.  Checked in a fresh interpreter."""
    code = (
        "import sys, torch\n"
        "import mgup_dist, mgup_dist.optim, mgup_dist.rules, mgup_dist.pipeline, mgup_dist.kernels, mgup_dist.kernels.torch_ops, mgup_dist.kernels.cpu, mgup_dist.selection, mgup_dist.device\n"
        "from mgup_dist.device import resolve_device, comm_backend\n"
        "resolve_device('cpu'); comm_backend('cpu')\n"
        "opt = mgup_dist.MGUPAdamW([torch.nn.Parameter(torch.zeros(3))])\n"
        "print('torch_npu' in sys.modules)\n"
    )
    assert _run(code) == "False"
