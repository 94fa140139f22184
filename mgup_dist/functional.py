"""The math of MGUP on local tensors: no classes, no state dicts, no frameworks.

A step of every rule has three phases, so that the selection (which may talk to
other ranks) sits between pure elementwise work:

1. ``*_direction``: update the moments in place and write the update direction ``u``
   and the alignment score ``s = u * g`` into caller-owned workspaces;
2. ``selection.select_masks`` (or ``s > 0`` for cautious mode) decides per coordinate
   whether ``phi = alpha`` or ``gamma``; ``fill_phi`` writes phi into the score
   workspace (scores are no longer needed once the mask exists);
3. ``apply_update``: decoupled weight decay ``p *= 1 - lr*wd`` and ``p -= lr_eff*phi*u``.

Every function takes lists and a ``foreach`` flag: the for-loop path and the foreach
path perform the same operations in the same order, so they agree bit for bit.
Workspaces are persistent (allocated once by the optimizer): on these machines,
writing freshly allocated memory costs several times more than reusing it.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

Tensor = torch.Tensor

__all__ = [
    "adamw_direction",
    "lion_direction",
    "muon_direction",
    "newton_schulz",
    "muon_lr_scale",
    "cautious_masks",
    "fill_phi",
    "apply_update",
    "NS_COEFFS",
]

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def _groups(*lists: Sequence[Tensor], **scalar_lists: Sequence[float]):
    """Split parallel lists into runs that one foreach kernel can take (same device and
    dtypes at every list position); per-tensor scalar lists are split along with them."""
    buckets = {}
    for i in range(len(lists[0])):
        key = tuple((l[i].device, l[i].dtype) for l in lists)
        buckets.setdefault(key, []).append(i)
    return [
        [[l[i] for i in idx] for l in lists] + [[sl[i] for i in idx] for sl in scalar_lists.values()]
        for idx in buckets.values()
    ]


def adamw_direction(
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    steps: List[Tensor],
    updates: List[Tensor],
    scores: List[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    foreach: bool,
) -> None:
    """AdamW direction with bias correction.

    t += 1;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
    u = (m / sqrt(v / (1-b2^t)) + eps) / (1-b1^t)        -> ``updates``
    s = u * g                                             -> ``scores``
    ``scores`` doubles as the denominator's scratch before it receives s.
    """
    if not grads:
        return
    for st in steps:
        st.add_(1)
    bc1 = [1 - beta1 ** st.item() for st in steps]
    bc2 = [1 - beta2 ** st.item() for st in steps]
    if foreach:
        for g, m, v, u, s, b1c, b2c in _groups(grads, exp_avgs, exp_avg_sqs, updates, scores, bc1=bc1, bc2=bc2):
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, g, alpha=1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, g, g, value=1 - beta2)
            torch._foreach_copy_(s, v)
            torch._foreach_div_(s, b2c)
            torch._foreach_sqrt_(s)
            torch._foreach_add_(s, eps)
            torch._foreach_copy_(u, m)
            torch._foreach_div_(u, s)
            torch._foreach_div_(u, b1c)
            torch._foreach_copy_(s, u)
            torch._foreach_mul_(s, g)
        return
    for i, g in enumerate(grads):
        m, v, u, s = exp_avgs[i], exp_avg_sqs[i], updates[i], scores[i]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        s.copy_(v).div_(bc2[i]).sqrt_().add_(eps)
        u.copy_(m).div_(s).div_(bc1[i])
        s.copy_(u).mul_(g)


def lion_direction(
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    updates: List[Tensor],
    scores: List[Tensor],
    *,
    beta1: float,
    beta2: float,
    foreach: bool,
) -> None:
    """Lion: u = sign(b1*m + (1-b1)*g); s = u * g; then m = b2*m + (1-b2)*g."""
    if not grads:
        return
    if foreach:
        for g, m, u, s in _groups(grads, exp_avgs, updates, scores):
            torch._foreach_copy_(u, m)
            torch._foreach_mul_(u, beta1)
            torch._foreach_add_(u, g, alpha=1 - beta1)
            torch._foreach_sign_(u)
            torch._foreach_copy_(s, u)
            torch._foreach_mul_(s, g)
            torch._foreach_mul_(m, beta2)
            torch._foreach_add_(m, g, alpha=1 - beta2)
        return
    for g, m, u, s in zip(grads, exp_avgs, updates, scores):
        u.copy_(m).mul_(beta1).add_(g, alpha=1 - beta1).sign_()
        s.copy_(u).mul_(g)
        m.mul_(beta2).add_(g, alpha=1 - beta2)


def muon_direction(
    grads: List[Tensor],
    momentum_buffers: List[Tensor],
    updates: List[Tensor],
    scores: List[Tensor],
    *,
    momentum: float,
    nesterov: bool,
    foreach: bool,
) -> None:
    """Muon's momentum (Moonlight form): buf = mu*buf + g; x = g + mu*buf (Nesterov) or
    x = buf.  ``updates`` receives x (orthogonalised afterwards, on the whole matrix),
    ``scores`` receives s = x * g: the score uses the momentum *before*
    orthogonalisation, which is what aligns coordinate-wise with the gradient."""
    if not grads:
        return
    if foreach:
        for g, b, u, s in _groups(grads, momentum_buffers, updates, scores):
            torch._foreach_mul_(b, momentum)
            torch._foreach_add_(b, g)
            if nesterov:
                torch._foreach_copy_(u, g)
                torch._foreach_add_(u, b, alpha=momentum)
            else:
                torch._foreach_copy_(u, b)
            torch._foreach_copy_(s, u)
            torch._foreach_mul_(s, g)
        return
    for g, b, u, s in zip(grads, momentum_buffers, updates, scores):
        b.mul_(momentum).add_(g)
        if nesterov:
            u.copy_(g).add_(b, alpha=momentum)
        else:
            u.copy_(b)
        s.copy_(u).mul_(g)


def newton_schulz(x: Tensor, steps: int = 5) -> Tensor:
    """Quintic Newton-Schulz iteration towards the orthogonal factor U V^T of x = U S V^T
    (Keller Jordan's coefficients; converges to singular values in about [0.7, 1.2]).
    Runs in x's dtype, or fp32 for half-precision input; returns a new tensor."""
    assert x.ndim == 2, x.shape
    a, b, c = NS_COEFFS
    X = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x.clone()
    X = X / (X.norm() + 1e-7)
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.T
    return X


def muon_lr_scale(shape: Sequence[int]) -> float:
    """Moonlight's 0.2 * sqrt(max(A, B)) matches the update RMS to AdamW's, so one lr
    serves the matrices and the AdamW-fallback params alike."""
    return 0.2 * math.sqrt(max(shape[0], shape[1]))


def cautious_masks(scores: List[Tensor], masks: List[Tensor]) -> None:
    """C-MGUP: alpha where the update agrees with the gradient (s > 0)."""
    for s, mk in zip(scores, masks):
        torch.gt(s, 0, out=mk)


def fill_phi(masks: List[Tensor], phis: List[Tensor], alpha: float, gamma: float) -> None:
    """phi = alpha where selected, gamma elsewhere (written exactly, not as a blend)."""
    for mk, ph in zip(masks, phis):
        ph.fill_(gamma).masked_fill_(mk, alpha)


def apply_update(
    params: List[Tensor],
    updates: List[Tensor],
    phis: List[Tensor],
    *,
    lrs: List[float],
    lr_scales: Optional[List[float]] = None,
    weight_decay: float,
    foreach: bool,
) -> None:
    """Decoupled weight decay then the scaled step:
    p *= 1 - lr*wd;   p -= (lr * lr_scale) * phi * u."""
    if not params:
        return
    lr_scales = lr_scales or [1.0] * len(params)
    steps = [-lr * sc for lr, sc in zip(lrs, lr_scales)]
    decay = [1 - lr * weight_decay for lr in lrs]
    if foreach:
        for p, u, ph, st, dc in _groups(params, updates, phis, st=steps, dc=decay):
            if weight_decay != 0:
                torch._foreach_mul_(p, dc)
            torch._foreach_addcmul_(p, u, ph, st)
        return
    for i, p in enumerate(params):
        if weight_decay != 0:
            p.mul_(decay[i])
        p.addcmul_(updates[i], phis[i], value=steps[i])


# ----------------------------------------------------------------------------- compiled
# The same math as above, fused by torch.compile (inductor) into one pass per phase over
# flat 1-D views, for whole tensors.  Phase 1 also writes a NaN-free copy of the scores
# (``scratch``) that the threshold search partitions in place; phase 3 takes the K-th
# score ``t`` and applies phi = alpha if s >= t else gamma on the fly, so neither a mask
# nor phi is ever materialised.  Scalars travel as 0-d tensors so that a changing lr or
# step count never triggers a recompilation; ``dynamic=True`` gives one graph for all sizes.

def _adamw_k1(g, m, v, u, s, scratch, beta1, beta2, bc1, bc2, eps):
    m2 = m * beta1 + g * (1 - beta1)
    v2 = v * beta2 + g * g * (1 - beta2)
    uu = m2 / (torch.sqrt(v2 / bc2) + eps) / bc1
    ss = (uu * g).to(s.dtype)
    m.copy_(m2)
    v.copy_(v2)
    u.copy_(uu)
    s.copy_(ss)
    scratch.copy_(torch.nan_to_num(ss, nan=float("-inf")))


def _lion_k1(g, m, u, s, scratch, beta1, beta2):
    uu = torch.sign(m * beta1 + g * (1 - beta1))
    ss = (uu * g).to(s.dtype)
    m.copy_(m * beta2 + g * (1 - beta2))
    u.copy_(uu)
    s.copy_(ss)
    scratch.copy_(torch.nan_to_num(ss, nan=float("-inf")))


def _apply_threshold_k2(p, u, s, t, alpha, gamma, lr, decay):
    phi = torch.where(s >= t, alpha, gamma)
    p.copy_((p * decay - lr * phi * u).to(p.dtype))


def _adamw_cautious_k(p, g, m, v, beta1, beta2, bc1, bc2, eps, alpha, gamma, lr, decay):
    m2 = m * beta1 + g * (1 - beta1)
    v2 = v * beta2 + g * g * (1 - beta2)
    uu = m2 / (torch.sqrt(v2 / bc2) + eps) / bc1
    phi = torch.where(uu * g > 0, alpha, gamma)
    m.copy_(m2)
    v.copy_(v2)
    p.copy_((p * decay - lr * phi * uu).to(p.dtype))


def _lion_cautious_k(p, g, m, beta1, beta2, alpha, gamma, lr, decay):
    uu = torch.sign(m * beta1 + g * (1 - beta1))
    phi = torch.where(uu * g > 0, alpha, gamma)
    m.copy_(m * beta2 + g * (1 - beta2))
    p.copy_((p * decay - lr * phi * uu).to(p.dtype))


_COMPILED = {}


def compiled(name: str):
    """The torch.compile'd kernel ``name`` (compiled once per process, cached on disk by
    inductor when TORCHINDUCTOR_CACHE_DIR is set)."""
    fn = _COMPILED.get(name)
    if fn is None:
        fn = torch.compile(globals()[name], dynamic=True, fullgraph=True)
        _COMPILED[name] = fn
    return fn
