"""The phases in plain torch ops: any device (NPU, CPU, CUDA without Triton, XPU...).

On an NPU the host dispatches every eager op (tens of microseconds each), so a step costs
about as many dispatches as it issues ops.  This backend issues a fixed number of ops per
chunk, whatever the number of tensors in it (``python -m mgup_dist.opcount``;
``tests/test_opcount.py`` holds the counts):

* elementwise phases: ``torch._foreach_*`` over all pieces of the chunk, per-tensor scalars
  (bias corrections) as one scalar list or one list of 0-d device tensors, and ops with no
  multi-tensor form (order keys, Lion's NaN-keeping sign, phi) on the flat scratch, of
  which the pieces' outputs are consecutive views;
* selection (``select``): per radix pass one segmented histogram of all units
  (``scatter_add_`` into ``[units, bins]``), one cumulative sum, one ``searchsorted`` (the
  digit of every unit at once); ties are resolved in ``apply``: an element is selected when
  ``key > t`` or when ``key == t`` and its rank among its unit's ties is within the K still
  needed, from one cumulative sum of the tie mask (no key rewrite pass).  Per-element unit
  ids are made once per step (transient, not kept between steps).

Free of host synchronisation: thresholds, prefixes and counts stay device tensors.

Ops a device step may issue (``NPU_OPS``; ``tests/test_opcount.py`` runs steps under a
dispatch mode and refuses any other): foreach arithmetic (``_foreach_{add,sub,mul,div,
addcmul,sqrt,neg,copy,pow}``), elementwise arithmetic, comparisons, bit ops and shifts on
int32/int64 and float32, ``where``, ``masked_fill_``, ``isnan``, ``sign``, ``clamp``,
``cumsum`` (int64 of bool/int), ``index_select``, ``gather``, ``scatter_add_`` (int64 ones),
``repeat_interleave`` with ``output_size``, ``searchsorted`` (int64 rows), ``zeros``/``ones``/
``full``/``fill_``, ``stack``, ``cat``, ``_to_copy`` between int dtypes or to float,
the matrix ops of Muon (``bmm``, ``baddbmm``, ``_foreach_norm``).  Never ``kthvalue``/``topk``/``sort`` (on older CANN stacks they cast
to fp16: wrong thresholds, corrupted int32 keys; on 910B/C ``kthvalue`` is a full sort, and on
CUDA a slow single-slice kernel), nor ``nonzero``/``bincount``/boolean indexing/``.item()``
(host reads), nor float64 collectives (HCCL has none): histograms and tie counts are int64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..radix import keys_, radix_widths, tie_cutoff, unit_tables
from .base import Backend, Bufs

Tensor = torch.Tensor

__all__ = ["TorchOps", "TopK", "NPU_OPS", "step_sizes", "traced_lr"]

#: ATen ops (overload packets) a step of this backend may issue on a device; see the module doc
NPU_OPS = frozenset({
    # multi-tensor arithmetic
    "_foreach_add", "_foreach_add_", "_foreach_sub", "_foreach_sub_", "_foreach_mul", "_foreach_mul_", "_foreach_div",
    "_foreach_div_", "_foreach_addcmul_", "_foreach_sqrt", "_foreach_sqrt_", "_foreach_neg", "_foreach_neg_",
    "_foreach_copy_", "_foreach_pow",
    # elementwise float / int arithmetic, comparisons, bit ops and shifts
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "sqrt", "pow", "abs", "sign", "isnan",
    "isfinite", "eq", "ne", "gt", "ge", "lt", "le", "where", "masked_fill_", "clamp", "clamp_", "clamp_min",
    "clamp_min_", "clamp_max", "clamp_max_", "bitwise_and", "bitwise_and_", "bitwise_or", "bitwise_xor",
    "bitwise_xor_", "bitwise_right_shift", "bitwise_right_shift_", "bitwise_left_shift_", "__rshift__",
    # scans, gathers, segmented counts, sorted search over cumulative counts (no sort)
    "cumsum", "sum", "amax", "index_select", "gather", "scatter_add_", "repeat_interleave", "searchsorted",
    # fills, copies, casts
    "zeros", "ones", "full", "new_full", "new_ones", "fill_", "zero_", "clone", "copy_", "_to_copy", "stack", "cat",
    # Muon's Newton-Schulz: stacked matrix products, norms of all matrices in one call (float64
    # NS also takes a power-of-two prescale: log2, floor, exp2)
    "mm", "bmm", "baddbmm", "linalg_vector_norm", "_foreach_norm", "log2_", "floor_", "neg_", "exp2_",
})


@dataclass
class TopK:
    """What ``TorchOps.select`` hands ``TorchOps.apply`` (phase 2 -> 3, one step).

    ``t``: the K-th key of every unit (key dtype, ``[units + 1]``; the last row, padding,
    lies above every key).  ``off``: per piece, the cut-off of its ties relative to the
    ties before it in the chunk: a tie of the piece is selected when its 1-based rank among
    the chunk's ties is ``<= ties_before_piece + off``.  ``eu``/``ep``: unit and piece of
    every scratch element (int64, transient: made once per step).  ``csum``: the chunk's
    inclusive tie count with a leading 0 (``[numel + 1]``), when phase 2 already made it."""

    t: Tensor
    off: Tensor
    eu: Tensor
    ep: Tensor
    csum: Optional[Tensor] = None


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
            U = chunk.n_units
            unit = [p.unit if p.unit >= 0 else U for p in ps]
            t = {
                "lengths": torch.tensor([p.length for p in ps] or [0], dtype=torch.int64, device=device),
                "unit": torch.tensor(unit or [0], dtype=torch.int32, device=device),
                "unit64": torch.tensor(unit or [0], dtype=torch.int64, device=device),
                "starts": torch.tensor([p.offset for p in ps] or [0], dtype=torch.int64, device=device),
            }
            chunk.cache[key] = t
        return t

    def _elem_piece(self, chunk, device) -> Tensor:
        """Piece index of every scratch element (int64, transient)."""
        return torch.repeat_interleave(self._tables(chunk, device)["lengths"], output_size=chunk.numel)

    def _elem_unit(self, chunk, device) -> Tensor:
        return self._tables(chunk, device)["unit64"].index_select(0, self._elem_piece(chunk, device))

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

    def _run(self, fn, g, st, h, outs, flat, *extra):
        """``fn(grads, states, hp, *outs)`` over all pieces at once (foreach, with the flat
        scratch for the ops that have no multi-tensor form) or piece by piece."""
        for b in self._batches(len(g)):
            hb = dict(h, bc1=h["bc1"][b], bc2=h["bc2"][b])
            if self.foreach and flat is not None:
                hb["flat"] = flat
            fn(g[b], {k: v[b] for k, v in st.items()}, hb, *([outs[b]] if outs is not None else []), *extra)

    # -- phase 1 ---------------------------------------------------------------------------
    def score(self, rule, hp, chunk, bufs, scratch):
        if not chunk.pieces:
            return None
        g, st, _, out = self._views(chunk, bufs, scratch)
        self._run(rule.score, g, st, self._piece_hp(hp, chunk, bufs), out, scratch[: chunk.numel])
        keys_(scratch[: chunk.numel])
        return None

    # -- phase 2 primitives (the generic radix select of mgup_dist.selection) ------------
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
        idx = torch.where(valid, unit * nb + digit, torch.full_like(digit, U * nb))
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
        return torch.zeros(len(chunk.pieces), dtype=torch.int64, device=keys.device).scatter_add_(0, piece, tie.to(torch.int64))

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

    # -- phase 2: the lean radix select ----------------------------------------------------
    def _lean(self) -> bool:
        """A subclass that brings its own selection primitives (CPU, Triton) keeps the generic
        ``selection.threshold`` over them; this class runs ``_select``."""
        cls = type(self)
        return all(getattr(cls, n) is getattr(TorchOps, n) for n in ("histogram", "tie_counts", "resolve_ties", "select_local"))

    def select(self, chunk, keys, hist0, reduce):
        if not self._lean() or keys.dtype != torch.int32 or hist0 is not None:
            # 64-bit keys (float64 params) take the generic passes: the offset arithmetic
            # below needs int64 headroom above the keys
            return None
        return self._select(chunk, keys, reduce)

    def _select_tables(self, chunk, device):
        key = ("torch_ops_select", device)
        t = chunk.cache.get(key)
        if t is None:
            U = chunk.n_units
            units = [p.unit for p in chunk.pieces if p.unit >= 0]
            fast = not chunk.split and units == list(range(U))  # every unit one local piece, in order
            pad = any(p.unit < 0 for p in chunk.pieces)
            # digits per pass: the fewest passes whose histograms (int64, units x 2^w bins) hold
            # no more entries than the chunk has elements (a plan fact, for a split chunk from
            # the global sizes): 16 + 16 bits for big chunks, 8 x 4 for small ones.  Split chunks
            # never take 16-bit digits (each pass's histograms travel in an all-reduce)
            size = sum(chunk.n) if chunk.split else chunk.numel
            cands = ([] if chunk.split else [[16, 16]]) + [radix_widths(32), [8, 8, 8, 8], [4] * 8]
            widths = next((c for c in cands if (U + 2) * sum((1 << w) + 2 for w in c) <= size), cands[-1])
            n = torch.tensor([0] + list(chunk.n) + [0], dtype=torch.int64)
            k = torch.tensor([0] + list(chunk.k) + [0], dtype=torch.int64)
            r_search = n - k.clamp_min(1)  # keys of the unit to skip from the bottom (K = 0: all but the top)
            r_search[0] = r_search[U + 1] = -1  # dummy row, padding: column 0 (padding's t is overwritten)
            ps = chunk.pieces
            # per piece tables with two leading dummy entries: element ids are piece + 2 (see _select)
            ext = lambda xs: torch.tensor([0, 0] + xs, dtype=torch.int64, device=device)  # noqa: E731
            t = {
                "fast": fast,
                "pad": pad,
                "widths": widths,
                "r_search": r_search.view(-1, 1).to(device),
                "r_take": (n - k).view(-1, 1).to(device),
                "lengths": ext([p.length for p in ps]),
                "starts": ext([p.offset for p in ps]),
                "unit": ext([(p.unit if p.unit >= 0 else U) + 2 for p in ps]),
                "one": torch.ones(1, dtype=torch.int64, device=device),
            }
            if not fast:
                ut = unit_tables(chunk, device)
                t.update(piece_slot=torch.cat([ut["piece_slot"].new_full((2,), chunk.n_slots), ut["piece_slot"][: len(ps)]]),
                         slot_unit=ut["slot_unit"], first_slot=ut["first_slot"])
            chunk.cache[key] = t
        return t

    def _select(self, chunk, keys, reduce) -> TopK:
        """The K-th key of every unit of the chunk, and the tie cut-offs, in a fixed number of
        ops (two radix passes of 16 bits: 20 ops, whatever the number of units).

        Element ids are ``piece + 2`` (``repeat_interleave`` of the piece lengths behind two
        empty dummy pieces), units ``unit + 2`` (padding: ``units + 2``), so that one
        ``add(digit, id, alpha=W)`` places the first pass's bins with no offset op.
        Histogram of a pass: ``[units + 2, W]``, row ``unit + 1`` (row 0 empty, last row
        padding); columns: 0 counts the keys below the unit's prefix, ``1 + d`` the keys with
        next digit ``d``, the last the keys above.  With ``r = N - K`` keys to skip from the
        bottom of a unit, the column that holds the K-th largest key is the number of columns
        whose cumulative count is ``<= r`` (``searchsorted``): ``selection.choose_digit`` from
        the bottom.  After the last pass, ``(count <= t) - r`` keys equal to ``t`` are selected
        (``K - count(> t)``), lowest index first."""
        dev = keys.device
        U, N = chunk.n_units, chunk.numel
        R = U + 2
        tab = self._select_tables(chunk, dev)
        widths = tab["widths"]
        Ws = [(1 << w) + 2 for w in widths]  # columns of a pass: below, digits, above
        k = keys[:N]
        ep = torch.repeat_interleave(tab["lengths"], output_size=N)  # piece + 2 of every element
        if tab["fast"]:
            eu = ep.clamp_max(U + 2) if tab["pad"] else ep  # units are the first pieces, padding after
        else:
            eu = tab["unit"].index_select(0, ep)
        ones = tab["one"].expand(N)  # the scatter's source: one cached int64 1 (8 bytes kept with the plan)
        h0 = 1 << (widths[0] - 1)
        bases = [Ws[0] - 1 - h0]  # pass 0's histogram inside hist_all: (unit + 2) * W + digit lands on row unit + 1
        for W in Ws[:-1]:
            bases.append(bases[-1] + R * W)
        hist_all = torch.zeros(bases[-1] + R * Ws[-1], dtype=torch.int64, device=dev)
        col = torch.empty(R + 1, 1, dtype=torch.int64, device=dev)  # per unit + 2: 1 + the digit
        shift = 32
        lo = None  # per unit + 2: the key prefix, folded with the column offsets of the pass
        for p, w in enumerate(widths):
            shift -= w
            base, W = bases[p], Ws[p]
            if p == 0:
                idx = torch.add(k >> shift, eu, alpha=W)
            else:
                # column = clamp(((key - prefix) >> shift) + 1, 0, 2^w + 1): 0 below the prefix,
                # 2^w + 1 above; the + 1 and the offset B of the histogram live in ``lo``
                idx = k - lo.index_select(0, eu)
                if shift:
                    idx = idx.bitwise_right_shift_(shift)
                B = base - W
                idx.clamp_(B, B + (1 << w) + 1).add_(eu, alpha=W)
            hist_all.scatter_add_(0, idx, ones)
            del idx
            hist = hist_all[base: base + R * W]
            reduce(hist)
            c = hist.view(R, W).cumsum(1)
            torch.searchsorted(c, tab["r_search"], right=True, out=col[1:])
            colv = col.view(-1)
            if p + 1 < len(widths):
                nxt = shift - widths[p + 1]
                B_next = bases[p + 1] - Ws[p + 1]
                if p == 0:
                    # prefix = (col - 1 - 2^(w-1)) * 2^shift;  lo = prefix - 2^nxt - B_next * 2^nxt
                    # (int64: no overflow for 32-bit keys)
                    lo = torch.mul(colv, 1 << shift)
                    lo.sub_((1 + h0) * (1 << shift) + (1 << nxt) + B_next * (1 << nxt))
                else:
                    # prefix' = lo + (col + B) << shift  (lo = prefix - 2^shift - B * 2^shift)
                    lo = torch.add(lo, colv, alpha=1 << shift)
                    lo.add_((base - W) * (1 << shift) - (1 << nxt) - B_next * (1 << nxt))
            else:
                # last pass (shift 0): t = prefix + col - 1 = lo + col + B; int64 (compared with
                # int32 keys as is)
                t = torch.add(lo, colv).add_(base - W)
                take = torch.empty(R + 1, dtype=torch.int64, device=dev)
                torch.sub(c.gather(1, col[1:]), tab["r_take"], out=take[1:].view(-1, 1))
        if tab["pad"]:
            t[U + 2:].fill_(torch.iinfo(keys.dtype).max)
        P2 = len(chunk.pieces) + 2
        if tab["fast"]:
            off = take[:P2] if not tab["pad"] else take.index_select(0, tab["unit"])
            return TopK(t, off, eu, ep)
        # units in several pieces (on this rank or others): the ties of earlier slots of a unit
        # come first; per piece its ties from one cumulative sum, per slot over all ranks
        tie = k == t.index_select(0, eu)
        csum = torch.zeros(N + 1, dtype=torch.int32, device=dev)
        torch.cumsum(tie, 0, dtype=torch.int32, out=csum[1:])
        starts = tab["starts"]
        before_piece = csum.index_select(0, starts)
        ties = csum.index_select(0, starts + tab["lengths"]) - before_piece
        slots = torch.zeros(chunk.n_slots + 1, dtype=torch.int64, device=dev)
        slots.scatter_add_(0, tab["piece_slot"], ties.to(torch.int64))
        reduce(slots)
        take_slot = tie_cutoff(slots, take[2:], tab["slot_unit"], tab["first_slot"])
        off = take_slot.index_select(0, tab["piece_slot"])
        return TopK(t, off, eu, ep, csum)

    # -- phase 3 ---------------------------------------------------------------------------
    def _phi(self, hp, chunk, keys, t_key, denom, dtype):
        """phi per scratch element from a threshold per unit (ties already resolved in the
        keys: ``key >= t``)."""
        k = keys[: chunk.numel]
        unit = self._elem_unit(chunk, k.device)
        t_ext = torch.cat([t_key, t_key.new_full((1,), torch.iinfo(k.dtype).max)])
        return self._where(hp, chunk, k >= t_ext.index_select(0, unit), denom, unit, dtype)

    def _where(self, hp, chunk, sel, denom, unit, dtype, lead=0):
        # exactly alpha or gamma (not a blend); 0-d constants cached on the device
        key = ("torch_ops_phi", hp["alpha"], hp["gamma"], dtype, sel.device)
        ag = chunk.cache.get(key)
        if ag is None:
            ag = (torch.tensor(hp["alpha"], dtype=dtype, device=sel.device), torch.tensor(hp["gamma"], dtype=dtype, device=sel.device))
            chunk.cache[key] = ag
        phi = torch.where(sel, ag[0], ag[1])
        if denom is not None:
            one = denom.new_ones(1)
            phi.div_(torch.cat([one.expand(lead), denom, one]).to(dtype).index_select(0, unit))
        return phi

    def _phi_topk(self, hp, chunk, keys, sel: TopK, denom, dtype):
        """phi from ``TorchOps.select``: an element is selected when ``key > t``, or when
        ``key == t`` and its rank among the chunk's ties is within its piece's cut-off.
        ``key + (rank <= cut) > t`` says both at once (keys are <= key(+inf) < iinfo.max, so
        ``key + 1`` never wraps; ``rank <= cut`` also holds for non-ties, which changes nothing:
        ``key + 1 > t`` needs ``key >= t``)."""
        N = chunk.numel
        k = keys[:N]
        t_e = sel.t.index_select(0, sel.eu)
        csum = sel.csum
        if csum is None:
            csum = torch.zeros(N + 1, dtype=torch.int32, device=k.device)
            torch.cumsum(k == t_e, 0, dtype=torch.int32, out=csum[1:])
        cut = csum.index_select(0, self._select_tables(chunk, k.device)["starts"]).add(sel.off)
        early = csum[1:] <= cut.index_select(0, sel.ep)
        return self._where(hp, chunk, (k + early) > t_e, denom, sel.eu, dtype, lead=2)

    def apply(self, rule, hp, chunk, bufs, scratch, t_key, denom):
        if not chunk.pieces:
            if rule.matrix:
                hp["matrix_hook"](chunk, [])  # the whole-matrix assembly is a collective: enter it
            return
        hp = traced_lr(hp, scratch.device)
        keys = scratch.view(_ity(scratch))
        if isinstance(t_key, TopK):
            phi = self._phi_topk(hp, chunk, keys, t_key, denom, scratch.dtype)
        else:
            phi = self._phi(hp, chunk, keys, t_key, denom, scratch.dtype)
        self._step(rule, hp, chunk, bufs, scratch, phi)

    def _step(self, rule, hp, chunk, bufs, scratch, phi):
        """u (into the scratch), the matrix hook, p *= 1 - lr*wd, p -= lr_eff * phi * u, finish."""
        g, st, p, u = self._views(chunk, bufs, scratch)
        h = self._piece_hp(hp, chunk, bufs)
        flat = scratch[: chunk.numel]
        self._run(rule.direction, g, st, h, u, flat)
        if rule.matrix:
            hp["matrix_hook"](chunk, u)
        steps = step_sizes(hp, h, chunk)
        if self.foreach:
            update(p, u, [phi[pc.offset: pc.offset + pc.length] for pc in chunk.pieces], steps, hp, flat, phi)
        else:
            for i, pc in enumerate(chunk.pieces):
                update(p[i: i + 1], u[i: i + 1], [phi[pc.offset: pc.offset + pc.length]], steps[i: i + 1], hp)
        if rule.finish is not None:
            self._run(rule.finish, g, st, h, None, None)

    # -- cautious: one pass, no selection ----------------------------------------------------
    def cautious(self, rule, hp, chunk, bufs, t_const):
        """phi = alpha where s > 0 (authors: s >= 0), in one pass: the state update, ``u``
        once (into one flat buffer), ``s = u * g`` (into another), phi over the flat ``s``,
        the step.  No keys, no selection, no recomputed ``u``."""
        if not self._lean() or type(self).apply is not TorchOps.apply:
            return False
        if rule.moments is None and not rule.late_state:
            return False
        from ..rules import _neg

        hp = traced_lr(hp, bufs.params[chunk.pieces[0].buf].device)
        fdt = torch.float64 if any(bufs.params[pc.buf].dtype == torch.float64 for pc in chunk.pieces) else torch.float32
        dev = bufs.params[chunk.pieces[0].buf].device
        u = torch.empty(chunk.numel, dtype=fdt, device=dev)
        s = torch.empty(chunk.numel, dtype=fdt, device=dev)
        g, st, p, us = self._views(chunk, bufs, u)
        ss = _piece_slices(s, chunk)
        h = self._piece_hp(hp, chunk, bufs)
        if rule.moments is not None:
            self._run(rule.moments, g, st, h, None, None)
        self._run(rule.direction, g, st, h, us, u)
        s.copy_(u)
        torch._foreach_mul_(ss, _neg(g, hp))
        sel = (s >= 0) if t_const == 0 else (s > 0)
        phi = self._where(hp, chunk, sel, None, None, fdt)
        del sel, s, ss  # (ss views s)
        steps = step_sizes(hp, h, chunk)
        phis = [phi[pc.offset: pc.offset + pc.length] for pc in chunk.pieces]
        if self.foreach:
            update(p, us, phis, steps, hp, u, phi)
        else:
            for i in range(len(p)):
                update(p[i: i + 1], us[i: i + 1], phis[i: i + 1], steps[i: i + 1], hp)
        if rule.finish is not None:
            self._run(rule.finish, g, st, h, None, None)
        return True


def _piece_slices(flat: Tensor, chunk) -> List[Tensor]:
    """Per piece its view of the flat chunk buffer (a function: a comprehension in the caller
    would make the buffer a closure cell, which dynamo cannot ``del``)."""
    return [flat[pc.offset: pc.offset + pc.length] for pc in chunk.pieces]


def _ity(scratch: Tensor) -> torch.dtype:
    return torch.int64 if scratch.dtype == torch.float64 else torch.int32


def traced_lr(hp, device):
    """``hp`` with a python-float lr made a 0-d float64 tensor while ``torch.compile`` traces
    the step (unchanged otherwise).  Traced, a python float is a symbolic float: Python
    arithmetic on it that ends in a scalar argument of an op (``1 - lr*wd`` of a foreach
    multiply, ``value=-lr``) makes dynamo specialise it, a guard ``lr == value`` that a
    scheduler breaks at every step (a recompile each).  ``ones * lr`` is a tensor op, which
    dynamo keeps symbolic (the float is a graph input): every later use is tensor math, the
    path a tensor lr takes in eager steps."""
    lr = hp["lr"]
    if isinstance(lr, Tensor) or not torch.compiler.is_compiling():
        return hp
    return dict(hp, lr=torch.ones((), dtype=torch.float64, device=device) * lr)


def step_sizes(hp, h, chunk) -> list:
    """lr_eff per piece: lr (torch), lr*sqrt(bc2)/bc1 (authors, with bias correction), times
    Muon's per-matrix scale (applied in the matrix hook)."""
    lr = hp["lr"]
    if hp.get("convention", "torch") == "authors" and hp.get("correct_bias", True) and "exp_avg_sq" in hp.get("state", ()):
        return [lr * (b2 ** 0.5) / b1 for b1, b2 in zip(h["bc1"], h["bc2"])]
    return [lr] * len(chunk.pieces)


