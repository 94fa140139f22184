"""CPU backend: the torch-ops phases, or with ``compile=True`` each phase fused by Inductor
into one pass per piece; and, for units held whole on this rank, the K-th key by
introselect (numpy's ``partition``, O(N)) instead of the radix passes.  Host reads are
free on a CPU, so ties are resolved with ``nonzero``.

Fused passes, bytes per element for fp32 AdamW (fused AdamW itself: 28):
score 24 (read g, m, v; write m, v, key), apply 20 (read m, v, key, p; write p),
plus introselect on a copy of the keys (~3 reads and writes of 4 bytes).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .base import KEY_NAN
from .torch_ops import TorchOps, step_sizes

__all__ = ["CPU"]


class CPU(TorchOps):
    name = "cpu"

    def __init__(self, foreach: bool = True, compile: bool = False):
        super().__init__(foreach)
        self.compile = compile

    @staticmethod
    def _hist(idx, size):
        return torch.bincount(idx, minlength=size)[:size]  # fastest here, and reading back is free

    # -- phase 2: introselect for whole units --------------------------------------------
    def select_local(self, chunk, keys) -> Optional[torch.Tensor]:
        units = [p for p in chunk.pieces if p.unit >= 0]
        if torch.compiler.is_compiling() or len(units) != chunk.n_units or chunk.n_units == 0:
            # numpy cannot be traced: under torch.compile(opt.step) the radix select (torch ops) runs
            return None  # a unit in several pieces (global scope): radix select
        ity = keys.dtype
        t = np.full(chunk.n_units, torch.iinfo(ity).max, dtype=np.int64)
        for pc in units:
            k, n = chunk.k[pc.unit], pc.length
            if k == 0:
                continue
            seg = keys[pc.offset: pc.offset + n]
            a = seg.numpy().copy()  # transient: the keys themselves are read again in phase 3
            a.partition(n - k)  # the k largest now sit at and after index n-k, the k-th largest at it
            tk = a[n - k]
            t[pc.unit] = tk
            if n > k and a[: n - k].max() == tk:  # more keys equal t than the k-th place needs
                s = seg.numpy()
                need = k - int((s > tk).sum())
                ties = np.flatnonzero(s == tk)
                s[ties[need:]] -= 1  # the later ties drop below t: lower index wins
        return torch.from_numpy(t).to(ity)

    def _phi(self, hp, chunk, keys, t_key, denom, dtype):
        """phi piece by piece (host reads are free here): no per-element unit ids."""
        phi = torch.empty(chunk.numel, dtype=dtype)
        t = t_key.tolist()
        d = denom.tolist() if denom is not None else None
        for pc in chunk.pieces:
            ph = phi[pc.offset: pc.offset + pc.length]
            ph.fill_(hp["gamma"])
            if pc.unit < 0:
                continue
            ph.masked_fill_(keys[pc.offset: pc.offset + pc.length] >= t[pc.unit], hp["alpha"])
            if d is not None:
                ph.div_(d[pc.unit])
        return phi

    # -- fused phases (compile=True) -------------------------------------------------------
    def _fused(self, rule) -> bool:
        return self.compile and rule.name in ("adamw", "lion")

    def score(self, rule, hp, chunk, bufs, scratch):
        if not self._fused(rule) or not chunk.pieces:
            return super().score(rule, hp, chunk, bufs, scratch)
        keys = scratch.view(torch.int64 if scratch.dtype == torch.float64 else torch.int32)
        fn = _kernel(rule.name, "score", hp)
        for pc in chunk.pieces:
            sl = slice(pc.start, pc.start + pc.length)
            fn(bufs.grads[pc.buf][sl], *(bufs.states[n][pc.buf][sl] for n in rule.state),
               keys[pc.offset: pc.offset + pc.length], *_consts(rule, hp, bufs, pc))
        return None

    def apply(self, rule, hp, chunk, bufs, scratch, t_key, denom):
        if not self._fused(rule) or not chunk.pieces:
            return super().apply(rule, hp, chunk, bufs, scratch, t_key, denom)
        keys = scratch.view(torch.int64 if scratch.dtype == torch.float64 else torch.int32)
        fn = _kernel(rule.name, "apply", hp)
        steps = step_sizes(hp, {"bc1": [bufs.bc1[p.buf] for p in chunk.pieces], "bc2": [bufs.bc2[p.buf] for p in chunk.pieces]}, chunk)
        big = torch.iinfo(keys.dtype).max
        for pc, lr_step in zip(chunk.pieces, steps):
            sl = slice(pc.start, pc.start + pc.length)
            t = t_key[pc.unit] if pc.unit >= 0 else torch.tensor(big, dtype=keys.dtype)
            d = denom[pc.unit] if (denom is not None and pc.unit >= 0) else _ONE
            fn(bufs.params[pc.buf][sl], bufs.grads[pc.buf][sl], *(bufs.states[n][pc.buf][sl] for n in rule.state),
               keys[pc.offset: pc.offset + pc.length], t, d, _f64(lr_step), *_consts(rule, hp, bufs, pc))

    def cautious(self, rule, hp, chunk, bufs, t_const):
        if not self._fused(rule):
            return False
        fn = _kernel(rule.name, "cautious", hp)
        steps = step_sizes(hp, {"bc1": [bufs.bc1[p.buf] for p in chunk.pieces], "bc2": [bufs.bc2[p.buf] for p in chunk.pieces]}, chunk)
        for pc, lr_step in zip(chunk.pieces, steps):
            sl = slice(pc.start, pc.start + pc.length)
            fn(bufs.params[pc.buf][sl], bufs.grads[pc.buf][sl], *(bufs.states[n][pc.buf][sl] for n in rule.state),
               _f64(lr_step), *_consts(rule, hp, bufs, pc))
        return True


_ONE = torch.tensor(1.0, dtype=torch.float64)


def _f64(x) -> torch.Tensor:
    """A 0-d float64 scalar: a changing value never recompiles a kernel, and fp64 params see
    the exact value (a 0-d tensor never promotes a dimensioned fp32/bf16 operand)."""
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)


def _consts(rule, hp, bufs, pc):
    b1, b2 = hp["betas"]
    lr = hp["lr"]
    common = (_f64(b1), _f64(b2), _f64(hp["alpha"]), _f64(hp["gamma"]), _f64(1 - lr * hp["weight_decay"]))
    if rule.name == "adamw":
        return common + (_f64(bufs.bc1[pc.buf]), _f64(bufs.bc2[pc.buf]), _f64(hp["eps"]))
    return common


# ----------------------------------------------------------------------- the kernels
# The formulas of mgup_dist.rules, written as single expressions so that Inductor fuses each
# phase into one loop.  ``authors``/``maximize``/cautious ``>= 0`` are compile-time variants.

def _key(s: torch.Tensor, ity: torch.dtype) -> torch.Tensor:
    """kernels.base.keys_ as an expression."""
    nbits = 64 if ity == torch.int64 else 32
    bits = (s + 0.0).view(ity)
    key = bits ^ ((bits >> (nbits - 1)) & torch.iinfo(ity).max)
    return torch.where(s != s, torch.full_like(key, KEY_NAN(ity)), key)


def _sign(c):
    """sign that keeps NaN (see rules._lion_u)."""
    return torch.where(c != c, c, torch.sign(c))


def _adamw_u(m, v, bc1, bc2, eps, authors):
    if authors:
        return m / (torch.sqrt(v) + eps)
    return m / (torch.sqrt(v / bc2) + eps) / bc1


def _make(rule: str, phase: str, authors: bool, maximize: bool):
    sgn = -1.0 if maximize else 1.0

    if rule == "adamw":
        def score(g, m, v, key, b1, b2, alpha, gamma, decay, bc1, bc2, eps):
            g = g * sgn
            m2 = m * b1 + g * (1 - b1)
            v2 = v * b2 + g * g * (1 - b2)
            fdt = torch.float64 if key.dtype == torch.int64 else torch.float32
            s = (_adamw_u(m2, v2, bc1, bc2, eps, authors) * g).to(fdt)
            m.copy_(m2)
            v.copy_(v2)
            key.copy_(_key(s, key.dtype))

        def apply(p, g, m, v, key, t, d, lr_step, b1, b2, alpha, gamma, decay, bc1, bc2, eps):
            u = _adamw_u(m, v, bc1, bc2, eps, authors)
            phi = torch.where(key >= t, alpha, gamma) / d
            p.copy_(((p - (u * phi) * lr_step) * decay) if authors else (p * decay - (u * phi) * lr_step))

        def cautious(p, g, m, v, lr_step, b1, b2, alpha, gamma, decay, bc1, bc2, eps):
            g = g * sgn
            m2 = m * b1 + g * (1 - b1)
            v2 = v * b2 + g * g * (1 - b2)
            u = _adamw_u(m2, v2, bc1, bc2, eps, authors)
            s = u * g
            phi = torch.where((s >= 0) if authors else (s > 0), alpha, gamma)
            m.copy_(m2)
            v.copy_(v2)
            p.copy_(((p - (u * phi) * lr_step) * decay) if authors else (p * decay - (u * phi) * lr_step))
    else:  # lion: u from the old momentum, the momentum moves after the step
        def score(g, m, key, b1, b2, alpha, gamma, decay):
            g = g * sgn
            fdt = torch.float64 if key.dtype == torch.int64 else torch.float32
            s = (_sign(m * b1 + g * (1 - b1)) * g).to(fdt)
            key.copy_(_key(s, key.dtype))

        def apply(p, g, m, key, t, d, lr_step, b1, b2, alpha, gamma, decay):
            g = g * sgn
            u = _sign(m * b1 + g * (1 - b1))
            phi = torch.where(key >= t, alpha, gamma) / d
            p.copy_(p * decay - (u * phi) * lr_step)
            m.copy_(m * b2 + g * (1 - b2))

        def cautious(p, g, m, lr_step, b1, b2, alpha, gamma, decay):
            g = g * sgn
            u = _sign(m * b1 + g * (1 - b1))
            s = u * g
            phi = torch.where((s >= 0) if authors else (s > 0), alpha, gamma)
            p.copy_(p * decay - (u * phi) * lr_step)
            m.copy_(m * b2 + g * (1 - b2))

    return {"score": score, "apply": apply, "cautious": cautious}[phase]


_COMPILED = {}


def _kernel(rule: str, phase: str, hp):
    """The compiled kernel (once per process and variant; cached on disk by Inductor when
    TORCHINDUCTOR_CACHE_DIR is set).  ``dynamic=True``: one graph for all sizes."""
    key = (rule, phase, hp.get("convention") == "authors", bool(hp.get("maximize")))
    fn = _COMPILED.get(key)
    if fn is None:
        fn = torch.compile(_make(rule, phase, *key[2:]), dynamic=True, fullgraph=True)
        _COMPILED[key] = fn
    return fn
