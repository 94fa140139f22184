"""CPU backend.  Everything the CPU runs is defined here (the device-agnostic ``TorchOps`` is
only its base class for the pieces it does not override).

The default step (``compile=False``) of AdamW and Lion rules on float32 buffers: the C++
kernels of ``cpu_ext`` (built at first use), on torch's own intra-op threads: phase 1 one
pass (fp32 AdamW: read g, m, v, write m, v, key: 24 bytes an element), phase 2 one counting
pass over the keys of each large unit (4 bytes; below), phase 3 one pass (read p, m, v, key,
write p: 20 bytes; Lion also moves its momentum there), cautious one pass (28 bytes, as
fused AdamW).  Every rounding as the eager torch ops below make it: states, keys and
parameters equal theirs bit for bit.  Where the extension cannot be built (no compiler),
other dtypes, Muon, and under ``torch.compile(opt.step)``: the paths below.

Phase 1 and 3, eager (``compile=False``, the default): the rules' torch ops over *blocks*:
pieces of at most ``BLOCK_ELEMS`` elements (large tensors are cut, small ones batched into one
foreach call), so that every temporary is block-sized and the several passes of a block
run in the cache instead of over the whole model; nothing full-size is allocated in a step.

Phase 1 and 3 with ``compile=True``: one Inductor kernel per piece and phase, one pass each
(fp32 AdamW, bytes per element: score 24 = read g, m, v, write m, v, key; apply 20 = read m,
v, key, p, write p; cautious 28, as fused AdamW).  The scalars reach the kernels as one
small tensor in the parameter's compute dtype (fp32 for fp32/bf16/fp16 params, fp64 for
fp64): fp32 math stays fp32 (a float64 0-d operand would promote ``where(c, alpha, gamma)``
to a full-size float64 tensor), and a changing lr or bias correction is data, not a new
graph.

Cautious mode (no normalisation): one pass per block or piece, no key scratch at all.

Phase 2 for units held whole on this rank (``select_local``): the exact K-th key without a
full selection on a copy of every tensor (Floyd-Rivest style): sorted keys of a fixed
sample of the unit give a bracket [lo, hi] around the K-th key's rank (+-4 standard
deviations of the sample rank); one counting pass over the keys gives ``#(key > hi)`` and
the few keys inside the bracket; the K-th key is the right one among those (numpy's
``partition`` on ~3 % of the keys).  A bracket that misses (rare: a sample that is not
representative) falls back to ``partition`` on a copy: the result is exact either way, and
deterministic (the sample positions depend on N only).  Ties at the K-th key go to the
lower index (the losing ties are lowered by one).  With the extension this runs in C++ on
torch's threads (int32 and int64 keys alike); without it, in numpy on the calling thread
(never a Python thread pool on top of torch's OpenMP threads: the two would fight for the
cores).  Units split over ranks take the same bracket with sums over the ranks
(``cpu_split``: a sample, the counts and the candidates' digit histograms, the ties); where
a bracket misses, the radix select of ``mgup_dist.selection`` over the per-piece
``bincount`` primitives below.

Traced by ``torch.compile(opt.step)``, every phase runs the torch-ops code of the base
class: nothing is read back to the host (a value read back is a guard that changes with
the data: a recompile per step), and numpy cannot be traced.
"""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch

from ..radix import KEY_NAN, radix_widths
from . import cpu_ext
from .bracket import COUNT_BLOCK, SAMPLE, _lower_ties, _sample_idx  # noqa: F401  (the bracket's pieces)
from .torch_ops import TorchOps

__all__ = ["CPU", "BLOCK_ELEMS"]

#: elements per block of the eager elementwise work: a block's g, m, v, scratch and
#: temporaries (~24 MB in fp32) stay in a 32 MB L3, and 1M-element ops amortise the
#: per-op cost of eager torch (~5 us) to nothing.
BLOCK_ELEMS = 1 << 20
#: units up to this size are selected by ``partition`` on a copy (the bracket's sample
#: would cost as much).
SMALL_UNIT = 1 << 16


def _ity(dtype: torch.dtype) -> torch.dtype:
    return torch.int64 if dtype == torch.float64 else torch.int32


