"""CUDA backend: multi-tensor Triton kernels for AdamW and Lion (Muon and float64 params:
``TorchOps``, i.e. ``super()``).  Imported lazily by the dispatcher only (``import triton``).

Every launch covers all pieces of a chunk.  Per chunk the host builds once, and caches in
``chunk.cache`` keyed by the buffers' ``data_ptr()``, a piece table (int64 addresses of
param / grad / states, length, scratch offset, unit) and a block table (program -> piece,
start): each program covers ``span`` elements of one piece (a loop of ``block``), so a
repeat step or a CUDA-graph replay needs no host-to-device copy.  Scalars (lr, bias
corrections, step sizes) are kernel arguments when they are python floats equal over the
chunk, else per-piece device tables read by pointer (0-d device tensors: CUDA graphs).

Math is fp32 (bf16/fp16 params, grads, states are loaded and upcast), with round-to-nearest
division and sqrt (``div_rn``, ``sqrt_rn``), in the operation order of ``mgup_dist.rules``,
explicit ``tl.fma`` where torch's kernels fuse one (``add_(x, alpha=)`` and ``addcmul_``
compute ``fma(alpha, x, self)`` on CPU and CUDA) and no other contraction
(``enable_fp_fusion=False`` at the score and apply launches): on CUDA the keys should equal
torch's bit for bit (not verified on a GPU yet: ``tests/test_cuda.py``).  On CPU, torch's
``sqrt`` is not correctly rounded, so AdamW's keys there differ by a few ulps (the interpreter
tests say so); the selection on the *same* keys is bitwise everywhere.  Half-precision
*states* are rounded once per update here, where torch's op-by-op path rounds after every op.
All kernels compile for sm_90 with Triton 3.9 (checked ahead of time, no GPU) and use only
APIs present in Triton 3.6.

Memory traffic per element (fp32 everything, AdamW; Lion one state less):

    score        read g, m, v; write m, v, key                    24 B
                 (+ one 4096-bin int32 histogram per program of ``span`` elements:
                 16 KiB per 16K elements = 1 B per element, transient, reduced per unit)
    histogram    read key                                           4 B
    tie_counts   read key                                           4 B  (resolve_ties: +4+4 B,
                                                                         only blocks with ties)
    apply        read key, g, m, v, p; write p                     24 B  (Lion: +write m)
    cautious     read g, m, v, p; write m, v, p                    28 B  (one pass, no scratch)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .base import KEY_NAN, radix_widths
from .torch_ops import TorchOps, step_sizes

Tensor = torch.Tensor

__all__ = ["TritonCUDA"]

_I32_NAN = KEY_NAN(torch.int32)
_F32_INF_BITS = 0x7F800000


# ------------------------------------------------------------------------------ device math
@triton.jit
def _scalar(arg, stride, piece, IS_TABLE: tl.constexpr):
    """A per-piece scalar: a kernel argument, or ``arg[piece * stride]`` (stride 0: one
    device value for every piece)."""
    if IS_TABLE:
        return tl.load(arg + piece * stride).to(tl.float32)
    else:
        return arg


@triton.jit
def _cast(x, T: tl.constexpr):
    """fp32 -> T rounded to nearest even.  bf16 by hand: (bits + 0x7FFF + lsb) >> 16, since
    Triton's interpreter truncates fp32 -> bf16 (the GPU rounds; both agree with this)."""
    if T == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(T)


@triton.jit
def _to_key(s):
    """keys_: IEEE sign-magnitude bits -> two's-complement order; -0 -> +0; NaN -> KEY_NAN."""
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(s == 0.0, 0, key)
    nan = (key > 0x7F800000) | (key < -0x7F800000 - 1)
    return tl.where(nan, -2147483647, key)


