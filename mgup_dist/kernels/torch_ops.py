"""The phases in plain torch ops: any device (NPU, CPU, CUDA without Triton, XPU...).

Batched over all pieces of a chunk (``torch._foreach_*`` for the elementwise phases, one
segmented op per radix pass) and free of host synchronisation: thresholds, prefixes and
counts stay device tensors; no ``.item()``, ``nonzero``, boolean indexing or ``bincount``
(which reads the maximum back) off the CPU.

Ops relied on, for int32/int64 and float32 data: elementwise bit ops and shifts, comparisons,
``repeat_interleave`` with ``output_size``, ``index_select``, ``scatter_add_`` of int64 ones,
``cumsum`` of int64, ``torch.where``, ``masked_fill_``, ``full``: integer arithmetic that Ascend's
op-plugin implements without a detour through fp16 (not yet run on an NPU).  Never
``kthvalue``/``topk``/``sort``: on older CANN stacks they cast to fp16 (wrong thresholds,
corrupted int32 keys), on 910B/C ``kthvalue`` is a full sort, and on CUDA a slow single-slice kernel.
"""
from __future__ import annotations

from typing import List

import torch

from .base import Backend, Bufs, keys_, radix_widths

Tensor = torch.Tensor

__all__ = ["TorchOps"]


