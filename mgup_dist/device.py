"""The one place where device kinds (cpu / cuda / npu) are resolved.

Nothing else in mgup_dist names a device string or imports ``torch_npu``: they ask
this module.  ``torch_npu`` is imported lazily, only when an NPU is asked for or
probed, because importing it patches torch globally.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional, Union

import torch

__all__ = [
    "DEVICE_KINDS",
    "npu_available",
    "resolve_device",
    "comm_backend",
    "device_kind",
    "supports_bf16",
    "fused_adamw_available",
    "synchronize",
    "set_device_for_local_rank",
    "device_count",
    "check_local_processes",
]

DEVICE_KINDS = ("cpu", "cuda", "npu")
_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


@functools.lru_cache(maxsize=None)
def _import_torch_npu():
    """Import ``torch_npu`` once; returns the module or None when it is not installed."""
    try:
        return importlib.import_module("torch_npu")
    except ImportError:
        return None


def npu_available() -> bool:
    if _import_torch_npu() is None:
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def _auto_kind() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if npu_available():
        return "npu"
    return "cpu"


def resolve_device(device: Union[None, str, torch.device] = None, local_rank: Optional[int] = None) -> torch.device:
    """``None`` / ``"auto"`` picks cuda, then npu, then cpu.  ``local_rank`` (or
    ``$LOCAL_RANK``) picks the accelerator index.  Raises ValueError for an unknown
    kind or one that is not available here."""
    if isinstance(device, torch.device):
        kind, index = device.type, device.index
    else:
        spec = "auto" if device is None else str(device).strip().lower()
        if spec == "auto":
            kind, index = _auto_kind(), None
        else:
            kind, _, idx = spec.partition(":")
            index = int(idx) if idx else None
    if kind not in DEVICE_KINDS:
        raise ValueError(f"device: unknown kind {kind!r}; allowed: 'auto', {', '.join(map(repr, DEVICE_KINDS))}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch.cuda.is_available() is False")
    if kind == "npu" and not npu_available():
        raise ValueError("device: 'npu' was asked for but torch_npu is not installed or no NPU is visible")
    if kind == "cpu":
        return torch.device("cpu")
    if index is None:
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        index = local_rank
    return torch.device(kind, index)


def device_kind(device: Union[str, torch.device, torch.Tensor]) -> str:
    if isinstance(device, torch.Tensor):
        device = device.device
    return torch.device(device).type if not isinstance(device, torch.device) else device.type


def comm_backend(device: Union[None, str, torch.device] = None) -> str:
    """The torch.distributed backend that matches a device: gloo, nccl or hccl."""
    kind = resolve_device(device).type if not isinstance(device, torch.device) else device.type
    if kind == "npu":
        _import_torch_npu()  # registers the hccl backend with torch.distributed
    return _BACKENDS[kind]


def _module(kind: str):
    if kind == "npu":
        _import_torch_npu()
        return torch.npu
    return getattr(torch, kind)


def set_device_for_local_rank(device: torch.device) -> None:
    if device.type != "cpu":
        _module(device.type).set_device(device)


def synchronize(device: Union[str, torch.device]) -> None:
    kind = device_kind(device)
    if kind != "cpu":
        _module(kind).synchronize()


def supports_bf16(device: Union[str, torch.device]) -> bool:
    kind = device_kind(device)
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind == "npu":
        # Ascend 910B/C run bf16, a 910A does not: torch_npu says which one this is.
        return bool(_module("npu").is_bf16_supported())
    return True  # CPU


def device_count(kind: str) -> int:
    """Visible accelerators of a kind (after CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES)."""
    if kind not in ("cuda", "npu"):
        raise ValueError(f"device_count: kind must be 'cuda' or 'npu', got {kind!r}")
    if kind == "npu" and not npu_available():
        return 0
    return int(_module(kind).device_count())


def check_local_processes(device: torch.device, local_world_size: int) -> None:
    """One process per accelerator: more local processes than visible devices would make
    the surplus ranks fail late with "invalid device ordinal"; refuse before any work."""
    if device.type == "cpu":
        return
    n = device_count(device.type)
    if local_world_size > n or (device.index is not None and device.index >= n):
        raise ValueError(
            f"device: {local_world_size} local processes (LOCAL_WORLD_SIZE) but only {n} visible {device.type} "
            f"device(s) on this node (index {device.index} asked); start at most {n} processes per node "
            f"(torchrun --nproc_per_node / NPROC) or make more devices visible"
        )


def fused_adamw_available(device: Union[str, torch.device]) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` runs on this device kind.  Only a
    baseline: MGUP itself cannot use a fused AdamW kernel (it applies a per-coordinate
    scale the kernel has no input for), so on NPU it runs the foreach path."""
    return device_kind(device) in ("cpu", "cuda")
