"""Workers of tests/test_engine_dist.py (real gloo process groups, real FSDP2, real DDP)."""
from __future__ import annotations

import torch
import torch.nn as nn
from _fsdp_workers import _fsdp2_model, _maxdiff, _reference, _set_fsdp2_grads, make_opt


def disagreement(rank, world, what):
    """Each rank builds the same FSDP2 model (one split tensor) with a setting that differs on
    rank 1; returns the error message each rank got (None: no error)."""
    kw = {"mask_ratio": 0.5, "scope": "tensor", "mode": "topk", "normalize": False}
    if rank == 1:
        kw[what] = {"mask_ratio": 0.25, "scope": "global", "mode": "cautious", "normalize": True}[what]
    model, _ = _fsdp2_model([(8, 3), (5,)], (world,))
    opt = make_opt("MGUPAdamW", model.parameters(), **kw)
    _set_fsdp2_grads(model, 0, "randn")
    try:
        opt.step()
        return None
    except ValueError as e:
        return str(e)


def ddp_disagreement(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(nn.Linear(4, 3))
    opt = make_opt("MGUPAdamW", model.parameters(), mask_ratio=0.5 if rank == 0 else 0.3).replicated()
    model(torch.randn(2, 4)).sum().backward()
    try:
        opt.step()
        return None
    except ValueError as e:
        return str(e)


def path_choice(rank, world, cases):
    """4 ranks, one (3, 4) parameter (rank 3 holds nothing of it) plus others: every scope,
    compile on and off, two steps; returns max |delta| vs one process for scope tensor."""
    out = {}
    shapes = [(3, 4), (9, 2), (1,)]
    for name, scope, compile_ in cases:
        model, full = _fsdp2_model(shapes, (world,))
        opt = make_opt(name, model.parameters(), scope=scope, compile=compile_)
        for step in range(2):
            _set_fsdp2_grads(model, step, "tied")
            opt.step()
        got = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        key = f"{name}/{scope}/{'compile' if compile_ else 'eager'}"
        if scope == "tensor":
            names = list(full)
            ref = _reference(names, [full[n] for n in names], name, 2, "tied", {"scope": scope})
            out[key] = max(_maxdiff(got[n], ref[n]) for n in names)
        else:
            out[key] = max(_maxdiff(got[n], full[n]) for n in full)  # moved, finite
    return out


class _Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.used = nn.Linear(8, 2)
        self.unused = nn.Linear(8, 5)  # no gradient on any rank

    def forward(self, x):
        return self.used(torch.tanh(self.body(x)))


def unused_parameter(rank, world, name):
    """Real FSDP2 backward with an unused head, default scope: the step works, the unused
    head is unchanged, the used ones move, identically on every rank."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _Heads()
    fully_shard(model)
    opt = make_opt(name, model.parameters())
    before = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    return {n: bool(torch.equal(before[n], after[n])) for n in before}


def fsdp2_memory(rank, world, name, dtype):
    """Optimizer state bytes per local parameter element under FSDP2, MGUP vs torch AdamW."""
    from mgup_dist.memory import state_bytes

    out = {}
    for which in ("adamw", "mgup"):
        model, _ = _fsdp2_model([(64, 16), (33,), (7, 5)], (world,))
        model.to(dtype)
        opt = torch.optim.AdamW(model.parameters()) if which == "adamw" else make_opt(name, model.parameters())
        from torch.distributed.tensor import distribute_tensor

        for _ in range(2):
            for p in model.parameters():
                p.grad = distribute_tensor(torch.randn(p.shape).to(dtype), p.device_mesh, p.placements)
            opt.step()
        n_local = sum(p.to_local().numel() for p in model.parameters())
        out[which] = state_bytes(opt) / n_local
    return out


def zero2_memory(rank, world, opt_type, dtype):
    """Bytes of the inner optimizer's state per element of this rank's ZeRO-2 partition:
    MGUP through the config's optimizer.type vs DeepSpeed with torch's AdamW."""
    import deepspeed

    import _ds_workers as D
    import mgup_dist.deepspeed  # noqa: F401  registers the MGUP names
    from mgup_dist.memory import state_bytes

    out = {}
    for which in ("AdamW", opt_type):
        params = {"lr": 1e-3, "torch_adam": True} if which == "AdamW" else {"lr": 1e-3}  # torch's AdamW, no extension
        cfg = D.ds_config(2, dtype=dtype, opt_type=which, opt_params=params, zero_allow_untested_optimizer=True)
        model = D.make_model()
        engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        D.train_steps(engine, range(2), rank)
        inner = opt.optimizer
        n = sum(p.numel() for g in inner.param_groups for p in g["params"])
        out[which] = state_bytes(inner) / n
    return out
