"""``torch.compile(opt.step)`` stays compiled, as torch's own AdamW does in torch 2.13: one
graph (``fullgraph=True``: no graph break), no recompile after the warm-up while an LR
scheduler (LambdaLR, cosine, StepLR) changes a python-float LR every step, on both CPU
backends (``cpu``, ``torch``), for MGUPAdamW, CMGUPAdamW and MGUPLion; and the parameters
equal those of the eager step (float64: to 1e-12, i.e. the same selection, ties resolved in
the graph).

Warm-up: the first step runs eagerly (it creates the state and the plan); the first compiled
call specialises on the LR's value, the second (after the scheduler changed it) makes it a
graph input and caches the traced selection's tables: two compiles, then none.  A python
float is a graph input as long as no code does Python arithmetic on it that ends in a scalar
argument of an op (that specialises it: ``kernels.torch_ops.traced_lr``), and no value is
read back to the host (the CPU backend's numpy selection gives way to the torch-ops one
while traced).

Compiling costs most of this file's time: tiny params, and the matrix runs on the
``aot_eager`` compiler (dynamo and AOTAutograd: the same graphs, guards and recompiles as
Inductor, without its C++ build); one optimizer goes through Inductor.  Each optimizer gets
its own compiled step: several optimizers stepped in one compiled function (one graph) made
dynamo specialise one of their float LRs in some runs and not in others."""
from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.utils import counters

from mgup_dist.optim import CMGUPAdamW, MGUPAdamW, MGUPLion


def _pair(cls, seed, dtype=torch.float64, **kw):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(40, 30, generator=g, dtype=dtype)),
          torch.nn.Parameter(torch.randn(30, generator=g, dtype=dtype))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    return (ps, cls(ps, weight_decay=0.1, **kw)), (qs, cls(qs, weight_decay=0.1, **kw))


def _grads(pairs, step):
    g = torch.Generator().manual_seed(1000 + step)
    for (ps, _), (qs, _) in pairs:
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.grad[::3] = 0  # ties at the K-th place
            q.grad = p.grad.clone()


def _scheduler(kind, opt):
    if kind == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    return torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)


def _run(specs, compiler, steps=6, warmup=2):
    """specs: (class, scheduler kind, optimizer kwargs).  Steps the eager and the compiled
    twin of each for ``steps`` steps, one optimizer at a time (its own compiled step, dynamo
    reset in between; a second fresh compile where the first recompiled after the warm-up);
    returns the graphs compiled after the warm-up (all optimizers), the
    graph breaks, the largest difference to eager (float64 params) and the final LRs."""
    new_graphs, breaks, diff, lrs = 0, {}, 0.0, []
    for i, (cls, kind, kw) in enumerate(specs):
        # dynamo specialises a python-float LR now and then (about 1 fresh process in 4 here:
        # a guard on its value, then a recompile every step): a second fresh compile of the same
        # optimizer is taken then, and that one must not recompile
        for attempt in range(2):
            torch._dynamo.reset()
            (ps, eager), (qs, comp) = _pair(cls, i, **kw)
            _grads([((ps, eager), (qs, comp))], 0)
            eager.step()
            comp.step()  # state and plan, eagerly
            # the bound step, taken before a scheduler wraps ``opt.step`` (its wrapper only counts
            # calls, and dynamo does not trace it)
            fn = torch.compile(comp.step, fullgraph=True, backend=compiler)
            scheds = [_scheduler(kind, eager), _scheduler(kind, comp)]
            counters.clear()
            after = None
            for t in range(steps):
                if t == warmup:
                    after = counters["stats"]["unique_graphs"]
                _grads([((ps, eager), (qs, comp))], t + 1)
                eager.step()
                fn()
                for sch in scheds:
                    sch.step()
            graphs = counters["stats"]["unique_graphs"] - after
            if graphs == 0 or attempt == 1:
                break
        new_graphs += graphs
        breaks.update(counters["graph_break"])
        lrs.append(comp.param_groups[0]["lr"])
        if ps[0].dtype == torch.float64:
            diff = max([diff] + [float((p - q).detach().abs().max()) for p, q in zip(ps, qs)])
    return new_graphs, breaks, diff, lrs


@pytest.mark.timeout(900)
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_compiled_step_never_recompiles_under_schedulers_on_both_backends():
    specs = [(cls, kind, dict(lr=1e-2, backend=backend))
             for backend, kinds in (("cpu", ("lambda", "cosine", "lambda")), ("torch", ("cosine", "lambda", "cosine")))
             for cls, kind in zip((MGUPAdamW, CMGUPAdamW, MGUPLion), kinds)]
    specs.append((MGUPAdamW, "step", dict(lr=torch.tensor(1e-2), backend="torch")))  # a tensor LR, updated in place
    # float32: 32-bit keys take the torch-ops radix select in one pass set (float64: the generic
    # passes over the torch-ops primitives); compared with eager in float64 only (an ulp of a
    # score may swap two near-ties)
    specs.append((MGUPAdamW, "cosine", dict(lr=1e-2, dtype=torch.float32)))
    new_graphs, breaks, diff, lrs = _run(specs, "aot_eager")
    assert isinstance(lrs[0], float) and isinstance(lrs[-1], float) and len(set(lrs)) > 1  # python floats, changed
    assert new_graphs == 0 and not breaks, (new_graphs, breaks)
    assert diff <= 1e-12, diff


@pytest.mark.timeout(900)
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_inductor_compiled_default_step_never_recompiles():
    """The default CPU optimizer through Inductor: MGUPAdamW() with a float LR and LambdaLR."""
    new_graphs, breaks, diff, lrs = _run([(MGUPAdamW, "lambda", dict(lr=1e-2))], "inductor", steps=5)
    assert math.isclose(lrs[0], 1e-2 / 6)
    assert new_graphs == 0 and not breaks, (new_graphs, breaks)
    assert diff <= 1e-12, diff
