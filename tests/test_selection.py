"""Selection against its definition: a stable descending sort of canonical keys."""
import math

import pytest
import torch
from dist_utils import run_distributed

from mgup_dist.layout import Layout, Segment
from mgup_dist.selection import Entry, float_keys, num_selected, select_masks, topk_mask_


def reference_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    """First k of a stable descending sort; NaN lowest, -0.0 == +0.0."""
    key = torch.where(torch.isnan(s), torch.full_like(s, -math.inf), s.double())
    nan = torch.isnan(s)
    # sort by (is not NaN, value) descending, stable: NaN below -inf
    order = sorted(range(s.numel()), key=lambda i: (0 if nan[i] else 1, key[i].item()), reverse=True)
    # python's sort with reverse=True keeps stability (equal keys keep original order)
    mask = torch.zeros(s.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def score_cases():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(1000, generator=g)
    t = torch.randn(500, generator=g)
    t[::3] = 0.0
    t[1::7] = -0.0
    yield t  # many ties at zero, signed zeros
    t = torch.randint(-3, 4, (777,), generator=g).float()
    yield t  # heavy ties everywhere
    t = torch.randn(300, generator=g)
    t[::5] = float("nan")
    t[1::11] = -math.inf
    t[2::13] = math.inf
    yield t
    yield torch.full((64,), float("nan"))
    yield torch.randn(1, generator=g)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_topk_mask_matches_definition(ratio):
    for s in score_cases():
        k = num_selected(ratio, s.numel())
        out = torch.empty(s.numel(), dtype=torch.bool)
        topk_mask_(s, k, out)
        assert int(out.sum()) == k
        assert torch.equal(out, reference_mask(s, k)), (ratio, s[:20])


def test_num_selected_floor():
    assert num_selected(0.3, 10) == 3
    assert num_selected(0.5, 7) == 3
    assert num_selected(1.0, 5) == 5
    assert num_selected(0.0, 5) == 0


def test_float_keys_order():
    vals = torch.tensor([float("nan"), -math.inf, -1e30, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, math.inf])
    keys = float_keys(vals)
    assert keys[5] == keys[6]  # -0 == +0
    assert torch.all(keys[1:5] < keys[2:6])
    assert torch.all(keys[6:-1] < keys[7:])
    assert keys[0] < keys[1]  # NaN below -inf
    d = float_keys(vals.double())
    assert d.dtype == torch.int64 and d[5] == d[6] and torch.all(d[:-1] <= d[1:])


def _split_entries(s, cuts, tid=0, shuffle_order=False):
    """One tensor cut into pieces, each a separate local buffer, collective = the tensor."""
    entries, bounds = [], [0] + list(cuts) + [s.numel()]
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = Segment(tid, 0, b - a, a, s.numel())
        lay = Layout((seg,) if b > a else (), b - a, collective=((tid, s.numel()),))
        entries.append(Entry(lay, s[a:b].clone(), torch.empty(b - a, dtype=torch.bool)))
    return entries


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_select_single_process_pieces(ratio, dtype):
    """The distributed algorithm run with all pieces on one rank equals the definition."""
    for s in score_cases():
        s = s.to(dtype)
        n = s.numel()
        for cuts in ([n // 2], [n // 3, n // 3, 2 * n // 3]):
            entries = _split_entries(s, cuts)
            select_masks(entries, ratio, "tensor")
            got = torch.cat([e.mask for e in entries])
            assert torch.equal(got, reference_mask(s, num_selected(ratio, n)))


def test_global_scope_single_process():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, generator=g), torch.randint(-2, 3, (30,), generator=g).float()
    entries = [
        Entry(Layout((Segment(0, 0, 50, 0, 50),), 50), a.clone(), torch.empty(50, dtype=torch.bool)),
        Entry(Layout((Segment(1, 0, 30, 0, 30),), 30), b.clone(), torch.empty(30, dtype=torch.bool)),
    ]
    select_masks(entries, 0.4, "global")
    got = torch.cat([e.mask for e in entries])
    assert torch.equal(got, reference_mask(torch.cat([a, b]), num_selected(0.4, 80)))


def test_shard_scope_and_padding():
    s = torch.randn(20)
    lay = Layout((Segment(0, 0, 8, 0, 8), Segment(1, 10, 6, 0, 6)), 20)  # 2 pad elems, 4 at end
    e = Entry(lay, s.clone(), torch.ones(20, dtype=torch.bool))
    select_masks([e], 0.5, "shard")
    assert int(e.mask[:8].sum()) == 4 and int(e.mask[10:16].sum()) == 3
    assert not e.mask[8:10].any() and not e.mask[16:].any()


def test_bad_scope():
    with pytest.raises(ValueError, match="scope"):
        select_masks([], 0.5, "bogus")


# ---------------------------------------------------------------- real gloo ranks
def _dist_select(rank, world, n, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    full = torch.randint(-4, 5, (n,), generator=g).float()  # heavy ties: exercises the prefix count
    full[::17] = float("nan")
    full2 = torch.randn(3 * n + 1, generator=g)
    # uneven contiguous pieces like torch.chunk; the last rank may be empty
    def piece(numel):
        per = -(-numel // world)
        a = min(rank * per, numel)
        return a, min(a + per, numel)
    entries = []
    for tid, t in ((0, full), (1, full2)):
        a, b = piece(t.numel())
        seg = Segment(tid, 0, b - a, a, t.numel())
        lay = Layout((seg,) if b > a else (), b - a, collective=((tid, t.numel()),))
        entries.append(Entry(lay, t[a:b].clone(), torch.empty(b - a, dtype=torch.bool)))
    # tensor 1 has no gradient on rank 1: it must still enter the collectives
    if rank == 1:
        entries[1] = Entry(entries[1].layout, None, None)
    select_masks(entries, ratio, "tensor")
    return [e.mask if e.mask is not None else None for e in entries]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_radix_select_gloo_equals_single_device(world):
    n, ratio = 101, 0.37
    results = run_distributed(_dist_select, world, n, ratio, 3)
    g = torch.Generator().manual_seed(3)
    full = torch.randint(-4, 5, (n,), generator=g).float()
    full[::17] = float("nan")
    full2 = torch.randn(3 * n + 1, generator=g)
    got0 = torch.cat([r[0] for r in results])
    assert torch.equal(got0, reference_mask(full, num_selected(ratio, n)))
    # tensor 1: rank 1 had no grad but entered every collective (else this run would time
    # out); its pieces on the other ranks are masks of the right size.
    per = -(-full2.numel() // world)
    for r, res in enumerate(results):
        if r == 1:
            assert res[1] is None
        else:
            assert res[1].dtype == torch.bool and res[1].numel() == min(per, full2.numel() - r * per)
