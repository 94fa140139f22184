"""Layout builders of mgup_dist.integrations.fsdp, without any MGUP optimizer.

Local unit tests of the chunking arithmetic, then real FSDP2 / HSDP / FSDP1 objects on
2 and 4 gloo ranks: every segment names the flat range whose data the rank really
holds, ``collective`` is identical on every rank and lists exactly the tensors held by
more than one rank, and the pieces of all ranks cover each tensor exactly once.
"""
from __future__ import annotations

import collections

import _fsdp_workers as W
import pytest
import torch
from dist_utils import run_distributed

from mgup_dist.integrations.fsdp import _holders, chunk_rows
from mgup_dist.layout import whole_layout


@pytest.mark.parametrize("dim0", [0, 1, 2, 3, 4, 5, 8, 9, 13, 17])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_chunk_rows_matches_torch_chunk(dim0, world):
    chunks = torch.arange(dim0).chunk(world) if dim0 else ()
    nonempty = 0
    for r in range(world):
        a, b = chunk_rows(dim0, world, r)
        want = chunks[r].tolist() if r < len(chunks) else []
        assert list(range(a, b)) == want, (dim0, world, r)
        nonempty += b > a
    assert _holders(dim0, world) == nonempty


def test_chunk_rows_rejects_bad_coord():
    with pytest.raises(ValueError, match="coord"):
        chunk_rows(4, 2, 2)


def test_whole_layout_ddp():
    t = torch.zeros(3, 4)
    lay = whole_layout(t, 7)
    assert lay.covers_whole_buffer and not lay.collective and not lay.has_split
    assert lay.segments[0].global_shape == (3, 4)
    assert whole_layout(torch.zeros(0), 1).segments == ()


def _expected_fsdp2_collective(shapes, shard_world):
    out = []
    for j, s in enumerate(shapes):
        n = 1
        for d in s:
            n *= d
        split = len(torch.empty(s[0]).chunk(shard_world)) > 1
        out.append(((j, n),) if split else ())
    return out


def _check(results, world):
    for r, facts in enumerate(results):
        assert facts["errors"] == [], f"rank {r}: {facts['errors']}"
        assert facts["replicate_whole"], r
        assert facts["shard1_refused"], r
    shapes = [(9, 5), (4 * world + 1, 3), (3, 4), (1, 7), (world, 2), (6,), (2, 3, 4)]
    meshes = [(world,)] + ([(2, 2)] if world == 4 else [])
    for mesh_shape in meshes:
        key = f"fsdp2{mesh_shape}_collective"
        colls = [facts[key] for facts in results]
        assert all(c == colls[0] for c in colls), f"{key} differs across ranks"
        assert [tuple(c) for c in colls[0]] == _expected_fsdp2_collective(shapes, mesh_shape[-1])
        # coverage, per replica (HSDP: ranks 0,1 and 2,3 are the two replicas)
        replicas = [list(range(world))] if len(mesh_shape) == 1 else [[0, 1], [2, 3]]
        for j, s in enumerate(shapes):
            n = 1
            for d in s:
                n *= d
            for ranks in replicas:
                hits = torch.zeros(n, dtype=torch.int64)
                for r in ranks:
                    for start, length in results[r]["fsdp2_cover"][(mesh_shape, f"p{j}")]:
                        hits[start:start + length] += 1
                assert torch.all(hits == 1), (mesh_shape, s, ranks, hits)
    for use_orig in (False, True):
        numels = results[0][f"fsdp1_{use_orig}_numels"]
        hits = {n: torch.zeros(k, dtype=torch.int64) for n, k in numels.items()}
        holders = collections.defaultdict(set)
        for r, facts in enumerate(results):
            for n, start, length in facts[f"fsdp1_{use_orig}_cover"]:
                hits[n][start:start + length] += 1
                if length:
                    holders[n].add(r)
        for n, h in hits.items():
            assert torch.all(h == 1), (use_orig, n, h)
        colls = [facts[f"fsdp1_{use_orig}_collective"] for facts in results]
        assert all(c == colls[0] for c in colls), f"FSDP1 use_orig_params={use_orig}: collective differs across ranks"
        listed = {n for per_param in colls[0] for n, _ in per_param}
        assert listed == {n for n, rs in holders.items() if len(rs) > 1}, (use_orig, listed, dict(holders))
        assert listed, "the test model should have tensors split across ranks"
        assert sum(f[f"fsdp1_{use_orig}_n_split_pieces"] for f in results) >= 2


@pytest.mark.timeout(120)
def test_layouts_world2():
    _check(run_distributed(W.layout_facts, 2, timeout=100), 2)


@pytest.mark.timeout(150)
def test_layouts_world4_hsdp():
    _check(run_distributed(W.layout_facts, 4, timeout=130), 4)
