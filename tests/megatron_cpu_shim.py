"""Run megatron-core 0.16 on CPU (gloo) in tests.  Test-only: nothing of this ships.

megatron-core assumes CUDA in a handful of places that have nothing to do with the
optimizer math under test.  :func:`install` (idempotent, per process) replaces exactly
these, for the calling process only:

1. ``torch.cuda.current_device()`` -> ``torch.device("cpu")``  (used as ``device=`` for
   buffers in ``param_and_grad_buffer``, ``distrib_optimizer.load_state_dict``, ...).
2. ``torch.cuda.synchronize`` / ``empty_cache`` -> no-ops; ``torch.cuda.Stream``,
   ``torch.cuda.default_stream``, ``torch.cuda.current_stream`` -> a stream stub whose
   ``wait_stream`` / ``synchronize`` do nothing; ``torch.cuda.stream(s)`` -> a null
   context (gloo collectives on CPU are synchronous, so there is nothing to order).
3. A ``TorchFunctionMode`` (entered for the rest of the process) that
   - rewrites a ``device=`` argument naming CUDA (``"cuda"``, ``"cuda:N"``, an int, a
     ``torch.device("cuda")``) to ``"cpu"`` in factory calls (``torch.tensor(..,
     device="cuda")`` in ``clip_grads``, ``FP32Optimizer._scale``,
     ``MixedPrecisionOptimizer.found_inf`` ...), and likewise ``Tensor.to("cuda")``;
   - makes ``Tensor.cuda()`` return the tensor itself;
   - makes ``Tensor.type()`` (no arguments) report CPU tensors as
     ``torch.cuda.<Kind>Tensor``: megatron's optimizers dispatch on these strings
     (``model_param.type() == 'torch.cuda.FloatTensor'`` in ``distrib_optimizer`` /
     ``Float16OptimizerWithFloat16Params`` and ``clip_grads``) and raise ``TypeError``
     for anything else.

Nothing of megatron-core itself is edited or mocked: its DDP, buffers, distributed
optimizer, clipping and dist_checkpointing run unchanged, on real gloo process groups.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE = None


class _StreamStub:
    """Stands in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        return None

    def wait_event(self, event):
        return None

    def synchronize(self):
        return None

    def record_event(self, event=None):
        return None


def _is_cuda_device(dev) -> bool:
    if dev is None:
        return False
    if isinstance(dev, int) and not isinstance(dev, bool):
        return True  # a bare index means a CUDA device to torch
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.split(":")[0].strip().lower() == "cuda"
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Item 3 of the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if args[0].device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) >= 2 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


def install() -> None:
    """Apply the replacements listed in the module docstring to this process."""
    global _INSTALLED, _MODE
    if _INSTALLED:
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.Stream = _StreamStub
    torch.cuda.default_stream = lambda *a, **k: _StreamStub()
    torch.cuda.current_stream = lambda *a, **k: _StreamStub()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    _INSTALLED = True
