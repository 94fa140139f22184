"""The device code of the CUDA backend (``triton_cuda``): the Triton kernels of score, the
radix passes, the digit choice, the tie count and resolve, and apply, with the constants they
share.  The host side (tables, launches, the select's protocol) is ``triton_cuda.TritonCUDA``;
its module doc gives the design, the launches and the bytes per element."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..radix import KEY_NAN

__all__ = ["WIDTHS", "NB", "NUM_WARPS", "TAB_W"]

#: radix digits of a 32-bit key, high to low (2048-bin histograms: 16 KiB of int64 per unit)
WIDTHS = (11, 11, 10)
NB = 1 << 11
_SHIFTS = (21, 10, 0)
_I32_MAX = 2**31 - 1
_I32_NAN = KEY_NAN(torch.int32)
_ST_ROWS = 4  # per-unit state rows: prefix, k left, t, tie cut needed
#: warps per program: BLOCK / (32 * NUM_WARPS) = 4 elements a thread per loop iteration, one
#: 16-byte vector of each array (more make the score kernel's 16-byte stores and loads spill
#: past 128 registers)
NUM_WARPS = 8


# ------------------------------------------------------------------------------ device math
@triton.jit
def _cast(x, T: tl.constexpr):
    """fp32 -> T rounded to nearest even; NaN stays NaN.  bf16 by hand on int64 bits (no
    overflow for the canonical NaN 0x7FFFFFFF that NVIDIA GPUs produce)."""
    if T == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(T)


@triton.jit
def _to_key(s):
    """kernels.base.keys_: sign-magnitude bits -> two's-complement order; -0 -> +0; NaN -> KEY_NAN."""
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(s == 0.0, 0, key)
    return tl.where(s != s, -2147483647, key)


@triton.jit
def _moments(g, m, v, b1, one_m_b1, b2, one_m_b2):
    # m = b1*m + (1-b1)*g ; v = b2*v + (1-b2)*g^2, rounded as torch's CUDA foreach ops:
    # add_(g, alpha=a) is fma(a, g, m*b1), addcmul_(g, g, value=c) is fma(c, g*g, v*b2)
    return tl.fma(one_m_b1, g, m * b1), tl.fma(one_m_b2, g * g, v * b2)


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
    # u = sign(b1*m + (1-b1)*g)   (NaN stays NaN: a frozen NaN coordinate would hide divergence)
    c = tl.fma(one_m_b1, g, m * b1)
    return tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, c * 0.0))


# ------------------------------------------------------------------------------ piece tables
# piece table row (int64): p, g, state0, state1 addresses, length, scratch offset, unit (U:
# padding), flags (bit 0: the four addresses 16-byte aligned, bit 1: the scratch offset a
# multiple of 4 keys).  A program reads its piece's row and takes the vectorised loop when
# the flags allow it: the choice is per piece, not per chunk.
TAB_W = 8
_TAB_W = tl.constexpr(TAB_W)


