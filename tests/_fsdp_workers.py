"""Module-level worker functions for the FSDP / DDP / DCP / scope tests.

Each runs on every rank of a real gloo process group (``dist_utils.run_distributed``)
and batches many checks into one spawn (a spawn costs several seconds on this
machine).  Workers return plain Python data (floats, bools, lists, CPU tensors);
the tests assert on it.

How identical gradients are produced: every gradient is a function of
``(parameter name, step)`` only (a ``torch.Generator`` seeded from a CRC of the
name), so every rank builds the same *full* gradient and gives its sharded param
exactly its piece -- through torch's own sharding code (``distribute_tensor`` for
FSDP2, ``FlatParamHandle.flatten_tensors`` / ``_get_shard`` and
``_shard_param_infos`` for FSDP1), never through the layouts under test.  A
single-process optimizer on plain tensors, run inside the same worker on the same
full gradients, is the reference.
"""
from __future__ import annotations

import math
import zlib
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

OPT_KW = {
    "MGUPAdamW": dict(lr=1e-2, weight_decay=0.1),
    "MGUPLion": dict(lr=1e-3, weight_decay=0.1),
    "MGUPMuon": dict(lr=2e-2, weight_decay=0.1),
}


def make_opt(name: str, params, **kw):
    import mgup_dist

    args = dict(OPT_KW[name])
    args.update(kw)
    return getattr(mgup_dist, name)(params, **args)


def full_grad(name: str, shape, step: int, kind: str = "randn") -> torch.Tensor:
    """The full gradient of parameter ``name`` at ``step``: identical on every rank."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}".encode()))
    if kind == "tied":  # few distinct values: ties decide much of the selection
        return torch.randint(-2, 3, tuple(shape), generator=g).float()
    return torch.randn(tuple(shape), generator=g)


class Bag(nn.Module):
    """A module that is just named parameters of given shapes (seeded init)."""

    def __init__(self, shapes: Sequence[Tuple[int, ...]], seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for i, s in enumerate(shapes):
            self.register_parameter(f"p{i}", nn.Parameter(torch.randn(*s, generator=g)))

    def forward(self, x):  # pragma: no cover - the parameter-only tests never call it
        return x


def pack(obj) -> bytes:
    """Results holding tensors travel as plain pickle bytes: the multiprocessing queue
    would send tensors as shared-memory handles, which die with the worker process
    before the parent reads them."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(results: List[bytes]) -> list:
    import io

    return [torch.load(io.BytesIO(b), weights_only=False) for b in results]


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    return float((a.detach().float() - b.detach().float()).abs().max())


def _reference(names, full_params, opt_name, steps, kind, opt_kw):
    """Single-process run on plain tensors (the optimizer's default whole layouts)."""
    ref = [nn.Parameter(t.detach().clone()) for t in full_params]
    opt = make_opt(opt_name, ref, **opt_kw)
    for step in range(steps):
        for n, p in zip(names, ref):
            p.grad = full_grad(n, p.shape, step, kind)
        opt.step()
    return {n: p.detach() for n, p in zip(names, ref)}


_MESHES: Dict[Tuple, object] = {}


def _mesh(shape: Tuple[int, ...]):
    from torch.distributed.device_mesh import init_device_mesh

    if shape not in _MESHES:
        names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
        _MESHES[shape] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return _MESHES[shape]


# ---------------------------------------------------------------------------- FSDP2


def _fsdp2_model(shapes, mesh_shape, seed=0):
    from torch.distributed.fsdp import fully_shard

    model = Bag(shapes, seed)
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    fully_shard(model, mesh=_mesh(mesh_shape))
    return model, full


def _set_fsdp2_grads(model, step, kind):
    from torch.distributed.tensor import distribute_tensor

    for n, p in model.named_parameters():
        p.grad = distribute_tensor(full_grad(n, p.shape, step, kind), p.device_mesh, p.placements)


