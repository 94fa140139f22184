"""Optimizer names of the recipe -> classes and keyword arguments; the LR schedule.

=================  ==========================================================
``adamw``          ``torch.optim.AdamW`` (the baseline; foreach path)
``cautious_adamw`` ``CMGUPAdamW`` with alpha=1, gamma=0, normalize=True: Liang et
                   al.'s Cautious AdamW (phi = 1[u*g > 0] / mean(1[u*g > 0]))
``mgup_adamw``     ``MGUPAdamW`` (top-K, defaults mask_ratio 0.5, alpha 2, gamma 0.5)
``cmgup_adamw``    ``CMGUPAdamW`` (alpha where u*g > 0, else gamma)
``lion``           plain Lion (Chen et al. 2023): ``MGUPLion`` with mode="cautious",
                   alpha=1, gamma=1, so phi = 1 on every coordinate and the step is
                   ``p -= lr * sign(b1*m + (1-b1)*g)`` exactly
``mgup_lion``      ``MGUPLion``
``muon``           plain Muon: ``torch.optim.Muon`` on the hidden matrices (Nesterov,
                   5 Newton-Schulz steps, lr scaled by 0.2*sqrt(max(A, B)) as
                   ``MGUPMuon`` does: ``adjust_lr_fn="match_rms_adamw"``), and
                   ``torch.optim.AdamW`` on embeddings, LM head and norms
                   (:class:`MuonWithAdamW`); DDP only
``mgup_muon``      ``MGUPMuon``: hidden matrices by Muon; embeddings, LM head and
                   norms by its AdamW fallback
=================  ==========================================================
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

__all__ = ["optimizer_spec", "param_groups", "build_optimizer", "lr_lambda", "build_scheduler", "MuonWithAdamW"]

# name -> (mgup_dist.OPTIMIZERS key, or None for a plain torch optimizer, fixed kwargs)
_TABLE = {
    "adamw": (None, {}),
    "cautious_adamw": ("CMGUPAdamW", {"mode": "cautious", "alpha": 1.0, "gamma": 0.0, "normalize": True}),
    "mgup_adamw": ("MGUPAdamW", {}),
    "cmgup_adamw": ("CMGUPAdamW", {}),
    "lion": ("MGUPLion", {"mode": "cautious", "alpha": 1.0, "gamma": 1.0}),
    "mgup_lion": ("MGUPLion", {}),
    "muon": (None, {}),
    "mgup_muon": ("MGUPMuon", {}),
}
# the plain torch optimizers: name -> class name in optimizer_class
_PLAIN = {"adamw": "AdamW", "muon": "MuonWithAdamW"}
_LION = ("lion", "mgup_lion")
_MUON = ("muon", "mgup_muon")
_MGUP_FLAGS = ("mask_ratio", "alpha", "gamma", "tau", "scope")


def optimizer_spec(cfg) -> Tuple[str, Dict]:
    """(class name, keyword arguments) for the recipe's optimizer name.  The class name is
    a key of ``mgup_dist.OPTIMIZERS``, ``"AdamW"`` (torch's) or ``"MuonWithAdamW"``."""
    key, fixed = _TABLE[cfg.optimizer]
    kw: Dict = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    betas_default = (0.9, 0.99) if cfg.optimizer in _LION else (0.9, 0.95) if cfg.optimizer in _MUON else (0.9, 0.999)
    b1 = cfg.beta1 if cfg.beta1 is not None else betas_default[0]
    b2 = cfg.beta2 if cfg.beta2 is not None else betas_default[1]
    kw["betas"] = (b1, b2)
    if cfg.optimizer not in _LION:
        kw["eps"] = cfg.eps
    if key is None:
        for f in _MGUP_FLAGS:
            if getattr(cfg, f) is not None:
                raise ValueError(f"{f}: only applies to the MGUP optimizers, not to {cfg.optimizer!r}")
    else:
        kw.update(fixed)
        for f in _MGUP_FLAGS:
            if getattr(cfg, f) is not None:
                if f in fixed:
                    raise ValueError(f"{f}: {cfg.optimizer!r} fixes {f}={fixed[f]}")
                if f == "tau" and "alpha" in fixed:   # tau = (alpha, gamma) in one flag
                    raise ValueError(f"tau: {cfg.optimizer!r} fixes alpha={fixed['alpha']}, gamma={fixed['gamma']}")
                kw[f] = getattr(cfg, f)
    if cfg.optimizer in _MUON:
        kw["lr"] = cfg.muon_lr if cfg.muon_lr is not None else 2e-2
        kw["adamw_lr"] = cfg.lr  # recorded in the group of the AdamW fallback (see param_groups)
    if cfg.opt_kwargs:
        kw.update(cfg.opt_kwargs)
    return (key or _PLAIN[cfg.optimizer]), kw


def _is_muon_matrix(name: str, p: torch.Tensor) -> bool:
    # Muon orthogonalises hidden 2-D weights; the embedding and the LM head stay on AdamW
    # (Jordan et al.; Moonlight), as do 1-D norms.
    return p.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name


def param_groups(model: torch.nn.Module, cfg, kw: Dict) -> List[Dict]:
    """Decoupled weight decay on matrices only (norm gains decay to zero otherwise).
    For Muon, a group per (use_muon, decay) pair with the AdamW fallback at ``cfg.lr``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    wd = kw.get("weight_decay", 0.0)
    if cfg.optimizer in _MUON:
        groups = []
        for use_muon in (True, False):
            for decay in (True, False):
                ps = [p for n, p in named if _is_muon_matrix(n, p) == use_muon and (p.ndim >= 2) == decay]
                if ps:
                    g = {"params": ps, "use_muon": use_muon, "weight_decay": wd if decay else 0.0}
                    if not use_muon:
                        g["lr"] = kw["adamw_lr"]
                    groups.append(g)
        return groups
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


class MuonWithAdamW(torch.optim.Optimizer):
    """Plain Muon with its AdamW fallback, one optimizer (one state dict, one LR schedule):
    groups with ``use_muon=True`` (2-D hidden matrices) step by ``torch.optim.Muon``,
    the others by ``torch.optim.AdamW``.  Muon: ``buf = lerp(buf, g, 1-mu)``,
    ``x = lerp(g, buf, mu)`` (Nesterov), ``p *= 1 - lr*wd``,
    ``p -= lr * 0.2*sqrt(max(A, B)) * NS5(x)``; since NS5 normalises its input first, the
    direction equals ``MGUPMuon``'s ``buf = mu*buf + g``, ``x = g + mu*buf`` with phi = 1.
    State keeps torch's names (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``, ``step``).
    """

    def __init__(self, params, lr: float = 2e-2, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 adjust_lr_fn: str = "match_rms_adamw"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, use_muon=False)
        super().__init__(params, defaults)
        # The two torch optimizers share this one's group dicts and state (re-bound at each
        # step: load_state_dict replaces both); they only fill in their own defaults.
        self._muon = torch.optim.Muon(self._groups(True), lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn) \
            if self._groups(True) else None
        self._adamw = torch.optim.AdamW(self._groups(False), lr=lr, betas=betas, eps=eps,
                                        weight_decay=weight_decay, foreach=True) if self._groups(False) else None

    def _groups(self, use_muon: bool):
        return [g for g in self.param_groups if bool(g["use_muon"]) == use_muon]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner, use_muon in ((self._muon, True), (self._adamw, False)):
            if inner is not None:
                inner.param_groups = self._groups(use_muon)
                for g in inner.param_groups:   # loaded groups: the inner optimizer's defaults again
                    for k, v in inner.defaults.items():
                        g.setdefault(k, v)
                inner.state = self.state
                inner.step()
        return loss


def accepted_kwargs(cls) -> List[str]:
    """The keyword arguments ``cls``'s constructor takes (following ``**kwargs`` up the MRO)."""
    from mgup_dist.options import constructor_kwargs

    return constructor_kwargs(cls)


def check_opt_kwargs(optimizer: str, opt_kwargs: Dict) -> None:
    """ValueError naming each ``--opt-kwargs`` key the optimizer does not take (with the
    closest accepted name), before anything is built."""
    import difflib

    cls = optimizer_class(_TABLE[optimizer][0] or _PLAIN[optimizer])
    accepted = accepted_kwargs(cls)
    unknown = [k for k in opt_kwargs if k not in accepted]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), accepted, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"opt_kwargs: {cls.__name__} takes no keyword {', '.join(hints)}; accepted: "
                         f"{', '.join(accepted)}")


