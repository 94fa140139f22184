"""``torch.compile(opt.step)`` of the torch-ops backend stays compiled: one graph (no graph
break: ``fullgraph=True``), no recompile over 20 steps under an LR scheduler, and the same
parameters as the eager step (float64: to 1e-12, i.e. the same selection).

The bias corrections are computed in the graph from the step counters (a python float there
would be a guard: a recompile every step), and the LR is a tensor, which schedulers update
in place (torch's recipe for compiled optimizers: a python-float LR is a constant of the
graph).  The first step creates the state and the plan eagerly; compiling from the very
first step costs two more compiles (state created, plan cached), then none."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from mgup_dist.optim import MGUPAdamW, MGUPLion


@pytest.mark.timeout(900)
@pytest.mark.parametrize("cls", [MGUPAdamW, MGUPLion], ids=["adamw", "lion"])
def test_compiled_step_has_one_graph_and_no_recompiles_under_a_scheduler(cls):
    torch._dynamo.reset()
    torch.manual_seed(0)
    dt = torch.float64
    ps = [torch.nn.Parameter(torch.randn(40, 30, dtype=dt)), torch.nn.Parameter(torch.randn(30, dtype=dt))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    eager = cls(ps, lr=torch.tensor(1e-2), backend="torch", weight_decay=0.1)
    comp = cls(qs, lr=torch.tensor(1e-2), backend="torch", weight_decay=0.1)

    def grads():
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            p.grad[::3] = 0  # ties at the K-th place
            q.grad = p.grad.clone()

    grads()
    eager.step()
    comp.step()  # state and plan, eagerly
    step = torch.compile(comp.step, fullgraph=True)
    sched = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.9) for o in (eager, comp)]
    counters.clear()
    for i in range(20):
        grads()
        eager.step()
        step()
        for s in sched:
            s.step()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"] and not counters["graph_break"], (dict(counters["recompiles"]), dict(counters["graph_break"]))
    for p, q in zip(ps, qs):
        assert (p - q).abs().max() <= 1e-12