@triton.jit
def _ptr(addr, T: tl.constexpr, ALIGNED: tl.constexpr):
    p = addr.to(tl.pointer_type(T))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _keys_at(keys_ptr, off, ALIGNED: tl.constexpr):
    p = keys_ptr + off
    if ALIGNED:  # the scratch is 16-byte aligned and off a multiple of 4 keys
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _idx(start, i, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    idx = start + i * BLOCK + tl.arange(0, BLOCK)
    if ALIGNED:
        idx = tl.max_contiguous(tl.multiple_of(idx, BLOCK), BLOCK)
    return idx


@triton.jit
def _ld(p, idx, msk, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(p + idx, mask=msk, other=0)
    else:
        return tl.load(p + idx)


@triton.jit
def _st(p, idx, x, msk, MASKED: tl.constexpr):
    if MASKED:
        tl.store(p + idx, x, mask=msk)
    else:
        tl.store(p + idx, x)


@triton.jit
def _bias(piece, c1, c2, sc_ptr, bc_ptr, bco_ptr, P, BC_MODE: tl.constexpr):
    """Bias corrections of this piece: 0 the scalar arguments; 1 a host-made fp32 table
    [3, P] (bc1, bc2, step size); 2 device values (capturable): bc_ptr + per-piece offsets
    (the 0-d tensors the optimizer made, read where they are: no table op)."""
    if BC_MODE == 1:
        c1 = tl.load(sc_ptr + piece)
        c2 = tl.load(sc_ptr + P + piece)
    elif BC_MODE == 2:
        c1 = tl.load(bc_ptr + tl.load(bco_ptr + piece * 2)).to(tl.float32)
        c2 = tl.load(bc_ptr + tl.load(bco_ptr + piece * 2 + 1)).to(tl.float32)
    return c1, c2


# ------------------------------------------------------------------------------ histograms
# A radix pass counts digits of keys.  Each program adds into its own private int32 row of
# NBINS bins in global memory (``priv``, 8 KiB: it stays in L2) with relaxed atomics, one per
# element, then adds the row's non-zero bins once to the unit's int64 row and clears its row
# for the next pass.  Exact-zero keys (scores of zero gradients: whole embedding rows) are
# counted in registers instead, so that the commonest tie does not serialise on one bin.
# Nothing here depends on how a Triton version lowers ``tl.histogram``.
@triton.jit
def _count(priv, digit, ok, z, key):
    """Count ``digit`` of the keys where ``ok``; zero keys go to the register count ``z``."""
    tl.atomic_add(priv + digit, ok.to(tl.int32), mask=ok & (key != 0), sem="relaxed")
    return z + (ok & (key == 0)).to(tl.int32)


@triton.jit
def _flush(priv, row, z, zbin, live, NBINS: tl.constexpr):
    """row[zbin] += z; row += priv (its non-zero bins; ``live`` 0: padding, nothing); priv = 0."""
    tl.debug_barrier()  # every thread's atomics on priv are done (and visible: a CTA barrier)
    bins = tl.arange(0, NBINS)
    h = tl.load(priv + bins, cache_modifier=".cg")
    h = tl.where(bins == zbin, h + tl.sum(z, axis=0), h) * live
    tl.atomic_add(row + bins, h.to(tl.int64), mask=h != 0, sem="relaxed")
    tl.store(priv + bins, tl.zeros((NBINS,), dtype=tl.int32))


# ------------------------------------------------------------------------------- score
@triton.jit
def _score_block(z, idx, msk, gp, mp, vp, kp, priv, hend, c1, c2, b1, one_m_b1, b2, one_m_b2, eps,
                 S_T: tl.constexpr, LION: tl.constexpr, AUTHORS: tl.constexpr, MAXIMIZE: tl.constexpr,
                 HIST: tl.constexpr, MASKED: tl.constexpr, NBINS: tl.constexpr, SHIFT0: tl.constexpr):
    g = _ld(gp, idx, msk, MASKED).to(tl.float32)
    if MAXIMIZE:
        g = -g
    m = _ld(mp, idx, msk, MASKED).to(tl.float32)
    if LION:
        u = _lion_u(g, m, b1, one_m_b1)  # the momentum moves in apply (late state)
    else:
        v = _ld(vp, idx, msk, MASKED).to(tl.float32)
        m, v = _moments(g, m, v, b1, one_m_b1, b2, one_m_b2)
        m = _cast(m, S_T)
        v = _cast(v, S_T)
        _st(mp, idx, m, msk, MASKED)
        _st(vp, idx, v, msk, MASKED)
        # u from the stored (rounded) state, as apply recomputes it
        u = _adamw_u(m.to(tl.float32), v.to(tl.float32), c1, c2, eps, AUTHORS)
    key = _to_key(u * g)
    _st(kp, idx, key, msk, MASKED)
    if HIST:
        z = _count(priv, (key >> SHIFT0) + NBINS // 2, idx < hend, z, key)  # hend: end, or start for padding
    return z


@triton.jit
def _score_range(ga, s0a, s1a, keys_ptr, off, priv, hend, start, end, c1, c2, b1, one_m_b1, b2, one_m_b2, eps,
                 G_T: tl.constexpr, S_T: tl.constexpr, LION: tl.constexpr, AUTHORS: tl.constexpr,
                 MAXIMIZE: tl.constexpr, HIST: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                 NBINS: tl.constexpr, SHIFT0: tl.constexpr):
    gp = _ptr(ga, G_T, ALIGNED)
    mp = _ptr(s0a, S_T, ALIGNED)
    vp = _ptr(s1a, S_T, ALIGNED)
    kp = _keys_at(keys_ptr, off, ALIGNED)
    z = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(0, (end - start) // BLOCK):  # unmasked main loop
        idx = _idx(start, i, BLOCK, ALIGNED)
        z = _score_block(z, idx, idx < end, gp, mp, vp, kp, priv, hend, c1, c2, b1, one_m_b1, b2, one_m_b2, eps,
                         S_T, LION, AUTHORS, MAXIMIZE, HIST, False, NBINS, SHIFT0)
    idx = start + (end - start) // BLOCK * BLOCK + tl.arange(0, BLOCK)
    return _score_block(z, idx, idx < end, gp, mp, vp, kp, priv, hend, c1, c2, b1, one_m_b1, b2, one_m_b2, eps,
                        S_T, LION, AUTHORS, MAXIMIZE, HIST, True, NBINS, SHIFT0)


@triton.jit
def _score_kernel(tab, blk, keys_ptr, priv_ptr, hist_ptr, sc_ptr, bc_ptr, bco_ptr, c1, c2,
                  b1, one_m_b1, b2, one_m_b2, eps, U, P,
                  G_T: tl.constexpr, S_T: tl.constexpr, LION: tl.constexpr, AUTHORS: tl.constexpr,
                  MAXIMIZE: tl.constexpr, BC_MODE: tl.constexpr, HIST: tl.constexpr,
                  SPAN: tl.constexpr, BLOCK: tl.constexpr, NBINS: tl.constexpr, SHIFT0: tl.constexpr):
    """s = u*g per element (AdamW's moments updated in place), key(s) into the scratch, and
    (HIST) the histogram of the top key bits added to the unit's int64 row of ``hist``."""
    pid = tl.program_id(0)
    piece = tl.load(blk + pid * 2)
    start = tl.load(blk + pid * 2 + 1)
    r = tab + piece * _TAB_W
    n = tl.load(r + 4)
    off = tl.load(r + 5)
    unit = tl.load(r + 6)
    flags = tl.load(r + 7)
    c1, c2 = _bias(piece, c1, c2, sc_ptr, bc_ptr, bco_ptr, P, BC_MODE)
    end = tl.minimum(start + SPAN, n)
    priv = priv_ptr + pid * NBINS
    live = (unit < U).to(tl.int32)
    hend = tl.where(unit < U, end, start)  # padding is not counted
    if (flags & 3) == 3:
        z = _score_range(tl.load(r + 1), tl.load(r + 2), tl.load(r + 3), keys_ptr, off, priv, hend, start, end,
                         c1, c2, b1, one_m_b1, b2, one_m_b2, eps, G_T, S_T, LION, AUTHORS, MAXIMIZE, HIST, True,
                         BLOCK, NBINS, SHIFT0)
    else:
        z = _score_range(tl.load(r + 1), tl.load(r + 2), tl.load(r + 3), keys_ptr, off, priv, hend, start, end,
                         c1, c2, b1, one_m_b1, b2, one_m_b2, eps, G_T, S_T, LION, AUTHORS, MAXIMIZE, HIST, False,
                         BLOCK, NBINS, SHIFT0)
    if HIST:
        _flush(priv, hist_ptr + unit * NBINS, z, NBINS // 2, live, NBINS)


# --------------------------------------------------------------------------- selection
@triton.jit
def _pass_block(z, kp, idx, msk, priv, pre, FIRST: tl.constexpr, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                MASKED: tl.constexpr, NBINS: tl.constexpr):
    key = _ld(kp, idx, msk, MASKED)
    if FIRST:
        return _count(priv, (key >> SHIFT) + NBINS // 2, msk, z, key)
    else:
        ok = msk & ((key >> (SHIFT + WIDTH)) == pre)
        return _count(priv, (key >> SHIFT) & ((1 << WIDTH) - 1), ok, z, key)


@triton.jit
def _pass_range(keys_ptr, off, priv, pre, start, end, FIRST: tl.constexpr, SHIFT: tl.constexpr,
                WIDTH: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, NBINS: tl.constexpr):
    kp = _keys_at(keys_ptr, off, ALIGNED)
    z = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(0, (end - start) // BLOCK):  # unmasked main loop
        idx = _idx(start, i, BLOCK, ALIGNED)
        z = _pass_block(z, kp, idx, idx < end, priv, pre, FIRST, SHIFT, WIDTH, False, NBINS)
    idx = start + (end - start) // BLOCK * BLOCK + tl.arange(0, BLOCK)
    return _pass_block(z, kp, idx, idx < end, priv, pre, FIRST, SHIFT, WIDTH, True, NBINS)


@triton.jit
def _pass_kernel(tab, blk, keys_ptr, priv_ptr, st_ptr, k_ptr, hist_ptr, U,
                 FIRST: tl.constexpr, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                 SPAN: tl.constexpr, BLOCK: tl.constexpr, NBINS: tl.constexpr):
    """Radix pass: histogram of (key >> SHIFT) & (2**WIDTH - 1) over the keys whose bits
    above SHIFT + WIDTH equal the unit's prefix (FIRST: the top digit of every key, offset
    by half the bins), added to the unit's int64 row of ``hist``.  Masked-off lanes never
    touch a bin (no funnel into bin 0)."""
    pid = tl.program_id(0)
    piece = tl.load(blk + pid * 2)
    start = tl.load(blk + pid * 2 + 1)
    r = tab + piece * _TAB_W
    n = tl.load(r + 4)
    off = tl.load(r + 5)
    unit = tl.load(r + 6)
    flags = tl.load(r + 7)
    if unit >= U:
        return  # padding
    if tl.load(k_ptr + unit) == 0:
        return  # K = 0: nothing is selected, the threshold is the maximum
    pre = tl.load(st_ptr + unit).to(tl.int32)  # |prefix| < 2**22
    end = tl.minimum(start + SPAN, n)
    priv = priv_ptr + pid * NBINS
    if (flags & 2) != 0:
        z = _pass_range(keys_ptr, off, priv, pre, start, end, FIRST, SHIFT, WIDTH, True, BLOCK, NBINS)
    else:
        z = _pass_range(keys_ptr, off, priv, pre, start, end, FIRST, SHIFT, WIDTH, False, BLOCK, NBINS)
    # the digit of key 0 (its count is z: zero when the prefix excludes it)
    if FIRST:
        zbin = NBINS // 2
    else:
        zbin = 0
    _flush(priv, hist_ptr + unit * NBINS, z, zbin, 1, NBINS)


@triton.jit
def _digit_kernel(hist_ptr, st_ptr, k_ptr, U1, FIRST: tl.constexpr, LAST: tl.constexpr,
                  WIDTH: tl.constexpr, NBINS: tl.constexpr):
    """One program per unit (and one for the padding slot U): b = the largest digit with
    count(digit >= b) >= K still needed; K -= count(digit > b); prefix = prefix << WIDTH | b
    (FIRST: b - NBINS/2, the signed top digit).  LAST: t = prefix (K = 0: the int32 maximum),
    and whether the ties at t need an index-order cut (fewer needed than there are)."""
    u = tl.program_id(0)
    bins = tl.arange(0, NBINS)
    h = tl.load(hist_ptr + u * NBINS + bins)
    k_all = tl.load(k_ptr + u)
    if FIRST:
        k = k_all
    else:
        k = tl.load(st_ptr + U1 + u)
    above = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # count(digit >= bin)
    b = tl.maximum(tl.sum((above >= k).to(tl.int32), axis=0) - 1, 0)
    at_b = tl.sum(tl.where(bins == b, h, 0), axis=0)
    above_b = tl.sum(tl.where(bins == b, above, 0), axis=0)
    k = k - (above_b - at_b)
    if FIRST:
        pre = (b - NBINS // 2).to(tl.int64)
    else:
        pre = (tl.load(st_ptr + u) << WIDTH) | b
    tl.store(st_ptr + u, pre)
    tl.store(st_ptr + U1 + u, k)
    if LAST:
        tl.store(st_ptr + 2 * U1 + u, tl.where(k_all > 0, pre, 2147483647))
        tl.store(st_ptr + 3 * U1 + u, ((k_all > 0) & (k < at_b)).to(tl.int64))


@triton.jit
def _tie_range(keys_ptr, off, t, start, end, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    kp = _keys_at(keys_ptr, off, ALIGNED)
    c = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(0, (end - start) // BLOCK):  # unmasked main loop
        idx = _idx(start, i, BLOCK, ALIGNED)
        c += (tl.load(kp + idx) == t).to(tl.int32)
    idx = start + (end - start) // BLOCK * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(kp + idx, mask=idx < end, other=0)
    c += ((idx < end) & (key == t)).to(tl.int32)
    return tl.sum(c, axis=0)


@triton.jit
def _tie_count_kernel(tab, blk, keys_ptr, st_ptr, cnt_ptr, U, U1, SPAN: tl.constexpr, BLOCK: tl.constexpr):
    """cnt[pid] = keys equal to t[unit] in this program's range, for units whose ties need a cut."""
    pid = tl.program_id(0)
    piece = tl.load(blk + pid * 2)
    start = tl.load(blk + pid * 2 + 1)
    r = tab + piece * _TAB_W
    n = tl.load(r + 4)
    off = tl.load(r + 5)
    unit = tl.load(r + 6)
    flags = tl.load(r + 7)
    if unit >= U:
        return
    if tl.load(st_ptr + 3 * U1 + unit) == 0:
        return
    t = tl.load(st_ptr + 2 * U1 + unit).to(tl.int32)
    end = tl.minimum(start + SPAN, n)
    if (flags & 2) != 0:
        c = _tie_range(keys_ptr, off, t, start, end, True, BLOCK)
    else:
        c = _tie_range(keys_ptr, off, t, start, end, False, BLOCK)
    tl.store(cnt_ptr + pid, c.to(tl.int64))


@triton.jit
def _resolve_kernel(tab, blk, keys_ptr, st_ptr, base_ptr, U, U1, SPAN: tl.constexpr, BLOCK: tl.constexpr):
    """Ties at t ranked in index order over the unit (base: ties before this program, on all
    ranks); those ranked above the K still needed drop to t - 1 (t > KEY_NAN: no wrap)."""
    pid = tl.program_id(0)
    piece = tl.load(blk + pid * 2)
    start = tl.load(blk + pid * 2 + 1)
    r = tab + piece * _TAB_W
    n = tl.load(r + 4)
    off = tl.load(r + 5)
    unit = tl.load(r + 6)
    if unit >= U:
        return
    if tl.load(st_ptr + 3 * U1 + unit) == 0:
        return
    t = tl.load(st_ptr + 2 * U1 + unit).to(tl.int32)
    take = tl.load(st_ptr + U1 + unit)
    rank0 = tl.load(base_ptr + pid)
    end = tl.minimum(start + SPAN, n)
    for i in range(0, (end - start) // BLOCK + 1):
        idx = start + i * BLOCK + tl.arange(0, BLOCK)
        msk = idx < end
        key = tl.load(keys_ptr + off + idx, mask=msk, other=0)
        tie = (msk & (key == t)).to(tl.int32)
        c = tl.cumsum(tie, axis=0)  # per block < 2**31; the unit's rank in int64
        rank = rank0 + c.to(tl.int64)  # 1-based rank of each tie in the unit
        lose = (tie > 0) & (rank > take)
        tl.store(keys_ptr + off + idx, key - 1, mask=lose)
        rank0 += tl.max(c, axis=0).to(tl.int64)


# ------------------------------------------------------------------------------- apply
@triton.jit
def _apply_block(idx, msk, pp, gp, mp, vp, kp, t, a, c, st, decay, c1, c2, b1, one_m_b1, b2, one_m_b2, eps, t_const,
                 P_T: tl.constexpr, S_T: tl.constexpr, LION: tl.constexpr, AUTHORS: tl.constexpr,
                 MAXIMIZE: tl.constexpr, CAUTIOUS: tl.constexpr, HAS_WD: tl.constexpr, FMA_STEP: tl.constexpr,
                 MASKED: tl.constexpr):
    m = _ld(mp, idx, msk, MASKED).to(tl.float32)
    if LION or CAUTIOUS:
        g = _ld(gp, idx, msk, MASKED).to(tl.float32)
        if MAXIMIZE:
            g = -g
    if LION:
        u = _lion_u(g, m, b1, one_m_b1)
    else:
        v = _ld(vp, idx, msk, MASKED).to(tl.float32)
        if CAUTIOUS:  # the moments move here (no score pass)
            m, v = _moments(g, m, v, b1, one_m_b1, b2, one_m_b2)
            m = _cast(m, S_T)
            v = _cast(v, S_T)
            _st(mp, idx, m, msk, MASKED)
            _st(vp, idx, v, msk, MASKED)
            m = m.to(tl.float32)
            v = v.to(tl.float32)
        u = _adamw_u(m, v, c1, c2, eps, AUTHORS)
    if CAUTIOUS:
        phi = tl.where(_to_key(u * g) >= t_const, a, c)
    else:
        phi = tl.where(_ld(kp, idx, msk, MASKED) >= t, a, c)
    p = _ld(pp, idx, msk, MASKED).to(tl.float32)
    if HAS_WD:  # decoupled decay first (both conventions), rounded to the param dtype as torch does
        p = _cast(p * decay, P_T).to(tl.float32)
    if FMA_STEP:  # one python lr: torch's addcmul_(p, u, phi, value=-lr), fma(-lr, u*phi, p) on CUDA
        p = tl.fma(-st, u * phi, p)
    else:  # u *= phi; u *= lr_eff; p -= u
        p = p - (u * phi) * st
    _st(pp, idx, _cast(p, P_T), msk, MASKED)
    if LION:  # m = b2*m + (1-b2)*g after the step
        _st(mp, idx, _cast(tl.fma(one_m_b2, g, m * b2), S_T), msk, MASKED)


@triton.jit
def _apply_range(pa, ga, s0a, s1a, keys_ptr, off, start, end, t, a, c, st, decay, c1, c2, b1, one_m_b1, b2, one_m_b2,
                 eps, t_const, P_T: tl.constexpr, G_T: tl.constexpr, S_T: tl.constexpr, LION: tl.constexpr,
                 AUTHORS: tl.constexpr, MAXIMIZE: tl.constexpr, CAUTIOUS: tl.constexpr, HAS_WD: tl.constexpr,
                 FMA_STEP: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pp = _ptr(pa, P_T, ALIGNED)
    gp = _ptr(ga, G_T, ALIGNED)
    mp = _ptr(s0a, S_T, ALIGNED)
    vp = _ptr(s1a, S_T, ALIGNED)
    kp = _keys_at(keys_ptr, off, ALIGNED)
    for i in range(0, (end - start) // BLOCK):  # unmasked main loop
        idx = _idx(start, i, BLOCK, ALIGNED)
        _apply_block(idx, idx < end, pp, gp, mp, vp, kp, t, a, c, st, decay, c1, c2, b1, one_m_b1, b2, one_m_b2,
                     eps, t_const, P_T, S_T, LION, AUTHORS, MAXIMIZE, CAUTIOUS, HAS_WD, FMA_STEP, False)
    idx = start + (end - start) // BLOCK * BLOCK + tl.arange(0, BLOCK)
    _apply_block(idx, idx < end, pp, gp, mp, vp, kp, t, a, c, st, decay, c1, c2, b1, one_m_b1, b2, one_m_b2,
                 eps, t_const, P_T, S_T, LION, AUTHORS, MAXIMIZE, CAUTIOUS, HAS_WD, FMA_STEP, True)


@triton.jit
def _apply_kernel(tab, blk, keys_ptr, t_ptr, denom_ptr, sc_ptr, bc_ptr, bco_ptr, lr_ptr, c1, c2, st, lr, decay,
                  b1, one_m_b1, b2, one_m_b2, eps, wd, alpha, gamma, t_const, U, P,
                  P_T: tl.constexpr, G_T: tl.constexpr, S_T: tl.constexpr, LION: tl.constexpr,
                  AUTHORS: tl.constexpr, MAXIMIZE: tl.constexpr, CAUTIOUS: tl.constexpr, HAS_DENOM: tl.constexpr,
                  BC_MODE: tl.constexpr, ST_MODE: tl.constexpr, LR_DEV: tl.constexpr, HAS_WD: tl.constexpr,
                  FMA_STEP: tl.constexpr, SPAN: tl.constexpr, BLOCK: tl.constexpr):
    """phi = alpha if key >= t[unit] else gamma (padding: gamma; / denom[unit]); u from the
    state (CAUTIOUS: the moments move here first and phi from key(u*g) >= t_const);
    p *= 1 - lr*wd; p -= step * (phi * u); Lion: m = b2*m + (1-b2)*g last.
    Step size: ST_MODE 0 the scalar ``st``; 1 the host table; 2 from lr (and, for the
    authors' AdamW, lr*sqrt(bc2)/bc1 in fp32, as torch computes it from device tensors)."""
    pid = tl.program_id(0)
    piece = tl.load(blk + pid * 2)
    start = tl.load(blk + pid * 2 + 1)
    r = tab + piece * _TAB_W
    n = tl.load(r + 4)
    off = tl.load(r + 5)
    unit = tl.load(r + 6)
    flags = tl.load(r + 7)
    c1, c2 = _bias(piece, c1, c2, sc_ptr, bc_ptr, bco_ptr, P, BC_MODE)
    if LR_DEV:  # lr on the device (capturable): 1 - lr*wd in fp32, as torch computes it from a tensor lr
        lr = tl.load(lr_ptr)
        decay = 1.0 - lr * wd
    if ST_MODE == 1:
        st = tl.load(sc_ptr + 2 * P + piece)
    elif ST_MODE == 2:
        if AUTHORS:
            st = tl.math.div_rn(lr * tl.math.sqrt_rn(c2), c1)
        else:
            st = lr
    if CAUTIOUS:
        t = t_const
    else:
        t = tl.load(t_ptr + unit)
    a = alpha
    c = gamma
    if HAS_DENOM:
        d = tl.load(denom_ptr + unit)
        a = tl.math.div_rn(a, d)
        c = tl.math.div_rn(c, d)
    if unit >= U:
        a = c  # padding: never selected
    end = tl.minimum(start + SPAN, n)
    if CAUTIOUS:
        vec = (flags & 1) != 0  # no keys read
    else:
        vec = (flags & 3) == 3
    if vec:
        _apply_range(tl.load(r), tl.load(r + 1), tl.load(r + 2), tl.load(r + 3), keys_ptr, off, start, end, t, a, c,
                     st, decay, c1, c2, b1, one_m_b1, b2, one_m_b2, eps, t_const, P_T, G_T, S_T, LION, AUTHORS,
                     MAXIMIZE, CAUTIOUS, HAS_WD, FMA_STEP, True, BLOCK)
    else:
        _apply_range(tl.load(r), tl.load(r + 1), tl.load(r + 2), tl.load(r + 3), keys_ptr, off, start, end, t, a, c,
                     st, decay, c1, c2, b1, one_m_b1, b2, one_m_b2, eps, t_const, P_T, G_T, S_T, LION, AUTHORS,
                     MAXIMIZE, CAUTIOUS, HAS_WD, FMA_STEP, False, BLOCK)