def fsdp2_equivalence(rank, world, cases, steps=3):
    """cases: list of (key, mesh_shape, shapes, opt_name, opt_kw, grad_kind).
    Returns {key: {param name: max abs diff vs the single-process run}} on every rank."""
    out = {}
    for key, mesh_shape, shapes, opt_name, opt_kw, kind in cases:
        model, full = _fsdp2_model(shapes, mesh_shape)
        names = list(full)
        opt = make_opt(opt_name, model.parameters(), **opt_kw)
        for step in range(steps):
            _set_fsdp2_grads(model, step, kind)
            opt.step()
        ref = _reference(names, [full[n] for n in names], opt_name, steps, kind, opt_kw)
        got = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        out[key] = {n: _maxdiff(got[n], ref[n]) for n in names}
        # Also: the parameters really moved (a no-op optimizer would "match" nothing
        # here, but guard against comparing two unchanged copies anyway).
        out[key]["_moved"] = max(_maxdiff(got[n], full[n]) for n in names)
        # State is kept as DTensor with the param's placements.
        from torch.distributed.tensor import DTensor

        kinds = set()
        for p in model.parameters():
            for k, v in opt.state[p].items():
                if torch.is_tensor(v) and v.dim() > 0:
                    kinds.add((isinstance(v, DTensor), tuple(v.placements) == tuple(p.placements)
                               if isinstance(v, DTensor) else False))
        out[key]["_state_dtensor"] = kinds == {(True, True)}
    return out


