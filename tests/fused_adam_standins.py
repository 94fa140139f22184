"""Stand-ins for apex's and Transformer Engine's ``FusedAdam``.  Test-only: nothing ships.

CI cannot install apex (not on the package index; its fused ops need CUDA) nor Transformer
Engine (CUDA-only), yet on real NVIDIA containers megatron-core 0.16 builds one of them as
its Adam: ``megatron/core/optimizer/__init__.py`` and ``distrib_optimizer.py`` run, at
import time,

    try:    from transformer_engine.pytorch.optimizers import FusedAdam as Adam
    except ImportError:
        try:    from apex.optimizers import FusedAdam as Adam
        except ImportError: torch.optim.AdamW (Adam in distrib_optimizer)

:func:`install` puts a module under the real import path into ``sys.modules`` so that
those imports find it; it must run **before megatron-core is imported** in the process
(it refuses otherwise, since megatron would already have bound ``torch.optim.AdamW``).

The classes copy the real constructors' signatures and the attributes they set
(``defaults`` with ``bias_correction``; ``adam_w_mode``, ``set_grad_none``,
``capturable``, ``master_weights``; TE's ``exp_avg_dtype``, ``exp_avg_sq_dtype``,
``master_weight_dtype``, ``use_decoupled_grad``, ``store_param_remainders``), from
NVIDIA/apex ``apex/optimizers/fused_adam.py`` and NVIDIA/TransformerEngine
``transformer_engine/pytorch/optimizers/fused_adam.py``.  They are deliberately *not*
subclasses of ``torch.optim.AdamW`` (neither real one is), so a test that passes proves
the MGUP integration accepts the fused class itself.  ``step`` is plain Adam(W) with
apex's bookkeeping (one ``step`` counter per param group), enough for megatron-core to
run them unreplaced.  Only what megatron's import lines name exists: other
``apex.*`` / ``transformer_engine.*`` imports (``multi_tensor_apply``, TE layers) still
fail with ImportError, as megatron's fallbacks expect.
"""
from __future__ import annotations

import sys
import types

import torch

APEX_MODULE = "apex.optimizers"
TE_MODULE = "transformer_engine.pytorch.optimizers"


def _adam_step(opt, closure=None):
    """Adam(W) with one step counter per param group (apex / TE keep ``group['step']``)."""
    loss = closure() if closure is not None else None
    with torch.no_grad():
        for group in opt.param_groups:
            group["step"] = group.get("step", 0) + 1
            t = group["step"]
            beta1, beta2 = group["betas"]
            bc1 = 1 - beta1 ** t if group["bias_correction"] else 1.0
            bc2 = 1 - beta2 ** t if group["bias_correction"] else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = opt.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                if not opt.adam_w_mode:
                    g = g + group["weight_decay"] * p.float()
                st["exp_avg"].lerp_(g, 1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                u = (st["exp_avg"] / bc1) / ((st["exp_avg_sq"] / bc2).sqrt() + group["eps"])
                if opt.adam_w_mode:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(u.to(p.dtype), alpha=-group["lr"])
    return loss


class ApexFusedAdam(torch.optim.Optimizer):
    """apex.optimizers.FusedAdam's constructor and attributes."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 adam_w_mode=True, weight_decay=0., amsgrad=False, set_grad_none=True,
                 capturable=False, master_weights=False):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        lr = torch.tensor(lr, dtype=torch.float32) if capturable else lr
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.set_grad_none = set_grad_none
        self.capturable = capturable
        self.master_weights = master_weights

    step = _adam_step


class TEFusedAdam(torch.optim.Optimizer):
    """transformer_engine.pytorch.optimizers.FusedAdam's constructor (TE 2.x)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 bias_correction=True, adam_w_mode=True, capturable=False, master_weights=False,
                 master_weight_dtype=torch.float32, exp_avg_dtype=torch.float32,
                 exp_avg_sq_dtype=torch.float32, use_decoupled_grad=False, store_param_remainders=False,
                 set_grad_none=None):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        lr = torch.tensor(lr, dtype=torch.float32) if capturable else lr
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.capturable = capturable
        self.master_weights = master_weights
        self.master_weight_dtype = master_weight_dtype
        self.exp_avg_dtype = exp_avg_dtype
        self.exp_avg_sq_dtype = exp_avg_sq_dtype
        self.use_decoupled_grad = use_decoupled_grad
        self.store_param_remainders = (
            store_param_remainders and master_weights and master_weight_dtype == torch.float32
        )
        self.set_grad_none = set_grad_none

    step = _adam_step


class _FusedSGD(torch.optim.SGD):
    """megatron imports FusedSGD on the same line as FusedAdam; plain SGD stands in."""


def install(which: str, allow_after_megatron: bool = False) -> type:
    """Register the ``which`` ("apex" | "te") stand-in in ``sys.modules``; returns its
    FusedAdam class.  Must run before anything imports megatron-core, unless the caller
    binds megatron's names itself (``allow_after_megatron``, the TE case in
    tests/_megatron_workers.py)."""
    if which not in ("apex", "te"):
        raise ValueError(f"which: {which!r}; allowed: 'apex', 'te'")
    bound = sorted(m for m in sys.modules if m == "megatron.core" or m.startswith("megatron.core."))
    if bound and not allow_after_megatron:
        raise RuntimeError(f"install({which!r}) after megatron-core was imported ({bound[:3]}...): too late")
    dotted = APEX_MODULE if which == "apex" else TE_MODULE
    cls = ApexFusedAdam if which == "apex" else TEFusedAdam
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            mod = types.ModuleType(name, "test stand-in (tests/fused_adam_standins.py)")
            mod.__path__ = []  # a package with nothing else in it: other submodules fail to import
            sys.modules[name] = mod
            if i > 1:
                setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], mod)
    leaf = sys.modules[dotted]
    cls = type("FusedAdam", (cls,), {"__module__": dotted + ".fused_adam", "__qualname__": "FusedAdam"})
    leaf.FusedAdam = cls
    leaf.FusedSGD = type("FusedSGD", (_FusedSGD,), {"__module__": dotted + ".fused_sgd"})
    return cls
