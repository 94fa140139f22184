"""CUDA backend: multi-tensor Triton kernels for AdamW and Lion (Muon and float64 params run
``TorchOps``, i.e. ``super()``).  Imported lazily by the dispatcher only (``import triton``).

A step of a top-K chunk (on CUDA a chunk holds the whole param group, ``plan.chunk_cap``):

    zeros       one int64 work buffer: 3 per-unit histograms (2048 bins), per-unit state, tie counts
    score       moments, u, s = u*g -> order key; the 2048-bin histogram of the top 11 key bits
                (see "histograms" below) added to the unit's int64 row
    digit  x3   one program per unit: the digit where the count from the top reaches the K still
                needed (``radix.choose_digit``), the prefix, K left; after the last pass the
                K-th key ``t`` and whether the ties at ``t`` need an index-order cut
    pass   x2   11 then 10 more bits: histogram of the keys matching the unit's prefix
    ties        per program, the keys equal to ``t`` (programs of units without a cut return at once),
                an index-order scan of the counts (a few tiny torch ops; ``all_reduce`` per slot
                when the unit spans ranks), and the losing ties lowered to ``t - 1`` (the contract
                of ``kernels.base``: afterwards ``key >= t`` is exactly "selected")
    apply       phi = alpha if key >= t else gamma, u recomputed from the state, the step

That is 9 kernel launches and 15 tiny torch ops a step, whatever the number of tensors
(``python -m mgup_dist.opcount``; with ``capturable=True`` the optimizer's device step counters
and bias corrections add 4 ops, which the kernels read in place); a group mixing parameter
dtypes (bf16 weights, fp32 norms) launches score and apply once per dtype class.  The
all-reduces of a chunk split over ranks are one per radix pass plus one for the ties, as the
generic path (``selection.threshold``).  Cautious mode is one launch of the fused apply kernel.

Histograms: each program counts digits into its own private int32 row of 2048 bins in global
memory (8 KiB, L2-resident) with one relaxed atomic add per element, then adds the row's
non-zero bins to the unit's int64 row once and clears it; exact-zero keys (the scores of zero
gradients, e.g. embedding rows of tokens not in the batch: the commonest tie) are counted in
registers instead of serialising on one bin.  No ``tl.histogram``: its lowering differs between
Triton versions (warp ballots + popcounts in 3.6, shared-memory atomics in 3.9), and the
kernels compile to the same lean code on both (``python -m mgup_dist.triton_table``).

Memory traffic per element by design (fp32 params, grads and states; AdamW; fused AdamW: 28 B):

    score        read g, m, v; write m, v, key                                 24 B
    pass 1, 2    read key                                                       8 B
    ties         read key twice (count, then cut), units whose ties need a cut only 0-8 B
    apply        read key, m, v, p; write p  (Lion: + g, write m; no v)        20 B
    total                                                                      52 B (+8 on a tie cut)
    cautious     read g, m, v, p; write m, v, p (one pass, no scratch)         28 B

Math is fp32 (bf16/fp16 params, grads, states are loaded and upcast) with IEEE division and
square root (``div_rn``, ``sqrt_rn``), in the operation order of ``mgup_dist.rules``, with the
contractions that torch's CUDA kernels make (``add_(x, alpha=a)`` -> ``fma(a, x, self)``,
``addcmul_(x, x, value=c)`` -> ``fma(c, x*x, self)``) and no other (``enable_fp_fusion=False``).
Half-precision values are rounded to nearest even by hand (NaN stays NaN): the interpreter
truncates a float cast.  Every program takes, per piece, the vectorised loop (unmasked main
loop over ``BLOCK`` elements with alignment hints: ``ld.global.v4``) when the piece's addresses
and scratch offset are 16-byte aligned, else the same loop with scalar loads, so one odd piece
does not make the others scalar.  No step reads the device from the host or copies pageable
memory to it: tables are made on the host and copied pinned and non-blocking (cached per plan),
python-float hyperparameters are kernel arguments.
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from .torch_ops import TorchOps, step_sizes
from .triton_kernels import (  # noqa: F401  (the device code; re-exported for tools and tests)
    NB, NUM_WARPS, TAB_W, WIDTHS, _I32_MAX, _I32_NAN, _SHIFTS, _ST_ROWS, _TAB_W, _adamw_u, _apply_block,
    _apply_kernel, _apply_range, _bias, _cast, _count, _digit_kernel, _flush, _idx, _keys_at, _ld, _lion_u,
    _moments, _pass_block, _pass_kernel, _pass_range, _ptr, _resolve_kernel, _score_block, _score_kernel,
    _score_range, _st, _tie_count_kernel, _tie_range, _to_key,
)

Tensor = torch.Tensor

__all__ = ["TritonCUDA", "WIDTHS", "NB", "NUM_WARPS"]

# ------------------------------------------------------------------------------- backend
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _dead():
    return None  # a weak reference to nothing


def _h2d(host: Tensor, device: torch.device) -> Tensor:
    """A host-made table on ``device`` without a device synchronisation: the host tensor itself
    on the CPU, else a pinned, non-blocking copy (the caching host allocator keeps the pinned
    block until the copy has run)."""
    if device.type == "cpu":
        return host
    if device.type == "meta":  # shapes only (launch counting): nothing is copied
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class TritonCUDA(TorchOps):
    """See the module doc.  ``span``: elements per program; ``block``: elements per loop
    iteration (a power of two, at least 4)."""

    name = "triton"

    def __init__(self, span: int = 1 << 15, block: int = 1024):
        super().__init__(foreach=True)
        if block < 4 or block & (block - 1) or span % block:
            raise ValueError(f"block must be a power of two >= 4 dividing span, got block={block}, span={span}")
        self.span, self.block = span, block

    # -- host tables (built from the plan once, cached in chunk.cache) ---------------------
    @staticmethod
    def _classes_of(rule, chunk, bufs):
        """Per piece its dtype class (param, grad, state types), or None when a piece has a
        type the kernels do not take (float64, complex) or states of two types."""
        sts = [bufs.states[s] for s in rule.state]
        lists = [bufs.params, bufs.grads] + sts
        kinds = [{x.dtype for x in xs if x is not None} for xs in lists]
        if all(len(k) == 1 for k in kinds):  # one dtype a list (the usual group): one class for every piece
            c = tuple(next(iter(k)) for k in kinds)
            if len(set(c[2:])) > 1 or not all(x in _TL for x in c):
                return None
            return [c[:3]] * len(chunk.pieces)
        out = [(bufs.params[b].dtype, bufs.grads[b].dtype) + tuple(x[b].dtype for x in sts)
               for b in (pc.buf for pc in chunk.pieces)]
        for c in set(out):
            if len(set(c[2:])) != 1 or not all(x in _TL for x in c):
                return None
        return [c[:3] for c in out]

    def _ours(self, rule, chunk, bufs):
        """The pieces' dtype classes when the kernels handle this step, else None: AdamW / Lion
        with fp32, bf16 or fp16 params, grads and states (one launch per class)."""
        if rule.name not in ("adamw", "lion") or not chunk.pieces:
            return None
        return self._classes_of(rule, chunk, bufs)

    def _static(self, chunk, device):
        """Per chunk, once: block table [n_blocks, 2] (piece, start), per-unit K (and 0 for
        the padding slot U), the tie-scan indices, and each program's private histogram row."""
        key = ("triton", device, self.span)
        hit = chunk.cache.get(key)
        if hit is None:
            rows, piece_first = [], []
            for i, pc in enumerate(chunk.pieces):
                piece_first.append(len(rows))
                rows += [(i, s) for s in range(0, pc.length, self.span)]
            n_slots = chunk.n_slots
            blk_piece = [i for i, _ in rows]
            slot_of = [chunk.pieces[i].slot if chunk.pieces[i].unit >= 0 else n_slots for i in blk_piece]
            first_slot = []  # per slot, the first slot of its unit (slots are in unit order)
            for s in range(n_slots):
                new_unit = s == 0 or chunk.slot_unit[s - 1] != chunk.slot_unit[s]
                first_slot.append(s if new_unit else first_slot[-1])
            first_slot.append(n_slots)
            t = lambda x: _h2d(torch.tensor(x, dtype=torch.int64), device)  # noqa: E731
            hit = {
                "blk": t(rows or [(0, 0)]).reshape(-1, 2),
                "rows": rows,
                "n": len(rows),
                "k": t(list(chunk.k) + [0]),
                "blk_slot": t(slot_of or [n_slots]),
                "blk_pfirst": t([piece_first[i] for i in blk_piece] or [0]),
                "first_slot": t(first_slot),
                # zero once; every program clears its row after each pass
                "priv": torch.zeros(max(len(rows), 1) * NB, dtype=torch.int32, device=device),
                "max1": torch.full((1,), _I32_MAX, dtype=torch.int32, device=device),
                "one1": torch.ones(1, dtype=torch.float32, device=device),
            }
            chunk.cache[key] = hit
        return hit

    def _launches(self, cls, chunk, device):
        """[(param, grad, state Triton types, block table, n_blocks)]: one launch per dtype
        class ``cls`` (``_ours``) of the chunk's pieces (one for the usual single-type group)."""
        stat = self._static(chunk, device)
        key = ("triton_cls", device, self.span, tuple(cls))
        hit = chunk.cache.get(key)
        if hit is None:
            kinds = sorted(set(cls), key=str)
            if len(kinds) == 1:
                hit = [(tuple(_TL[x] for x in kinds[0]), stat["blk"], stat["n"])]
            else:
                hit = []
                for kd in kinds:
                    rows = [r for r in stat["rows"] if cls[r[0]] == kd]
                    hit.append((tuple(_TL[x] for x in kd), _h2d(torch.tensor(rows, dtype=torch.int64), device),
                                len(rows)))
            chunk.cache[key] = hit
        return hit

    def _piece_table(self, rule, chunk, bufs, device, ptrs: bool):
        """[n_pieces, 8] int64: p, g, state0, state1 addresses, length, scratch offset, unit
        (U for padding), flags (bit 0: addresses 16-byte aligned, bit 1: scratch offset a
        multiple of 4); ``ptrs=False``: addresses 0, for the selection kernels.  Cached by the
        addresses: a moved buffer (``zero_grad(set_to_none=True)``) costs one pinned,
        non-blocking host-to-device copy, never a device synchronisation."""
        U = chunk.n_units
        key = ("triton_tab", device, ptrs)
        hit = chunk.cache.get(key)
        if not ptrs and hit is not None:
            return hit[2]
        hit = hit if ptrs else None
        if hit is not None and hit[3]() is bufs:
            return hit[2]  # score and apply of one step: the same buffers
        ts = [bufs.params, bufs.grads] + [bufs.states[s] for s in rule.state] if ptrs else []
        # the buffers' addresses, one call a tensor: equal to the cached ones, the table is reused
        bases = tuple(tuple(x.data_ptr() if x is not None else 0 for x in xs) for xs in ts)
        if hit is not None and hit[0] == bases:
            chunk.cache[key] = hit[:3] + (weakref.ref(bufs),)
            return hit[2]
        rows, addr = [], []
        for pc in chunk.pieces:
            a = [0, 0, 0, 0]
            for j, xs in enumerate(ts):
                x = xs[pc.buf]
                a[j] = x.data_ptr() + pc.start * x.element_size()
            addr += a
            flags = int(all(x % 16 == 0 for x in a)) | (2 if pc.offset % 4 == 0 else 0)
            rows.append(a + [pc.length, pc.offset, pc.unit if pc.unit >= 0 else U, flags])
        if hit is None or hit[1] != addr:
            tab = _h2d(torch.tensor(rows or [[0] * TAB_W], dtype=torch.int64), device)
        else:
            tab = hit[2]
        chunk.cache[key] = (bases, addr, tab, weakref.ref(bufs) if bufs is not None else _dead)
        return tab

    @staticmethod
    def _consts(rule, hp):
        b = hp["betas"]
        b1, b2 = float(b[0]), float(b[1])
        return dict(b1=b1, one_m_b1=1 - b1, b2=b2, one_m_b2=1 - b2, eps=float(hp.get("eps", 0.0)),
                    LION=rule.name == "lion", AUTHORS=hp.get("convention", "torch") == "authors",
                    MAXIMIZE=bool(hp.get("maximize", False)))

    @staticmethod
    def _device_bc(bcs, chunk):
        """The optimizer's device bias corrections (0-d views of one [2, n] tensor when the
        step counters live on the device) read in place: (base tensor, [n_pieces, 2] element
        offsets of bc1, bc2 from it), or None when they are not all views of one storage."""
        if not all(isinstance(x, Tensor) for x in bcs):
            return None
        base = bcs[0]
        if any(x.dtype != base.dtype or x.device != base.device
               or x.untyped_storage().data_ptr() != base.untyped_storage().data_ptr() for x in bcs):
            return None
        size = base.element_size()
        offs = [(x.data_ptr() - base.data_ptr()) // size for x in bcs]
        P = len(chunk.pieces)
        return base, [o for pair in zip(offs[:P], offs[P:]) for o in pair]

    def _scalars(self, rule, hp, chunk, bufs, device):
        """Bias corrections and step sizes, with no device synchronisation and no table op in
        the usual cases: kernel arguments when they are python floats equal over the chunk;
        a host-made table [3, n_pieces] (one pinned, non-blocking copy) when the step counts
        differ; the optimizer's own device tensors read in place by the kernels when the step
        counters are on the device (capturable); lr a kernel argument unless it is a device
        tensor (then read by the kernel)."""
        bc1 = [bufs.bc1[pc.buf] for pc in chunk.pieces]
        bc2 = [bufs.bc2[pc.buf] for pc in chunk.pieces]
        P = len(bc1)
        lr = hp["lr"]
        if isinstance(lr, Tensor) and lr.device.type == "cpu" and device.type != "cpu":
            lr = float(lr)  # a host value: no device read (a tensor on the kernels' device is read by them)
        lr_dev = isinstance(lr, Tensor)
        authors = hp.get("convention", "torch") == "authors" and hp.get("correct_bias", True) \
            and "exp_avg_sq" in hp.get("state", ())
        out = dict(sc_ptr=None, bc_ptr=None, bco_ptr=None, c1=1.0, c2=1.0, st=0.0, P=P, BC_MODE=0, ST_MODE=0,
                   lr=0.0 if lr_dev else float(lr), lr_dev=lr_dev,
                   # the step rounds as torch_ops.update: one fused multiply-add when the step size
                   # is the python lr itself, else (u*phi)*step
                   fma=not isinstance(hp["lr"], Tensor) and not authors)
        if set(map(type, bufs.bc1)) | set(map(type, bufs.bc2)) <= {float, int}:  # host floats (no Tensor)
            steps = None if lr_dev else step_sizes(dict(hp, lr=lr), {"bc1": bc1, "bc2": bc2}, chunk)
            if len(set(bc1)) <= 1 and len(set(bc2)) <= 1 and (steps is None or len(set(steps)) <= 1):
                out.update(c1=float(bc1[0]) if bc1 else 1.0, c2=float(bc2[0]) if bc2 else 1.0,
                           st=float(steps[0]) if steps else 0.0, ST_MODE=2 if lr_dev else 0)
                return out
            host = torch.tensor([bc1, bc2, steps if steps is not None else [0.0] * P], dtype=torch.float32)
            out.update(sc_ptr=_h2d(host, device), BC_MODE=1, ST_MODE=2 if lr_dev else 1)
            return out
        dev_bc = self._device_bc(bc1 + bc2, chunk)
        if dev_bc is not None:
            base, offs = dev_bc
            key = ("triton_bco", device, tuple(offs))
            bco = chunk.cache.get(key)
            if bco is None:
                bco = chunk.cache[key] = _h2d(torch.tensor(offs, dtype=torch.int64), device)
            out.update(bc_ptr=base, bco_ptr=bco, BC_MODE=2, ST_MODE=2)
            return out
        # mixed host floats and device tensors: one [2, P] fp32 table made on the device
        def one(x):
            if isinstance(x, Tensor):
                return x.reshape(()).to(dtype=torch.float32)
            return torch.full((), float(x), dtype=torch.float32, device=device)

        out.update(sc_ptr=torch.stack([one(x) for x in bc1 + bc2]), BC_MODE=1, ST_MODE=2)
        return out

    def _args(self, sc, tab):
        """The scalar-table pointers of ``_scalars`` (a dummy pointer where unused)."""
        return dict(sc_ptr=sc["sc_ptr"] if sc["sc_ptr"] is not None else tab,
                    bc_ptr=sc["bc_ptr"] if sc["bc_ptr"] is not None else tab,
                    bco_ptr=sc["bco_ptr"] if sc["bco_ptr"] is not None else tab,
                    c1=sc["c1"], c2=sc["c2"], P=sc["P"], BC_MODE=sc["BC_MODE"])

    # -- phase 1 ----------------------------------------------------------------------------
    def score(self, rule, hp, chunk, bufs, scratch):
        cls = self._ours(rule, chunk, bufs) if scratch.dtype == torch.float32 else None
        if cls is None:
            return super().score(rule, hp, chunk, bufs, scratch)
        dev = scratch.device
        stat = self._static(chunk, dev)
        tab = self._piece_table(rule, chunk, bufs, dev, True)
        topk = hp.get("mode", "topk") == "topk"
        work = self._work(chunk, dev) if topk else None
        sc = self._scalars(rule, hp, chunk, bufs, dev)
        for (_, G_T, S_T), blk, n in self._launches(cls, chunk, dev):
            if n:
                _score_kernel[(n,)](
                    tab, blk, scratch.view(torch.int32), stat["priv"], work if topk else tab, U=chunk.n_units,
                    G_T=G_T, S_T=S_T, HIST=topk, SPAN=self.span, BLOCK=self.block, NBINS=NB, SHIFT0=_SHIFTS[0],
                    enable_fp_fusion=False, num_warps=NUM_WARPS, **self._args(sc, tab), **self._consts(rule, hp))
        return work

    def _work(self, chunk, device) -> Tensor:
        """One zeroed int64 buffer per step: 3 histograms [U+1, NB], the state [4, U+1], the
        tie counts [n_blocks]: one fill for all of phase 2's scratch."""
        U1 = chunk.n_units + 1
        n = self._static(chunk, device)["n"]
        return torch.zeros(3 * U1 * NB + _ST_ROWS * U1 + max(n, 1), dtype=torch.int64, device=device)

    # -- phase 2 ----------------------------------------------------------------------------
    def select(self, chunk, keys, hist0, reduce):
        """AIR-style radix select of every unit of the chunk at once (see the module doc).
        Taken for every int32-key chunk, also when this rank holds none of the chunk's pieces
        or another backend scored it (Muon): the same collectives on every rank."""
        if keys.dtype != torch.int32:
            return super().select(chunk, keys, hist0, reduce)
        dev = keys.device
        U, U1 = chunk.n_units, chunk.n_units + 1
        stat = self._static(chunk, dev)
        work = hist0 if hist0 is not None else self._work(chunk, dev)
        hists = work[: 3 * U1 * NB].view(3, U1, NB)
        st = work[3 * U1 * NB: 3 * U1 * NB + _ST_ROWS * U1]
        cnt = work[3 * U1 * NB + _ST_ROWS * U1:]
        tab = self._piece_table(None, chunk, None, dev, False)
        run = stat["n"] > 0 and bool(chunk.pieces)
        common = dict(SPAN=self.span, BLOCK=self.block, num_warps=NUM_WARPS)
        for p, (shift, width) in enumerate(zip(_SHIFTS, WIDTHS)):
            if run and (p > 0 or hist0 is None):
                _pass_kernel[(stat["n"],)](tab, stat["blk"], keys, stat["priv"], st, stat["k"], hists[p], U,
                                           FIRST=p == 0, SHIFT=shift, WIDTH=width, NBINS=NB, **common)
            reduce(hists[p])
            _digit_kernel[(U1,)](hists[p], st, stat["k"], U1, FIRST=p == 0, LAST=p == len(WIDTHS) - 1,
                                 WIDTH=width, NBINS=NB, num_warps=NUM_WARPS)
        # ties at t that need a cut: ranked in index order over all ranks' pieces of the unit
        if run:
            _tie_count_kernel[(stat["n"],)](tab, stat["blk"], keys, st, cnt, U, U1, **common)
        nb = max(stat["n"], 1)
        c = cnt[:nb]
        slots = torch.zeros(chunk.n_slots + 1, dtype=torch.int64, device=dev).index_add_(0, stat["blk_slot"], c)
        reduce(slots)
        s_excl = slots.cumsum(0) - slots
        before_slot = s_excl - s_excl.index_select(0, stat["first_slot"])  # ties in earlier slots of the unit
        b_excl = c.cumsum(0) - c
        base = before_slot.index_select(0, stat["blk_slot"]) + b_excl - b_excl.index_select(0, stat["blk_pfirst"])
        if run:
            _resolve_kernel[(stat["n"],)](tab, stat["blk"], keys, st, base, U, U1, **common)
        return st[2 * U1: 2 * U1 + U].to(torch.int32)

    # -- phase 3 ----------------------------------------------------------------------------
    def _launch_apply(self, cls, rule, hp, chunk, bufs, keys, t_key, denom, t_const, cautious):
        dev = bufs.params[chunk.pieces[0].buf].device
        stat = self._static(chunk, dev)
        if not stat["n"]:
            return
        tab = self._piece_table(rule, chunk, bufs, dev, True)
        sc = self._scalars(rule, hp, chunk, bufs, dev)
        wd = float(hp["weight_decay"])
        lr = sc["lr"]
        # per unit, and for the padding slot U: t = the int32 maximum (never selected), denom = 1
        t_tab = torch.cat([t_key.to(torch.int32), stat["max1"]]) if t_key is not None else tab
        d_tab = torch.cat([denom.to(torch.float32), stat["one1"]]) if denom is not None else tab
        for (P_T, G_T, S_T), blk, n in self._launches(cls, chunk, dev):
            if not n:
                continue
            _apply_kernel[(n,)](
                tab, blk, keys if keys is not None else tab, t_tab, d_tab,
                lr_ptr=hp["lr"] if sc["lr_dev"] else tab, st=sc["st"], lr=lr,
                decay=0.0 if sc["lr_dev"] else 1 - lr * wd,
                wd=wd, alpha=float(hp["alpha"]), gamma=float(hp["gamma"]), t_const=int(t_const), U=chunk.n_units,
                P_T=P_T, G_T=G_T, S_T=S_T, CAUTIOUS=cautious, HAS_DENOM=denom is not None,
                ST_MODE=sc["ST_MODE"], LR_DEV=sc["lr_dev"], HAS_WD=wd != 0, FMA_STEP=sc["fma"],
                SPAN=self.span, BLOCK=self.block, enable_fp_fusion=False, num_warps=NUM_WARPS, **self._args(sc, tab),
                **self._consts(rule, hp))

    def apply(self, rule, hp, chunk, bufs, scratch, t_key, denom):
        cls = self._ours(rule, chunk, bufs) if scratch.dtype == torch.float32 else None
        if cls is None:
            return super().apply(rule, hp, chunk, bufs, scratch, t_key, denom)
        self._launch_apply(cls, rule, hp, chunk, bufs, scratch.view(torch.int32), t_key, denom, 0, False)

    def cautious(self, rule, hp, chunk, bufs, t_const: int) -> bool:
        cls = self._ours(rule, chunk, bufs)
        if cls is None:
            return False
        self._launch_apply(cls, rule, hp, chunk, bufs, None, None, None, t_const, True)
        return True