def fsdp2_train(rank, world, steps=20, opt_name="MGUPAdamW", opt_kw=None):
    """Tiny token model: FSDP2 on ``world`` ranks (each rank half the batch) vs one
    process on the full batch.  Returns (sharded losses, reference losses)."""
    from torch.distributed.fsdp import fully_shard

    opt_kw = opt_kw or {}

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 33), nn.GELU(), nn.Linear(33, 40))

    def batch(step):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randint(0, 40, (8, 6), generator=g)
        return x, (7 * x + 3) % 40  # a learnable token map: the loss must fall

    ref = build()
    model = build()
    mesh = _mesh((world,))
    for m in (model[1], model[3]):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_opt(opt_name, model.parameters(), **opt_kw)
    ropt = make_opt(opt_name, ref.parameters(), **opt_kw)
    ce = nn.CrossEntropyLoss()
    losses, rlosses = [], []
    per = 8 // world
    for step in range(steps):
        x, y = batch(step)
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        loss = ce(model(xs).reshape(-1, 40), ys.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        lt = loss.detach().clone()
        dist.all_reduce(lt)
        losses.append(lt.item() / world)
        rloss = ce(ref(x).reshape(-1, 40), y.reshape(-1))
        rloss.backward()
        ropt.step()
        ropt.zero_grad()
        rlosses.append(rloss.item())
    return losses, rlosses


def fsdp2_no_deadlock(rank, world, opt_names, scopes):
    """(1) a parameter whose gradient is None on rank 1 only; (2) get_optimizer_state_dict
    on a fresh optimizer (zero grads, lr 0 step on every rank).  Returns facts to assert."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    facts = {}
    shapes = [(9, 5), (3, 4), (1, 7), (6,)]
    for opt_name in opt_names:
        for scope in scopes:
            key = f"{opt_name}/{scope}"
            model, full = _fsdp2_model(shapes, (world,))
            opt = make_opt(opt_name, model.parameters(), scope=scope)
            params = dict(model.named_parameters())
            before = {n: p.to_local().detach().clone() for n, p in params.items()}
            _set_fsdp2_grads(model, 0, "randn")
            if rank == 1:
                params["p0"].grad = None  # p0 is split across ranks: rank 1 has rows 5..8
            opt.step()
            after = {n: p.to_local().detach().clone() for n, p in params.items()}
            facts[key] = {
                "p0_unchanged": torch.equal(before["p0"], after["p0"]),
                "p1_changed": before["p1"].numel() == 0 or not torch.equal(before["p1"], after["p1"]),
            }
            # a second, ordinary step still lines up across ranks
            _set_fsdp2_grads(model, 1, "randn")
            opt.step()
            facts[key]["second_step_ok"] = all(torch.isfinite(p.to_local()).all().item() for p in params.values())

        model, _ = _fsdp2_model(shapes, (world,))
        opt = make_opt(opt_name, model.parameters())
        before = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
        osd = get_optimizer_state_dict(model, opt)
        facts[f"{opt_name}/init_state"] = {
            "keys": {fqn: sorted(st.keys()) for fqn, st in osd["state"].items()},
            "unchanged": all(torch.equal(before[n], p.to_local()) for n, p in model.named_parameters()),
            "grads_cleared": all(p.grad is None for p in model.parameters()),
        }
    return facts


# ---------------------------------------------------------------------------- scopes


def scope_counts(rank, world, mesh_shape=None, backend="auto"):
    """Lion with lr = 1/8, alpha = 2, gamma = 0.5, wd = 0 from zero state: the first
    update of every coordinate is lr * phi * sign(g), so phi = |delta| / lr exactly
    reveals the selection.  Returns, on every rank, the full phi maps per scope and the
    full gradients' scores, for the test to count."""
    mesh_shape = mesh_shape or (world,)
    shapes_a = [(9, 5), (3, 4), (1, 7), (6,)]
    shapes_b = [(5, 3), (2,)]
    lr = 0.125
    out = {"lr": lr, "world": world}
    for scope in ("tensor", "shard", "global", "global_approx"):
        model, full = _fsdp2_model(shapes_a + shapes_b, mesh_shape)
        params = list(model.parameters())
        na = len(shapes_a)
        opt = make_opt(
            "MGUPLion",
            [dict(params=params[:na]), dict(params=params[na:])],
            lr=lr, weight_decay=0.0, alpha=2.0, gamma=0.5, mask_ratio=0.5, scope=scope, backend=backend,
        )
        before_local = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
        _set_fsdp2_grads(model, 0, "randn")
        opt.step()
        phis = {}
        for n, p in model.named_parameters():
            phis[n] = (full[n] - p.full_tensor().detach()).abs() / lr
        out[scope] = phis
        # this rank's own pieces: their phi, straight from the local tensors
        out[scope + "_local"] = {
            n: ((before_local[n] - p.to_local().detach()).abs() / lr).reshape(-1) for n, p in model.named_parameters()
        }
    out["scores"] = {n: full_grad(n, full[n].shape, 0, "randn").abs() for n in full}
    out["groups"] = [[f"p{i}" for i in range(len(shapes_a))], [f"p{len(shapes_a) + i}" for i in range(len(shapes_b))]]
    return pack(out)


# ---------------------------------------------------------------------------- FSDP1


class Root(nn.Module):
    """Two wrapped children plus a root parameter: three FlatParameters, tensors that
    straddle the rank boundary, and ranks with empty pieces of some tensors."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = Bag([(7, 5), (5,), (1, 3)], seed + 1)
        self.b = Bag([(4, 9), (3, 2), (2,)], seed + 2)
        self.r = nn.Parameter(torch.randn(3, 3))


def _fsdp1_model(use_orig_params: bool):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    root = Root()
    full = {n: p.detach().clone() for n, p in root.named_parameters()}
    modname = {m: n for n, m in root.named_modules()}
    fsdp = FSDP(
        root,
        auto_wrap_policy=ModuleWrapPolicy({Bag}),
        use_orig_params=use_orig_params,
        device_id=torch.device("cpu"),
    )
    return fsdp, full, modname


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


def _fsdp1_handle_names(h, modname) -> List[str]:
    out = []
    for param_name, module, _ in h.flat_param._param_infos:
        prefix = modname[module]
        out.append(f"{prefix}.{param_name}" if prefix else param_name)
    return out


def _set_fsdp1_grads(fsdp, modname, step, kind, use_orig_params):
    """Give each rank its piece of the full gradients through torch's own code."""
    from torch.distributed.fsdp._flat_param import FlatParamHandle
    from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

    for h in _get_fsdp_handles(fsdp):
        fp = h.flat_param
        names = _fsdp1_handle_names(h, modname)
        grads = [full_grad(n, s, step, kind) for n, s in zip(names, fp._shapes)]
        if not use_orig_params:
            flat = h.flatten_tensors(grads, h._aligned_numel)
            shard, _ = FlatParamHandle._get_shard(flat, h.rank, h.world_size)
            fp.grad = shard
        else:
            for p, g, info in zip(fp._params, grads, fp._shard_param_infos):
                if info.in_shard:
                    p.grad = g.flatten()[info.intra_param_start_idx:info.intra_param_end_idx + 1].clone()
                else:
                    p.grad = None  # what FSDP itself leaves on a rank holding none of p


def _fsdp1_full_params(fsdp) -> Dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(fsdp):
        return {_clean(n): p.detach().clone() for n, p in fsdp.named_parameters()}


def fsdp1_equivalence(rank, world, use_orig_params, cases, steps=3, attach=True):
    """cases: list of (key, opt_name, opt_kw, grad_kind).  Returns
    {key: {name: max abs diff vs single process}} plus layout facts.  ``attach=False``:
    the user forgot ``attach_fsdp1_layouts``; a case whose step refuses gives the error text."""
    from mgup_dist.integrations.fsdp import attach_fsdp1_layouts, fsdp1_muon_param_groups

    out = {"_attached": 0} if not attach else {}
    for key, opt_name, opt_kw, kind in cases:
        fsdp, full, modname = _fsdp1_model(use_orig_params)
        if opt_name == "MGUPMuon" and not use_orig_params:
            # one FlatParameter mixes matrices and vectors: refused, not silently AdamW
            opt = make_opt(opt_name, fsdp.parameters(), **opt_kw)
            try:
                if attach:
                    attach_fsdp1_layouts(opt, fsdp)
                else:
                    _set_fsdp1_grads(fsdp, modname, 0, kind, use_orig_params)
                    opt.step()
                out[key] = "accepted"
            except ValueError as e:
                out[key] = f"ValueError: {e}"
            continue
        params = fsdp1_muon_param_groups(fsdp) if opt_name == "MGUPMuon" else fsdp.parameters()
        opt = make_opt(opt_name, params, **opt_kw)
        if attach:
            out.setdefault("_attached", attach_fsdp1_layouts(opt, fsdp))
        else:
            _fsdp1_full_params(fsdp)  # FSDP's lazy init, as a training loop's first forward runs it
        try:
            for step in range(steps):
                _set_fsdp1_grads(fsdp, modname, step, kind, use_orig_params)
                opt.step()
        except ValueError as e:
            if attach:
                raise
            out[key] = f"ValueError: {e}"
            continue
        got = _fsdp1_full_params(fsdp)
        names = list(full)
        ref = _reference(names, [full[n] for n in names], opt_name, steps, kind, opt_kw)
        out[key] = {n: _maxdiff(got[n], ref[n]) for n in names}
        out[key]["_moved"] = max(_maxdiff(got[n], full[n]) for n in names)
    return out


# ---------------------------------------------------------------------------- DDP


def ddp_equivalence(rank, world, cases, steps=3):
    """DDP with identical data on every rank (the averaged gradient is then bitwise the
    local one for world 2) vs a plain model in the same process."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for key, opt_name, opt_kw in cases:
        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

        ref, model = build(), build()
        ddp = DDP(model)
        opt = make_opt(opt_name, ddp.parameters(), **opt_kw)
        ropt = make_opt(opt_name, ref.parameters(), **opt_kw)
        for step in range(steps):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)
            nn.functional.mse_loss(ddp(x), y).backward()
            nn.functional.mse_loss(ref(x), y).backward()
            opt.step()
            ropt.step()
            opt.zero_grad()
            ropt.zero_grad()
        diffs = {n: _maxdiff(p, q) for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters())}
        layouts = [opt.layout_of(p) for p in model.parameters()]
        # replicas stay identical across ranks
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        lo, hi = flat.clone(), flat.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        out[key] = {
            "diffs": diffs,
            "whole": all(l.covers_whole_buffer and not l.collective for l in layouts),
            "replicas_equal": torch.equal(lo, hi),
        }
    return out


# ---------------------------------------------------------------------------- DCP


def _state_snapshot(opt, names_of) -> Dict[str, Dict[str, torch.Tensor]]:
    """Local optimizer state, keyed by parameter name, cloned (DTensor -> its local)."""
    from torch.distributed.tensor import DTensor

    snap = {}
    for p, st in opt.state.items():
        snap[names_of[p]] = {
            k: (v.to_local() if isinstance(v, DTensor) else v).detach().clone() if torch.is_tensor(v) else v
            for k, v in st.items()
        }
    return snap


def _full_state(opt, names_of) -> Dict[str, Dict[str, torch.Tensor]]:
    from torch.distributed.tensor import DTensor

    out = {}
    for p, st in opt.state.items():
        out[names_of[p]] = {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in st.items()
            if torch.is_tensor(v)
        }
    return out


def _states_equal(a, b) -> List[str]:
    """Names of the (param, key) entries that differ bitwise."""
    bad = []
    if set(a) != set(b):
        return [f"params {sorted(set(a) ^ set(b))}"]
    for n in a:
        if set(a[n]) != set(b[n]):
            bad.append(f"{n}: keys {sorted(a[n])} vs {sorted(b[n])}")
            continue
        for k in a[n]:
            x, y = a[n][k], b[n][k]
            if torch.is_tensor(x):
                if not (torch.is_tensor(y) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)):
                    bad.append(f"{n}.{k}")
            elif x != y:
                bad.append(f"{n}.{k}")
    return bad


DCP_SHAPES = [(9, 5), (3, 4), (1, 7), (6,)]


def _plain_grads(model, step):
    for n, p in model.named_parameters():
        p.grad = full_grad(n, p.shape, step)


def dcp_fsdp2_roundtrip(rank, world, ckpt_root, opt_names, steps=2):
    """Save after ``steps`` steps, load into a fresh FSDP2 model + optimizer: bitwise equal
    state, and one more step gives bitwise equal params.  Returns per optimizer the
    mismatches, plus (rank 0) the full states and the params after the extra step for
    the reshard test."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    out = {}
    for opt_name in opt_names:
        ckpt = f"{ckpt_root}/{opt_name}"
        model, _ = _fsdp2_model(DCP_SHAPES, (world,))
        opt = make_opt(opt_name, model.parameters())
        names_of = {p: n for n, p in model.named_parameters()}
        for step in range(steps):
            _set_fsdp2_grads(model, step, "randn")
            opt.step()
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=ckpt)
        saved_full = _full_state(opt, names_of)
        saved_local = _state_snapshot(opt, names_of)

        model2, _ = _fsdp2_model(DCP_SHAPES, (world,), seed=123)  # different params before load
        opt2 = make_opt(opt_name, model2.parameters())
        names_of2 = {p: n for n, p in model2.named_parameters()}
        sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(sd, checkpoint_id=ckpt)
        set_model_state_dict(model2, sd["model"])
        set_optimizer_state_dict(model2, opt2, sd["optim"])
        bad = _states_equal(saved_local, _state_snapshot(opt2, names_of2))
        # one more step on both
        _set_fsdp2_grads(model, steps, "randn")
        _set_fsdp2_grads(model2, steps, "randn")
        opt.step()
        opt2.step()
        p1 = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        p2 = {n: p.full_tensor().detach() for n, p in model2.named_parameters()}
        bad += [f"param {n} after step" for n in p1 if not torch.equal(p1[n], p2[n])]
        out[opt_name] = {"bad": bad, "full_state": saved_full if rank == 0 else None,
                         "next_params": p1 if rank == 0 else None}
    return pack(out)


