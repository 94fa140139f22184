"""Backends: one implementation of the phases per kind of device, behind one interface
(``base.Backend``), chosen by ``get_backend`` from facts identical on every rank (the
device type of the group's params and its hyperparameters), never from local data.

    base.py          the interface and the order-key definition every backend shares
    torch_ops.py     plain torch ops, batched and sync-free: any device (NPU, ...)
    cpu.py           CPU: introselect (numpy) for whole tensors, Inductor-fused phases (compile=True)
    cpu_split.py     CPU: the exact selection of tensors split over ranks (a collective bracket)
    triton_cuda.py   CUDA: multi-tensor Triton kernels (imported lazily: never on CPU-only installs)
"""
from __future__ import annotations

import warnings

import torch

from .base import Backend, Bufs

__all__ = ["Backend", "Bufs", "get_backend", "BACKENDS"]

BACKENDS = ("auto", "torch", "cpu", "triton")
_WARNED: list = []


def get_backend(device: torch.device, *, foreach: bool = True, compile: bool = False, kind: str = "auto") -> Backend:
    """The backend for a param group on ``device``: decided from the device type and the
    group's options only (identical on every rank).  ``kind="auto"``: CPU -> cpu, CUDA ->
    triton (when Triton imports and not ``foreach=False``), anything else (NPU, ...) -> torch."""
    if kind not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {kind!r}")
    dtype = device.type
    if kind == "auto":
        kind = "cpu" if dtype == "cpu" else ("triton" if dtype == "cuda" and foreach and _triton_ok() else "torch")
        if dtype == "cuda" and kind == "torch" and foreach and not _WARNED:
            _WARNED.append(True)
            warnings.warn("mgup_dist: Triton is not importable here; MGUP runs its plain torch-ops backend on CUDA "
                          "(same results, slower). Install triton, or pass backend='torch' to silence this.", stacklevel=3)
    if kind == "cpu":
        from .cpu import CPU

        return CPU(foreach, compile=compile)
    if kind == "triton":
        from .triton_cuda import TritonCUDA

        return TritonCUDA()
    from .torch_ops import TorchOps

    return TorchOps(foreach)


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401

        from . import triton_cuda  # noqa: F401
    except ImportError:
        return False
    return True
