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

from ..radix import KEY_NAN
from .torch_ops import TorchOps, step_sizes

Tensor = torch.Tensor

__all__ = ["TritonCUDA", "WIDTHS", "NB", "NUM_WARPS"]

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