def dcp_plain_load(rank, world, ckpt_root, opt_names, steps=2):
    """Load a checkpoint written at another world size into a plain (unsharded) model on
    one process, and take the same next step.  Returns per optimizer the loaded full
    state and the params after that step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    out = {}
    for opt_name in opt_names:
        model = Bag(DCP_SHAPES, seed=123)
        opt = make_opt(opt_name, model.parameters())
        names_of = {p: n for n, p in model.named_parameters()}
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=f"{ckpt_root}/{opt_name}")
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        state = _full_state(opt, names_of)
        _plain_grads(model, steps)
        opt.step()
        out[opt_name] = {"full_state": state, "next_params": {n: p.detach().clone() for n, p in model.named_parameters()}}
    return pack(out)


def dcp_plain_save(rank, world, ckpt_root, opt_names, steps=2):
    """Train a plain model on one process and save it: the source of a 1 -> N reshard."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = {}
    for opt_name in opt_names:
        model = Bag(DCP_SHAPES, seed=0)
        opt = make_opt(opt_name, model.parameters())
        names_of = {p: n for n, p in model.named_parameters()}
        for step in range(steps):
            _plain_grads(model, step)
            opt.step()
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=f"{ckpt_root}/{opt_name}")
        full = _full_state(opt, names_of)
        _plain_grads(model, steps)
        opt.step()
        out[opt_name] = {"full_state": full, "next_params": {n: p.detach().clone() for n, p in model.named_parameters()}}
    return pack(out)


