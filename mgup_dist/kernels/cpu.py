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

from .base import KEY_NAN, radix_widths
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

    # -- phase 2 for split tensors: the radix passes piece by piece, on candidates --------
    def histogram(self, chunk, keys, prefix, p):
        """As TorchOps.histogram, per piece with ``bincount``; pass p > 0 only looks at the keys
        that matched the previous passes (kept from pass to pass: a few percent of them)."""
        nbits = torch.iinfo(keys.dtype).bits
        widths = radix_widths(nbits)
        nb = 1 << widths[p]
        shift = nbits - sum(widths[: p + 1])
        hist = torch.zeros(chunk.n_units, nb, dtype=torch.int64)
        pre = prefix.tolist() if prefix is not None else None
        cand = chunk.cache.setdefault("cpu_candidates", {})
        for pc in chunk.pieces:
            if pc.unit < 0:
                continue
            if p == 0:
                k = keys[pc.offset: pc.offset + pc.length]
                hist[pc.unit] += torch.bincount((k >> shift).add_(nb // 2), minlength=nb)
                cand[pc.offset] = k
                continue
            c = cand[pc.offset]
            c = c[(c >> (shift + widths[p])) == pre[pc.unit]]
            cand[pc.offset] = c
            hist[pc.unit] += torch.bincount((c >> shift) & (nb - 1), minlength=nb)
        if p == len(widths) - 1:
            cand.clear()
        return hist

    def tie_counts(self, chunk, keys, t_key):
        t = t_key.tolist()
        return torch.tensor(
            [int((keys[pc.offset: pc.offset + pc.length] == t[pc.unit]).sum()) if pc.unit >= 0 else 0 for pc in chunk.pieces],
            dtype=torch.int64,
        )

    def resolve_ties(self, chunk, keys, t_key, take):
        t, take = t_key.tolist(), take.tolist()
        for pc, n in zip(chunk.pieces, take):
            if pc.unit < 0:
                continue
            k = keys[pc.offset: pc.offset + pc.length]
            ties = torch.nonzero(k == t[pc.unit]).flatten()
            if ties.numel() > n:
                k[ties[n:]] -= 1  # the later ties drop below t: lower index wins

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
        for pc in chunk.pieces:
            sl = slice(pc.start, pc.start + pc.length)
            fn = _kernel(rule.name, "score", hp, bufs.grads[pc.buf], *(bufs.states[n][pc.buf] for n in rule.state), keys)
            fn(bufs.grads[pc.buf][sl], *(bufs.states[n][pc.buf][sl] for n in rule.state),
               keys[pc.offset: pc.offset + pc.length], *_consts(rule, hp, bufs, pc))
        return None

    def apply(self, rule, hp, chunk, bufs, scratch, t_key, denom):
        if not self._fused(rule) or not chunk.pieces:
            return super().apply(rule, hp, chunk, bufs, scratch, t_key, denom)
        keys = scratch.view(torch.int64 if scratch.dtype == torch.float64 else torch.int32)
        steps = step_sizes(hp, self._piece_hp(hp, chunk, bufs), chunk)
        big = torch.iinfo(keys.dtype).max
        for pc, lr_step in zip(chunk.pieces, steps):
            sl = slice(pc.start, pc.start + pc.length)
            fn = _kernel(rule.name, "apply", hp, bufs.params[pc.buf], bufs.grads[pc.buf],
                         *(bufs.states[n][pc.buf] for n in rule.state), keys)
            t = t_key[pc.unit] if pc.unit >= 0 else torch.tensor(big, dtype=keys.dtype)
            d = denom[pc.unit] if (denom is not None and pc.unit >= 0) else _ONE
            fn(bufs.params[pc.buf][sl], bufs.grads[pc.buf][sl], *(bufs.states[n][pc.buf][sl] for n in rule.state),
               keys[pc.offset: pc.offset + pc.length], t, d, _f64(lr_step), *_consts(rule, hp, bufs, pc))

    def cautious(self, rule, hp, chunk, bufs, t_const):
        if not self._fused(rule):
            return False
        steps = step_sizes(hp, self._piece_hp(hp, chunk, bufs), chunk)
        for pc, lr_step in zip(chunk.pieces, steps):
            sl = slice(pc.start, pc.start + pc.length)
            fn = _kernel(rule.name, "cautious", hp, bufs.params[pc.buf], bufs.grads[pc.buf],
                         *(bufs.states[n][pc.buf] for n in rule.state))
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


def _stepped(p, u, phi, lr_step, decay):
    """p *= 1 - lr*wd; p -= lr_eff * (phi * u): decoupled decay first, in both conventions."""
    return p * decay - (u * phi) * lr_step


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
            p.copy_(_stepped(p, u, phi, lr_step, decay))

        def cautious(p, g, m, v, lr_step, b1, b2, alpha, gamma, decay, bc1, bc2, eps):
            g = g * sgn
            m2 = m * b1 + g * (1 - b1)
            v2 = v * b2 + g * g * (1 - b2)
            u = _adamw_u(m2, v2, bc1, bc2, eps, authors)
            s = u * g
            phi = torch.where((s >= 0) if authors else (s > 0), alpha, gamma)
            m.copy_(m2)
            v.copy_(v2)
            p.copy_(_stepped(p, u, phi, lr_step, decay))
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
            p.copy_(_stepped(p, u, phi, lr_step, decay))
            m.copy_(m * b2 + g * (1 - b2))

        def cautious(p, g, m, lr_step, b1, b2, alpha, gamma, decay):
            g = g * sgn
            u = _sign(m * b1 + g * (1 - b1))
            s = u * g
            phi = torch.where((s >= 0) if authors else (s > 0), alpha, gamma)
            p.copy_(_stepped(p, u, phi, lr_step, decay))
            m.copy_(m * b2 + g * (1 - b2))

    return {"score": score, "apply": apply, "cautious": cautious}[phase]


_COMPILED = {}


def _kernel(rule: str, phase: str, hp, *tensors):
    """The compiled kernel (once per process, variant and dtypes of its tensors; cached on
    disk by Inductor when TORCHINDUCTOR_CACHE_DIR is set).  ``dynamic=True``: one graph for
    all sizes; one compiled function per dtype combination, so that mixed fp32/bf16/fp16
    params never reach dynamo's recompile limit."""
    key = (rule, phase, hp.get("convention") == "authors", bool(hp.get("maximize")), tuple(t.dtype for t in tensors))
    fn = _COMPILED.get(key)
    if fn is None:
        body = _make(rule, phase, *key[2:4])
        # dynamo counts recompilations per code object: each variant gets its own copy
        body.__code__ = body.__code__.replace(co_name=f"mgup_{rule}_{phase}_{len(_COMPILED)}")
        fn = torch.compile(body, dynamic=True, fullgraph=True)
        _COMPILED[key] = fn
    return fn