def _sdt(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype of the scalars of a kernel over tensors of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _num(x) -> float:
    return float(x) if isinstance(x, torch.Tensor) else float(x)


class CPU(TorchOps):
    name = "cpu"

    def __init__(self, foreach: bool = True, compile: bool = False):
        super().__init__(foreach)
        self.compile = compile
        self._tmp = {}  # block-sized temporaries of this step, by (name, dtype)
        self._pending = {}  # id(chunk) -> what the key-free top-K select needs from its score

    # ------------------------------------------------------------------ helpers
    def _buf(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A block-sized temporary reused within the step (the backend lives one step)."""
        b = self._tmp.get((name, dtype))
        if b is None or b.numel() < n:
            b = torch.empty(n, dtype=dtype)
            self._tmp[(name, dtype)] = b
        return b[:n]

    @staticmethod
    def _blocks(chunk) -> List[List[tuple]]:
        """The chunk's pieces as blocks of <= BLOCK_ELEMS elements: each block a list of
        (piece index, start, stop) ranges (relative to the piece), consecutive in the
        scratch.  Large pieces are cut, small ones share a block."""
        key = ("cpu_blocks", BLOCK_ELEMS)
        hit = chunk.cache.get(key)
        if hit is not None:
            return hit
        out, cur, used = [], [], 0
        for i, pc in enumerate(chunk.pieces):
            a = 0
            while True:
                if used >= BLOCK_ELEMS:
                    out.append(cur)
                    cur, used = [], 0
                take = min(pc.length - a, BLOCK_ELEMS - used)
                cur.append((i, a, a + take))
                used += take
                a += take
                if a >= pc.length:
                    break
        if cur:
            out.append(cur)
        chunk.cache[key] = out
        return out

    @staticmethod
    def _block_views(chunk, bufs, blk, scratch=None):
        g, p, out, st = [], [], [], {name: [] for name in bufs.states}
        bc1, bc2 = [], []
        for i, a, b in blk:
            pc = chunk.pieces[i]
            sl = slice(pc.start + a, pc.start + b)
            g.append(bufs.grads[pc.buf][sl])
            p.append(bufs.params[pc.buf][sl])
            for name, lst in bufs.states.items():
                st[name].append(lst[pc.buf][sl])
            if scratch is not None:
                out.append(scratch[pc.offset + a: pc.offset + b])
            bc1.append(bufs.bc1[pc.buf])
            bc2.append(bufs.bc2[pc.buf])
        return g, st, p, out, bc1, bc2

    @staticmethod
    def _span(chunk, blk):
        """The block's range of the chunk scratch (its ranges are consecutive there)."""
        i0, a0, _ = blk[0]
        i1, _, b1 = blk[-1]
        return chunk.pieces[i0].offset + a0, chunk.pieces[i1].offset + b1

    def _keys(self, x: torch.Tensor) -> None:
        """``kernels.base.keys_`` in place on the float block ``x`` with block temporaries:
        sign-magnitude bits -> two's-complement order (flip the magnitude of negatives),
        -0.0 + 0.0 = +0.0, every NaN -> KEY_NAN."""
        n = x.numel()
        if n == 0:
            return
        ity = _ity(x.dtype)
        nbits = torch.iinfo(ity).bits
        nan = torch.ne(x, x, out=self._buf("nan", n, torch.bool))
        x.add_(0.0)
        bits = x.view(ity)
        flip = torch.bitwise_right_shift(bits, nbits - 1, out=self._buf("flip", n, ity))
        flip.bitwise_and_(torch.iinfo(ity).max)
        bits.bitwise_xor_(flip)
        bits.masked_fill_(nan, KEY_NAN(ity))

    def _fused(self, rule) -> bool:
        return self.compile and rule.name in ("adamw", "lion")

    @staticmethod
    def _keyless(hp, chunk) -> bool:
        """Top-K whose units are each one piece held on this rank (scope tensor or shard, not
        split): the C++ kernels select without a key buffer.  Decided from the plan and the
        hyperparameters (identical on every rank)."""
        if hp.get("mode") != "topk" or hp.get("scope") not in ("tensor", "shard") or chunk.split:
            return False
        units = [pc.unit for pc in chunk.pieces if pc.unit >= 0]
        return len(units) == chunk.n_units == len(set(units))

    def _ext(self, rule, chunk, bufs):
        """The C++ kernels when they serve this chunk (the default eager step of AdamW and
        Lion over float32 buffers), else None."""
        if self.compile or rule.name not in _RULE or torch.compiler.is_compiling():
            return None
        for pc in chunk.pieces:
            for t in (bufs.params[pc.buf], bufs.grads[pc.buf], *(bufs.states[n][pc.buf] for n in rule.state)):
                if t is None or t.dtype != torch.float32 or not t.is_contiguous():
                    return None
        return cpu_ext.load()

    # ------------------------------------------------------------------ phase 1
    def score(self, rule, hp, chunk, bufs, scratch):
        if torch.compiler.is_compiling():
            # traced by torch.compile(opt.step): aot_autograd refuses the block path's in-place
            # ops on the scratch's integer view; the torch-ops phases trace
            return super().score(rule, hp, chunk, bufs, scratch)
        if not chunk.pieces:
            return None
        keys = scratch.view(_ity(scratch.dtype))
        ext = self._ext(rule, chunk, bufs)
        if ext is not None and self._keyless(hp, chunk):
            # top-K of units held whole: no keys stored (see cpu_ext/mgup_cpu.cpp); select and
            # apply recompute them
            pcs = chunk.pieces
            g, st = _piece_views(pcs, bufs.grads), [_piece_views(pcs, bufs.states[n]) for n in rule.state]
            c = _ext_consts(hp, pcs, bufs)
            args = (g, st[0], st[1] if len(st) > 1 else [], c)
            hist = ext.topk_score(_RULE[rule.name], *args, [pc.length > SMALL_UNIT for pc in pcs],
                                  bool(hp.get("maximize")), hp.get("convention") == "authors")
            self._pending[id(chunk)] = (rule, hp, args, hist)
            cpu_ext.calls["topk_score"] += 1
            return None
        if ext is not None:
            pcs = chunk.pieces
            g, st = _piece_views(pcs, bufs.grads), [_piece_views(pcs, bufs.states[n]) for n in rule.state]
            ext.score(_RULE[rule.name], g, st[0], st[1] if len(st) > 1 else [], keys, [pc.offset for pc in pcs],
                      _ext_consts(hp, pcs, bufs), bool(hp.get("maximize")), hp.get("convention") == "authors")
            cpu_ext.calls["score"] += 1
            return None
        if self._fused(rule):
            for pc in chunk.pieces:
                sl = slice(pc.start, pc.start + pc.length)
                fn = _kernel(rule.name, "score", hp, bufs.grads[pc.buf], *(bufs.states[n][pc.buf] for n in rule.state), keys)
                fn(bufs.grads[pc.buf][sl], *(bufs.states[n][pc.buf][sl] for n in rule.state),
                   keys[pc.offset: pc.offset + pc.length], _consts(rule, hp, bufs, pc, bufs.grads[pc.buf].dtype))
            return None
        for blk in self._blocks(chunk):
            g, st, _, out, bc1, bc2 = self._block_views(chunk, bufs, blk, scratch)
            rule.score(g, st, dict(hp, bc1=bc1, bc2=bc2), out)
            a, b = self._span(chunk, blk)
            self._keys(scratch[a:b])
        return None

    # ------------------------------------------------------------------ phase 2
    def select(self, chunk, keys, hist0, reduce):
        hit = self._pending.pop(id(chunk), None)
        if hit is not None:  # scored by the C++ kernels without keys: their select
            rule, hp, args, hist = hit
            ks = [chunk.k[pc.unit] if pc.unit >= 0 else 0 for pc in chunk.pieces]
            tc = cpu_ext.load().topk_select(_RULE[rule.name], *args, hist, ks, SMALL_UNIT, bool(hp.get("maximize")),
                                            hp.get("convention") == "authors")
            cpu_ext.calls["topk_select"] += 1
            return _KthAndCut(tc, args)
        if torch.compiler.is_compiling():
            # traced by torch.compile(opt.step): the torch-ops selection, which reads nothing
            # back to the host (numpy, ``tolist`` and ``nonzero`` below would break the graph,
            # and a value read back is a guard that changes with the data)
            return TorchOps._select(self, chunk, keys, reduce) if keys.dtype == torch.int32 and hist0 is None else None
        from . import cpu_split

        if cpu_split.bracket_applies(chunk):
            # tensors split over ranks: the collective bracket select; None (the bracket
            # missed, known alike on every rank) runs the radix select below
            return cpu_split.bracket_select(chunk, keys, reduce)
        return None

    def select_local(self, chunk, keys) -> Optional[torch.Tensor]:
        units = [p for p in chunk.pieces if p.unit >= 0]
        if torch.compiler.is_compiling() or len(units) != chunk.n_units or chunk.n_units == 0:
            # numpy cannot be traced: under torch.compile(opt.step) the radix select (torch ops) runs;
            # a unit in several pieces (global scope): radix select
            return None
        ity = keys.dtype
        ext = cpu_ext.load() if keys.is_contiguous() else None
        if ext is not None:
            ks = [chunk.k[pc.unit] for pc in units]
            samples = [torch.from_numpy(_sample_idx(pc.length)) for pc, k in zip(units, ks)
                       if 0 < k < pc.length and pc.length > SMALL_UNIT]
            tu = ext.select(keys, [pc.offset for pc in units], [pc.length for pc in units], ks, samples, SMALL_UNIT)
            cpu_ext.calls["select"] += 1
            t = torch.full((chunk.n_units,), torch.iinfo(ity).max, dtype=torch.int64)
            t[torch.tensor([pc.unit for pc in units], dtype=torch.int64)] = tu
            return t.to(ity)
        t = np.full(chunk.n_units, torch.iinfo(ity).max, dtype=np.int64)
        arr = keys.numpy()
        jobs = [(pc.unit, arr[pc.offset: pc.offset + pc.length], chunk.k[pc.unit]) for pc in units]
        for unit, val in _select_units(jobs):
            t[unit] = val
        return torch.from_numpy(t).to(ity)

    # -- phase 2 for split tensors: the radix passes piece by piece, on candidates --------
    def histogram(self, chunk, keys, prefix, p):
        """As TorchOps.histogram, per piece with ``bincount``; pass p > 0 only looks at the keys
        that matched the previous passes (kept from pass to pass: a few percent of them)."""
        if torch.compiler.is_compiling():  # see select
            return super().histogram(chunk, keys, prefix, p)
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
                for a in range(0, pc.length, BLOCK_ELEMS):  # block-sized digit temporaries
                    d = torch.bitwise_right_shift(k[a: a + BLOCK_ELEMS], shift).add_(nb // 2)
                    hist[pc.unit] += torch.bincount(d, minlength=nb)
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
        if torch.compiler.is_compiling():  # see select
            return super().tie_counts(chunk, keys, t_key)
        t = t_key.tolist()
        return torch.tensor(
            [int((keys[pc.offset: pc.offset + pc.length] == t[pc.unit]).sum()) if pc.unit >= 0 else 0 for pc in chunk.pieces],
            dtype=torch.int64,
        )

    def resolve_ties(self, chunk, keys, t_key, take):
        if torch.compiler.is_compiling():  # see select
            return super().resolve_ties(chunk, keys, t_key, take)
        t, take = t_key.tolist(), take.tolist()
        for pc, n in zip(chunk.pieces, take):
            if pc.unit < 0:
                continue
            k = keys[pc.offset: pc.offset + pc.length]
            ties = torch.nonzero(k == t[pc.unit]).flatten()
            if ties.numel() > n:
                k[ties[n:]] -= 1  # the later ties drop below t: lower index wins

    # ------------------------------------------------------------------ phase 3
    def apply(self, rule, hp, chunk, bufs, scratch, t_key, denom):
        if torch.compiler.is_compiling():  # see score
            return super().apply(rule, hp, chunk, bufs, scratch, t_key, denom)
        if not chunk.pieces:
            if rule.matrix:
                hp["matrix_hook"](chunk, [])  # the whole-matrix assembly is a collective: enter it
            return
        if isinstance(t_key, _KthAndCut):
            pcs = chunk.pieces
            c = t_key.args[3]
            if denom is not None:
                c = _ext_consts(hp, pcs, bufs, denom.tolist())
            cpu_ext.load().topk_apply(_RULE[rule.name], _piece_views(pcs, bufs.params), *t_key.args[:3], c, t_key.tc,
                                      bool(hp.get("maximize")), hp.get("convention") == "authors")
            cpu_ext.calls["topk_apply"] += 1
            return
        keys = scratch.view(_ity(scratch.dtype))
        t = t_key.tolist()
        d = denom.tolist() if denom is not None else None
        big = torch.iinfo(keys.dtype).max
        ext = self._ext(rule, chunk, bufs)
        if ext is not None:
            pcs = chunk.pieces
            p, g = _piece_views(pcs, bufs.params), _piece_views(pcs, bufs.grads)
            st = [_piece_views(pcs, bufs.states[n]) for n in rule.state]
            tp = torch.tensor([t[pc.unit] if pc.unit >= 0 else big for pc in pcs], dtype=torch.int64)
            ext.apply(_RULE[rule.name], p, g, st[0], st[1] if len(st) > 1 else [], keys, [pc.offset for pc in pcs], tp,
                      _ext_consts(hp, pcs, bufs, d), bool(hp.get("maximize")), hp.get("convention") == "authors")
            cpu_ext.calls["apply"] += 1
            return
        steps = _step_sizes(hp, [bufs.bc1[pc.buf] for pc in chunk.pieces], [bufs.bc2[pc.buf] for pc in chunk.pieces])
        if self._fused(rule):
            for pc, lr_step in zip(chunk.pieces, steps):
                sl = slice(pc.start, pc.start + pc.length)
                dt = bufs.params[pc.buf].dtype
                fn = _kernel(rule.name, "apply", hp, bufs.params[pc.buf], bufs.grads[pc.buf],
                             *(bufs.states[n][pc.buf] for n in rule.state), keys)
                tk = torch.tensor(t[pc.unit] if pc.unit >= 0 else big, dtype=keys.dtype)
                dd = d[pc.unit] if (d is not None and pc.unit >= 0) else None
                fn(bufs.params[pc.buf][sl], bufs.grads[pc.buf][sl], *(bufs.states[n][pc.buf][sl] for n in rule.state),
                   keys[pc.offset: pc.offset + pc.length], tk, _consts(rule, hp, bufs, pc, dt, lr_step, dd))
            return
        if rule.matrix:
            return self._apply_matrix(rule, hp, chunk, bufs, scratch, t, d, steps)
        for blk in self._blocks(chunk):
            g, st, p, u, bc1, bc2 = self._block_views(chunk, bufs, blk, scratch)
            h = dict(hp, bc1=bc1, bc2=bc2)
            n = sum(b - a for _, a, b in blk)
            phi_b, sel_b = self._buf("phi", n, scratch.dtype), self._buf("sel", n, torch.bool)
            # phi from the keys before u overwrites them (this block's range only)
            phis = [self._phi_of(keys[chunk.pieces[i].offset + a: chunk.pieces[i].offset + b], chunk.pieces[i], hp, t, d,
                                 phi_b[a0: a0 + b - a], sel_b[a0: a0 + b - a])
                    for (i, a, b), a0 in zip(blk, _starts(blk))]
            rule.direction(g, st, h, u)
            _update(p, u, phis, [steps[i] for i, _, _ in blk], hp)
            if rule.finish is not None:
                rule.finish(g, st, h)

    @staticmethod
    def _phi_of(k, pc, hp, t, d, phi, sel):
        """phi = alpha where key >= t[unit] else gamma (padding: gamma), / denom[unit]:
        exactly alpha or gamma, made by fills, into the block temporary ``phi``."""
        phi.fill_(hp["gamma"])
        if pc.unit >= 0:
            phi.masked_fill_(torch.ge(k, t[pc.unit], out=sel), hp["alpha"])
            if d is not None:
                phi.div_(torch.tensor(d[pc.unit], dtype=torch.float64).to(phi.dtype))
        return phi

    def _apply_matrix(self, rule, hp, chunk, bufs, scratch, t, d, steps):
        """Muon: u of every piece must exist at once for the whole-matrix hook, so the
        selection is kept as a bool mask (1 byte an element) while u overwrites the keys."""
        keys = scratch.view(_ity(scratch.dtype))
        sel = torch.empty(chunk.numel, dtype=torch.bool)
        for pc in chunk.pieces:
            s = sel[pc.offset: pc.offset + pc.length]
            if pc.unit >= 0:
                torch.ge(keys[pc.offset: pc.offset + pc.length], t[pc.unit], out=s)
            else:
                s.zero_()
        g, st, p, u, bc1, bc2 = self._block_views(chunk, bufs, [(i, 0, pc.length) for i, pc in enumerate(chunk.pieces)], scratch)
        h = dict(hp, bc1=bc1, bc2=bc2)
        rule.direction(g, st, h, u)
        hp["matrix_hook"](chunk, u)
        for blk in self._blocks(chunk):
            phi_b = self._buf("phi", sum(b - a for _, a, b in blk), scratch.dtype)
            for (i, a, b), at in zip(blk, _starts(blk)):
                pc = chunk.pieces[i]
                phi = phi_b[at: at + b - a]
                phi.fill_(hp["gamma"]).masked_fill_(sel[pc.offset + a: pc.offset + b], hp["alpha"])
                if d is not None and pc.unit >= 0:
                    phi.div_(torch.tensor(d[pc.unit], dtype=torch.float64).to(phi.dtype))
                _update([bufs.params[pc.buf][pc.start + a: pc.start + b]], [scratch[pc.offset + a: pc.offset + b]], [phi],
                        [steps[i]], hp)
        if rule.finish is not None:
            rule.finish(g, st, h)

    # ------------------------------------------------------------------ cautious
    def cautious(self, rule, hp, chunk, bufs, t_const):
        """phi = alpha where s > 0 (authors: s >= 0), in one pass per block (eager) or piece
        (compiled): no keys, no scratch."""
        if rule.matrix or torch.compiler.is_compiling():  # see score
            return False
        ext = self._ext(rule, chunk, bufs)
        if ext is not None:
            pcs = chunk.pieces
            p, g = _piece_views(pcs, bufs.params), _piece_views(pcs, bufs.grads)
            st = [_piece_views(pcs, bufs.states[n]) for n in rule.state]
            ext.cautious(_RULE[rule.name], p, g, st[0], st[1] if len(st) > 1 else [], _ext_consts(hp, pcs, bufs),
                         bool(hp.get("maximize")), hp.get("convention") == "authors")
            cpu_ext.calls["cautious"] += 1
            return True
        steps = _step_sizes(hp, [bufs.bc1[pc.buf] for pc in chunk.pieces], [bufs.bc2[pc.buf] for pc in chunk.pieces])
        if self._fused(rule):
            for pc, lr_step in zip(chunk.pieces, steps):
                sl = slice(pc.start, pc.start + pc.length)
                fn = _kernel(rule.name, "cautious", hp, bufs.params[pc.buf], bufs.grads[pc.buf],
                             *(bufs.states[n][pc.buf] for n in rule.state))
                fn(bufs.params[pc.buf][sl], bufs.grads[pc.buf][sl], *(bufs.states[n][pc.buf][sl] for n in rule.state),
                   _consts(rule, hp, bufs, pc, bufs.params[pc.buf].dtype, lr_step))
            return True
        fdt = torch.float64 if any(p is not None and p.dtype == torch.float64 for p in bufs.params) else torch.float32
        for blk in self._blocks(chunk):
            n = sum(b - a for _, a, b in blk)
            if n == 0:
                continue
            g, st, p, _, bc1, bc2 = self._block_views(chunk, bufs, blk)
            h = dict(hp, bc1=bc1, bc2=bc2)
            sb, ub, phb = (self._buf(nm, n, fdt) for nm in ("s", "u", "phi"))
            starts = _starts(blk)
            s = [sb[a0: a0 + b - a] for (_, a, b), a0 in zip(blk, starts)]
            u = [ub[a0: a0 + b - a] for (_, a, b), a0 in zip(blk, starts)]
            rule.score(g, st, h, s)  # moments (AdamW), s = u * g
            rule.direction(g, st, h, u)  # u again, bit for bit as in the score
            # phi = gamma + (alpha - gamma) * [s > 0], by fills: exactly alpha or gamma
            sel = (torch.ge if hp.get("convention") == "authors" else torch.gt)(sb, 0, out=self._buf("sel", n, torch.bool))
            phb.fill_(hp["gamma"]).masked_fill_(sel, hp["alpha"])
            _update(p, u, [phb[a0: a0 + b - a] for (_, a, b), a0 in zip(blk, starts)], [steps[i] for i, _, _ in blk], hp)
            if rule.finish is not None:
                rule.finish(g, st, h)
        return True


def _starts(blk) -> List[int]:
    out, at = [], 0
    for _, a, b in blk:
        out.append(at)
        at += b - a
    return out


_RULE = {"adamw": 0, "lion": 1}


class _KthAndCut:
    """The key-free select's result, read by ``CPU.apply`` only: per piece (K-th key, tie
    cut-off index) as int64 ``[pieces, 2]``; selected <=> key > t or (key == t and index < cut)."""

    def __init__(self, tc: torch.Tensor, args):
        self.tc, self.args = tc, args


def _piece_views(pieces, bufs) -> List[torch.Tensor]:
    return [bufs[pc.buf][pc.start: pc.start + pc.length] for pc in pieces]


def _ext_consts(hp, pieces, bufs, d=None) -> torch.Tensor:
    """The C++ kernels' float32 scalars per piece (the order of ``_consts``), each rounded
    as eager torch rounds a python scalar operand of a float32 op: the double value,
    then float32 (``1 - b1``, ``1 - lr*wd``, ``lr_eff`` computed in double first).  With a
    denominator: ``fp32(alpha) / fp32(d)``, as eager divides the alpha/gamma-filled phi."""
    b1, b2 = (_num(b) for b in hp["betas"])
    lr, wd = _num(hp["lr"]), _num(hp["weight_decay"])
    bc1 = [_num(bufs.bc1[pc.buf]) for pc in pieces]
    bc2 = [_num(bufs.bc2[pc.buf]) for pc in pieces]
    steps = _step_sizes(dict(hp, lr=lr), bc1, bc2)
    eps = _num(hp.get("eps", 0.0))
    rows = [[b1, 1 - b1, b2, 1 - b2, hp["alpha"], hp["gamma"], 1 - lr * wd, st, c1, c2, eps]
            for st, c1, c2 in zip(steps, bc1, bc2)]
    c = torch.tensor(rows, dtype=torch.float64).to(torch.float32).reshape(len(pieces), 11)
    if d is not None:
        dd = torch.tensor([d[pc.unit] if pc.unit >= 0 else 1.0 for pc in pieces], dtype=torch.float64).to(torch.float32)
        c[:, 4].div_(dd)
        c[:, 5].div_(dd)
    return c.contiguous()


def _step_sizes(hp, bc1, bc2) -> list:
    """lr_eff per piece: lr (torch), lr*sqrt(bc2)/bc1 (authors, with bias correction)."""
    lr = hp["lr"]
    if hp.get("convention", "torch") == "authors" and hp.get("correct_bias", True) and "exp_avg_sq" in hp.get("state", ()):
        return [lr * (b2 ** 0.5) / b1 for b1, b2 in zip(bc1, bc2)]
    return [lr] * len(bc1)


def _update(params, us, phis, steps, hp) -> None:
    """p *= 1 - lr*wd ; p -= lr_eff * (phi * u): decoupled decay first (both conventions).
    ``us`` is consumed."""
    wd, lr = hp["weight_decay"], hp["lr"]
    torch._foreach_mul_(us, phis)
    torch._foreach_mul_(us, list(steps))
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_sub_(params, us)


# ------------------------------------------------------------------------- selection


def _kth_by_partition(a: np.ndarray, k: int):
    """(K-th largest, #keys > it, #keys == it) by introselect on a copy."""
    n = a.size
    c = a.copy()
    c.partition(n - k)  # the k largest now sit at and after n-k, the k-th largest at it
    t = c[n - k]
    return t, int(np.count_nonzero(a > t)), int(np.count_nonzero(a == t))


def _count_block(a: np.ndarray, lo, hi, want_values: bool):
    """One block of the counting pass: #(a > hi), and the keys in [lo, hi] (or their count)."""
    gt = a > hi
    c_gt = int(np.count_nonzero(gt))
    inb = a >= lo
    np.logical_xor(inb, gt, out=inb)  # gt is a subset of inb: what is left lies in [lo, hi]
    return c_gt, (a[inb] if want_values else int(np.count_nonzero(inb)))


def _select_units(jobs):
    """jobs: (unit, int keys of the unit (numpy view), K).  Returns [(unit, K-th key)] of
    the units with K > 0, having lowered the losing ties in place."""
    small, big = [], []
    for unit, a, k in jobs:
        n = a.size
        if k == 0 or n == 0:
            continue  # nothing selected: the threshold stays the largest key
        (small if (n <= SMALL_UNIT or k == n) else big).append((unit, a, k))
    futs = []
    # big units: bracket from the sample, then the counting pass split into tasks
    plans = []
    for unit, a, k in big:
        n = a.size
        s = np.sort(a[_sample_idx(n)])
        S = s.size
        r = n - k  # ascending rank of the K-th largest
        p = r / n
        js = int(r * S // n)
        margin = int(4.0 * math.sqrt(S * p * (1 - p))) + 8
        info = np.iinfo(a.dtype)
        lo = s[js - margin] if js - margin >= 0 else info.min
        hi = s[js + margin] if js + margin < S else info.max
        want = lo != hi
        parts = [_count_block(a[i: i + COUNT_BLOCK], lo, hi, want) for i in range(0, n, COUNT_BLOCK)]
        plans.append((unit, a, k, lo, hi, want, parts))
    for unit, a, k in small:
        futs.append((unit, a, k, _kth_by_partition(a, k)))
    results = []
    for unit, a, k, lo, hi, want, parts in plans:
        c_gt, cands, c_in = 0, [], 0
        for g, v in parts:
            c_gt += g
            if want:
                cands.append(v)
                c_in += v.size
            else:
                c_in += v
        if c_gt < k <= c_gt + c_in:  # the K-th key lies in [lo, hi]
            kk = k - c_gt  # its place among the keys in the bracket, from the top
            if want:
                cand = np.concatenate(cands)
                cand.partition(c_in - kk)
                t = cand[c_in - kk]
                above = c_gt + int(np.count_nonzero(cand > t))
                eq = int(np.count_nonzero(cand == t))
            else:
                t, above, eq = lo, c_gt, c_in
        else:  # the sample missed: exact anyway
            t, above, eq = _kth_by_partition(a, k)
        results.append((unit, a, k, t, above, eq))
    for unit, a, k, (t, above, eq) in futs:
        results.append((unit, a, k, t, above, eq))
    for unit, a, k, t, above, eq in results:
        if eq > k - above:
            _lower_ties(a, t, k - above)  # the first k - above ties at t are selected
    return [(unit, int(t)) for unit, a, k, t, above, eq in results]


# ----------------------------------------------------------------------- the kernels
# The formulas of mgup_dist.rules, written as single expressions so that Inductor fuses each
# phase into one loop.  ``authors``/``maximize``/cautious ``>= 0`` are compile-time variants.
# c: the scalars in the compute dtype, in the order of ``_consts``:
# 0 b1, 1 1-b1, 2 b2, 3 1-b2, 4 alpha/d, 5 gamma/d, 6 1-lr*wd, 7 lr_eff, 8 bc1, 9 bc2, 10 eps

def _consts(rule, hp, bufs, pc, dtype, lr_step=0.0, d=None) -> torch.Tensor:
    """The scalars of one kernel call as one tensor of the compute dtype: values rounded as
    eager torch rounds a python scalar operand (to the op's compute type)."""
    b1, b2 = hp["betas"]
    b1, b2 = _num(b1), _num(b2)
    sdt = _sdt(dtype)
    alpha, gamma = hp["alpha"], hp["gamma"]
    vals = [b1, 1 - b1, b2, 1 - b2, alpha, gamma, _num(1 - hp["lr"] * hp["weight_decay"]), _num(lr_step),
            _num(bufs.bc1[pc.buf]), _num(bufs.bc2[pc.buf]), _num(hp.get("eps", 0.0))]
    c = torch.tensor(vals, dtype=sdt)
    if d is not None:  # phi / d: as eager divides the alpha/gamma-filled phi by fp(d)
        c[4:6].div_(torch.tensor(d, dtype=torch.float64).to(sdt))
    return c


def _key(s: torch.Tensor, ity: torch.dtype) -> torch.Tensor:
    """kernels.base.keys_ as an expression."""
    nbits = 64 if ity == torch.int64 else 32
    bits = (s + 0.0).view(ity)
    key = bits ^ ((bits >> (nbits - 1)) & torch.iinfo(ity).max)
    return torch.where(s != s, torch.full_like(key, KEY_NAN(ity)), key)


def _sign(c):
    """sign that keeps NaN (see rules._lion_u)."""
    return torch.where(c != c, c, torch.sign(c))


def _adamw_u(m, v, c, authors):
    if authors:
        return m / (torch.sqrt(v) + c[10])
    return m / (torch.sqrt(v / c[9]) + c[10]) / c[8]


def _stepped(p, u, phi, c):
    """p *= 1 - lr*wd; p -= lr_eff * (phi * u): decoupled decay first, in both conventions."""
    return p * c[6] - (u * phi) * c[7]


def _make(rule: str, phase: str, authors: bool, maximize: bool):
    def sgn(g):  # maximize: the rule sees -g
        return -g if maximize else g

    if rule == "adamw":
        def score(g, m, v, key, c):
            g = sgn(g)
            m2 = m * c[0] + g * c[1]
            v2 = v * c[2] + g * g * c[3]
            fdt = torch.float64 if key.dtype == torch.int64 else torch.float32
            s = (_adamw_u(m2, v2, c, authors) * g).to(fdt)
            m.copy_(m2)
            v.copy_(v2)
            key.copy_(_key(s, key.dtype))

        def apply(p, g, m, v, key, t, c):
            u = _adamw_u(m, v, c, authors)
            phi = torch.where(key >= t, c[4], c[5])
            p.copy_(_stepped(p, u, phi, c))

        def cautious(p, g, m, v, c):
            g = sgn(g)
            m2 = m * c[0] + g * c[1]
            v2 = v * c[2] + g * g * c[3]
            u = _adamw_u(m2, v2, c, authors)
            s = u * g
            phi = torch.where((s >= 0) if authors else (s > 0), c[4], c[5])
            m.copy_(m2)
            v.copy_(v2)
            p.copy_(_stepped(p, u, phi, c))
    else:  # lion: u from the old momentum, the momentum moves after the step
        def score(g, m, key, c):
            g = sgn(g)
            fdt = torch.float64 if key.dtype == torch.int64 else torch.float32
            s = (_sign(m * c[0] + g * c[1]) * g).to(fdt)
            key.copy_(_key(s, key.dtype))

        def apply(p, g, m, key, t, c):
            g = sgn(g)
            u = _sign(m * c[0] + g * c[1])
            phi = torch.where(key >= t, c[4], c[5])
            p.copy_(_stepped(p, u, phi, c))
            m.copy_(m * c[2] + g * c[3])

        def cautious(p, g, m, c):
            g = sgn(g)
            u = _sign(m * c[0] + g * c[1])
            s = u * g
            phi = torch.where((s >= 0) if authors else (s > 0), c[4], c[5])
            p.copy_(_stepped(p, u, phi, c))
            m.copy_(m * c[2] + g * c[3])

    return {"score": score, "apply": apply, "cautious": cautious}[phase]


_COMPILED = {}


def _kernel(rule: str, phase: str, hp, *tensors):
    """The compiled kernel (once per process, variant and dtypes of its tensors; cached on
    disk by Inductor when TORCHINDUCTOR_CACHE_DIR is set).  ``dynamic=True``: one graph for
    all sizes; one compiled function per dtype combination, so that mixed fp32/bf16/fp16
    params never reach dynamo's recompile limit.  The scalars are a tensor argument: new
    values never recompile."""
    key = (rule, phase, hp.get("convention") == "authors", bool(hp.get("maximize")), tuple(t.dtype for t in tensors))
    fn = _COMPILED.get(key)
    if fn is None:
        body = _make(rule, phase, *key[2:4])
        # dynamo counts recompilations per code object: each variant gets its own copy
        body.__code__ = body.__code__.replace(co_name=f"mgup_{rule}_{phase}_{len(_COMPILED)}")
        fn = torch.compile(body, dynamic=True, fullgraph=True)
        _COMPILED[key] = fn
    return fn