class TorchOps(Backend):
    name = "torch"

    def __init__(self, foreach: bool = True):
        self.foreach = foreach

    @staticmethod
    def _hist(idx: Tensor, size: int) -> Tensor:
        """Counts of the int64 values ``idx`` in [0, size) (``bincount`` would read the
        maximum back to the host)."""
        out = torch.zeros(size, dtype=torch.int64, device=idx.device)
        return out.scatter_add_(0, idx, torch.ones(1, dtype=torch.int64, device=idx.device).expand(idx.numel()))

    # -- chunk tables (cached per chunk and device) ----------------------------------------
    def _tables(self, chunk, device):
        key = ("torch_ops", device)
        t = chunk.cache.get(key)
        if t is None:
            ps = chunk.pieces
            unit = torch.tensor([p.unit if p.unit >= 0 else chunk.n_units for p in ps] or [0], dtype=torch.int32)
            t = {
                "lengths": torch.tensor([p.length for p in ps] or [0], dtype=torch.int64, device=device),
                "unit": unit.to(device),
                "starts": torch.tensor([p.offset for p in ps] or [0], dtype=torch.int64, device=device),
            }
            chunk.cache[key] = t
        return t

    def _elem_piece(self, chunk, device) -> Tensor:
        """Piece index of every scratch element (int32: 4 bytes an element, transient)."""
        t = self._tables(chunk, device)
        n = len(chunk.pieces)
        return torch.repeat_interleave(
            torch.arange(max(n, 1), dtype=torch.int32, device=device), t["lengths"], output_size=chunk.numel
        )

    def _elem_unit(self, chunk, device) -> Tensor:
        return self._tables(chunk, device)["unit"].index_select(0, self._elem_piece(chunk, device))

    # -- views -----------------------------------------------------------------------------
    @staticmethod
    def _views(chunk, bufs: Bufs, scratch: Tensor):
        """Per piece: (grad, {state: view}, param, scratch view)."""
        g, p, out = [], [], []
        st = {name: [] for name in bufs.states}
        for pc in chunk.pieces:
            sl = slice(pc.start, pc.start + pc.length)
            g.append(bufs.grads[pc.buf][sl])
            p.append(bufs.params[pc.buf][sl])
            for name, lst in bufs.states.items():
                st[name].append(lst[pc.buf][sl])
            out.append(scratch[pc.offset: pc.offset + pc.length])
        return g, st, p, out

    @staticmethod
    def _piece_hp(hp, chunk, bufs: Bufs):
        h = dict(hp)
        h["bc1"] = [bufs.bc1[pc.buf] for pc in chunk.pieces]
        h["bc2"] = [bufs.bc2[pc.buf] for pc in chunk.pieces]
        return h

    def _batches(self, n: int) -> List[slice]:
        """foreach: one call for all pieces; for-loop: one call per piece (same ops)."""
        return [slice(0, n)] if self.foreach else [slice(i, i + 1) for i in range(n)]

    # -- phase 1 ---------------------------------------------------------------------------
    def score(self, rule, hp, chunk, bufs, scratch):
        if not chunk.pieces:
            return None
        g, st, _, out = self._views(chunk, bufs, scratch)
        h = self._piece_hp(hp, chunk, bufs)
        for b in self._batches(len(g)):
            hb = dict(h, bc1=h["bc1"][b], bc2=h["bc2"][b])
            rule.score(g[b], {k: v[b] for k, v in st.items()}, hb, out[b])
        keys_(scratch[: chunk.numel])
        return None

    # -- phase 2 primitives ----------------------------------------------------------------
    def histogram(self, chunk, keys, prefix, p):
        nbits = torch.iinfo(keys.dtype).bits
        widths = radix_widths(nbits)
        width = widths[p]
        nb = 1 << width
        U = chunk.n_units
        k = keys[: chunk.numel]
        unit = self._elem_unit(chunk, k.device)  # padding: U
        shift = nbits - sum(widths[: p + 1])
        if p == 0:
            digit = (k >> shift).to(torch.int64).add_(nb // 2)
            valid = unit < U
        else:
            digit = ((k >> shift) & (nb - 1)).to(torch.int64)
            pre = torch.cat([prefix, prefix.new_zeros(1)]).index_select(0, unit)
            valid = ((k >> (shift + width)).to(torch.int64) == pre) & (unit < U)
        idx = torch.where(valid, unit.to(torch.int64) * nb + digit, torch.full_like(digit, U * nb))
        return self._hist(idx, U * nb + 1)[: U * nb].view(U, nb)

    def _ties(self, chunk, keys, t_key):
        k = keys[: chunk.numel]
        unit = self._elem_unit(chunk, k.device)
        t_ext = torch.cat([t_key, t_key.new_full((1,), torch.iinfo(k.dtype).max)])
        return k == t_ext.index_select(0, unit)

    def tie_counts(self, chunk, keys, t_key):
        if not chunk.pieces:
            return torch.zeros(0, dtype=torch.int64, device=keys.device)
        tie = self._ties(chunk, keys, t_key)
        piece = self._elem_piece(chunk, keys.device)
        return torch.zeros(len(chunk.pieces), dtype=torch.int64, device=keys.device).scatter_add_(
            0, piece.to(torch.int64), tie.to(torch.int64)
        )

    def resolve_ties(self, chunk, keys, t_key, take):
        if not chunk.pieces:
            return
        k = keys[: chunk.numel]
        tie = self._ties(chunk, k, t_key)
        piece = self._elem_piece(chunk, k.device)
        csum = torch.cumsum(tie.to(torch.int64), 0)  # inclusive: the tie's 1-based rank in the chunk
        starts = self._tables(chunk, k.device)["starts"]
        before = torch.where(starts > 0, csum.index_select(0, (starts - 1).clamp_min(0)), torch.zeros_like(starts))
        rank = csum - before.index_select(0, piece)  # 1-based rank within its piece
        lose = tie & (rank > take.index_select(0, piece))
        k.sub_(lose.to(k.dtype))  # losing ties drop to t - 1 (t > KEY_NAN, so no wrap)

    # -- phase 3 ---------------------------------------------------------------------------
    def _phi(self, hp, chunk, keys, t_key, denom, dtype):
        k = keys[: chunk.numel]
        unit = self._elem_unit(chunk, k.device)
        t_ext = torch.cat([t_key, t_key.new_full((1,), torch.iinfo(k.dtype).max)])
        sel = k >= t_ext.index_select(0, unit)
        # exactly alpha or gamma (not a blend), made by fills: no host-to-device copy
        phi = torch.full(sel.shape, hp["gamma"], dtype=dtype, device=k.device).masked_fill_(sel, hp["alpha"])
        if denom is not None:
            phi.div_(torch.cat([denom, denom.new_ones(1)]).to(dtype).index_select(0, unit))
        return phi

    def apply(self, rule, hp, chunk, bufs, scratch, t_key, denom):
        if not chunk.pieces:
            if rule.matrix:
                hp["matrix_hook"](chunk, [])  # the whole-matrix assembly is a collective: enter it
            return
        phi = self._phi(hp, chunk, scratch.view(_ity(scratch)), t_key, denom, scratch.dtype)
        g, st, p, u = self._views(chunk, bufs, scratch)
        h = self._piece_hp(hp, chunk, bufs)
        phis = [phi[pc.offset: pc.offset + pc.length] for pc in chunk.pieces]
        for b in self._batches(len(g)):
            hb = dict(h, bc1=h["bc1"][b], bc2=h["bc2"][b])
            rule.direction(g[b], {k: v[b] for k, v in st.items()}, hb, u[b])
        if rule.matrix:
            hp["matrix_hook"](chunk, u)
        steps = step_sizes(hp, h, chunk)
        for b in self._batches(len(g)):
            update(p[b], u[b], phis[b], steps[b], hp)
        if rule.finish is not None:
            for b in self._batches(len(g)):
                hb = dict(h, bc1=h["bc1"][b], bc2=h["bc2"][b])
                rule.finish(g[b], {k: v[b] for k, v in st.items()}, hb)


def _ity(scratch: Tensor) -> torch.dtype:
    return torch.int64 if scratch.dtype == torch.float64 else torch.int32


def step_sizes(hp, h, chunk) -> list:
    """lr_eff per piece: lr (torch), lr*sqrt(bc2)/bc1 (authors, with bias correction), times
    Muon's per-matrix scale (applied in the matrix hook)."""
    lr = hp["lr"]
    if hp.get("convention", "torch") == "authors" and hp.get("correct_bias", True) and "exp_avg_sq" in hp.get("state", ()):
        return [lr * (b2 ** 0.5) / b1 for b1, b2 in zip(h["bc1"], h["bc2"])]
    return [lr] * len(chunk.pieces)


def update(params, us, phis, steps, hp) -> None:
    """p *= 1 - lr*wd ; p -= lr_eff * (phi * u).  Decoupled decay comes first in both
    conventions (the authors' AdamW and Lion decay p before their moment update, which
    does not read p).  ``us`` is consumed (it is the scratch)."""
    wd, lr = hp["weight_decay"], hp["lr"]
    torch._foreach_mul_(us, phis)
    torch._foreach_mul_(us, list(steps))
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_sub_(params, us)