def optimizer_class(class_name: str):
    if class_name == "AdamW":
        return torch.optim.AdamW
    if class_name == "MuonWithAdamW":
        return MuonWithAdamW
    try:
        from mgup_dist import OPTIMIZERS
    except ImportError as e:  # pragma: no cover - the core is part of the package
        raise RuntimeError(f"optimizer: mgup_dist.OPTIMIZERS is not importable ({e})") from e
    return OPTIMIZERS[class_name]


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    class_name, kw = optimizer_spec(cfg)
    kw = dict(kw)
    kw.pop("adamw_lr", None)
    cls = optimizer_class(class_name)
    if class_name == "AdamW":
        kw.setdefault("foreach", True)
    groups = param_groups(model, cfg, optimizer_spec(cfg)[1])
    try:
        return cls(groups, **kw)
    except TypeError as e:
        raise ValueError(f"opt_kwargs: {class_name} rejected the arguments {sorted(kw)}: {e}") from e


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier of optimizer step ``step`` (0-based: LambdaLR's count of finished
    steps).  Linear warmup (t + 1) / w for t < w (so no step runs at lr 0), then cosine
    from 1 down to ``min_ratio`` at ``total``:
    f(t) = r + (1 - r) * (1 + cos(pi * (t - w) / (T - w))) / 2."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineWithWarmup(torch.optim.lr_scheduler.LambdaLR):
    def __init__(self, optimizer, *, warmup: int, total: int, min_ratio: float):
        import functools

        super().__init__(optimizer, functools.partial(lr_lambda, warmup=warmup, total=total, min_ratio=min_ratio))


def build_scheduler(optimizer, cfg):
    return CosineWithWarmup(optimizer, warmup=cfg.warmup_steps, total=schedule_steps(cfg), min_ratio=cfg.min_lr_ratio)


def schedule_steps(cfg) -> int:
    """The step at which the cosine reaches ``lr * min_lr_ratio``: ``--steps``, or, for a run
    continued past its first ``--steps``, that first total (the lr then stays at the minimum)."""
    return getattr(cfg, "schedule_steps", None) or cfg.steps
