"""The 1-D counterexample of the MGUP poster: Cautious-Adam stalls, MGUP-Adam converges.

Problem (Zhang et al., NeurIPS 2022, after Shi et al., ICLR 2021): a finite sum of ``n``
functions of one variable,

    f_0(x) = n x                          for x >= -1,   n/2 (x+2)^2 - 3n/2   for x < -1
    f_i(x) = -x                           for x >= -1,  -1/2 (x+2)^2 + 3/2    for x < -1   (i > 0)

so that ``f = sum_i f_i`` is ``x`` on ``[-1, inf)`` and ``(x+2)^2/2 - 3/2`` below: smooth,
with its minimum at ``x* = -2``.  (Each ``f_i`` is continuous at -1; the quadratic of f_i,
i > 0, is the negated, rescaled one of f_0 so that the sum's curvature is 1.)  Each step
samples one ``f_i`` uniformly (seeded) and uses its gradient; start at ``x = -0.5``.

Why Cautious fails here: on ``x >= -1`` the only gradient that points towards the optimum
is the rare large ``f_0' = n`` (probability 1/n); the frequent ``f_i' = -1`` point away.  Adam
gets there through its momentum: after a large gradient ``m > 0`` for a while and the
steps taken while ``g = -1`` still move left.  Those steps are exactly the ones whose
update disagrees in sign with the current gradient (``u * g < 0``), so the Cautious mask
(``phi = 0`` there) deletes them, keeping only the rightward steps of the ``g = -1`` draws
once ``m`` turned negative: the iterate stalls around the kink at -1 instead of reaching
-2.  MGUP keeps those coordinates at a reduced but non-zero scale ``gamma`` and converges
like Adam.

On one scalar the top-K rule is degenerate (``K = floor(mask_ratio * 1) = 0`` for
``mask_ratio < 1``: every step gets gamma), so the comparison uses the sign rule of the
poster: Cautious = ``mode="cautious", alpha=1, gamma=0``; MGUP = ``mode="cautious"`` with
``tau = 0.5`` (alpha 2, gamma 0.5).  Plain Adam is ``torch.optim.Adam``.

Usage::

    python -m mgup_dist.counterexample --out counterexample.png
"""
from __future__ import annotations

import argparse
import random
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["grad_fi", "objective", "run_method", "run_all", "main", "METHODS", "X0", "X_STAR"]

X0 = -0.5
X_STAR = -2.0
# Defaults found by a sweep (seeds 0..49): with Adam's default betas, a constant lr 0.01 and
# n = 5, Adam and MGUP-Adam (tau 0.5) end at -2.000 for 50/50 seeds, Cautious-Adam for 1/50
# (median final iterate -0.93).
DEFAULTS = dict(n=5, steps=10_000, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, seed=0, tau=0.5)

METHODS = ("adam", "cautious", "mgup")


def grad_fi(i: int, x: float, n: int) -> float:
    """Derivative of the i-th summand at x."""
    if x >= -1.0:
        return float(n) if i == 0 else -1.0
    return n * (x + 2.0) if i == 0 else -(x + 2.0)


def objective(x: float, n: int) -> float:
    """f(x) / n, the mean of the summands (minimum -3/(2n) at x = -2)."""
    if x >= -1.0:
        return x / n
    return (0.5 * (x + 2.0) ** 2 - 1.5) / n


def _labels(tau: float) -> Dict[str, str]:
    return {
        "adam": "Adam",
        "cautious": "Cautious-Adam (gamma=0)",
        "mgup": f"MGUP-Adam (cautious rule, tau={tau:g}: alpha={1 / tau:g}, gamma={tau:g})",
    }


def _make_optimizer(method: str, x: torch.Tensor, *, lr, beta1, beta2, eps, tau, impl):
    """A torch optimizer (impl="optim") or a closure over the reference rule (impl="reference")."""
    if method == "adam":
        scale = dict(alpha=1.0, gamma=1.0)
    elif method == "cautious":
        scale = dict(alpha=1.0, gamma=0.0)
    elif method == "mgup":
        scale = dict(alpha=1.0 / tau, gamma=tau)
    else:
        raise ValueError(f"method: unknown {method!r}; allowed: {', '.join(METHODS)}")
    if impl == "reference":
        from mgup_dist import reference

        state: dict = {}

        def step():
            reference.adamw_step(
                x.data, x.grad, state, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=0.0,
                mode="cautious", mask_ratio=0.5, normalize=False, **scale,
            )

        return step
    if impl != "optim":
        raise ValueError(f"impl: unknown {impl!r}; allowed: 'optim', 'reference'")
    if method == "adam":
        return torch.optim.Adam([x], lr=lr, betas=(beta1, beta2), eps=eps).step
    from mgup_dist import CMGUPAdamW

    kwargs = dict(scale) if method == "cautious" else dict(tau=tau)
    opt = CMGUPAdamW([x], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=0.0, mode="cautious", **kwargs)
    return opt.step