def update(params, us, phis, steps, hp, flat=None, phi=None) -> None:
    """p *= 1 - lr*wd ; p -= lr_eff * phi * u.  Decoupled decay comes first in both
    conventions (the authors' AdamW and Lion decay p before their moment update, which
    does not read p).  ``us`` may be consumed (it is the scratch).  One python-float lr for
    all pieces: one ``addcmul`` (``p + (-lr) * u * phi``); otherwise ``u *= phi`` (one op over
    ``flat``/``phi``, the buffers ``us``/``phis`` view, when given), ``u *= lr_eff``, ``p -= u``."""
    wd, lr = hp["weight_decay"], hp["lr"]
    uniform = not isinstance(lr, torch.Tensor) and all(s is lr for s in steps)
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)
    if uniform:
        torch._foreach_addcmul_(params, us, phis, value=-lr)
        return
    if flat is not None:
        flat.mul_(phi)
    else:
        torch._foreach_mul_(us, phis)
    if all(s is lr for s in steps) and flat is not None:
        flat.mul_(lr)
    elif any(isinstance(s, torch.Tensor) for s in steps):
        torch._foreach_mul_(us, [s if isinstance(s, torch.Tensor) else torch.tensor(float(s)) for s in steps])
    else:
        torch._foreach_mul_(us, [float(s) for s in steps])
    torch._foreach_sub_(params, us)
