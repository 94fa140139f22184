"""A readable, unbatched reference of the MGUP rules, written line by line from the paper.

This module is the *specification* the fast paths in ``mgup_dist.functional`` are tested
against (``tests/test_equivalence.py``, in float64).  It is deliberately slow and plain:
one tensor at a time, one function per base rule, a Python sort for the top-K selection.
It imports nothing from the rest of ``mgup_dist`` so that a bug in the fast code cannot
leak into the reference.

MGUP (Chang & Yuan, NeurIPS 2025).  For each parameter tensor with gradient ``g`` the base
rule produces an update direction ``u``; the alignment score is ``s = u * g`` (elementwise);
a per-coordinate scale ``phi`` multiplies the step: ``p -= lr_t * phi * u``.

* ``mode="topk"`` (MGUP): the ``K = floor(mask_ratio * N)`` coordinates with the largest
  scores get ``phi = alpha``, the other ``N - K`` get ``gamma``.  Ties: the lower flat
  index wins.  NaN scores rank below every number.  ``-0.0`` and ``+0.0`` are equal.
* ``mode="cautious"`` (C-MGUP): ``phi = alpha`` where ``s > 0``, else ``gamma``
  (Liang et al.'s Cautious optimizer is ``alpha=1, gamma=0``).
* ``normalize=True``: Liang et al. divide the mask by its mean, clamped at 1e-3:
  ``phi = phi / max(mean(phi), 1e-3)`` (per tensor).

State dicts use torch's names: AdamW ``step`` / ``exp_avg`` / ``exp_avg_sq``, Lion
``exp_avg``, Muon ``momentum_buffer``.  Every function updates ``p`` and ``state`` in place
and returns ``phi`` (the scale it applied; ``None`` for an empty tensor) so tests can look
at the selection itself.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

__all__ = [
    "topk_indices",
    "mgup_scale",
    "adamw_step",
    "lion_step",
    "muon_step",
    "newton_schulz5",
    "muon_lr",
    "NS_COEFFS",
]

#: Quintic Newton-Schulz coefficients (Keller Jordan's Muon; Moonlight uses the same).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


# --------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------
def topk_indices(scores: torch.Tensor, k: int) -> List[int]:
    """Flat indices of the ``k`` largest scores.

    Order: larger score first; NaN below every number (also below -inf); equal scores
    (with -0.0 == +0.0) by lower flat index.  A plain Python sort on an explicit key, so
    that there is nothing to trust but the key.
    """
    values = scores.detach().reshape(-1).tolist()

    def key(i: int):
        v = values[i]
        if math.isnan(v):
            return (1, 0.0, i)  # NaN: after every number, ties among NaNs by index
        return (0, -v, i)  # -v: descending; -(-0.0) == -(+0.0) compare equal, so index decides

    order = sorted(range(len(values)), key=key)
    return order[:k]


def mgup_scale(
    scores: torch.Tensor,
    *,
    mode: str,
    mask_ratio: float,
    alpha: float,
    gamma: float,
    normalize: bool = False,
) -> torch.Tensor:
    """The per-coordinate scale ``phi`` for one tensor's scores (same shape and dtype)."""
    n = scores.numel()
    phi = torch.full_like(scores, float(gamma))
    flat = phi.view(-1)
    if mode == "topk":
        # K = floor(mask_ratio * N): exactly K coordinates get alpha.  A float product that
        # falls short of an integer by rounding only (0.57 * 100 == 56.99999999999999) counts
        # as that integer: a relative slack of 1e-9, far below 1/N for any real tensor.
        k = min(n, max(0, math.floor(mask_ratio * n + 1e-9 * n)))
        for i in topk_indices(scores, k):
            flat[i] = alpha
    elif mode == "cautious":
        # alpha where the update agrees in sign with the gradient (s > 0), gamma elsewhere
        # (s <= 0 and NaN).
        aligned = scores.reshape(-1) > 0
        flat[aligned] = alpha
    else:
        raise ValueError(f"mode: unknown {mode!r}; allowed: 'topk', 'cautious'")
    if normalize:
        # Liang et al.: divide the mask by its mean so the average step length is kept.
        mean = flat.mean().item()
        phi = phi / max(mean, 1e-3)
    return phi