def run_method(
    method: str,
    *,
    n: int = DEFAULTS["n"],
    steps: int = DEFAULTS["steps"],
    lr: float = DEFAULTS["lr"],
    beta1: float = DEFAULTS["beta1"],
    beta2: float = DEFAULTS["beta2"],
    eps: float = DEFAULTS["eps"],
    seed: int = DEFAULTS["seed"],
    tau: float = DEFAULTS["tau"],
    impl: str = "optim",
) -> List[float]:
    """The iterates x_0 .. x_steps of one method (float64, one 1-element parameter)."""
    if n < 2:
        raise ValueError(f"n: must be an integer >= 2, got {n}")
    x = torch.tensor([X0], dtype=torch.float64, requires_grad=True)
    step = _make_optimizer(method, x, lr=lr, beta1=beta1, beta2=beta2, eps=eps, tau=tau, impl=impl)
    rng = random.Random(seed)  # the same sample sequence for every method
    xs = [X0]
    for _ in range(steps):
        i = rng.randrange(n)
        x.grad = torch.tensor([grad_fi(i, float(x.detach()[0]), n)], dtype=torch.float64)
        step()
        xs.append(float(x.detach()[0]))
    return xs


def run_all(methods: Sequence[str] = METHODS, **kw) -> Dict[str, List[float]]:
    return {m: run_method(m, **kw) for m in methods}


def plot(trajectories: Dict[str, List[float]], out: str, tau: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _labels(tau)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, xs in trajectories.items():
        ax.plot(range(len(xs)), xs, label=labels.get(name, name), linewidth=1.2)
    ax.axhline(X_STAR, color="k", linestyle="--", linewidth=0.8, label="optimum x* = -2")
    ax.axhline(-1.0, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("x")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[float]]:
    p = argparse.ArgumentParser(
        prog="mgup-dist counterexample",
        description="Zhang et al.'s 1-D counterexample: Cautious-Adam (gamma=0) vs MGUP-Adam (gamma>0).",
    )
    p.add_argument("--n", type=int, default=DEFAULTS["n"], help="number of summands (default %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimizer steps (default %(default)s)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="learning rate (default %(default)s)")
    p.add_argument("--beta1", type=float, default=DEFAULTS["beta1"], help="Adam beta1 (default %(default)s)")
    p.add_argument("--beta2", type=float, default=DEFAULTS["beta2"], help="Adam beta2 (default %(default)s)")
    p.add_argument("--eps", type=float, default=DEFAULTS["eps"], help="Adam eps (default %(default)s)")
    p.add_argument("--tau", type=float, default=DEFAULTS["tau"],
                   help="MGUP: alpha = 1/tau, gamma = tau (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="which summand each step samples (default %(default)s)")
    p.add_argument("--impl", choices=("optim", "reference"), default="optim",
                   help="mgup_dist's optimizer classes (default) or mgup_dist.reference")
    p.add_argument("--out", default="counterexample.png", help="PNG figure path ('' to skip)")
    args = p.parse_args(argv)
    if not 0.0 < args.tau <= 1.0:
        raise ValueError(f"tau: must be in (0, 1], got {args.tau}")

    kw = dict(n=args.n, steps=args.steps, lr=args.lr, beta1=args.beta1, beta2=args.beta2, eps=args.eps,
              seed=args.seed, tau=args.tau, impl=args.impl)
    traj = run_all(**kw)
    labels = _labels(args.tau)
    print(f"n={args.n} steps={args.steps} lr={args.lr} betas=({args.beta1}, {args.beta2}) seed={args.seed} "
          f"x0={X0} x*={X_STAR}")
    print(f"{'method':<58} {'final x':>10} {'|x - x*|':>10}")
    for name, xs in traj.items():
        print(f"{labels[name]:<58} {xs[-1]:>10.4f} {abs(xs[-1] - X_STAR):>10.4f}")
    if args.out:
        title = (f"f = sum of n={args.n} summands, one sampled per step; lr={args.lr}, "
                 f"betas=({args.beta1}, {args.beta2}), seed {args.seed}")
        plot(traj, args.out, args.tau, title)
        print(f"figure written to {args.out}")
    return traj


if __name__ == "__main__":
    main()
