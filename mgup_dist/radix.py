"""The pure math of the selection, below every backend: order-preserving integer keys of
float scores, the digit choice of one radix pass, the tie cut-off, and a chunk's per-unit
device tables.  It imports no backend and no collective: backends compute with it, and
``mgup_dist.selection`` drives the passes (and their all-reduces) on top of the backends.
"""
from __future__ import annotations

from typing import List

import torch

Tensor = torch.Tensor

__all__ = ["key_dtype", "KEY_NAN", "radix_widths", "keys_", "key_of", "float_of_key", "choose_digit",
           "tie_cutoff", "unit_tables"]


def key_dtype(float_dtype: torch.dtype) -> torch.dtype:
    return torch.int64 if float_dtype == torch.float64 else torch.int32


def KEY_NAN(dtype: torch.dtype) -> int:  # noqa: N802 - a constant per dtype
    """Every NaN's key: one above the integer minimum, so that ``t - 1`` never wraps."""
    return torch.iinfo(dtype).min + 1


def radix_widths(nbits: int) -> List[int]:
    """Bits resolved per radix pass: 12 first (4096 bins: an octave of scores cut 16 ways),
    then 10 at a time: 12+10+10 for 32-bit keys, 12+10*5+2 for 64-bit ones."""
    widths, left = [12], nbits - 12
    while left > 0:
        widths.append(min(10, left))
        left -= widths[-1]
    return widths


def keys_(x: Tensor) -> Tensor:
    """Turn the float scores ``x`` (float32/float64, contiguous) into their order keys in
    place and return the integer view.  IEEE bits are sign-magnitude: flipping the
    magnitude bits of negatives makes them two's-complement ordered.  -0.0 + 0.0 = +0.0.
    NaN bit patterns would land above +inf's key (or below -inf's): they are sent to
    KEY_NAN.  Six elementwise ops over the flat buffer, whatever it holds."""
    ity = key_dtype(x.dtype)
    nbits = torch.iinfo(ity).bits
    x.add_(0.0)
    nan = x.isnan()  # read before the bits change: one op instead of two range tests
    bits = x.view(ity)
    flip = torch.bitwise_right_shift(bits, nbits - 1)  # 0 or -1 (all ones)
    flip.bitwise_and_(torch.iinfo(ity).max)
    bits.bitwise_xor_(flip)
    del flip
    return bits.masked_fill_(nan, KEY_NAN(ity))


def key_of(value: Tensor, ity: torch.dtype) -> Tensor:
    """The key of float values (any shape), as a new tensor."""
    fdt = torch.float64 if ity == torch.int64 else torch.float32
    return keys_(value.to(fdt, copy=True).contiguous())


def float_of_key(key: Tensor) -> Tensor:
    """Inverse of ``keys_`` for non-NaN keys."""
    ity = key.dtype
    nbits = torch.iinfo(ity).bits
    flip = torch.bitwise_right_shift(key, nbits - 1).bitwise_and_(torch.iinfo(ity).max)
    bits = key ^ flip
    return bits.view(torch.float64 if nbits == 64 else torch.float32)


def choose_digit(hist: torch.Tensor, k: torch.Tensor):
    """The digit choice of one radix pass, for every unit at once.

    ``hist``: int64 ``[units, bins]``, per unit the counts of each digit among its keys that
    match the prefix chosen so far; ``k``: int64 ``[units]``, how many of those keys (the
    largest) are still to be selected, ``0 <= k <= hist.sum(1)``.  Returns ``(b, k_new)``:
    ``b`` the largest digit with ``count(digit >= b) >= k`` (the K-th largest key has digit
    ``b``; ``k == 0``: the top bin), and ``k_new = k - count(digit > b)``, the number still to
    select among the keys with digit ``b`` (after the last pass: how many keys equal to the
    threshold are selected, lowest index first).  Every backend's selection matches this."""
    above = hist.flip(1).cumsum(1).flip(1)  # count(digit >= b)
    b = ((above >= k[:, None]).sum(1) - 1).clamp_(min=0)
    k_new = k - (above.gather(1, b[:, None])[:, 0] - hist.gather(1, b[:, None])[:, 0])
    return b, k_new


def tie_cutoff(slot_ties: torch.Tensor, k_rem: torch.Tensor, slot_unit: torch.Tensor, first_slot: torch.Tensor) -> torch.Tensor:
    """The tie cut-off: how many of each slot's keys equal to its unit's threshold are selected.

    ``slot_ties``: int64 ``[n_slots + 1]``, per slot (a piece of a unit, over all ranks, in
    index order; the last entry: padding) its keys equal to the unit's K-th key;
    ``k_rem``: ``[units]`` or ``[units + 1]``, the ties each unit selects (``choose_digit``'s
    last ``k_new``); ``slot_unit``: ``[n_slots + 1]`` (padding: ``units``);
    ``first_slot``: ``[units + 1]``, each unit's first slot.  Returns int64
    ``[n_slots + 1]``: ``max(0, k_rem[unit] - ties in the unit's earlier slots)``; a slot keeps
    its first that many ties (lowest index first), so the lower index wins across pieces and
    ranks."""
    U = first_slot.numel() - 1
    excl = slot_ties.cumsum(0) - slot_ties  # ties in earlier slots of the chunk
    before = excl - excl.index_select(0, first_slot).index_select(0, slot_unit)
    k_ext = k_rem if k_rem.numel() == U + 1 else torch.cat([k_rem, k_rem.new_zeros(1)])
    return (k_ext.to(torch.int64).index_select(0, slot_unit) - before).clamp_(min=0)


def unit_tables(chunk, device):
    """Device tables of a chunk, made once (no host-to-device copy in later steps): per piece
    its slot (n_slots for padding), unit and length; per slot its unit; per unit its first
    slot, K and N."""
    key = ("selection", device)
    t = chunk.cache.get(key)
    if t is None:
        first = [chunk.n_slots] * chunk.n_units
        for i, u in reversed(list(enumerate(chunk.slot_unit))):
            first[u] = i
        t = {
            "piece_slot": torch.tensor([p.slot if p.unit >= 0 else chunk.n_slots for p in chunk.pieces] or [0], device=device),
            "piece_unit": torch.tensor([p.unit if p.unit >= 0 else chunk.n_units for p in chunk.pieces] or [0], device=device),
            "slot_unit": torch.tensor(list(chunk.slot_unit) + [chunk.n_units], dtype=torch.int64, device=device),
            "first_slot": torch.tensor(first + [chunk.n_slots], dtype=torch.int64, device=device),
            "k": torch.tensor(chunk.k, dtype=torch.int64, device=device),
            "n": torch.tensor(chunk.n, dtype=torch.int64, device=device),
            "lengths": torch.tensor([p.length for p in chunk.pieces] or [0], dtype=torch.int64, device=device),
        }
        chunk.cache[key] = t
    return t