# --------------------------------------------------------------------------------------
# AdamW
# --------------------------------------------------------------------------------------
def adamw_step(
    p: torch.Tensor,
    g: torch.Tensor,
    state: Dict[str, torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    mode: str = "topk",
    mask_ratio: float = 0.5,
    alpha: float = 2.0,
    gamma: float = 0.5,
    normalize: bool = False,
) -> Optional[torch.Tensor]:
    """One MGUP-AdamW step on one tensor (in place)."""
    if p.numel() == 0:
        return None  # an empty tensor is skipped (no state either)
    if not state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    m, v = state["exp_avg"], state["exp_avg_sq"]

    # t <- t + 1
    state["step"] += 1
    t = float(state["step"])
    # m_t = b1 m + (1 - b1) g ;  v_t = b2 v + (1 - b2) g^2
    m.copy_(beta1 * m + (1 - beta1) * g)
    v.copy_(beta2 * v + (1 - beta2) * g * g)
    # bias-corrected direction u = m_hat / (sqrt(v_hat) + eps)
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    u = m_hat / (torch.sqrt(v_hat) + eps)
    # alignment score and the MGUP scale
    s = u * g
    phi = mgup_scale(s, mode=mode, mask_ratio=mask_ratio, alpha=alpha, gamma=gamma, normalize=normalize)
    # decoupled weight decay, then the scaled step
    p.mul_(1 - lr * weight_decay)
    p.sub_(lr * phi * u)
    return phi


# --------------------------------------------------------------------------------------
# Lion
# --------------------------------------------------------------------------------------
def lion_step(
    p: torch.Tensor,
    g: torch.Tensor,
    state: Dict[str, torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    mode: str = "topk",
    mask_ratio: float = 0.5,
    alpha: float = 2.0,
    gamma: float = 0.5,
    normalize: bool = False,
) -> Optional[torch.Tensor]:
    """One MGUP-Lion step on one tensor (in place)."""
    if p.numel() == 0:
        return None
    if not state:
        state["exp_avg"] = torch.zeros_like(p)
    m = state["exp_avg"]

    # c = b1 m + (1 - b1) g ;  u = sign(c)
    c = beta1 * m + (1 - beta1) * g
    u = torch.where(torch.isnan(c), c, torch.sign(c))  # NaN stays NaN (torch.sign gives 0: a frozen coordinate)
    s = u * g
    phi = mgup_scale(s, mode=mode, mask_ratio=mask_ratio, alpha=alpha, gamma=gamma, normalize=normalize)
    p.mul_(1 - lr * weight_decay)
    p.sub_(lr * phi * u)
    # momentum update after the step: m = b2 m + (1 - b2) g
    m.copy_(beta2 * m + (1 - beta2) * g)
    return phi


# --------------------------------------------------------------------------------------
# Muon (Moonlight's form)
# --------------------------------------------------------------------------------------
def newton_schulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Quintic Newton-Schulz orthogonalisation of a matrix, in G's own dtype.

    X <- G / (||G||_F + 1e-7) (transposed so that rows <= cols), then ``steps`` times
    A = X X^T ;  B = b A + c A A ;  X = a X + B X.
    """
    assert G.ndim == 2, G.shape
    a, b, c = NS_COEFFS
    X = G
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.T
    return X


def muon_lr(lr: float, shape) -> float:
    """Moonlight's update-RMS matching: lr * 0.2 * sqrt(max(A, B))."""
    A, B = shape[:2]
    return lr * 0.2 * math.sqrt(max(A, B))


def muon_step(
    p: torch.Tensor,
    g: torch.Tensor,
    state: Dict[str, torch.Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    weight_decay: float,
    mode: str = "topk",
    mask_ratio: float = 0.5,
    alpha: float = 2.0,
    gamma: float = 0.5,
    normalize: bool = False,
) -> Optional[torch.Tensor]:
    """One MGUP-Muon step on one 2-D matrix (in place).  Non-matrices use ``adamw_step``."""
    if p.numel() == 0:
        return None
    assert p.ndim == 2, "Muon orthogonalises matrices; other params fall back to adamw_step"
    if not state:
        state["momentum_buffer"] = torch.zeros_like(p)
    buf = state["momentum_buffer"]

    # buf = mu buf + g ;  x = g + mu buf (Nesterov) or buf
    buf.copy_(momentum * buf + g)
    x = g + momentum * buf if nesterov else buf.clone()
    # the score uses the momentum before orthogonalisation
    s = x * g
    phi = mgup_scale(s, mode=mode, mask_ratio=mask_ratio, alpha=alpha, gamma=gamma, normalize=normalize)
    u = newton_schulz5(x, ns_steps)
    # decoupled weight decay with the unadjusted lr, then the shape-adjusted step
    p.mul_(1 - lr * weight_decay)
    p.sub_(muon_lr(lr, p.shape) * phi * u)
    return phi
