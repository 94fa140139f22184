"""MGUP under DDP and in a single process: every tensor whole, default layouts, no
collectives in the optimizer.  DDP (2 gloo ranks, identical data on each, so the
all-reduced mean gradient is bitwise the local one) must equal a plain model."""
from __future__ import annotations

import _fsdp_workers as W
import pytest
import torch
from dist_utils import run_distributed

import mgup_dist


@pytest.mark.timeout(200)
def test_ddp_equals_single_process():
    cases = [(f"{o}/{m}", o, {"mode": m}) for o in ("MGUPAdamW", "MGUPLion", "MGUPMuon") for m in ("topk", "cautious")]
    cases.append(("MGUPAdamW/global", "MGUPAdamW", {"scope": "global"}))
    for r, res in enumerate(run_distributed(W.ddp_equivalence, 2, cases, 3, timeout=180)):
        for key, facts in res.items():
            bad = {n: d for n, d in facts["diffs"].items() if d != 0.0}
            assert not bad, (r, key, bad)
            assert facts["whole"], (r, key, "DDP params must get whole layouts without collectives")
            assert facts["replicas_equal"], (r, key)


@pytest.mark.parametrize("name", sorted(mgup_dist.OPTIMIZERS))
def test_single_process_default_layout_is_whole(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = mgup_dist.OPTIMIZERS[name](model.parameters())
    ids = []
    for p in model.parameters():
        lay = opt.layout_of(p)
        assert lay.covers_whole_buffer and lay.collective == () and lay.group is None
        assert lay.segments[0].global_shape == tuple(p.shape)
        ids.append(lay.segments[0].tensor_id)
    assert len(set(ids)) == len(ids)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no process group here: must not try to communicate
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