def dcp_fsdp2_load(rank, world, ckpt_root, opt_names, steps=2):
    """Load a checkpoint (written at another world size) into FSDP2 at ``world`` ranks;
    returns the loaded full state and the full params after the same next step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    out = {}
    for opt_name in opt_names:
        model, _ = _fsdp2_model(DCP_SHAPES, (world,), seed=123)
        opt = make_opt(opt_name, model.parameters())
        names_of = {p: n for n, p in model.named_parameters()}
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=f"{ckpt_root}/{opt_name}")
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        state = _full_state(opt, names_of)
        _set_fsdp2_grads(model, steps, "randn")
        opt.step()
        nxt = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        out[opt_name] = {"full_state": state if rank == 0 else None, "next_params": nxt if rank == 0 else None}
    return pack(out)


def _fsdp1_opt_params(fsdp, opt_name):
    from mgup_dist.integrations.fsdp import fsdp1_muon_param_groups

    return fsdp1_muon_param_groups(fsdp) if opt_name == "MGUPMuon" else fsdp.parameters()


def dcp_fsdp1_both(rank, world, ckpt_root, opt_names_flat, opt_names_orig):
    """Both use_orig_params settings in one spawn."""
    return {
        False: dcp_fsdp1_roundtrip(rank, world, ckpt_root, False, opt_names_flat),
        True: dcp_fsdp1_roundtrip(rank, world, ckpt_root, True, opt_names_orig),
    }


def dcp_fsdp1_roundtrip(rank, world, ckpt_root, use_orig_params, opt_names, steps=2):
    """FSDP1 save / load into a fresh wrapped model: bitwise equal local state, and one
    more step gives bitwise equal full params."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from mgup_dist.integrations.fsdp import attach_fsdp1_layouts

    out = {}
    for opt_name in opt_names:
        ckpt = f"{ckpt_root}/fsdp1_{int(use_orig_params)}_{opt_name}"
        fsdp, _, modname = _fsdp1_model(use_orig_params)
        opt = make_opt(opt_name, _fsdp1_opt_params(fsdp, opt_name))
        attach_fsdp1_layouts(opt, fsdp)
        names_of = {p: n for n, p in fsdp.named_parameters()}
        for step in range(steps):
            _set_fsdp1_grads(fsdp, modname, step, "randn", use_orig_params)
            opt.step()
        dcp.save({"model": get_model_state_dict(fsdp), "optim": get_optimizer_state_dict(fsdp, opt)},
                 checkpoint_id=ckpt)
        saved = _state_snapshot(opt, names_of)

        torch.manual_seed(7)
        fsdp2, _, modname2 = _fsdp1_model(use_orig_params)
        with torch.no_grad():  # different params before the load
            for p in fsdp2.parameters():
                p.add_(1.0)
        opt2 = make_opt(opt_name, _fsdp1_opt_params(fsdp2, opt_name))
        attach_fsdp1_layouts(opt2, fsdp2)
        names_of2 = {p: n for n, p in fsdp2.named_parameters()}
        sd = {"model": get_model_state_dict(fsdp2), "optim": get_optimizer_state_dict(fsdp2, opt2)}
        # torch 2.13 quirk, not MGUP's: under FSDP1's sharded state dict a rank that
        # holds no piece of a tensor omits its key, which the default planner takes for a
        # pre-2.4 checkpoint and fails ("Missing key ... optim.param_groups"), with
        # torch.optim.AdamW too.  allow_partial_load skips that heuristic; the bitwise
        # state comparison below still proves that everything was loaded.
        dcp.load(sd, checkpoint_id=ckpt, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        set_model_state_dict(fsdp2, sd["model"])
        set_optimizer_state_dict(fsdp2, opt2, sd["optim"])
        bad = _states_equal(saved, _state_snapshot(opt2, names_of2))
        _set_fsdp1_grads(fsdp, modname, steps, "randn", use_orig_params)
        _set_fsdp1_grads(fsdp2, modname2, steps, "randn", use_orig_params)
        opt.step()
        opt2.step()
        f1, f2 = _fsdp1_full_params(fsdp), _fsdp1_full_params(fsdp2)
        bad += [f"param {n} after step" for n in f1 if not torch.equal(f1[n], f2[n])]
        out[opt_name] = bad
    return out


# ---------------------------------------------------------------------------- layouts


def layout_facts(rank, world):
    """Layout builders on real FSDP2 / HSDP / FSDP1 objects, without any optimizer.

    For every rank: the local data equals the full tensor's flat range each segment
    names; collective lists are identical on all ranks; and over all ranks every
    element of every tensor is covered exactly once (per replica)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from mgup_dist.integrations.fsdp import dtensor_layout, fsdp1_layouts

    facts = {"errors": []}
    err = facts["errors"]

    # --- FSDP2 (1-D mesh, and HSDP when world == 4)
    shapes = [(9, 5), (4 * world + 1, 3), (3, 4), (1, 7), (world, 2), (6,), (2, 3, 4)]
    meshes = [(world,)] + ([(2, 2)] if world == 4 else [])
    cover = {}
    for mesh_shape in meshes:
        model = Bag(shapes)
        full = {n: p.detach().clone() for n, p in model.named_parameters()}
        fully_shard(model, mesh=_mesh(mesh_shape))
        colls = []
        for j, (n, p) in enumerate(model.named_parameters()):
            lay = dtensor_layout(p, j)
            local = p.to_local().reshape(-1)
            if lay.numel != local.numel():
                err.append(f"{mesh_shape} {n}: numel {lay.numel} vs local {local.numel()}")
            lshape, goff = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            if math.prod(lshape) != lay.numel:
                err.append(f"{mesh_shape} {n}: torch local shape {lshape} vs layout numel {lay.numel}")
            for s in lay.segments:
                if lay.numel and s.global_start != goff[0] * math.prod(p.shape[1:]):
                    err.append(f"{mesh_shape} {n}: global_start {s.global_start} vs torch offset {goff}")
                want = full[n].reshape(-1)[s.global_start:s.global_start + s.length]
                if not torch.equal(local[s.local_start:s.local_start + s.length], want):
                    err.append(f"{mesh_shape} {n}: data mismatch")
                if s.global_shape != tuple(p.shape):
                    err.append(f"{mesh_shape} {n}: global_shape {s.global_shape}")
            grp = lay.group
            if lay.collective and grp is None:
                err.append(f"{mesh_shape} {n}: split but no group")
            if grp is not None and dist.get_world_size(grp) != mesh_shape[-1]:
                err.append(f"{mesh_shape} {n}: group size {dist.get_world_size(grp)} != shard dim {mesh_shape[-1]}")
            colls.append(lay.collective)
            cover[(mesh_shape, n)] = [(s.global_start, s.length) for s in lay.segments]
        facts[f"fsdp2{mesh_shape}_collective"] = colls
    # Replicate-only DTensor: whole
    t = distribute_tensor(torch.arange(12.0).reshape(3, 4), _mesh((world,)), [Shard(0)]).redistribute(
        _mesh((world,)), [__import__("torch.distributed.tensor", fromlist=["Replicate"]).Replicate()])
    lay = dtensor_layout(t, 0)
    facts["replicate_whole"] = lay.covers_whole_buffer and not lay.collective
    # Shard(1) is refused with a ValueError
    try:
        dtensor_layout(distribute_tensor(torch.zeros(4, 6), _mesh((world,)), [Shard(1)]), 0)
        facts["shard1_refused"] = False
    except ValueError as e:
        facts["shard1_refused"] = "Shard(0)" in str(e)
    facts["fsdp2_cover"] = cover

    # --- FSDP1, both use_orig_params
    for use_orig in (False, True):
        fsdp, full, modname = _fsdp1_model(use_orig)
        params = list(fsdp.parameters())
        opt = torch.optim.SGD(params, lr=0.0)  # only its param_groups are read
        lays = fsdp1_layouts(opt, fsdp)
        from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

        handles = _get_fsdp_handles(fsdp)
        # name of every tensor id, for the coverage check
        if use_orig:
            id_name = {j: _clean(n) for j, (n, _) in enumerate(fsdp.named_parameters())}
        else:
            pos = {id(p): j for j, p in enumerate(params)}
            id_name = {}
            for h in handles:
                for i, n in enumerate(_fsdp1_handle_names(h, modname)):
                    id_name[(pos[id(h.flat_param)], i)] = n
        cov = []
        colls = []
        for p in params:
            lay = lays[p]
            local = p.detach().reshape(-1)
            if lay.numel != local.numel():
                err.append(f"fsdp1 {use_orig}: numel {lay.numel} vs {local.numel()}")
            for s in lay.segments:
                n = id_name[s.tensor_id]
                want = full[n].reshape(-1)[s.global_start:s.global_start + s.length]
                if not torch.equal(local[s.local_start:s.local_start + s.length], want):
                    err.append(f"fsdp1 {use_orig} {n}: data mismatch")
                if s.global_numel != full[n].numel() or s.global_shape != tuple(full[n].shape):
                    err.append(f"fsdp1 {use_orig} {n}: global numel/shape")
                cov.append((n, s.global_start, s.length))
            # padding: everything outside segments is zero in a freshly built flat param
            covered = torch.zeros(local.numel(), dtype=torch.bool)
            for s in lay.segments:
                covered[s.local_start:s.local_start + s.length] = True
            if local[~covered].abs().sum() != 0:
                err.append(f"fsdp1 {use_orig}: non-zero element outside segments")
            colls.append([(id_name[t], numel) for t, numel in lay.collective])
        facts[f"fsdp1_{use_orig}_cover"] = cov
        facts[f"fsdp1_{use_orig}_collective"] = colls
        facts[f"fsdp1_{use_orig}_numels"] = {n: t.numel() for n, t in full.items()}
        facts[f"fsdp1_{use_orig}_n_split_pieces"] = sum(
            1 for p in params for s in lays[p].segments if s.is_split)
    return facts


def dtensor_placements(rank, world):
    """MGUPAdamW stepping DTensors of placements other than FSDP2's Shard(0): Replicate is
    whole on every rank (the same step as a plain tensor, bit for bit); Partial and
    _StridedShard (FSDP2 over tensor parallelism) are refused at the first step by name.
    Returns {placement: max abs diff vs a plain tensor, or the error text}."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    import mgup_dist

    mesh = _mesh((world,))
    full = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    grad = full_grad("dt", (8, 6), 0)
    out = {}
    for name, placement in (("replicate", Replicate()), ("partial", Partial()),
                            ("strided_shard", _StridedShard(0, split_factor=2))):
        if name == "partial":
            p = torch.nn.Parameter(DTensor.from_local(full.clone(), mesh, [placement]))
            p.grad = DTensor.from_local(grad.clone(), mesh, [placement])
        else:
            p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [placement]))
            p.grad = distribute_tensor(grad.clone(), mesh, [placement])
        opt = mgup_dist.MGUPAdamW([p], lr=1e-2)
        try:
            opt.step()
        except ValueError as e:
            out[name] = f"ValueError: {e}"
            continue
        ref = torch.nn.Parameter(full.clone())
        ref.grad = grad.clone()
        mgup_dist.MGUPAdamW([ref], lr=1e-2).step()
        out[name] = _maxdiff(p.full_tensor(), ref)
    return out