@triton.jit
def _adamw_u(m, v, bc1, bc2, eps, AUTHORS: tl.constexpr):
    # torch:   u = (m / (sqrt(v / bc2) + eps)) / bc1 ;  authors: u = m / (sqrt(v) + eps)
    if AUTHORS:
        return tl.math.div_rn(m, tl.math.sqrt_rn(v) + eps)
    else:
        d = tl.math.sqrt_rn(tl.math.div_rn(v, bc2)) + eps
        return tl.math.div_rn(tl.math.div_rn(m, d), bc1)


@triton.jit
def _lion_u(g, m, b1, one_m_b1):
    # u = sign(b1*m + (1-b1)*g)   (NaN stays NaN, as torch.sign)
    c = tl.fma(one_m_b1, g, m * b1)
    return tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, c * 0.0))


@triton.jit
def _piece_row(tab, piece):
    # piece table row: p, g, s0, s1 (int64 addresses), length, offset, unit
    row = tab + piece * 7
    return (tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
            tl.load(row + 4), tl.load(row + 5), tl.load(row + 6))


# ------------------------------------------------------------------------------- kernels
@triton.jit
def _score_kernel(tab, blk, keys_ptr, hist_ptr, bc1, bc1_s, bc2, bc2_s,
                  b1, one_m_b1, b2, one_m_b2, eps,
                  G_T: tl.constexpr, S_T: tl.constexpr,
                  LION: tl.constexpr, AUTHORS: tl.constexpr, MAXIMIZE: tl.constexpr,
                  BC_TAB: tl.constexpr, SPAN: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    """s = u*g per element (state updated in place for AdamW), key(s) into the scratch, and
    this program's histogram of (key >> 20) + 2048 into hist[pid]."""
    pid = tl.program_id(0)
    piece = tl.load(blk + pid * 2)
    start = tl.load(blk + pid * 2 + 1)
    pa, ga, s0a, s1a, n, off, unit = _piece_row(tab, piece)
    gp = ga.to(tl.pointer_type(G_T))
    mp = s0a.to(tl.pointer_type(S_T))
    vp = s1a.to(tl.pointer_type(S_T))
    c1 = _scalar(bc1, bc1_s, piece, BC_TAB)
    c2 = _scalar(bc2, bc2_s, piece, BC_TAB)
    acc = tl.zeros((NB,), dtype=tl.int32)
    n_masked = 0
    for i in range(0, SPAN, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        msk = idx < n
        g = tl.load(gp + idx, mask=msk, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        m = tl.load(mp + idx, mask=msk, other=0.0).to(tl.float32)
        if LION:
            u = _lion_u(g, m, b1, one_m_b1)  # state moves in apply (late_state)
        else:
            # m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g*g
            m = tl.fma(one_m_b1, g, m * b1)
            v = tl.load(vp + idx, mask=msk, other=0.0).to(tl.float32)
            v = tl.fma(one_m_b2 * g, g, v * b2)
            tl.store(mp + idx, _cast(m, S_T), mask=msk)
            tl.store(vp + idx, _cast(v, S_T), mask=msk)
            # u from the stored (rounded) state, as apply will recompute it
            u = _adamw_u(_cast(m, S_T).to(tl.float32), _cast(v, S_T).to(tl.float32), c1, c2, eps, AUTHORS)
        key = _to_key(u * g)
        tl.store(keys_ptr + off + idx, key, mask=msk)
        digit = tl.where(msk, (key >> 20) + NB // 2, 0)
        acc += tl.histogram(digit, NB)
        n_masked += tl.sum((~msk).to(tl.int32), axis=0)
    bins = tl.arange(0, NB)
    acc -= tl.where(bins == 0, n_masked, 0)  # masked lanes were counted in bin 0
    tl.store(hist_ptr + pid.to(tl.int64) * NB + bins, acc)


@triton.jit
def _hist_kernel(tab, blk, keys_ptr, prefix_ptr, hist_ptr, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                 SPAN: tl.constexpr, BLOCK: tl.constexpr):
    """Pass p > 0: histogram of (key >> SHIFT) & (2**WIDTH - 1) over the keys whose bits above
    SHIFT + WIDTH equal prefix[unit]."""
    NB: tl.constexpr = 1 << WIDTH
    pid = tl.program_id(0)
    piece = tl.load(blk + pid * 2)
    start = tl.load(blk + pid * 2 + 1)
    n = tl.load(tab + piece * 7 + 4)
    off = tl.load(tab + piece * 7 + 5)
    unit = tl.load(tab + piece * 7 + 6)
    pre = tl.load(prefix_ptr + tl.maximum(unit, 0))
    acc = tl.zeros((NB,), dtype=tl.int32)
    n_masked = 0
    for i in range(0, SPAN, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        key = tl.load(keys_ptr + off + idx, mask=idx < n, other=0)
        ok = (idx < n) & ((key >> (SHIFT + WIDTH)).to(tl.int64) == pre) & (unit >= 0)
        acc += tl.histogram(tl.where(ok, (key >> SHIFT) & (NB - 1), 0), NB)
        n_masked += tl.sum((~ok).to(tl.int32), axis=0)
    bins = tl.arange(0, NB)
    acc -= tl.where(bins == 0, n_masked, 0)
    tl.store(hist_ptr + pid.to(tl.int64) * NB + bins, acc)


@triton.jit
def _tie_count_kernel(tab, blk, keys_ptr, t_ptr, cnt_ptr, SPAN: tl.constexpr, BLOCK: tl.constexpr):
    """cnt[pid] = #{key == t_key[unit]} in this program's range (0 for padding)."""
    pid = tl.program_id(0)
    piece = tl.load(blk + pid * 2)
    start = tl.load(blk + pid * 2 + 1)
    n = tl.load(tab + piece * 7 + 4)
    off = tl.load(tab + piece * 7 + 5)
    unit = tl.load(tab + piece * 7 + 6)
    t = tl.load(t_ptr + tl.maximum(unit, 0))
    c = 0
    for i in range(0, SPAN, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        key = tl.load(keys_ptr + off + idx, mask=idx < n, other=0)
        c += tl.sum(((idx < n) & (key == t) & (unit >= 0)).to(tl.int32), axis=0)
    tl.store(cnt_ptr + pid, c)


@triton.jit
def _resolve_kernel(tab, blk, keys_ptr, t_ptr, cnt_ptr, base_ptr, take_ptr, SPAN: tl.constexpr, BLOCK: tl.constexpr):
    """Ties of a piece ranked in index order: rank = (ties in earlier programs of the piece:
    base) + running in-block cumsum.  A tie of rank > take[piece] drops to t - 1."""
    pid = tl.program_id(0)
    if tl.load(cnt_ptr + pid) == 0:
        return
    piece = tl.load(blk + pid * 2)
    start = tl.load(blk + pid * 2 + 1)
    n = tl.load(tab + piece * 7 + 4)
    off = tl.load(tab + piece * 7 + 5)
    unit = tl.load(tab + piece * 7 + 6)
    t = tl.load(t_ptr + tl.maximum(unit, 0))
    take = tl.load(take_ptr + piece)
    rank0 = tl.load(base_ptr + pid)
    for i in range(0, SPAN, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        msk = idx < n
        key = tl.load(keys_ptr + off + idx, mask=msk, other=0)
        tie = (msk & (key == t)).to(tl.int32)
        rank = rank0 + tl.cumsum(tie, axis=0)  # 1-based rank of each tie within the piece
        lose = (tie > 0) & (rank > take)
        tl.store(keys_ptr + off + idx, key - lose.to(tl.int32), mask=msk)
        rank0 += tl.sum(tie, axis=0)


@triton.jit
def _apply_kernel(tab, blk, keys_ptr, t_ptr, denom_ptr, bc1, bc1_s, bc2, bc2_s, step, step_s, lr, lr_s,
                  b1, one_m_b1, b2, one_m_b2, eps, wd, decay_c, alpha, gamma, t_const,
                  P_T: tl.constexpr, G_T: tl.constexpr, S_T: tl.constexpr,
                  LION: tl.constexpr, AUTHORS: tl.constexpr, MAXIMIZE: tl.constexpr, CAUTIOUS: tl.constexpr,
                  HAS_DENOM: tl.constexpr, BC_TAB: tl.constexpr, STEP_TAB: tl.constexpr, LR_TAB: tl.constexpr,
                  HAS_WD: tl.constexpr, SPAN: tl.constexpr, BLOCK: tl.constexpr):
    """phi = alpha if key >= t else gamma (/ denom[unit]); u from the state (CAUTIOUS: the
    moments move here first and key = key(u*g), t = t_const); p *= 1 - lr*wd (both conventions);
    p -= step * (phi * u); Lion: m = b2*m + (1-b2)*g last."""
    pid = tl.program_id(0)
    piece = tl.load(blk + pid * 2)
    start = tl.load(blk + pid * 2 + 1)
    pa, ga, s0a, s1a, n, off, unit = _piece_row(tab, piece)
    pp = pa.to(tl.pointer_type(P_T))
    gp = ga.to(tl.pointer_type(G_T))
    mp = s0a.to(tl.pointer_type(S_T))
    vp = s1a.to(tl.pointer_type(S_T))
    c1 = _scalar(bc1, bc1_s, piece, BC_TAB)
    c2 = _scalar(bc2, bc2_s, piece, BC_TAB)
    st = _scalar(step, step_s, piece, STEP_TAB)
    if LR_TAB:  # lr on the device: 1 - lr*wd in fp32, as torch computes it from a tensor lr
        decay = 1.0 - _scalar(lr, lr_s, piece, LR_TAB) * wd
    else:  # python lr: 1 - lr*wd in double on the host, rounded once (as torch's scalar)
        decay = decay_c
    if CAUTIOUS:
        t = t_const
    else:
        t = tl.load(t_ptr + tl.maximum(unit, 0))
    a = alpha
    c = gamma
    if HAS_DENOM:
        d = tl.load(denom_ptr + tl.maximum(unit, 0)).to(tl.float32)
        a = tl.math.div_rn(a, d)
        c = tl.math.div_rn(c, d)
    for i in range(0, SPAN, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        msk = idx < n
        g = tl.load(gp + idx, mask=msk, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        m = tl.load(mp + idx, mask=msk, other=0.0).to(tl.float32)
        if LION:
            u = _lion_u(g, m, b1, one_m_b1)
        else:
            v = tl.load(vp + idx, mask=msk, other=0.0).to(tl.float32)
            if CAUTIOUS:
                m = _cast(tl.fma(one_m_b1, g, m * b1), S_T)
                v = _cast(tl.fma(one_m_b2 * g, g, v * b2), S_T)
                tl.store(mp + idx, m, mask=msk)
                tl.store(vp + idx, v, mask=msk)
                m = m.to(tl.float32)
                v = v.to(tl.float32)
            u = _adamw_u(m, v, c1, c2, eps, AUTHORS)
        if CAUTIOUS:
            key = _to_key(u * g)
        else:
            key = tl.load(keys_ptr + off + idx, mask=msk, other=0)
        phi = tl.where((key >= t) & (unit >= 0), a, c)
        p = tl.load(pp + idx, mask=msk, other=0.0).to(tl.float32)
        if HAS_WD:
            p = _cast(p * decay, P_T).to(tl.float32)
        p = p - (u * phi) * st
        tl.store(pp + idx, _cast(p, P_T), mask=msk)
        if LION:
            tl.store(mp + idx, _cast(tl.fma(one_m_b2, g, m * b2), S_T), mask=msk)


# ------------------------------------------------------------------------------- backend
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class TritonCUDA(TorchOps):
    """See the module doc.  ``span``: elements per program; ``block``: elements per loop
    iteration (a power of two)."""

    name = "triton"

    def __init__(self, span: int = 1 << 14, block: int = 1024):
        super().__init__(foreach=True)
        if block <= 0 or block & (block - 1) or span % block:
            raise ValueError(f"block must be a power of two dividing span, got block={block}, span={span}")
        self.span, self.block = span, block

    # -- host tables ----------------------------------------------------------------------
    def _ours(self, rule, chunk, bufs) -> bool:
        """Rules and dtypes the kernels handle: AdamW / Lion, one float type each for the
        params, the grads and the states of the chunk, none of them float64."""
        if rule.name not in ("adamw", "lion") or not chunk.pieces:
            return False
        ts = {
            "p": {bufs.params[pc.buf].dtype for pc in chunk.pieces},
            "g": {bufs.grads[pc.buf].dtype for pc in chunk.pieces},
            "s": {bufs.states[s][pc.buf].dtype for pc in chunk.pieces for s in rule.state},
        }
        return all(len(v) == 1 and next(iter(v)) in _TL for v in ts.values())

    def _blocks(self, chunk, device):
        """Block table [n_blocks, 2] int64 (piece, start), block units, and each piece's
        first block (cached per chunk)."""
        key = ("triton_blocks", device, self.span)
        hit = chunk.cache.get(key)
        if hit is None:
            rows, first = [], []
            for i, pc in enumerate(chunk.pieces):
                first.append(len(rows))
                rows += [(i, s) for s in range(0, pc.length, self.span)]
            unit = [chunk.pieces[i].unit if chunk.pieces[i].unit >= 0 else chunk.n_units for i, _ in rows]
            hit = {
                "blk": torch.tensor(rows or [(0, 0)], dtype=torch.int64, device=device).reshape(-1, 2),
                "n": len(rows),
                "unit": torch.tensor(unit or [0], dtype=torch.int64, device=device),
                "piece": torch.tensor([i for i, _ in rows] or [0], dtype=torch.int64, device=device),
                "first": torch.tensor(first or [0], dtype=torch.int64, device=device),
            }
            chunk.cache[key] = hit
        return hit

    def _piece_table(self, rule, chunk, bufs, device, ptrs: bool):
        """[n_pieces, 7] int64: p, g, state0, state1 addresses, length, scratch offset, unit
        (``ptrs=False``: addresses 0, for the phases that read the scratch only).  Cached in
        ``chunk.cache`` by the addresses: a new host-to-device copy only when a buffer moves."""
        rows, addr = [], []
        for pc in chunk.pieces:
            a = [0, 0, 0, 0]
            if ptrs:
                ts = [bufs.params[pc.buf], bufs.grads[pc.buf]] + [bufs.states[s][pc.buf] for s in rule.state]
                for j, t in enumerate(ts):
                    a[j] = t.data_ptr() + pc.start * t.element_size()
            addr += a
            rows.append(a + [pc.length, pc.offset, pc.unit])
        key = ("triton_tab", device, ptrs, tuple(addr))
        hit = chunk.cache.get(key)
        if hit is None:
            stale = [k for k in chunk.cache if isinstance(k, tuple) and k[:3] == ("triton_tab", device, ptrs)]
            for k in stale:
                del chunk.cache[k]  # one table per chunk and kind: a moved buffer's table goes
            hit = torch.tensor(rows, dtype=torch.int64, device=device)
            chunk.cache[key] = hit
        return hit

    @staticmethod
    def _scal(values, device):
        """(arg, stride, is_table): one python float shared by all pieces -> the float itself;
        otherwise a per-piece fp32 device table (0-d tensors are stacked on the device, no
        host read; a single 0-d tensor is read with stride 0)."""
        if all(not isinstance(v, Tensor) for v in values) and len(set(values)) <= 1:
            return (float(values[0]) if values else 0.0), 0, False
        if len(values) > 0 and all(v is values[0] for v in values) and isinstance(values[0], Tensor):
            return values[0].to(device=device, dtype=torch.float32).reshape(1), 0, True
        ts = [v.to(device=device, dtype=torch.float32).reshape(()) if isinstance(v, Tensor)
              else torch.full((), v, dtype=torch.float32, device=device) for v in values]
        return torch.stack(ts), 1, True

    @staticmethod
    def _consts(rule, hp):
        b = hp["betas"]
        b1, b2 = float(b[0]), float(b[1])
        return dict(b1=b1, one_m_b1=1 - b1, b2=b2, one_m_b2=1 - b2, eps=float(hp.get("eps", 0.0)),
                    LION=rule.name == "lion", AUTHORS=hp.get("convention", "torch") == "authors",
                    MAXIMIZE=bool(hp.get("maximize", False)))

    def _dtypes(self, rule, chunk, bufs):
        pc = chunk.pieces[0]
        return (_TL[bufs.params[pc.buf].dtype], _TL[bufs.grads[pc.buf].dtype],
                _TL[bufs.states[rule.state[0]][pc.buf].dtype])

    # -- phase 1 ----------------------------------------------------------------------------
    def score(self, rule, hp, chunk, bufs, scratch):
        if not self._ours(rule, chunk, bufs):
            return super().score(rule, hp, chunk, bufs, scratch)
        dev = scratch.device
        tab = self._piece_table(rule, chunk, bufs, dev, True)
        b = self._blocks(chunk, dev)
        nb = 1 << radix_widths(32)[0]
        hist = torch.empty(b["n"], nb, dtype=torch.int32, device=dev)
        bc1, s1, t1 = self._scal([bufs.bc1[pc.buf] for pc in chunk.pieces], dev)
        bc2, s2, t2 = self._scal([bufs.bc2[pc.buf] for pc in chunk.pieces], dev)
        _, G_T, S_T = self._dtypes(rule, chunk, bufs)
        if t1 != t2:  # one flag for both: make both tables
            (bc1, s1, t1), (bc2, s2, t2) = (self._table(bc1, s1, t1, dev), self._table(bc2, s2, t2, dev))
        if not b["n"]:
            return self._reduce(chunk, b, hist)
        _score_kernel[(b["n"],)](
            tab, b["blk"], scratch.view(torch.int32), hist, bc1, s1, bc2, s2,
            G_T=G_T, S_T=S_T, BC_TAB=t1, SPAN=self.span, BLOCK=self.block, NB=nb,
            enable_fp_fusion=False, **self._consts(rule, hp))
        return self._reduce(chunk, b, hist)

    @staticmethod
    def _table(arg, stride, is_tab, dev):
        if is_tab:
            return arg, stride, True
        return torch.full((1,), arg, dtype=torch.float32, device=dev), 0, True

    @staticmethod
    def _reduce(chunk, b, hist):
        """Per-program histograms -> per unit (padding programs land in the dropped row)."""
        # int32 sums (a chunk holds < 2**31 elements): no int64 copy of the per-program rows
        out = torch.zeros(chunk.n_units + 1, hist.shape[1], dtype=torch.int32, device=hist.device)
        out.index_add_(0, b["unit"][: b["n"]], hist)
        return out[: chunk.n_units].to(torch.int64)

    # -- phase 2 ----------------------------------------------------------------------------
    def histogram(self, chunk, keys, prefix, p):
        if keys.dtype != torch.int32 or p == 0 or not chunk.pieces:
            return super().histogram(chunk, keys, prefix, p)
        widths = radix_widths(32)
        dev = keys.device
        tab = self._piece_table(None, chunk, None, dev, False)
        b = self._blocks(chunk, dev)
        hist = torch.empty(b["n"], 1 << widths[p], dtype=torch.int32, device=dev)
        if b["n"]:
            _hist_kernel[(b["n"],)](tab, b["blk"], keys, prefix.to(torch.int64), hist,
                                    SHIFT=32 - sum(widths[: p + 1]), WIDTH=widths[p], SPAN=self.span, BLOCK=self.block)
        return self._reduce(chunk, b, hist)

    def _block_ties(self, chunk, keys, t_key):
        dev = keys.device
        tab = self._piece_table(None, chunk, None, dev, False)
        b = self._blocks(chunk, dev)
        cnt = torch.zeros(max(b["n"], 1), dtype=torch.int32, device=dev)
        if b["n"]:
            _tie_count_kernel[(b["n"],)](tab, b["blk"], keys, t_key.to(torch.int32), cnt,
                                         SPAN=self.span, BLOCK=self.block)
        return tab, b, cnt

    def tie_counts(self, chunk, keys, t_key):
        if keys.dtype != torch.int32 or not chunk.pieces:
            return super().tie_counts(chunk, keys, t_key)
        _, b, cnt = self._block_ties(chunk, keys, t_key)
        out = torch.zeros(len(chunk.pieces), dtype=torch.int64, device=keys.device)
        return out.index_add_(0, b["piece"][: b["n"]], cnt[: b["n"]].to(torch.int64))

    def resolve_ties(self, chunk, keys, t_key, take):
        if keys.dtype != torch.int32 or not chunk.pieces:
            return super().resolve_ties(chunk, keys, t_key, take)
        tab, b, cnt = self._block_ties(chunk, keys, t_key)
        if not b["n"]:
            return
        # exclusive scan of the per-program counts, restarted at each piece's first program
        c64 = cnt[: b["n"]].to(torch.int64)
        excl = torch.cumsum(c64, 0) - c64
        base = excl - excl.index_select(0, b["first"]).index_select(0, b["piece"][: b["n"]])
        _resolve_kernel[(b["n"],)](tab, b["blk"], keys, t_key.to(torch.int32), cnt, base, take.to(torch.int64),
                                   SPAN=self.span, BLOCK=self.block)

    # -- phase 3 ----------------------------------------------------------------------------
    def _launch_apply(self, rule, hp, chunk, bufs, keys, t_key, denom, t_const, cautious):
        dev = bufs.params[chunk.pieces[0].buf].device
        tab = self._piece_table(rule, chunk, bufs, dev, True)
        b = self._blocks(chunk, dev)
        if not b["n"]:
            return
        bc1s = [bufs.bc1[pc.buf] for pc in chunk.pieces]
        bc2s = [bufs.bc2[pc.buf] for pc in chunk.pieces]
        lr = hp["lr"]
        steps = step_sizes(hp, {"bc1": bc1s, "bc2": bc2s}, chunk)  # lr_eff per piece, as TorchOps
        bc1 = self._table(*self._scal(bc1s, dev), dev)
        bc2 = self._table(*self._scal(bc2s, dev), dev)
        st = self._scal(list(steps), dev)
        lr_ = self._scal([lr], dev)
        P_T, G_T, S_T = self._dtypes(rule, chunk, bufs)
        wd = float(hp["weight_decay"])
        dummy = keys if keys is not None else tab
        _apply_kernel[(b["n"],)](
            tab, b["blk"], dummy, t_key if t_key is not None else dummy,
            denom.to(torch.float32) if denom is not None else dummy,
            bc1[0], bc1[1], bc2[0], bc2[1], st[0], st[1], lr_[0], lr_[1],
            wd=wd, decay_c=0.0 if lr_[2] else 1 - lr * wd,
            alpha=float(hp["alpha"]), gamma=float(hp["gamma"]), t_const=int(t_const),
            P_T=P_T, G_T=G_T, S_T=S_T, CAUTIOUS=cautious, HAS_DENOM=denom is not None,
            BC_TAB=True, STEP_TAB=st[2], LR_TAB=lr_[2], HAS_WD=wd != 0,
            SPAN=self.span, BLOCK=self.block, enable_fp_fusion=False, **self._consts(rule, hp))

    def apply(self, rule, hp, chunk, bufs, scratch, t_key, denom):
        if not self._ours(rule, chunk, bufs) or scratch.dtype != torch.float32:
            return super().apply(rule, hp, chunk, bufs, scratch, t_key, denom)
        self._launch_apply(rule, hp, chunk, bufs, scratch.view(torch.int32), t_key.to(torch.int32), denom, 0, False)

    def cautious(self, rule, hp, chunk, bufs, t_const: int) -> bool:
        if not self._ours(rule, chunk, bufs):
            return False
        self._launch_apply(rule, hp, chunk, bufs, None, None, None, t_const, True)
        return True
