"""A spy on every host-to-device copy and every factory call with a device during a step,
below the dispatcher too (``torch.tensor(x, device=d)`` copies host data without an ATen op a
``TorchDispatchMode`` sees).  It records what can synchronise the host with a device:

- ``torch.tensor`` / ``torch.as_tensor`` with a ``device``: host data copied from pageable
  memory (a synchronising copy on CUDA, an error under graph capture);
- ``Tensor.to`` / ``.cuda`` / ``copy_`` moving a host tensor to another device (or, with the
  step's device the CPU, naming a device at all) without ``non_blocking=True``, or from
  pageable memory;
- reads of device values on the host (``item``, ``tolist``, ``float``/``int`` of a device
  tensor: ``aten._local_scalar_dense`` on a non-CPU tensor).

Pinned + ``non_blocking``, or no copy at all, is what a step may do."""
from __future__ import annotations

import contextlib
from typing import List

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _ScalarReads(TorchDispatchMode):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense" and args[0].device.type not in ("cpu", "meta"):
            self.out.append(f"host read of a {args[0].device.type} value ({func})")
        return func(*args, **(kwargs or {}))


def _device_of(args, kwargs):
    d = kwargs.get("device")
    for a in args:
        if isinstance(a, (torch.device, str)) and not isinstance(a, torch.dtype):
            try:
                d = torch.device(a)
            except (RuntimeError, TypeError):
                pass
        elif isinstance(a, torch.Tensor):
            d = a.device
    return None if d is None else torch.device(d)


@contextlib.contextmanager
def sync_spy():
    """Yields (bad, calls): lists of strings, what could synchronise and every call seen."""
    bad: List[str] = []
    calls: List[str] = []
    orig = {"tensor": torch.tensor, "as_tensor": torch.as_tensor, "to": torch.Tensor.to,
            "copy_": torch.Tensor.copy_, "cuda": torch.Tensor.cuda, "pin_memory": torch.Tensor.pin_memory}

    def factory(name):
        def f(data, *args, **kwargs):
            calls.append(f"torch.{name}(device={kwargs.get('device')})")
            if kwargs.get("device") is not None:
                bad.append(f"torch.{name}(..., device={kwargs['device']}): a pageable host-to-device copy")
            return orig[name](data, *args, **kwargs)
        return f

    def to(self, *args, **kwargs):
        dev = _device_of(args, kwargs)
        if dev is not None:
            calls.append(f"Tensor.to({dev}, non_blocking={kwargs.get('non_blocking', False)})")
            if self.device.type == "cpu" and dev.type != "meta":
                if not kwargs.get("non_blocking", False):
                    bad.append(f"Tensor.to({dev}) of a host tensor without non_blocking=True")
                elif dev.type != "cpu" and not self.is_pinned():
                    bad.append(f"Tensor.to({dev}, non_blocking=True) from pageable memory")
        return orig["to"](self, *args, **kwargs)

    def copy_(self, src, non_blocking=False):
        if isinstance(src, torch.Tensor) and src.device.type == "cpu" and self.device.type not in ("cpu", "meta"):
            calls.append(f"copy_({src.device} -> {self.device}, non_blocking={non_blocking})")
            if not non_blocking or not src.is_pinned():
                bad.append(f"copy_ host -> {self.device} (non_blocking={non_blocking}, pinned={src.is_pinned()})")
        return orig["copy_"](self, src, non_blocking=non_blocking)

    def cuda(self, *args, **kwargs):
        calls.append("Tensor.cuda")
        if self.device.type == "cpu" and not kwargs.get("non_blocking", False):
            bad.append("Tensor.cuda() of a host tensor without non_blocking=True")
        return orig["cuda"](self, *args, **kwargs)

    def pin_memory(self, *args, **kwargs):
        calls.append("Tensor.pin_memory")
        return orig["pin_memory"](self, *args, **kwargs)

    torch.tensor, torch.as_tensor = factory("tensor"), factory("as_tensor")
    torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cuda, torch.Tensor.pin_memory = to, copy_, cuda, pin_memory
    try:
        with _ScalarReads(bad):
            yield bad, calls
    finally:
        torch.tensor, torch.as_tensor = orig["tensor"], orig["as_tensor"]
        torch.Tensor.to, torch.Tensor.copy_ = orig["to"], orig["copy_"]
        torch.Tensor.cuda, torch.Tensor.pin_memory = orig["cuda"], orig["pin_memory"]
