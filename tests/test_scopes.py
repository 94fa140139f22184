"""Selection scopes under FSDP2 on real gloo ranks (uneven and empty shards).

The applied scale is read off the parameter delta: MGUP-Lion from zero state with
lr = 1/8, alpha = 2, gamma = 0.5, wd = 0 moves every coordinate by exactly
lr * phi (its direction is sign(g), and gradients here have no zeros), so
phi = |delta| / lr is 2 (selected) or 0.5.  Two param groups check that "global"
ranges over one param group, not the optimizer.

* ``tensor``: exactly floor(N/2) per original tensor, and exactly the top scores.
* ``shard``: exactly floor(L/2) per local piece of L elements, on every rank.
* ``global``: exactly floor(N_group/2) per param group over all ranks, and exactly
  the top scores of the group.
* ``global_approx``: an opt-in approximation; only its count is bounded.
"""
from __future__ import annotations

import math

import _fsdp_workers as W
import pytest
import torch
from dist_utils import run_distributed


def _phi_values_ok(phi):
    alpha = (phi - 2.0).abs() < 1e-3
    gamma = (phi - 0.5).abs() < 1e-3
    assert torch.all(alpha | gamma), f"phi values outside {{2, 0.5}}: {phi[~(alpha | gamma)]}"
    return alpha


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.topk(scores.reshape(-1), k).indices] = True  # no ties in randn scores
    return mask


def _check(results):
    res0 = results[0]
    scores = res0["scores"]
    # tensor: per original tensor, exact K and exactly the top scores
    for n, phi in res0["tensor"].items():
        sel = _phi_values_ok(phi).reshape(-1)
        k = math.floor(0.5 * phi.numel())
        assert int(sel.sum()) == k, (n, int(sel.sum()), k)
        assert torch.equal(sel, _top(scores[n], k)), n
    # shard: per local piece, on every rank
    for r, res in enumerate(results):
        for n, phi in res["shard_local"].items():
            sel = _phi_values_ok(phi)
            assert int(sel.sum()) == math.floor(0.5 * phi.numel()), (r, n, int(sel.sum()), phi.numel())
    # shard differs from tensor somewhere (else the test would not tell them apart)
    assert any(not torch.equal(res0["shard"][n], res0["tensor"][n]) for n in scores)
    # global: per param group, over all ranks
    coincide = []
    for names in res0["groups"]:
        sel = torch.cat([_phi_values_ok(res0["global"][n]).reshape(-1) for n in names])
        s = torch.cat([scores[n].reshape(-1) for n in names])
        k = math.floor(0.5 * s.numel())
        assert int(sel.sum()) == k, (names, int(sel.sum()), k)
        assert torch.equal(sel, _top(s, k)), names
        per_tensor = [int(_phi_values_ok(res0["global"][n]).sum()) for n in names]
        coincide.append(per_tensor == [math.floor(0.5 * res0["global"][n].numel()) for n in names])
        # global_approx: a threshold averaged over ranks: roughly K, not exactly
        sel_a = torch.cat([_phi_values_ok(res0["global_approx"][n]).reshape(-1) for n in names])
        assert abs(int(sel_a.sum()) - k) <= 0.25 * s.numel(), (names, int(sel_a.sum()), k)
    assert not all(coincide), "global scope should differ from per-tensor K in some group here"
    # every rank saw the same full phi maps
    for res in results[1:]:
        for scope in ("tensor", "shard", "global", "global_approx"):
            for n in scores:
                assert torch.equal(res[scope][n], res0[scope][n]), (scope, n)


@pytest.mark.timeout(200)
def test_scopes_world2():
    _check(W.unpack(run_distributed(W.scope_counts, 2, timeout=180)))


@pytest.mark.timeout(300)
def test_scopes_world4_hsdp():
    _check(W.unpack(run_distributed(W.scope_counts, 4, (2, 2), timeout=280)))


@pytest.mark.timeout(180)
def test_bench_selection_smoke(capsys):
    """The selection benchmark runs end to end on tiny shapes and prints its table (no
    timing is asserted)."""
    from mgup_dist import bench_selection

    rc = bench_selection.main(["--worlds", "2", "--steps", "1", "--warmup", "0", "--layers", "1", "--hidden", "16",
                               "--inter", "24", "--vocab", "40", "--scopes", "tensor,shard,global,global_approx"])
    out = capsys.readouterr().out
    assert rc == 0
    for scope in ("tensor", "shard", "global", "global_approx"):
        assert f"| 2 | {scope} |" in out, out
    with pytest.raises(SystemExit):
        bench_selection.main(["--scopes", "bogus"])
