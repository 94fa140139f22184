"""What an optimizer holds, and what a step allocates on top.

* ``state_bytes(opt)``: bytes of the optimizer's state tensors (torch's names: what a
  checkpoint carries); ``held_bytes(opt)``: state plus any buffer the optimizer keeps
  between steps (the CPU key scratch: at most one byte a parameter; block temporaries
  live for one step only).
* ``StepPeak``: the peak of bytes allocated and still alive during a block of eager
  torch code, by watching every tensor storage that torch ops create in it (a
  ``TorchDispatchMode``): works on any device, including the CPU, where torch keeps no
  allocator statistics.  On CUDA use ``torch.cuda.max_memory_allocated`` instead.
"""
from __future__ import annotations

import weakref
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["state_bytes", "held_bytes", "StepPeak", "step_peak_bytes"]


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.untyped_storage().nbytes()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                key = _local(v).untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += _nbytes(v)
    return total


def held_bytes(opt: torch.optim.Optimizer) -> int:
    extra = sum(b.untyped_storage().nbytes() for b in getattr(opt, "_scratch", {}).values())
    return state_bytes(opt) + extra


def _ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


class StepPeak(TorchDispatchMode):
    """``with StepPeak() as m: opt.step()`` -> ``m.peak``: the most bytes of storages
    created inside the block that were alive at once (views counted once)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: Dict[int, int] = {}

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self._seen or st.nbytes() == 0:
            return
        n = st.nbytes()
        self._seen[ptr] = n
        self.live += n
        self.peak = max(self.peak, self.live)

        mode = weakref.ref(self)

        def gone(ptr=ptr, n=n, mode=mode):
            m = mode()
            if m is not None and m._seen.pop(ptr, None) is not None:
                m.live -= n

        weakref.finalize(st, gone)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {_ptr(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            # a view or an in-place result shares an input's storage: nothing new was allocated
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and _ptr(t) not in inputs:
                try:
                    self._track(t)
                except (RuntimeError, NotImplementedError):  # no storage (e.g. a sparse result)
                    pass
        return out


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def step_peak_bytes(fn, device: torch.device, compiled: bool = False) -> int:
    """Peak bytes allocated on top of what existed, while ``fn()`` runs.  CUDA: the caching
    allocator's peak; CPU: ``StepPeak`` (tracked allocations), or, for code that runs
    torch.compile'd kernels (``compiled``: they refuse dispatch modes), the resident-set
    high-water mark (Linux: reset through /proc/self/clear_refs) over the resident set before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not compiled:
        with StepPeak() as m:
            fn()
        return m.peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _rss_kb("VmRSS")
    fn()
    return max(0, _rss_kb("VmHWM") - base) * 1024
