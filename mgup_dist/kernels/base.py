"""The one interface every backend implements (CPU, CUDA/Triton, plain torch ops).

The pipeline (``mgup_dist.pipeline``) calls, per chunk of a param group (``mgup_dist.plan``):

    hist0 = backend.score(rule, hp, chunk, bufs, scratch)          phase 1
    t = selection.select(backend, chunk, keys, hist0, reduce)      phase 2 (backend.select, or
                                                                    the radix select over
                                                                    histogram, tie_counts,
                                                                    resolve_ties)
    backend.apply(rule, hp, chunk, bufs, scratch, t_key, denom)    phase 3

Contracts (all backends, bit for bit on the selection):

* **keys**: ``score`` writes s = u * g of every piece into ``scratch[piece.offset:][:piece.length]``
  (a float32 buffer, float64 for float64 params) and turns them, in place, into
  order-preserving integer keys (``keys_`` below: the scratch's int32/int64 view):
  ``a < b  <=>  key(a) < key(b)``, ``-0.0`` and ``+0.0`` one key, every NaN the key
  ``KEY_NAN = iinfo.min + 1`` (below -inf).  It may return the histogram of pass 0 (as
  ``histogram(chunk, keys, None, 0)`` would), or None.
* **histogram(chunk, keys, prefix, p)** -> int64 ``[n_units, 2**width_p]``: pass ``p``
  of the radix select (``radix_widths``).  Pass 0 bins ``(key >> (bits - 12)) + 2048``;
  pass p > 0 bins ``(key >> shift_p) & (2**width_p - 1)`` of the keys whose bits above
  ``shift_p + width_p`` equal ``prefix[unit]`` (arithmetic shift).  Padding (unit -1) never counts.
* **tie_counts(chunk, keys, t_key)** -> int64 ``[len(chunk.pieces)]``: per piece, how many
  keys equal ``t_key[unit]`` (0 for padding).
* **resolve_ties(chunk, keys, t_key, take)**: in every piece, of the keys equal to
  ``t_key[unit]`` keep the first ``take[piece]`` (lowest index) and set the others to
  ``t_key - 1``; afterwards ``key >= t_key[unit]`` is exactly "selected".
* **apply(rule, hp, chunk, bufs, scratch, t_key, denom)**: phi = alpha where
  ``key >= t_key[unit]`` else gamma (padding: gamma), divided by ``denom[unit]`` when
  ``denom`` is given (Liang et al.'s normalisation); recompute u (``rule.direction``),
  ``p *= 1 - lr*wd``, ``p -= lr_eff * phi * u`` (decay first in both conventions),
  then ``rule.finish`` for late-state rules.  The scratch may be overwritten.
* **cautious(rule, hp, chunk, bufs, t_const)** -> bool: optional fused one-pass cautious
  step (no scratch); returns False when the backend has none for this rule, and the
  pipeline then runs score + apply with the constant threshold.
* **select(chunk, keys, hist0, reduce)** -> what ``apply`` takes as ``t_key``, or None for the
  radix select of ``mgup_dist.selection`` over the primitives above.  ``reduce`` is handed in
  by the pipeline: backends never import ``mgup_dist.collectives``.
* **select_local(chunk, keys)** -> ``t_key`` or None: optional exact fast path for chunks
  whose units are all on this rank (CPU: introselect); it must leave the keys so that
  ``key >= t_key[unit]`` is exactly "selected" (ties resolved).

Nothing here synchronises with the host on an accelerator: thresholds, counts and
prefixes stay device tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ..radix import KEY_NAN, float_of_key, key_dtype, key_of, keys_, radix_widths  # noqa: F401  (re-exported)

Tensor = torch.Tensor
Reduce = Callable[[Tensor], Tensor]  # in-place sum over a split chunk's ranks (identity otherwise)

__all__ = ["Bufs", "Backend", "key_dtype", "KEY_NAN", "radix_widths", "keys_", "key_of"]


@dataclass
class Bufs:
    """The group's local buffers by buffer index (flat views; None where there is no gradient
    this step), its state tensors by name, and per-buffer step-dependent scalars."""

    params: List[Optional[Tensor]]
    grads: List[Optional[Tensor]]
    states: Dict[str, List[Optional[Tensor]]]
    bc1: List  # 1 - beta1**t per buffer (floats or 0-d device tensors); 1.0 when unused
    bc2: List


class Backend:
    """Base class: see the module docstring.  ``TorchOps`` implements everything with
    plain torch ops; other backends override what they accelerate."""

    name = "abstract"

    def score(self, rule, hp, chunk, bufs: Bufs, scratch: Tensor) -> Optional[Tensor]:
        raise NotImplementedError

    def histogram(self, chunk, keys: Tensor, prefix: Optional[Tensor], p: int) -> Tensor:
        raise NotImplementedError

    def tie_counts(self, chunk, keys: Tensor, t_key: Tensor) -> Tensor:
        raise NotImplementedError

    def resolve_ties(self, chunk, keys: Tensor, t_key: Tensor, take: Tensor) -> None:
        raise NotImplementedError

    def apply(self, rule, hp, chunk, bufs: Bufs, scratch: Tensor, t_key: Tensor, denom: Optional[Tensor]) -> None:
        raise NotImplementedError

    def cautious(self, rule, hp, chunk, bufs: Bufs, t_const: int) -> bool:
        return False

    def select_local(self, chunk, keys: Tensor) -> Optional[Tensor]:
        return None

    def select(self, chunk, keys: Tensor, hist0: Optional[Tensor], reduce: Reduce):
        """Phase 2 of a top-K chunk: what ``apply`` takes as ``t_key``, or None to run the
        radix select of ``mgup_dist.selection`` over this backend's primitives.  A backend's
        own form is read only by its own ``apply``.  ``reduce(t)`` sums ``t`` over the ranks
        of a split chunk in place (the identity otherwise): the only communication a backend
        may issue, called at the same points on every rank whatever it holds."""
        return None
