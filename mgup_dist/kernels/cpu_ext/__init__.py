"""The CPU step's C++ kernels (``mgup_cpu.cpp``), built at first use.

``load()`` compiles the extension with ``torch.utils.cpp_extension.load`` the first time a
process needs it (g++ with ``-O3 -march=native -fopenmp``; about half a minute) and returns
the module; later processes load the cached build from ``TORCH_EXTENSIONS_DIR`` (torch's
default: ``~/.cache/torch_extensions``).  torch's loader holds a file lock while it builds,
so ranks that start together build once and the others wait.  The build is named after
this machine's CPU features, so a cache shared between different machines never hands one
a binary for another's instruction set.

Where no compiler is found or the build fails, ``load()`` warns once and returns None: the
CPU backend then runs its torch-ops path (same results, slower).  ``MGUP_DIST_CPU_EXT=0``
turns the extension off.

``calls`` counts the kernel calls of this process by phase (score, select, apply,
cautious): a cheap way to see that the fast path is the one taken.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import threading
import warnings
from collections import Counter
from typing import Optional

__all__ = ["load", "available", "calls", "SOURCE"]

SOURCE = pathlib.Path(__file__).with_name("mgup_cpu.cpp")
#: -ffp-contract=off: no multiply-add is fused that torch's eager ops round twice (the
#: fused ones are written as std::fma); -fno-math-errno lets sqrt vectorise.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]

calls: Counter = Counter()
_lock = threading.Lock()
_state = {"done": False, "mod": None}


def _cpu_tag() -> str:
    """A short hash of this CPU's feature flags (the build uses -march=native)."""
    flags = ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    if not flags:
        import platform

        flags = platform.machine() + platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def load():
    """The compiled module, or None (one warning a process) where it cannot be built."""
    if _state["done"]:
        return _state["mod"]
    with _lock:
        if _state["done"]:
            return _state["mod"]
        mod = None
        if os.environ.get("MGUP_DIST_CPU_EXT", "1") != "0":
            try:
                from torch.utils.cpp_extension import load as _load

                import torch

                # torch.sqrt is MKL's vmsSqrt where torch has MKL: the kernels call it too (bit for bit)
                flags = CFLAGS + (["-DMGUP_MKL_SQRT"] if torch.backends.mkl.is_available() else [])
                mod = _load(name=f"mgup_cpu_{_cpu_tag()}", sources=[str(SOURCE)], extra_cflags=flags,
                            extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # no compiler, no ninja, a failed build: the torch-ops path runs
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                warnings.warn(f"mgup_dist: the CPU kernels could not be built ({type(e).__name__}: {first}); MGUP runs "
                              "its slower torch-ops CPU path (same results). Install g++ and ninja to get the fast "
                              "step, or set MGUP_DIST_CPU_EXT=0 to silence this.", stacklevel=3)
                mod = None
        _state["mod"], _state["done"] = mod, True
        return mod


def available() -> bool:
    return load() is not None
