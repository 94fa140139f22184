"""Each base rule declared once: its state, its score (phase 1) and its direction (phase 3).

A step of every MGUP optimizer is one pipeline (``mgup_dist.pipeline``)::

    score  (phase 1)   moments, direction u, alignment score s = u * g  -> order keys in a scratch
    select (phase 2)   the K-th key per selection unit (``mgup_dist.selection``), ties to the lower index
    apply  (phase 3)   phi = alpha if selected else gamma;  p *= 1 - lr*wd;  p -= lr * phi * u

``u`` is not stored between phases 1 and 3 (it would cost 4 bytes a parameter): phase 3
recomputes it from the state, bit for bit as phase 1 did.  Rules whose ``u`` can be
recomputed from the *updated* state (AdamW, Muon) update it in phase 1; a rule whose ``u``
needs the *old* state (Lion: ``u = sign(b1*m + (1-b1)*g)`` before ``m`` moves) sets
``late_state`` and updates its state in phase 3, after the step.

This module holds the math in plain torch ops over lists of flat tensors (``torch._foreach_*``,
so that one call serves many tensors); the for-loop path calls the same functions with lists
of one tensor, so the two agree bit for bit.  Backends with their own kernels
(``mgup_dist.kernels``) implement the same formulas; the float64 reference
(``mgup_dist.reference``) is the specification all of them are tested against.

Hyperparameters reach the rules as ``hp``: a dict with the param group's values plus, per
tensor, what depends on the step (``bc1``, ``bc2``: bias corrections; python floats, or 0-d
tensors on the device when the step counter lives there or under ``torch.compile``), and
optionally ``flat``: one contiguous tensor of which the ``outs`` are consecutive views
covering it, so that an elementwise op with no multi-tensor form (Lion's NaN-keeping
sign) is one op over all tensors instead of one per tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["Rule", "ADAMW", "LION", "MUON", "RULES", "CONVENTIONS", "NS_COEFFS", "newton_schulz", "newton_schulz_batched",
           "muon_lr_scale"]

#: ``torch``: eps on the bias-corrected sqrt(v_hat) (torch.optim.AdamW).  ``authors``: the MGUP
#: authors' code (Hugging Face's old AdamW): eps on the uncorrected sqrt(v), bias correction
#: folded into the step size, cautious alpha also where s == 0 (weight decay first, as torch).
CONVENTIONS = ("torch", "authors")


@dataclass(frozen=True)
class Rule:
    """A base optimizer as MGUP sees it.

    ``state``: names of the state tensors shaped like the parameter (torch's names);
    ``step``: whether it keeps a ``step`` counter; ``late_state``: see the module doc;
    ``score(grads, states, hp, outs)``: phase 1, writes s into ``outs`` (float views);
    ``direction(grads, states, hp, outs)``: phase 3, writes u into ``outs`` (and, for a
    late-state rule, updates the state afterwards); ``matrix``: whether ``u`` is finished
    on the whole matrix (Muon's Newton-Schulz) after ``direction``; ``moments``: the state
    update of ``score`` without the score (rules that update their state in phase 1), so
    that a one-pass step (cautious) can compute ``u`` once and ``s = u * g`` from it.
    """

    name: str
    state: Tuple[str, ...]
    step: bool
    late_state: bool
    score: Callable
    direction: Callable
    finish: Optional[Callable] = None
    matrix: bool = False
    moments: Optional[Callable] = None  # ``moments(grads, states, hp)``: phase 1's state update alone


def _neg(grads: List[Tensor], hp) -> List[Tensor]:
    """maximize: the rule sees -g (as torch's optimizers do)."""
    return torch._foreach_neg(grads) if hp.get("maximize") else grads


# ------------------------------------------------------------------------------- AdamW
def _adamw_moments(g, m, v, hp) -> None:
    # m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g^2
    b1, b2 = hp["betas"]
    torch._foreach_mul_(m, b1)
    torch._foreach_add_(m, g, alpha=1 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, g, g, value=1 - b2)


def _adamw_u(m, v, hp, out) -> None:
    """torch:   u = m_hat / (sqrt(v_hat) + eps) = (m / (sqrt(v / bc2) + eps)) / bc1
    authors: u = m / (sqrt(v) + eps)   (their bias correction sits in the step size).

    Six multi-tensor ops whatever the number of tensors: the denominator goes to a transient
    list (foreach has no ``out=``, and ``out = m / out`` in place would need one op per
    tensor), then ``out = m``, ``out /= d``: the same roundings in the same order as the
    textbook formula."""
    if hp.get("convention", "torch") == "authors":
        d = torch._foreach_sqrt(v)
    else:
        d = torch._foreach_div(v, _scalars(hp["bc2"]))
        torch._foreach_sqrt_(d)
    torch._foreach_add_(d, hp["eps"])
    torch._foreach_copy_(out, m)
    torch._foreach_div_(out, d)
    del d
    if hp.get("convention", "torch") != "authors":
        torch._foreach_div_(out, _scalars(hp["bc1"]))


def _scalars(xs):
    """Per-tensor scalars for a foreach op: python floats as a scalar list; 0-d tensors (step
    counts on the device, or traced by torch.compile) as a tensor list."""
    xs = list(xs)
    if any(isinstance(x, torch.Tensor) for x in xs):
        return [x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64) for x in xs]
    return [float(x) for x in xs]


def _adamw_score(grads, states, hp, outs) -> None:
    g = _neg(grads, hp)
    _adamw_moments(g, states["exp_avg"], states["exp_avg_sq"], hp)
    _adamw_u(states["exp_avg"], states["exp_avg_sq"], hp, outs)
    torch._foreach_mul_(outs, g)


def _adamw_direction(grads, states, hp, outs) -> None:
    _adamw_u(states["exp_avg"], states["exp_avg_sq"], hp, outs)


def _adamw_state(grads, states, hp) -> None:
    _adamw_moments(_neg(grads, hp), states["exp_avg"], states["exp_avg_sq"], hp)


ADAMW = Rule("adamw", ("exp_avg", "exp_avg_sq"), True, False, _adamw_score, _adamw_direction, moments=_adamw_state)


# -------------------------------------------------------------------------------- Lion
def _lion_u(g, m, hp, out) -> None:
    # u = sign(b1*m + (1-b1)*g), from the momentum *before* this step's update.  torch's
    # sign(NaN) is 0, which would freeze a coordinate whose momentum went NaN for ever,
    # silently: NaN stays NaN here (and reaches the parameter, as in AdamW), so it shows.
    b1 = hp["betas"][0]
    torch._foreach_copy_(out, m)
    torch._foreach_mul_(out, b1)
    torch._foreach_add_(out, g, alpha=1 - b1)
    flat = hp.get("flat")  # the one buffer ``out`` views, when the backend has one: 3 ops for all
    for o in ([flat] if flat is not None else out):
        torch.where(o.isnan(), o, torch.sign(o), out=o)


def _lion_score(grads, states, hp, outs) -> None:
    g = _neg(grads, hp)
    _lion_u(g, states["exp_avg"], hp, outs)
    torch._foreach_mul_(outs, g)


def _lion_direction(grads, states, hp, outs) -> None:
    _lion_u(_neg(grads, hp), states["exp_avg"], hp, outs)


def _lion_finish(grads, states, hp) -> None:
    # m = b2*m + (1-b2)*g, after the step
    b2 = hp["betas"][1]
    m = states["exp_avg"]
    torch._foreach_mul_(m, b2)
    torch._foreach_add_(m, _neg(grads, hp), alpha=1 - b2)


LION = Rule("lion", ("exp_avg",), False, True, _lion_score, _lion_direction, finish=_lion_finish)


# -------------------------------------------------------------------------------- Muon
def _muon_x(g, buf, hp, out) -> None:
    # x = g + mu*buf (Nesterov) or buf: the momentum that Newton-Schulz orthogonalises
    if hp["nesterov"]:
        torch._foreach_copy_(out, g)
        torch._foreach_add_(out, buf, alpha=hp["momentum"])
    else:
        torch._foreach_copy_(out, buf)


def _muon_score(grads, states, hp, outs) -> None:
    # buf = mu*buf + g; s = x * g: the momentum *before* orthogonalisation, which aligns
    # coordinate-wise with the gradient (NS5(x) mixes coordinates)
    g = _neg(grads, hp)
    buf = states["momentum_buffer"]
    torch._foreach_mul_(buf, hp["momentum"])
    torch._foreach_add_(buf, g)
    _muon_x(g, buf, hp, outs)
    torch._foreach_mul_(outs, g)


def _muon_direction(grads, states, hp, outs) -> None:
    _muon_x(_neg(grads, hp), states["momentum_buffer"], hp, outs)


def _muon_state(grads, states, hp) -> None:
    buf = states["momentum_buffer"]
    torch._foreach_mul_(buf, hp["momentum"])
    torch._foreach_add_(buf, _neg(grads, hp))


MUON = Rule("muon", ("momentum_buffer",), False, False, _muon_score, _muon_direction, matrix=True, moments=_muon_state)

RULES: Dict[str, Rule] = {r.name: r for r in (ADAMW, LION, MUON)}


# ------------------------------------------------------------------------ Newton-Schulz
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(x: Tensor, steps: int = 5, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Quintic Newton-Schulz iteration towards the orthogonal factor U V^T of x = U S V^T
    (Keller Jordan's coefficients; singular values land in about [0.7, 1.2]), one matrix:
    the readable form of ``newton_schulz_batched``, which the optimizers run.

    Runs in ``dtype`` (default: x's dtype, fp32 for half-precision input), on X^T when x has
    more rows than columns (the Gram matrix X X^T is then the smaller one), as
    ``torch.optim.Muon``::

        X <- X / (||X||_F + 1e-7);   steps times:  A = X X^T;  B = b A + c A A;  X = a X + B X

    with ``B`` and the new ``X`` one fused ``addmm`` each.  X is scaled by its largest
    absolute entry before the Frobenius normalisation when ||X||_F overflows (3e38 squared
    is inf in fp32); NS depends on X / ||X||_F only.  Non-finite input gives a non-finite
    result: the caller decides what to do with it."""
    assert x.ndim == 2, x.shape
    a, b, c = NS_COEFFS
    if dtype is None:
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    X = x.to(dtype, copy=True)
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T
    norm = X.norm()
    # both are computed, so that no value is read back to the host; the usual case is
    # bitwise the plain formula
    amax = X.abs().amax().clamp_min(torch.finfo(X.dtype).tiny)
    Xs = X / amax
    X = torch.where(torch.isfinite(norm), X / (norm + 1e-7), Xs / (Xs.norm() + 1e-7))
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    if transposed:
        X = X.T
    return X


def newton_schulz_batched(batches: Sequence[Tensor], steps: int = 5, scales: Optional[Sequence[float]] = None) -> List[Tensor]:
    """``newton_schulz`` of many matrices at once: ``batches`` are stacks ``[B, m, n]`` of
    same-shape matrices with ``m <= n`` (tall matrices transposed by the caller), in the
    dtype NS runs in; they are normalised in place and ``scales[i] * NS5`` of each stack is
    returned (the scale folded into the last iteration's ``baddbmm``).

    Device ops: 3 for the normalisation of all matrices together (9 when NS runs in float64),
    then 3 per iteration per stack (``bmm``, two ``baddbmm``).

    Normalisation X <- X / (||X||_F + 1e-7) without a host read and without overflow:
    ||X||_F is accumulated in float64, which cannot overflow for fp32/bf16/fp16 entries
    ((3.4e38)^2 * 2^40 < 1.8e308).  Float64 matrices are first multiplied by
    s = 2^-floor(log2 max|X|) (exact: a power of two), the 1e-7 by s too, so that their
    norm cannot overflow either.  A zero matrix stays zero; a NaN or inf entry gives a
    non-finite result."""
    views = [x for X in batches if X.numel() for x in X.unbind(0)]
    out = list(batches)
    if views:
        eps = None
        if views[0].dtype == torch.float64:
            s = torch.stack(torch._foreach_norm(views, float("inf"))).clamp_min_(torch.finfo(torch.float64).tiny)
            s = s.log2_().floor_().neg_().exp2_()
            torch._foreach_mul_(views, list(s.unbind(0)))
            eps = s
        d = torch._foreach_norm(views, 2, dtype=torch.float64)
        if eps is None:
            torch._foreach_add_(d, 1e-7)
        else:
            torch._foreach_add_(d, list(eps.unbind(0)), alpha=1e-7)
        torch._foreach_div_(views, d)
    a, b, c = NS_COEFFS
    for i, X in enumerate(out):
        if X.numel() == 0:
            continue
        k = 1.0 if scales is None else float(scales[i])
        for j in range(steps):
            A = torch.bmm(X, X.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a * k, alpha=k) if j == steps - 1 else torch.baddbmm(X, B, X, beta=a)
        out[i] = X
    return out


def muon_lr_scale(shape: Sequence[int]) -> float:
    """Moonlight's 0.2 * sqrt(max(A, B)) matches the update RMS to AdamW's, so one lr
    serves the matrices and the AdamW-fallback params alike."""
    return 0.2 * math.sqrt(max(shape[0], shape[1]))
