"""MGUP under FSDP1 (``FullyShardedDataParallel``) with layouts from
``attach_fsdp1_layouts``, on real gloo ranks, both ``use_orig_params`` settings.

The model has three FlatParameters (two auto-wrapped children and the root), tensors
that straddle the rank boundary of a flat shard, ranks holding none of some tensors
(their gradient is None, as FSDP leaves it) and, with ``use_orig_params=True``,
alignment padding between tensors.  With identical gradients the sharded run must
equal a single-process run bit for bit.
"""
from __future__ import annotations

import _fsdp_workers as W
import pytest
from dist_utils import run_distributed

OPTS = ("MGUPAdamW", "MGUPLion", "MGUPMuon")
MODES = ("topk", "cautious")


def _cases():
    cases = [(f"{o}/{m}", o, {"mode": m}, "randn") for o in OPTS for m in MODES]
    cases.append(("MGUPAdamW/topk/tied", "MGUPAdamW", {"mode": "topk"}, "tied"))
    return cases


def _check(results, use_orig_params):
    for r, res in enumerate(results):
        assert res.pop("_attached") > 0
        for key, diffs in res.items():
            if key.startswith("MGUPMuon") and not use_orig_params:
                # a FlatParameter mixes matrices and vectors: refused loudly rather than
                # silently running AdamW on every matrix
                assert diffs.startswith("ValueError") and "use_orig_params=True" in diffs, (r, key, diffs)
                continue
            moved = diffs.pop("_moved")
            bad = {n: d for n, d in diffs.items() if d != 0.0}
            assert not bad, f"rank {r} use_orig_params={use_orig_params} case {key}: diff vs single device {bad}"
            assert moved > 0, key


@pytest.mark.timeout(300)
@pytest.mark.parametrize("use_orig_params", [False, True], ids=["flat", "orig_params"])
def test_fsdp1_equals_single_device_world2(use_orig_params):
    _check(run_distributed(W.fsdp1_equivalence, 2, use_orig_params, _cases(), 3, timeout=280), use_orig_params)


@pytest.mark.timeout(400)
def test_fsdp1_equals_single_device_world4():
    # 4 ranks: more tensors split, more ranks with empty pieces
    cases = [("MGUPAdamW/topk", "MGUPAdamW", {"mode": "topk"}, "randn"),
             ("MGUPMuon/topk", "MGUPMuon", {"mode": "topk"}, "randn"),
             ("MGUPLion/topk/tied", "MGUPLion", {"mode": "topk"}, "tied")]
    _check(run_distributed(W.fsdp1_equivalence, 4, True, cases, 3, timeout=380), True)


@pytest.mark.timeout(600)
def test_fsdp1_without_attach_learns_or_refuses():
    """A user who forgets attach_fsdp1_layouts: the optimizer holding FlatParameters learns
    their layouts from the FlatParameter (same result as with attach, bit for bit); one
    holding the original parameters (use_orig_params=True) refuses at the first step with a
    line naming attach_fsdp1_layouts.  Never a per-buffer top-K in place of per-tensor."""
    cases = [("MGUPAdamW/topk", "MGUPAdamW", {"mode": "topk"}, "randn"),
             ("MGUPLion/topk/tied", "MGUPLion", {"mode": "topk"}, "tied"),
             ("MGUPMuon/topk", "MGUPMuon", {"mode": "topk"}, "randn")]
    for use_orig_params in (False, True):
        results = run_distributed(W.fsdp1_equivalence, 2, use_orig_params, cases, 2, False, timeout=280)
        for r, res in enumerate(results):
            res.pop("_attached")
            for key, diffs in res.items():
                if use_orig_params or key.startswith("MGUPMuon"):
                    assert isinstance(diffs, str) and diffs.startswith("ValueError"), (r, key, diffs)
                    assert "\n" not in diffs
                    want = "attach_fsdp1_layouts" if use_orig_params else "use_orig_params=True"
                    assert want in diffs, (r, key, diffs)
                    continue
                moved = diffs.pop("_moved")
                bad = {n: d for n, d in diffs.items() if d != 0.0}
                assert not bad and moved > 0, (r, key, bad)
